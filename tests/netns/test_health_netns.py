"""Health verdicts of real agents (gpud + serf) in the namespace harness, with nftables faults.

A blocked peer port is one-way from both sides; blocked both ways while gossip still works it
is "Serf alive but data path failing" (seed 001); kill -9 is "down"; a Docker-style
port-mapped node is behind NAT and says so in its tags.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.harness import faults
from tests.harness.gpud_node import PEER_PORT, SERF_PORT, Cluster, GpudNode, wait_for

DETECT_S = 30.0


def pair(node: GpudNode, peer: str) -> dict[str, Any]:
    return next(p for p in node.api("/v1/health")["pairs"] if p["peer"] == peer)


def wait_pair(node: GpudNode, peer: str, kind: str) -> dict[str, Any]:
    return wait_for(
        lambda: (p := pair(node, peer))["kind"] == kind and p,
        DETECT_S,
        what=f"{node.name} judging {peer} {kind}",
        describe=lambda: str(node.api("/v1/health")["pairs"]),
    )


def all_passing(c: Cluster) -> None:
    wait_for(
        lambda: all(n.api("/v1/health")["state"] == "passing" for n in c),
        60,
        what="every node passing",
        describe=lambda: str([n.api("/v1/health")["reasons"] for n in c]),
    )


def test_blocked_peer_port_one_way_then_both_ways_then_down(cluster: Callable[..., Cluster]):
    c = cluster(3)
    a, b, third = c
    all_passing(c)
    with faults.block_port(b.host, PEER_PORT, source=a.host):
        seen_by_a = wait_pair(a, b.name, "out-failing")
        assert seen_by_a["state"] == "warning"
        assert seen_by_a["message"].startswith(
            f"{b.addr} reaches us but we cannot reach {b.addr}:{PEER_PORT}"
        )
        assert seen_by_a["message"].endswith(f"a firewall on {b.addr} or a one-way NAT")
        seen_by_b = wait_pair(b, a.name, "in-failing")
        assert f"{a.addr} cannot reach us at {b.addr}:{PEER_PORT}" in seen_by_b["message"]
        assert f"a firewall on this host ({b.addr})" in seen_by_b["message"]
        # The third node is not involved.
        assert pair(third, a.name)["kind"] == pair(third, b.name)["kind"] == "ok"
        with faults.block_port(a.host, PEER_PORT, source=b.host):
            both = wait_pair(a, b.name, "data-path")
            assert both["state"] == "critical"
            assert f"Serf sees {b.name} alive (its gossip port works)" in both["message"]
            assert b.name in a.alive_members()
    all_passing(c)
    third.kill9()
    down = wait_pair(a, third.name, "down")
    assert down["state"] == "critical"
    # gpud's own verdict (refused, confirmed) comes seconds before Serf's `failed`.
    assert f"{third.name} is down: its peer API port refuses connections" in down["message"]


def test_port_mapped_node_is_behind_nat_and_never_head(cluster: Callable[..., Cluster]):
    c = cluster(2)
    inner = faults.port_mapped_host(c.hosts[1], [SERF_PORT + 10, PEER_PORT + 10])
    mapped = c.add_node(inner, serf_port=SERF_PORT + 10, rpc_port=7383, peer_port=PEER_PORT + 10)
    health = wait_for(
        lambda: (h := mapped.api("/v1/health"))["behind_nat"] and h,
        DETECT_S,
        what="the port-mapped node reporting NAT",
        describe=lambda: str(mapped.api("/v1/health")),
    )
    assert health["state"] == "critical"
    assert f"{inner.advertise_addr} is not on any local interface" in health["nat_message"]
    assert "Ray needs host networking" in health["nat_message"]
    # It publishes nat=1 in its tags, which head election reads.
    tags = mapped.api("/v1/status")["node"]["tags"]
    assert tags["nat"] is True and tags["hl"] == "critical"
    # Serf binds all addresses when the advertised one is not local, so the mapped node joins:
    # the others see it alive at its outer address.
    wait_for(
        lambda: all(mapped.name in n.alive_members() for n in c.nodes[:2]),
        DETECT_S,
        what="the others seeing the port-mapped node alive",
        describe=c.describe,
    )
    seen = next(m for m in c[0].members() if m["name"] == mapped.name)
    assert seen["addr"] == inner.advertise_addr
    doctor = mapped.api("/v1/doctor")
    assert any(
        p["subject"] == "network" and p["severity"] == "critical" for p in doctor["problems"]
    )
