"""Plain data of the host-network checks: snapshots of links, addresses and routes, and the
`network` section of `gpud status`."""

from __future__ import annotations

from typing import Literal

import msgspec

from gpud.component import Problem, Severity

# rtnetlink.h: RT_SCOPE_UNIVERSE, a global address.
SCOPE_UNIVERSE = 0

ChosenBy = Literal["config", "interface", "default-route", "only-address"]


class LinkInfo(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    name: str
    mtu: int
    # Administratively up (IFF_UP).
    up: bool
    # The driver reports a carrier (IFF_LOWER_UP).
    carrier: bool
    loopback: bool = False


class AddressInfo(msgspec.Struct, frozen=True, kw_only=True):
    address: str
    prefixlen: int
    interface: str
    # rtnetlink scope: 0 global, 253 link, 254 host.
    scope: int = SCOPE_UNIVERSE


class DefaultRoute(msgspec.Struct, frozen=True, kw_only=True):
    family: Literal[4, 6]
    interface: str
    # Route metric: lower wins.
    priority: int = 0
    # The route's preferred source address, if it names one.
    src: str | None = None


class HostNetwork(msgspec.Struct, frozen=True, kw_only=True):
    """What this host's (namespace's) network looks like at one moment."""

    links: list[LinkInfo] = []
    addresses: list[AddressInfo] = []
    default_routes: list[DefaultRoute] = []

    def link(self, name: str) -> LinkInfo | None:
        return next((link for link in self.links if link.name == name), None)


class RouteInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The kernel's answer to `ip route get <peer>`."""

    peer: str
    addr: str
    interface: str = ""
    src: str | None = None
    gateway: str | None = None
    # The route's MTU if it sets one, else the interface's MTU.
    mtu: int | None = None
    # The peer's address is one of ours (another gpud node in this namespace).
    local: bool = False
    # Why the kernel has no route, e.g. "Network is unreachable".
    error: str | None = None


class Advertisement(msgspec.Struct, frozen=True, kw_only=True):
    address: str
    # Interface that holds the address; "" when no local interface does (NAT, port mapping).
    interface: str
    chosen_by: ChosenBy


class PeerRoute(msgspec.Struct, frozen=True, kw_only=True):
    peer: str
    addr: str
    iface: str
    src: str | None
    mtu: int | None
    gateway: str | None = None
    warnings: list[str] = []


class NetworkStatus(msgspec.Struct, kw_only=True):
    """The `network` section of `gpud status`."""

    advertise: str
    chosen_by: ChosenBy
    interface: str
    mtu: int | None
    # None until the first check has run.
    address_is_local: bool | None
    # Why the address is not local (empty when it is).
    address_reason: str = ""
    routes: list[PeerRoute] = []
    problems: list[Problem] = []
    # Unix time of the last check; None before the first.
    checked_at: float | None = None


class AdvertiseState(msgspec.Struct, frozen=True, kw_only=True):
    """The advertised address as the address watch tracks it."""

    address: str
    # Interface holding the address, or that held it when it was removed; "" if never local.
    interface: str
    # advertise = "auto": follow new addresses on the interface.
    auto: bool
    present: bool


class AddressChange(msgspec.Struct, frozen=True, kw_only=True):
    old: str | None
    # None: the advertised address is gone. Equal to old: it came back.
    new: str | None
    message: str
    severity: Severity
