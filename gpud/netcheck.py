"""Host-network verification: is the advertised address ours, how traffic reaches each peer,
and what happens to the advertised address over time (netlink address/link events).

Decisions are pure functions over plain snapshots (``HostNetwork``, ``RouteInfo``); the netlink
I/O around them is thin (pyroute2's ``AsyncIPRoute``). Every I/O function takes an optional
``netns`` name so tests can look into their own namespaces; the agent uses the current one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec
from aiohttp import web
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK

from gpud import log
from gpud.config import Config, NodeConfig
from gpud.errors import GpudError
from gpud.problems import Problem, Severity

if TYPE_CHECKING:
    from gpud.context import NodeContext

logger = log.get("netcheck")

# Kernel constants (linux/if.h, linux/rtnetlink.h).
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFF_LOWER_UP = 0x10000
_SCOPE_UNIVERSE = 0
_RTN_LOCAL = 2
_MAIN_TABLE = 254
_WATCH_GROUPS = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_LINK
_WATCH_EVENTS = {"RTM_NEWADDR", "RTM_DELADDR", "RTM_NEWLINK", "RTM_DELLINK"}

ChosenBy = Literal["config", "interface", "default-route", "only-address"]


# ---------------------------------------------------------------------------------------------
# Plain data


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
    scope: int = _SCOPE_UNIVERSE


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


# ---------------------------------------------------------------------------------------------
# Pure decisions


def normalize(addr: str) -> str:
    """Canonical text form of an IP address (so IPv6 spellings compare equal)."""
    return ipaddress.ip_address(addr).compressed


def family_of(addr: str) -> Literal[4, 6]:
    return 4 if ipaddress.ip_address(addr).version == 4 else 6


def effective_mtu(route_mtu: int | None, link_mtu: int | None) -> int | None:
    """The route's MTU when it sets one (non-zero), else the interface's."""
    return route_mtu if route_mtu else link_mtu


def interface_holding(addr: str, host: HostNetwork) -> str | None:
    """Name of the interface that has ``addr`` assigned, or None."""
    wanted = normalize(addr)
    return next((a.interface for a in host.addresses if normalize(a.address) == wanted), None)


def global_addresses(host: HostNetwork, interface: str | None = None) -> list[AddressInfo]:
    """Global-scope addresses on non-loopback interfaces (of one interface if named), IPv4 first."""
    loopbacks = {link.name for link in host.links if link.loopback}
    found = [
        a
        for a in host.addresses
        if a.scope == _SCOPE_UNIVERSE
        and a.interface not in loopbacks
        and (interface is None or a.interface == interface)
    ]
    return sorted(found, key=lambda a: family_of(a.address))


def not_local_reason(addr: str) -> str:
    return (
        f"advertised address {addr} is not assigned to any local interface: gpud is behind NAT "
        "or port mapping (e.g. Docker bridge mode); peers can only reach it through the mapping, "
        "and it cannot become Ray head"
    )


def choose_advertise(node: NodeConfig, host: HostNetwork) -> Advertisement:
    """The address to advertise and the interface holding it. Raises GpudError (one line)."""
    if node.advertise != "auto":
        address = normalize(node.advertise)
        return Advertisement(
            address=address, interface=interface_holding(address, host) or "", chosen_by="config"
        )
    if node.interface:
        if host.link(node.interface) is None:
            names = ", ".join(link.name for link in host.links) or "none"
            raise GpudError(
                f"node.interface: no interface named {node.interface!r} (interfaces: {names})"
            )
        candidates = global_addresses(host, node.interface)
        if not candidates:
            raise GpudError(
                f"node.interface: {node.interface} has no global IPv4 or IPv6 address; assign one "
                "or set node.advertise to this host's address"
            )
        return Advertisement(
            address=normalize(candidates[0].address),
            interface=node.interface,
            chosen_by="interface",
        )
    for route in sorted(host.default_routes, key=lambda r: (r.family, r.priority)):
        on_iface = [
            a
            for a in global_addresses(host, route.interface)
            if family_of(a.address) == route.family
        ]
        if route.src is not None and any(
            normalize(a.address) == normalize(route.src) for a in on_iface
        ):
            return Advertisement(
                address=normalize(route.src), interface=route.interface, chosen_by="default-route"
            )
        if on_iface:
            return Advertisement(
                address=normalize(on_iface[0].address),
                interface=route.interface,
                chosen_by="default-route",
            )
    candidates = global_addresses(host)
    preferred = [a for a in candidates if family_of(a.address) == 4] or candidates
    if len(preferred) == 1:
        only = preferred[0]
        return Advertisement(
            address=normalize(only.address), interface=only.interface, chosen_by="only-address"
        )
    if not preferred:
        raise GpudError(
            "cannot choose an address to advertise: no default route and no global address; "
            "set node.advertise or node.interface"
        )
    listed = ", ".join(f"{a.address} on {a.interface}" for a in preferred)
    raise GpudError(
        f"cannot choose an address to advertise: no default route and several addresses "
        f"({listed}); set node.advertise or node.interface"
    )


def initial_state(address: str, auto: bool, host: HostNetwork) -> AdvertiseState:
    holder = interface_holding(address, host)
    return AdvertiseState(
        address=normalize(address), interface=holder or "", auto=auto, present=holder is not None
    )


def reconcile(
    state: AdvertiseState, host: HostNetwork
) -> tuple[AdvertiseState, AddressChange | None]:
    """Compare the tracked advertised address with a fresh snapshot; say what changed."""
    holder = interface_holding(state.address, host)
    if holder is not None:
        new_state = msgspec.structs.replace(state, interface=holder, present=True)
        if state.present:
            return new_state, None
        return new_state, AddressChange(
            old=state.address,
            new=state.address,
            message=f"advertised address {state.address} is assigned to {holder} again",
            severity="warning",
        )
    if state.auto and state.interface:
        on_iface = global_addresses(host, state.interface)
        same_family = [a for a in on_iface if family_of(a.address) == family_of(state.address)]
        replacement = (same_family or on_iface or [None])[0]
        if replacement is not None:
            new_address = normalize(replacement.address)
            gone = "was removed from" if state.present else "is still missing from"
            return msgspec.structs.replace(state, address=new_address, present=True), AddressChange(
                old=state.address,
                new=new_address,
                message=(
                    f"advertised address {state.address} {gone} {state.interface}; "
                    f"advertising {new_address} instead"
                ),
                severity="warning",
            )
    if not state.present:
        return state, None
    return msgspec.structs.replace(state, present=False), AddressChange(
        old=state.address,
        new=None,
        message=f"advertised address {state.address} was removed from {state.interface}",
        severity="critical",
    )


def peer_route_problems(
    advertise: str, interface: str, routes: list[RouteInfo]
) -> list[tuple[RouteInfo, list[Problem]]]:
    """Warnings per peer route: no route, another source address or interface, MTU mismatch."""
    usable = [r for r in routes if r.error is None and not r.local and r.mtu is not None]
    counts = Counter(r.mtu for r in usable)
    # The most common MTU is the reference; on a tie the larger one (the smaller is the suspect).
    reference = max(counts, key=lambda mtu: (counts[mtu], mtu)) if counts else None
    out: list[tuple[RouteInfo, list[Problem]]] = []
    for route in routes:
        problems: list[Problem] = []
        if route.error is not None:
            problems.append(
                Problem(
                    subject="network",
                    severity="warning",
                    message=f"no route to peer {route.peer} ({route.addr}): {route.error}",
                    fix="add a route to the peer's network or fix the peer's advertised address",
                )
            )
        elif not route.local:
            if route.src is not None and normalize(route.src) != normalize(advertise):
                problems.append(
                    Problem(
                        subject="network",
                        severity="warning",
                        message=(
                            f"traffic to peer {route.peer} ({route.addr}) leaves from {route.src} "
                            f"on {route.interface}, not from the advertised address {advertise}: "
                            "the peer sees another source address, so dial-back and Ray may fail"
                        ),
                        fix=(
                            "fix the routes (or policy rules) so the advertised address is the "
                            "source, or advertise the address that carries this traffic"
                        ),
                    )
                )
            if interface and route.interface != interface:
                problems.append(
                    Problem(
                        subject="network",
                        severity="warning",
                        message=(
                            f"traffic to peer {route.peer} ({route.addr}) uses {route.interface}, "
                            f"not the advertised interface {interface}: NCCL_SOCKET_IFNAME / "
                            "GLOO_SOCKET_IFNAME will name the wrong interface"
                        ),
                        fix="route the cluster network over one interface or set node.interface",
                    )
                )
            if reference is not None and route.mtu is not None and route.mtu != reference:
                problems.append(
                    Problem(
                        subject="network",
                        severity="warning",
                        message=(
                            f"MTU to peer {route.peer} ({route.addr}) is {route.mtu} on "
                            f"{route.interface}, but {reference} to most peers: large packets "
                            "(NCCL, object transfers) may be dropped or fragmented"
                        ),
                        fix="set the same MTU on every host's cluster interface and route",
                    )
                )
        out.append((route, problems))
    return out


def assess(
    state: AdvertiseState,
    chosen_by: ChosenBy,
    host: HostNetwork,
    routes: list[RouteInfo],
    checked_at: float,
) -> NetworkStatus:
    """Everything `gpud status` shows about the network, from one snapshot."""
    problems: list[Problem] = []
    reason = ""
    if not state.present and state.interface:
        fix = (
            "restore the address on the interface; gpud re-advertises when a new one appears"
            if state.auto
            else 'restore the address, or set node.advertise = "auto" to follow address changes'
        )
        problems.append(
            Problem(
                subject="network",
                severity="critical",
                message=f"advertised address {state.address} was removed from {state.interface}",
                fix=fix,
            )
        )
        reason = f"advertised address {state.address} was removed from {state.interface}"
    elif not state.present:
        reason = not_local_reason(state.address)
        problems.append(
            Problem(
                subject="network",
                severity="warning",
                message=reason,
                fix=(
                    "run gpud with host networking, or set node.advertise to an address "
                    "assigned to this host"
                ),
            )
        )
    link = host.link(state.interface) if state.interface else None
    if link is not None and not link.up:
        problems.append(
            Problem(
                subject="network",
                severity="critical",
                message=f"interface {link.name} holding the advertised address is down",
                fix=f"ip link set {link.name} up",
            )
        )
    elif link is not None and not link.carrier:
        problems.append(
            Problem(
                subject="network",
                severity="critical",
                message=f"interface {link.name} holding the advertised address has no carrier",
                fix=f"check the cable, switch port or peer end of {link.name}",
            )
        )
    rows: list[PeerRoute] = []
    for route, route_problems in peer_route_problems(state.address, state.interface, routes):
        rows.append(
            PeerRoute(
                peer=route.peer,
                addr=route.addr,
                iface=route.interface,
                src=route.src,
                mtu=route.mtu,
                gateway=route.gateway,
                warnings=[p.message for p in route_problems],
            )
        )
        problems.extend(route_problems)
    return NetworkStatus(
        advertise=state.address,
        chosen_by=chosen_by,
        interface=state.interface,
        mtu=link.mtu if link is not None else None,
        address_is_local=state.present,
        address_reason=reason,
        routes=rows,
        problems=problems,
        checked_at=checked_at,
    )


def chosen_by_config(node: NodeConfig, host: HostNetwork) -> ChosenBy:
    """How the configuration picks the advertised address (for status only, never raises)."""
    if node.advertise != "auto":
        return "config"
    if node.interface:
        return "interface"
    try:
        return choose_advertise(node, host).chosen_by
    except GpudError:
        return "default-route"


# ---------------------------------------------------------------------------------------------
# Netlink I/O (thin)


def _open(netns: str | None, groups: int = 0) -> AsyncIPRoute:
    # flags=0: never create a namespace that does not exist.
    if netns is None:
        return AsyncIPRoute(groups=groups)
    return AsyncIPRoute(netns=netns, flags=0, groups=groups)


def _link_info(msg: Any) -> LinkInfo:
    flags = msg["flags"]
    return LinkInfo(
        index=msg["index"],
        name=msg.get("ifname"),
        mtu=msg.get("mtu") or 0,
        up=bool(flags & _IFF_UP),
        carrier=bool(flags & _IFF_LOWER_UP),
        loopback=bool(flags & _IFF_LOOPBACK),
    )


async def _read_host(ipr: AsyncIPRoute) -> HostNetwork:
    links = [_link_info(msg) async for msg in await ipr.link("dump")]
    names = {link.index: link.name for link in links}
    addresses = [
        AddressInfo(
            address=normalize(msg.get("address")),
            prefixlen=msg["prefixlen"],
            interface=names.get(msg["index"], str(msg["index"])),
            scope=msg["scope"],
        )
        async for msg in await ipr.addr("dump")
        if msg.get("address")
    ]
    defaults: list[DefaultRoute] = []
    for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        async for msg in await ipr.route("dump", family=family, table=_MAIN_TABLE):
            if msg["dst_len"] != 0 or msg.get("oif") not in names:
                continue
            defaults.append(
                DefaultRoute(
                    family=version,
                    interface=names[msg.get("oif")],
                    priority=msg.get("priority") or 0,
                    src=msg.get("prefsrc"),
                )
            )
    return HostNetwork(links=links, addresses=addresses, default_routes=defaults)


async def read_host_network(netns: str | None = None) -> HostNetwork:
    """Links, addresses and default routes of the current (or the named) namespace."""
    async with _open(netns) as ipr:
        return await _read_host(ipr)


async def _route_to(ipr: AsyncIPRoute, peer: str, addr: str, host: HostNetwork) -> RouteInfo:
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        return RouteInfo(peer=peer, addr=addr, error="not an IP address")
    try:
        replies = await ipr.route("get", dst=addr)
    except NetlinkError as exc:
        return RouteInfo(peer=peer, addr=addr, error=exc.args[1] if len(exc.args) > 1 else str(exc))
    msg = replies[0]
    by_index = {link.index: link for link in host.links}
    link = by_index.get(msg.get("oif"))
    metrics = msg.get("metrics")
    route_mtu = metrics.get("mtu") if metrics else None
    return RouteInfo(
        peer=peer,
        addr=addr,
        interface=link.name if link else str(msg.get("oif")),
        src=msg.get("prefsrc"),
        gateway=msg.get("gateway"),
        mtu=effective_mtu(route_mtu, link.mtu if link else None),
        local=msg["type"] == _RTN_LOCAL,
    )


async def read_routes(
    peers: Iterable[tuple[str, str]], host: HostNetwork, netns: str | None = None
) -> list[RouteInfo]:
    """`ip route get` for each (peer name, address)."""
    async with _open(netns) as ipr:
        return [await _route_to(ipr, name, addr, host) for name, addr in peers]


_T = TypeVar("_T")


def _run_blocking(coro: Awaitable[_T]) -> _T:
    """Run a netlink coroutine from sync code, also when an event loop is already running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()  # type: ignore[arg-type]


