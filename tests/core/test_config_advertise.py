"""node.advertise must be an address peers can dial: unspecified and multicast addresses are
refused, and loopback is allowed only for a one-host cluster (no remote serf.retry_join)."""

from __future__ import annotations

import pytest

from gpud import config
from gpud.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[node]\nadvertise = "0.0.0.0"', "node.advertise: 0.0.0.0 is not an address peers"),
        ('[node]\nadvertise = "::"', "node.advertise: :: is not an address peers"),
        ('[node]\nadvertise = "239.1.2.3"', "node.advertise: 239.1.2.3 is not an address"),
        (
            '[node]\nadvertise = "127.0.0.1"\n[serf]\nretry_join = ["10.0.0.2"]',
            "node.advertise: 127.0.0.1 is a loopback address, which peers such as 10.0.0.2",
        ),
        (
            '[node]\nadvertise = "127.0.0.5"\n[serf]\nretry_join = ["127.0.0.6", "10.0.0.3:7946"]',
            "peers such as 10.0.0.3:7946 (serf.retry_join) cannot reach",
        ),
    ],
)
def test_unroutable_advertise_is_refused(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(text, source="gpud.toml")
    message = str(info.value)
    assert message.startswith("gpud.toml: node.advertise") and needle in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text",
    [
        '[node]\nadvertise = "10.0.0.1"\n[serf]\nretry_join = ["10.0.0.2"]',
        '[node]\nadvertise = "127.0.0.1"',  # a one-host test cluster
        '[node]\nadvertise = "127.0.0.2"\n[serf]\nretry_join = ["127.0.0.3"]',
        '[node]\nadvertise = "auto"\n[serf]\nretry_join = ["10.0.0.2"]',
    ],
)
def test_routable_advertise_is_accepted(text: str) -> None:
    config.parse(text, source="gpud.toml")
