"""Pure decision logic of gpud.netcheck: address choice, route warnings, the address watch."""

from __future__ import annotations

import itertools

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.config import NodeConfig
from gpud.errors import GpudError
from gpud.netcheck import (
    AddressInfo,
    AdvertiseState,
    DefaultRoute,
    HostNetwork,
    LinkInfo,
    NetworkStatus,
    RouteInfo,
    assess,
    choose_advertise,
    effective_mtu,
    initial_state,
    interface_holding,
    reconcile,
)
from gpud.netcheck.assess import peer_route_problems


def link(name: str, index: int, mtu: int = 1500, up: bool = True, loopback: bool = False):
    return LinkInfo(index=index, name=name, mtu=mtu, up=up, carrier=up, loopback=loopback)


def addr(address: str, interface: str, scope: int = 0, prefixlen: int = 24) -> AddressInfo:
    return AddressInfo(address=address, prefixlen=prefixlen, interface=interface, scope=scope)


LO = link("lo", 1, 65536, loopback=True)
LO_ADDRS = [addr("127.0.0.1", "lo", scope=254, prefixlen=8), addr("::1", "lo", 254, 128)]


def host(*addresses: AddressInfo, defaults: list[DefaultRoute] | None = None, links=None):
    names = sorted({a.interface for a in addresses} - {"lo"})
    all_links = links or [LO] + [link(n, i + 2) for i, n in enumerate(names)]
    return HostNetwork(
        links=all_links, addresses=LO_ADDRS + list(addresses), default_routes=defaults or []
    )


# --- choose_advertise -------------------------------------------------------------------------


def test_fixed_address_is_used_as_is_and_reports_its_interface():
    h = host(addr("10.77.0.2", "eth0"))
    chosen = choose_advertise(NodeConfig(advertise="10.77.0.2"), h)
    assert (chosen.address, chosen.interface, chosen.chosen_by) == ("10.77.0.2", "eth0", "config")


def test_fixed_address_not_local_has_no_interface():
    chosen = choose_advertise(NodeConfig(advertise="203.0.113.9"), host(addr("10.77.0.2", "eth0")))
    assert (chosen.address, chosen.interface) == ("203.0.113.9", "")


def test_fixed_ipv6_is_normalized():
    h = host(addr("fd00::2", "eth0", prefixlen=64))
    chosen = choose_advertise(NodeConfig(advertise="fd00:0:0::0002"), h)
    assert (chosen.address, chosen.interface) == ("fd00::2", "eth0")


def test_configured_interface_prefers_ipv4_and_skips_link_local():
    h = host(
        addr("fe80::1", "eth1", scope=253, prefixlen=64),
        addr("fd00::5", "eth1", prefixlen=64),
        addr("10.77.1.5", "eth1"),
        addr("10.77.0.2", "eth0"),
    )
    chosen = choose_advertise(NodeConfig(interface="eth1"), h)
    assert (chosen.address, chosen.interface, chosen.chosen_by) == (
        "10.77.1.5",
        "eth1",
        "interface",
    )


def test_configured_interface_ipv6_only():
    h = host(
        addr("fe80::1", "eth1", scope=253, prefixlen=64), addr("fd00::5", "eth1", prefixlen=64)
    )
    assert choose_advertise(NodeConfig(interface="eth1"), h).address == "fd00::5"


def test_configured_interface_missing_or_without_address_is_an_actionable_error():
    h = host(addr("10.77.0.2", "eth0"), addr("fe80::1", "eth1", scope=253, prefixlen=64))
    with pytest.raises(GpudError, match=r"node.interface: no interface named 'eth9'.*eth0"):
        choose_advertise(NodeConfig(interface="eth9"), h)
    with pytest.raises(GpudError, match=r"eth1 has no global .*node.advertise"):
        choose_advertise(NodeConfig(interface="eth1"), h)


