"""Restarting gpud never makes a second head (real gpud, serf and Ray in namespaces).

A restarted gpud starts a fresh serf that has not found its peers yet: before the fix it
elected itself at once ("elected head votes=1 known=1") beside the head in office. Here the
head's gpud, a worker's, then all three at once are restarted while every node is sampled
every 0.5 s: never two nodes acting as head, and no election won by one vote of one member.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.gpud_node import Cluster, GpudNode, wait_for
from tests.ray_helpers import RAY_EXECUTABLE, agreed_head, running_ray_cluster
from tests.test_leader_lease_netns import Sampler
from tests.test_ray_cluster import FAILOVER_S, describe, wait_steady

pytestmark = [
    pytest.mark.netns,
    pytest.mark.ray,
    pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason=f"no {RAY_EXECUTABLE}"),
]

STEADY_S = 200.0


@pytest.fixture(scope="module")
def ray_cluster(_harness_leftovers_removed: None) -> Iterator[Cluster]:
    with running_ray_cluster(3, "grr-") as cluster:
        yield cluster


def election_lines(nodes: list[GpudNode]) -> dict[str, list[str]]:
    """What each node's log says about elections (for a failure's message)."""
    wanted = re.compile(
        r"harness: starting|elected head|stepping down|pre-vote|election lost|"
        r"not following|step_down|head gcs announced|ray (start|stop)"
    )
    return {
        n.name: [line[:200] for line in n.log_text().splitlines() if wanted.search(line)][-25:]
        for n in nodes
    }


def test_restarts_never_make_a_second_head(ray_cluster: Cluster) -> None:
    nodes = list(ray_cluster)
    head, _, _ = wait_steady(nodes, STEADY_S)
    by_name = {n.name: n for n in nodes}
    worker = next(n for n in nodes if n.name != head)
    sampler = Sampler(nodes)
    sampler.start()
    try:
        for restart in ([by_name[head]], [worker], nodes):
            for node in restart:
                node.terminate()
                node.reap_children()
            for node in restart:
                node.start(ray_cluster.start_timeout)
            wait_for(
                lambda: agreed_head(nodes),
                FAILOVER_S,
                0.5,
                what=f"one ready head after restarting {[n.name for n in restart]}",
                describe=describe(nodes),
            )
    finally:
        sampler.done.set()
        sampler.join(timeout=30)
    wins = [
        (node.name, int(votes), int(known))
        for node in nodes
        for votes, known in re.findall(r"elected head\b.*votes=(\d+) known=(\d+)", node.log_text())
    ]
    assert wins, "no election was logged"
    assert all(known == 3 and votes >= 2 for _, votes, known in wins), wins
    overlaps = [(t, heads) for t, heads in sampler.samples if len(heads) > 1]
    assert not overlaps, (overlaps[:3], election_lines(nodes))
    assert len(sampler.samples) > 20
