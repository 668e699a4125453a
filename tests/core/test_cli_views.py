"""The CLI's views against the servers' own structs: whatever a server can encode, the view
that a client command decodes it with accepts, and what it prints has every string from
outside escaped (no control character reaches the terminal).

The views declare only what the CLI prints, so that a client command does not load the
servers' modules (aiohttp, pyroute2, NVML, SQLite); this is what keeps the two in step.
(`gpud status`, `members` and `doctor` decode the servers' own StatusDocument and Member.)
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpud import cli, views
from gpud.deployments.drain import DrainReply
from gpud.gpus import cli as gpus_cli
from gpud.gpus.leases import GpuLease
from gpud.gpus.service import GpusDetail
from gpud.health.service import HealthStatus
from gpud.netcheck.model import NetworkStatus
from gpud.ports import cli as ports_cli
from gpud.ports.leases import Lease
from gpud.ports.service import PortsDetail
from gpud.ray.problems import RayStatus
from gpud.serf import cli as keys_cli
from gpud.serf.keys import KeysReply

_registered: set[type] = set()


def instances(tp: type) -> st.SearchStrategy[Any]:
    """Any value of the msgspec Struct ``tp``: every field drawn from its type, defaults
    included (hypothesis would otherwise pass msgspec's default factories through)."""
    _register(tp)
    return st.from_type(tp)


def _register(tp: object) -> None:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        if tp in _registered:
            return
        _registered.add(tp)
        fields = msgspec.structs.fields(tp)
        for field in fields:
            _register(field.type)
        strategy = st.builds(tp, **{f.name: st.from_type(f.type) for f in fields})
        st.register_type_strategy(tp, strategy)
        return
    for arg in typing.get_args(tp):
        _register(arg)


def _printable(text: str) -> bool:
    return all(c.isprintable() or c == "\n" for c in text)


def _leases(view: ports_cli.PortsView) -> str:
    return ports_cli.render_leases(view.leases)


CASES: list[tuple[type, type, Callable[[Any], str] | None]] = [
    (HealthStatus, views.HealthView, views.render_health),
    (NetworkStatus, views.NetworkView, views.render_network),
    (RayStatus, views.RayView, views.render_ray),
    (GpusDetail, gpus_cli.GpusView, gpus_cli.render_gpus),
    (GpuLease, gpus_cli.GpuLeaseView, None),
    (PortsDetail, ports_cli.PortsView, _leases),
    (Lease, ports_cli.LeaseView, None),
    (KeysReply, keys_cli.KeysView, None),
    (DrainReply, cli.DrainReply, None),
]


@pytest.mark.parametrize(("server", "view", "render"), CASES, ids=[c[0].__name__ for c in CASES])
def test_views_read_whatever_the_server_sends(
    server: type, view: type, render: Callable[[Any], str] | None
) -> None:
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(instances(server))
    def check(value: Any) -> None:
        decoded = msgspec.json.decode(msgspec.json.encode(value), type=view)
        if render is not None:
            text = render(decoded)
            assert _printable(text), text

    check()