def test_default_route_interface_ipv4_first_then_priority_and_prefsrc():
    h = host(
        addr("10.77.0.2", "eth0"),
        addr("10.77.1.2", "eth1"),
        addr("10.77.1.3", "eth1"),
        addr("fd00::2", "eth2", prefixlen=64),
        defaults=[
            DefaultRoute(family=6, interface="eth2", priority=0),
            DefaultRoute(family=4, interface="eth0", priority=200),
            DefaultRoute(family=4, interface="eth1", priority=100, src="10.77.1.3"),
        ],
    )
    chosen = choose_advertise(NodeConfig(), h)
    assert (chosen.address, chosen.interface, chosen.chosen_by) == (
        "10.77.1.3",
        "eth1",
        "default-route",
    )


def test_default_route_via_interface_without_that_family_falls_through():
    h = host(
        addr("fd00::2", "eth0", prefixlen=64),
        addr("fd00::3", "eth1", prefixlen=64),
        defaults=[
            DefaultRoute(family=4, interface="eth0"),
            DefaultRoute(family=6, interface="eth1"),
        ],
    )
    assert choose_advertise(NodeConfig(), h).address == "fd00::3"


def test_no_default_route_single_address_is_chosen():
    h = host(addr("10.77.0.2", "eth0"), addr("fd00::2", "eth0", prefixlen=64))
    chosen = choose_advertise(NodeConfig(), h)
    assert (chosen.address, chosen.chosen_by) == ("10.77.0.2", "only-address")


def test_no_default_route_and_several_or_no_addresses_is_an_error():
    several = host(addr("10.77.0.2", "eth0"), addr("10.77.1.2", "eth1"))
    with pytest.raises(GpudError, match=r"several addresses .*10.77.0.2 on eth0.*node.advertise"):
        choose_advertise(NodeConfig(), several)
    with pytest.raises(GpudError, match=r"no default route and no global address"):
        choose_advertise(NodeConfig(), host())


ADDRESS_POOL = ["10.77.0.1", "10.77.0.2", "10.77.1.1", "fd00::1", "fd00::2", "fe80::1"]
IFACES = ["lo", "eth0", "eth1"]

hosts = st.builds(
    lambda picks, defaults: HostNetwork(
        links=[LO, link("eth0", 2), link("eth1", 3)],
        addresses=[
            addr(a, i, scope=253 if a.startswith("fe80") else (254 if i == "lo" else 0))
            for a, i in picks
        ],
        default_routes=defaults,
    ),
    st.lists(
        st.tuples(st.sampled_from(ADDRESS_POOL), st.sampled_from(IFACES)),
        unique_by=lambda t: t[0],
        max_size=5,
    ),
    st.lists(
        st.builds(
            DefaultRoute,
            family=st.sampled_from([4, 6]),
            interface=st.sampled_from(IFACES[1:]),
            priority=st.integers(0, 3),
            src=st.none() | st.sampled_from(ADDRESS_POOL),
        ),
        max_size=3,
    ),
)
node_configs = st.builds(
    NodeConfig,
    advertise=st.sampled_from(["auto", "auto", "10.77.0.1", "203.0.113.5"]),
    interface=st.sampled_from(["", "", "eth0", "eth1", "eth9"]),
)


@settings(max_examples=500, deadline=None)
@given(node_configs, hosts)
def test_choice_is_a_global_address_of_the_named_interface_or_a_clear_error(node, h):
    try:
        chosen = choose_advertise(node, h)
    except GpudError as exc:
        assert node.advertise == "auto"
        assert "node." in str(exc) and "\n" not in str(exc)
        return
    if node.advertise != "auto":
        assert chosen.address == node.advertise
        assert chosen.interface == (interface_holding(chosen.address, h) or "")
        return
    held = [a for a in h.addresses if a.address == chosen.address]
    assert held and held[0].interface == chosen.interface
    assert held[0].scope == 0 and chosen.interface != "lo"
    if node.interface:
        assert chosen.interface == node.interface
    elif chosen.chosen_by == "default-route":
        assert chosen.interface in {r.interface for r in h.default_routes}


