"""A 3|2 partition healed, with real gpud + serf + `ray start` on 5 hosts in namespaces.

The head sits on the majority side. The cut-off pair has no majority: it neither raises its
term (pre-vote: it stands only with evidence that a majority would grant) nor, after the
heal, deposes the head that kept its majority. At every sample (every 0.5 s, on every node)
the only head anyone sees is the same head, term and GCS port, and its Ray process is the one
that ran before; after the heal all 5 nodes are Ray nodes of it again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import faults
from tests.harness.gpud_node import Cluster, GpudNode, wait_for
from tests.harness.ray_cluster import (
    RAY_EXECUTABLE,
    describe,
    head_views,
    one_ray_cluster,
    ray_node_names,
    running_ray_cluster,
)

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason=f"no {RAY_EXECUTABLE}"),
]

STEADY_5_S = 300.0
SAMPLE_S = 0.5
# Serf usually declares the other side failed after 5-10 s, but memberlist's Lifeguard stretches
# a member's probe interval up to 8x while its own probes fail (as they all do on the cut-off
# side): probing the last of 4 peers can take ~25 s, plus a suspicion timeout of up to ~17 s.
# Then the cut-off pair must sit still (a candidate retries every 1-3 s: several rounds in
# which it must not raise its term).
PARTITION_S = 60.0
HOLD_S = 20.0
# After the heal: gossip merges within seconds; the pair's Ray workers restart toward the
# head (10-20 s on 2 busy cores) and its GCS poll (every 10 s) lists them.
REJOIN_S = 90.0


@pytest.fixture
def ray_cluster(_harness_leftovers_removed: None) -> Iterator[Cluster]:
    with running_ray_cluster(5, "gph-") as cluster:
        yield cluster


def ray_term(node: GpudNode) -> int:
    return int(node.api("/v1/ray")["term"])


def head_pid(node: GpudNode) -> int | None:
    return node.api("/v1/ray")["process"]["process"]["pid"]


def test_healed_3_2_partition_keeps_the_majoritys_head_and_gcs(ray_cluster: Cluster) -> None:
    nodes = list(ray_cluster)
    names = {n.name for n in nodes}
    steady = one_ray_cluster(nodes, STEADY_5_S)
    head, term, gcs = steady
    by_name = {n.name: n for n in nodes}
    h = by_name[head]
    pid = head_pid(h)
    assert pid is not None
    majority = [h, *[n for n in nodes if n is not h][:2]]
    minority = [n for n in nodes if n not in majority]
    began = time.monotonic()
    wrong: list[tuple[float, str, object]] = []

    def sample() -> None:
        at = round(time.monotonic() - began, 1)
        for view in head_views(nodes):
            if view.heads not in ((), (steady,)):
                wrong.append((at, view.observer, view.heads))
        if head_pid(h) != pid:
            wrong.append((at, head, "head's Ray process changed"))
        for node in minority:
            if ray_term(node) > term:
                wrong.append((at, node.name, f"term {ray_term(node)} > {term}"))

    with faults.partition_groups([n.host for n in majority], [n.host for n in minority]):
        # The pair loses the head (it cannot reach it) and has no majority to elect one.
        wait_for(
            lambda: all(head not in n.alive_members() for n in minority),
            PARTITION_S,
            SAMPLE_S,
            what=f"{[n.name for n in minority]} to see {head} gone",
            describe=describe(nodes),
        )
        deadline = time.monotonic() + HOLD_S
        while time.monotonic() < deadline:
            sample()
            time.sleep(SAMPLE_S)
        assert all(head_views([n])[0].heads == (steady,) for n in majority), describe(nodes)()
        # The cut-off pair has no head it could follow nor a majority to elect one: it waits.
        for node in minority:
            ray = node.api("/v1/ray")
            assert ray["action"] == "wait" and ray["role"] == "none", ray
            print(f"{node.name} while cut off: {ray['election_reason']}")
    healed_at = time.monotonic()

    def whole() -> bool:
        sample()
        views = head_views(nodes)
        if len(views) != len(nodes) or any(v.heads != (steady,) for v in views):
            return False
        for node in minority:  # workers of that head again, not just listed by its GCS
            ray = node.api("/v1/ray")
            if (ray["role"], ray["head"], ray["action"]) != ("worker", head, "follow"):
                return False
        return ray_node_names(h) == names

    wait_for(
        whole,
        REJOIN_S,
        SAMPLE_S,
        what=f"all 5 nodes Ray nodes of {head} (term {term}, GCS {gcs}) again",
        describe=describe(nodes),
    )
    rejoined_s = time.monotonic() - healed_at
    for _ in range(10):  # and it stays so: nobody deposes it after the heal
        sample()
        time.sleep(SAMPLE_S)
    assert not wrong, wrong
    assert all(ray_term(n) == term for n in nodes), describe(nodes)()
    print(f"healed to one Ray cluster of 5 in {rejoined_s:.1f} s")
