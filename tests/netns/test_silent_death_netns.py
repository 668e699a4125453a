"""A host that answers nothing, on real gpud + serf in the namespace harness (3 hosts, no Ray).

A pulled cable (the far end of its veth down: its packets vanish, as at a power loss or a
kernel hang; nothing refuses) makes both peers judge it down with the silent verdict while
Serf still lists it alive, and it is alive again once the cable is back. A partition between
only two of the three hosts is not the death of either: each asks the third, which reaches the
other, so neither is ever judged down (the pair verdicts name the fault).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.harness import faults
from tests.harness.gpud_node import Cluster, GpudNode, wait_for

# A partition lasts this long without a down verdict on either side.
PARTITION_S = 15.0
# Serf marks a silent member failed after its suspicion timeout (about 5-7 s on 3 hosts): the
# silent verdict must come first (from the cut: about 1 s to the first failed probe, 1.5 s of
# connects, the 3.5 s quiet window).
SILENT_S = 9.0
RECOVER_S = 60.0


def member(node: GpudNode, name: str) -> dict[str, Any]:
    return next(m for m in node.members() if m["name"] == name)


def pair_kind(node: GpudNode, peer: str) -> str:
    return next(p["kind"] for p in node.api("/v1/health")["pairs"] if p["peer"] == peer)


def test_a_cut_cable_is_down_before_serf_fails_it_and_a_partial_partition_is_not(
    cluster: Callable[..., Cluster],
) -> None:
    c = cluster(3)
    c.wait_converged()
    a, b, cut = c
    for node in c:
        wait_for(lambda n=node: n.api("/v1/health")["state"] == "passing", 60, what="passing")

    with faults.partition(a.host, b.host):
        began = time.monotonic()
        judged_down = []
        while time.monotonic() - began < PARTITION_S:
            for node, other in ((a, b), (b, a)):
                seen = member(node, other.name)
                if seen["down"]:
                    judged_down.append((node.name, seen["down_reason"]))
            time.sleep(0.5)
        assert judged_down == [], judged_down
        # The fault is still named, between the two of them only.
        assert pair_kind(a, b.name) != "ok" and pair_kind(b, a.name) != "ok"
        assert pair_kind(cut, a.name) == pair_kind(cut, b.name) == "ok"
    for node in c:
        wait_for(lambda n=node: n.api("/v1/health")["state"] == "passing", RECOVER_S)

    cut.host.link_down()
    cut_at = time.monotonic()
    serf_said = []
    for observer in (a, b):
        seen = wait_for(
            lambda o=observer: (m := member(o, cut.name))["down"] and m,
            SILENT_S,
            0.2,
            what=f"{observer.name} judging {cut.name} down",
            describe=lambda o=observer: str(member(o, cut.name)),
        )
        took = time.monotonic() - cut_at
        print(f"{observer.name}: {cut.name} down {took:.1f} s after the cut, serf {seen['status']}")
        assert "it answers nothing" in seen["down_reason"], seen
        assert "nor from the peers asked to try it" in seen["down_reason"], seen
        serf_said.append(seen["status"])
    # Faster than Serf: judged down while Serf still listed it alive.
    assert "alive" in serf_said, serf_said
    cut.host.link_up()
    for observer in (a, b):
        wait_for(
            lambda o=observer: (m := member(o, cut.name))["status"] == "alive" and not m["down"],
            RECOVER_S,
            what=f"{cut.name} alive again on {observer.name}",
            describe=lambda o=observer: str(member(o, cut.name)),
        )