# --- routes -----------------------------------------------------------------------------------


def test_effective_mtu_exhaustive():
    for route_mtu, link_mtu in itertools.product([None, 0, 1400, 9000], [None, 1500]):
        expected = route_mtu if route_mtu else link_mtu
        assert effective_mtu(route_mtu, link_mtu) == expected


def route(peer: str, mtu: int = 1500, src: str = "10.77.0.2", iface: str = "eth0", **kw):
    return RouteInfo(
        peer=peer,
        addr=f"10.77.0.{sum(map(ord, peer)) % 200 + 10}",
        interface=iface,
        src=src,
        mtu=mtu,
        **kw,
    )


def test_matching_routes_have_no_warnings():
    rows = peer_route_problems("10.77.0.2", "eth0", [route("a"), route("b"), route("c")])
    assert all(problems == [] for _, problems in rows)


def test_source_interface_mtu_and_missing_route_warnings():
    routes = [
        route("a"),
        route("b"),
        route("c", mtu=1400),
        route("d", src="10.77.9.9", iface="eth1"),
        RouteInfo(peer="e", addr="10.99.0.1", error="Network is unreachable"),
        route("self", mtu=65536, iface="lo", local=True),
    ]
    by_peer = {
        r.peer: [p.message for p in ps]
        for r, ps in peer_route_problems("10.77.0.2", "eth0", routes)
    }
    assert by_peer["a"] == [] and by_peer["b"] == [] and by_peer["self"] == []
    assert len(by_peer["c"]) == 1 and "MTU to peer c" in by_peer["c"][0]
    assert "1400" in by_peer["c"][0] and "1500 to most peers" in by_peer["c"][0]
    assert len(by_peer["d"]) == 2
    assert (
        "leaves from 10.77.9.9" in by_peer["d"][0]
        and "advertised address 10.77.0.2" in by_peer["d"][0]
    )
    assert "uses eth1, not the advertised interface eth0" in by_peer["d"][1]
    assert by_peer["e"] == ["no route to peer e (10.99.0.1): Network is unreachable"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([1400, 1500, 9000]),
            st.sampled_from(["10.77.0.2", "10.77.0.3"]),
            st.booleans(),
        ),
        max_size=8,
    )
)
def test_route_warning_properties(specs):
    routes = [route(f"p{i}", mtu=m, src=s, local=loc) for i, (m, s, loc) in enumerate(specs)]
    result = peer_route_problems("10.77.0.2", "eth0", routes)
    assert [r for r, _ in result] == routes
    remote_mtus = [r.mtu for r in routes if not r.local]
    for r, problems in result:
        messages = [p.message for p in problems]
        if r.local:
            assert messages == []
            continue
        assert any("leaves from" in m for m in messages) == (r.src != "10.77.0.2")
        mtu_warned = any("MTU" in m for m in messages)
        # Warned iff some other MTU is strictly more common, or equally common and larger.
        others = {m for m in remote_mtus if m != r.mtu}
        beaten = any((remote_mtus.count(m), m) > (remote_mtus.count(r.mtu), r.mtu) for m in others)
        assert mtu_warned == beaten
        assert all(p.severity == "warning" for p in problems)
    if len(set(remote_mtus)) <= 1:
        assert not any("MTU" in p.message for _, ps in result for p in ps)


# --- the address watch ------------------------------------------------------------------------


def test_removal_is_critical_once_then_quiet():
    state = initial_state("10.77.0.2", False, host(addr("10.77.0.2", "eth0")))
    assert state == AdvertiseState(address="10.77.0.2", interface="eth0", auto=False, present=True)
    gone = host(addr("10.77.0.3", "eth0"))
    state, change = reconcile(state, gone)
    assert change is not None and (change.old, change.new) == ("10.77.0.2", None)
    assert change.severity == "critical"
    assert change.message == "advertised address 10.77.0.2 was removed from eth0"
    state, change = reconcile(state, gone)
    assert change is None and not state.present and state.interface == "eth0"
    state, change = reconcile(state, host(addr("10.77.0.2", "eth0")))
    assert change is not None and (change.old, change.new) == ("10.77.0.2", "10.77.0.2")
    assert state.present


