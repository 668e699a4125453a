"""Pure decisions over network snapshots: which address to advertise, what an address change
means, and the problems of a snapshot (each with a stable ``network.*`` code)."""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Literal

import msgspec

from gpud.component import Problem
from gpud.config import NodeConfig
from gpud.errors import GpudError
from gpud.netcheck.model import (
    SCOPE_UNIVERSE,
    AddressChange,
    AddressInfo,
    Advertisement,
    AdvertiseState,
    ChosenBy,
    HostNetwork,
    NetworkStatus,
    PeerRoute,
    RouteInfo,
)


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
        if a.scope == SCOPE_UNIVERSE
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
                    code="network.no_route",
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
                        code="network.source_mismatch",
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
                        code="network.interface_mismatch",
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
                        code="network.mtu_mismatch",
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
                code="network.address_removed",
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
                code="network.address_not_local",
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
                code="network.link_down",
                message=f"interface {link.name} holding the advertised address is down",
                fix=f"ip link set {link.name} up",
            )
        )
    elif link is not None and not link.carrier:
        problems.append(
            Problem(
                subject="network",
                severity="critical",
                code="network.no_carrier",
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
