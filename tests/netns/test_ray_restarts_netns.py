"""Restarting gpud never makes a second head (real gpud, serf and Ray in namespaces).

A restarted gpud whose serf has not found its peers yet once elected itself at once ("elected
head votes=1 known=1") beside the head in office; a voter that had just started granted a vote
while the head's lease still ran on its previous process's word. Here, while every node is
sampled every 0.5 s, ten rounds restart the head's gpud and a worker's in turn (five of each:
the next gpud adopts serf and Ray) and two more kill every process of all three hosts at once
(serf and Ray start afresh, so the cluster elects again from persisted terms): never two nodes
acting as head, no election won by one vote, and every election after a restart counts all
three members.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.gpud_node import Cluster, GpudNode, wait_for
from tests.harness.ray_cluster import (
    FAILOVER_S,
    RAY_EXECUTABLE,
    Sampler,
    agreed_head,
    describe,
    kill_host,
    one_ray_cluster,
    running_ray_cluster,
)

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason=f"no {RAY_EXECUTABLE}"),
]

STEADY_S = 200.0
# The harness writes this before every start of gpud.
RESTART_MARK = "==== harness: starting gpud"
ROUNDS = ["head", "worker"] * 3 + ["all"] + ["head", "worker"] * 2 + ["all"]


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


# Twelve rounds of up to FAILOVER_S each, after the cluster's first steady state.
@pytest.mark.timeout(600)
def test_restarts_never_make_a_second_head(ray_cluster: Cluster) -> None:
    nodes = list(ray_cluster)
    head, _, _ = one_ray_cluster(nodes, STEADY_S)
    by_name = {n.name: n for n in nodes}
    sampler = Sampler(nodes)
    sampler.start()
    try:
        for round_ in ROUNDS:
            if round_ == "all":
                restart = nodes
            elif round_ == "head":
                restart = [by_name[head]]
            else:
                restart = [next(n for n in nodes if n.name != head)]
            for node in restart:
                if round_ == "all":
                    kill_host(node)  # every process of the host: serf and Ray start afresh
                else:
                    node.terminate()  # gpud alone: the next one adopts serf and Ray
                    node.reap_children()
            for node in restart:
                node.start(ray_cluster.start_timeout)
            head, _, _ = wait_for(
                lambda: agreed_head(nodes),
                FAILOVER_S,
                0.5,
                what=f"one ready head after restarting {[n.name for n in restart]}",
                describe=describe(nodes),
            )
    finally:
        sampler.done.set()
        sampler.join(timeout=30)
    won = re.compile(r"elected head\b.*votes=(\d+) known=(\d+)")
    # While the cluster first forms, a node may know only the members started so far; after
    # the first restart every node counts all three (its persisted view).
    formed, restarted = [], []
    for node in nodes:
        _, _, since_start = node.log_text().partition(RESTART_MARK)
        first, _, later = since_start.partition(RESTART_MARK)
        formed += [(node.name, int(v), int(k)) for v, k in won.findall(first)]
        restarted += [(node.name, int(v), int(k)) for v, k in won.findall(later)]
    assert restarted, "no election after a restart was logged"
    # The harness starts the hosts one after another: the first may be alone in its view when
    # it forms the cluster (1 of 1, then the others follow it). Any other head had a majority of
    # at least two, and after a restart never fewer than two of all three.
    assert all(votes >= 2 or known == 1 for _, votes, known in formed), formed
    assert all(votes >= 2 for _, votes, _ in restarted), restarted
    assert all(known == 3 for _, _, known in restarted), restarted
    overlaps = [(t, heads) for t, heads in sampler.samples if len(heads) > 1]
    assert not overlaps, (overlaps[:3], election_lines(nodes))
    assert len(sampler.samples) > 20