def resolve_advertise(config: Config, netns: str | None = None) -> tuple[str, str]:
    """(address, interface) to advertise at agent start; interface "" when not local (NAT).

    Raises GpudError with a one-line, actionable message."""
    host = _run_blocking(read_host_network(netns))
    chosen = choose_advertise(config.node, host)
    return chosen.address, chosen.interface


def interface_for(addr: str, netns: str | None = None) -> str | None:
    """The interface that holds ``addr`` (for NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME)."""
    return interface_holding(addr, _run_blocking(read_host_network(netns)))


def _peer_addrs(ctx: NodeContext) -> list[tuple[str, str]]:
    return [(m.name, m.addr) for m in ctx.peers()]


async def check_now(ctx: NodeContext, netns: str | None = None) -> NetworkStatus:
    """One full check (for `gpud doctor`): address, link and routes to every alive peer."""
    host = await read_host_network(netns)
    config = ctx.config
    state = initial_state(ctx.advertise_addr, config.node.advertise == "auto", host)
    routes = await read_routes(_peer_addrs(ctx), host, netns)
    return assess(state, chosen_by_config(config.node, host), host, routes, time.time())


# ---------------------------------------------------------------------------------------------
# The component


class NetCheck:
    """Watches the advertised address over netlink and checks the route to every peer."""

    name = "network"

    def __init__(
        self,
        ctx: NodeContext,
        on_address_change: Callable[[str | None, str | None], Awaitable[None]],
        *,
        refresh_s: float = 30.0,
        netns: str | None = None,
    ) -> None:
        self._ctx = ctx
        self._on_address_change = on_address_change
        self._refresh_s = refresh_s
        self._netns = netns
        self._auto = ctx.config.node.advertise == "auto"
        self._state: AdvertiseState | None = None
        self._host = HostNetwork()
        self._routes: list[RouteInfo] = []
        self._status = NetworkStatus(
            advertise=ctx.advertise_addr,
            chosen_by=chosen_by_config(ctx.config.node, self._host),
            interface="",
            mtu=None,
            address_is_local=None,
        )
        self._refresh_wanted = asyncio.Event()
        # Set after every completed check; tests and `doctor`-style callers may wait on it.
        self.checked = asyncio.Event()
        ctx.on_members_changed(lambda _members: self._refresh_wanted.set())

    def status(self) -> NetworkStatus:
        return self._status

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/network", self._handle_status)]

    async def _handle_status(self, _request: web.Request) -> web.Response:
        return web.Response(body=msgspec.json.encode(self._status), content_type="application/json")

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._watch_forever())
            tasks.create_task(self._refresh_forever())

    async def _watch_forever(self) -> None:
        backoff = 0.5
        while True:
            started = time.monotonic()
            try:
                await self._watch()
            except (OSError, NetlinkError) as exc:
                # ENOBUFS: events overflowed the socket; a fresh socket and snapshot recover.
                log.warning(logger, "netlink watch failed, reopening", error=str(exc))
                # Back off only while failures come in quick succession.
                backoff = 0.5 if time.monotonic() - started > 60 else min(backoff * 2, 10.0)
                await asyncio.sleep(backoff)

    async def _watch(self) -> None:
        # Subscribe before the first snapshot so that no change slips in between.
        async with _open(self._netns, _WATCH_GROUPS) as events, _open(self._netns) as query:
            await events.bind()
            await self._reconcile(query)
            while True:
                batch = [msg async for msg in events.get()]
                if not batch:
                    raise OSError(errno.ECONNRESET, "netlink event socket closed")
                if any(msg.get("event") in _WATCH_EVENTS for msg in batch):
                    await self._reconcile(query)

    async def _reconcile(self, query: AsyncIPRoute) -> None:
        host = await _read_host(query)
        first = self._state is None
        if first:
            self._state = initial_state(self._ctx.advertise_addr, self._auto, host)
            change = None
        else:
            self._state, change = reconcile(self._state, host)
        self._host = host
        if first or change is not None:
            self._routes = await self._read_routes(query, host)
        self._publish()
        if change is None:
            return
        if change.severity == "critical":
            log.error(logger, f"critical: {change.message}", old=change.old, new=change.new)
        else:
            log.warning(logger, change.message, old=change.old, new=change.new)
        try:
            await self._on_address_change(change.old, change.new)
        except Exception as exc:  # the agent's handler failing must not stop the watch
            log.error(logger, "address-change handler failed", error=repr(exc))

    async def _read_routes(self, ipr: AsyncIPRoute, host: HostNetwork) -> list[RouteInfo]:
        return [await _route_to(ipr, name, addr, host) for name, addr in _peer_addrs(self._ctx)]

    async def _refresh_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh_wanted.wait(), self._refresh_s)
            self._refresh_wanted.clear()
            if self._state is None:
                continue
            try:
                host = await read_host_network(self._netns)
                async with _open(self._netns) as ipr:
                    self._routes = await self._read_routes(ipr, host)
            except (OSError, NetlinkError) as exc:
                log.warning(logger, "route check failed", error=str(exc))
                continue
            self._host = host
            self._publish()

    def _publish(self) -> None:
        assert self._state is not None
        self._status = assess(
            self._state,
            chosen_by_config(self._ctx.config.node, self._host),
            self._host,
            self._routes,
            time.time(),
        )
        self.checked.set()
