"""Netlink I/O (thin, pyroute2's ``AsyncIPRoute``): read links, addresses, default routes and
the route to each peer. Every function takes an optional ``netns`` name so tests can look into
their own namespaces; the agent uses the current one."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from gpud.config import Config
from gpud.netcheck.assess import (
    assess,
    choose_advertise,
    chosen_by_config,
    effective_mtu,
    initial_state,
    interface_holding,
    normalize,
)
from gpud.netcheck.lean_pyroute2 import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
    AsyncIPRoute,
    NetlinkError,
)
from gpud.netcheck.model import (
    AddressInfo,
    DefaultRoute,
    HostNetwork,
    LinkInfo,
    NetworkStatus,
    RouteInfo,
)

if TYPE_CHECKING:
    from gpud.context import NodeContext

# Kernel constants (linux/if.h, linux/rtnetlink.h).
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFF_LOWER_UP = 0x10000
_RTN_LOCAL = 2
_MAIN_TABLE = 254
WATCH_GROUPS = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_LINK
WATCH_EVENTS = {"RTM_NEWADDR", "RTM_DELADDR", "RTM_NEWLINK", "RTM_DELLINK"}


def open_ipr(netns: str | None, groups: int = 0) -> AsyncIPRoute:
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


async def read_host(ipr: AsyncIPRoute) -> HostNetwork:
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
    async with open_ipr(netns) as ipr:
        return await read_host(ipr)


async def route_to(ipr: AsyncIPRoute, peer: str, addr: str, host: HostNetwork) -> RouteInfo:
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
    async with open_ipr(netns) as ipr:
        return [await route_to(ipr, name, addr, host) for name, addr in peers]


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


def peer_addrs(ctx: NodeContext) -> list[tuple[str, str]]:
    return [(m.name, m.addr) for m in ctx.peers()]


async def check_now(ctx: NodeContext, netns: str | None = None) -> NetworkStatus:
    """One full check (for `gpud doctor`): address, link and routes to every alive peer."""
    host = await read_host_network(netns)
    config = ctx.config
    state = initial_state(ctx.advertise_addr, config.node.advertise == "auto", host)
    routes = await read_routes(peer_addrs(ctx), host, netns)
    return assess(state, chosen_by_config(config.node, host), host, routes, time.time())