def test_auto_follows_a_new_address_on_the_interface():
    state = initial_state("10.77.0.2", True, host(addr("10.77.0.2", "eth0")))
    state, change = reconcile(state, host(addr("fe80::1", "eth0", scope=253)))
    assert change is not None and change.new is None and change.severity == "critical"
    # An address on another interface is not a replacement; IPv4 is preferred for an IPv4 one.
    other = host(
        addr("10.77.5.5", "eth1"), addr("fd00::7", "eth0", prefixlen=64), addr("10.77.0.9", "eth0")
    )
    state, change = reconcile(state, other)
    assert change is not None and (change.old, change.new) == ("10.77.0.2", "10.77.0.9")
    assert "advertising 10.77.0.9 instead" in change.message
    assert state == AdvertiseState(address="10.77.0.9", interface="eth0", auto=True, present=True)


def test_auto_replacement_present_at_removal_is_reported_directly():
    before = host(addr("10.77.0.2", "eth0"), addr("10.77.0.3", "eth0"))
    state = initial_state("10.77.0.2", True, before)
    state, change = reconcile(state, host(addr("10.77.0.3", "eth0")))
    assert change is not None and (change.old, change.new) == ("10.77.0.2", "10.77.0.3")
    assert "was removed from eth0" in change.message


def test_not_local_address_never_changes():
    state = initial_state("203.0.113.5", True, host(addr("10.77.0.2", "eth0")))
    assert state.interface == "" and not state.present
    assert reconcile(state, host(addr("10.77.0.3", "eth0"))) == (state, None)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.lists(hosts, min_size=1, max_size=6))
def test_watch_invariants(auto, snapshots):
    start = host(addr("10.77.0.1", "eth0"))
    state = initial_state("10.77.0.1", auto, start)
    for snapshot in snapshots:
        previous = state
        state, change = reconcile(state, snapshot)
        held = interface_holding(state.address, snapshot)
        assert state.present == (held is not None)
        if state.present:
            assert state.interface == held
        if not auto:
            assert state.address == "10.77.0.1"
        if change is None:
            assert (state.address, state.present) == (previous.address, previous.present)
            continue
        assert change.old == previous.address
        if change.new is None:
            assert previous.present and not state.present and change.severity == "critical"
        else:
            assert change.new == state.address and state.present


# --- the status section -----------------------------------------------------------------------


def test_assess_not_local_removed_and_link_down():
    h = host(addr("10.77.0.2", "eth0"))
    nat = assess(initial_state("203.0.113.5", False, h), "config", h, [], 1.0)
    assert nat.address_is_local is False and "behind NAT or port mapping" in nat.address_reason
    assert [p.severity for p in nat.problems] == ["warning"]

    removed_state = AdvertiseState(address="10.77.0.9", interface="eth0", auto=False, present=False)
    removed = assess(removed_state, "config", h, [], 1.0)
    assert removed.problems[0].severity == "critical"
    assert removed.problems[0].message == "advertised address 10.77.0.9 was removed from eth0"

    down = HostNetwork(links=[LO, link("eth0", 2, mtu=9000, up=False)], addresses=h.addresses)
    st_down = assess(
        initial_state("10.77.0.2", True, down), "default-route", down, [route("a")], 2.0
    )
    assert st_down.address_is_local and st_down.mtu == 9000 and st_down.interface == "eth0"
    assert [p.message for p in st_down.problems] == [
        "interface eth0 holding the advertised address is down"
    ]
    assert st_down.routes[0].peer == "a" and st_down.routes[0].warnings == []
    decoded = msgspec.json.decode(msgspec.json.encode(st_down), type=NetworkStatus)
    assert decoded == st_down
