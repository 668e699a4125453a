"""Host and "host:port" strings as operators write them in the config (serf.retry_join,
metrics.listen): IP addresses, [v6] brackets, RFC 1123 names. Pure parsing, no lookups."""

from __future__ import annotations

import ipaddress
import re

# RFC 1123 host name label: letters, digits and inner hyphens, at most 63 characters.
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_hostname(host: str) -> bool:
    """A DNS name per RFC 1123 (pure). An all-numeric last label is refused (RFC 3696), so a
    mistyped IPv4 address such as 10.0.0.300 is not taken for a name."""
    name = host.removesuffix(".")
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    return all(_HOST_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def is_join_address(entry: str) -> bool:
    """Whether ``entry`` is "host" or "host:port" ("[v6]:port"), host an IP address or a DNS
    name (pure)."""
    host, port = split_host_port(entry)
    if port is not None and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return ":" not in host and is_hostname(host)
    return True


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an IP address or a name) is this host's own loopback (pure)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # RFC 6761: localhost names resolve to loopback addresses.
        name = host.removesuffix(".").lower()
        return name == "localhost" or name.endswith(".localhost")


def split_host_port(entry: str) -> tuple[str, str | None]:
    """("10.0.0.1", "7951") from "10.0.0.1:7951", ("::1", None) from "::1" or "[::1]" (pure)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, port
    return entry, None
