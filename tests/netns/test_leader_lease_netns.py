"""Leader lease with real gpud, serf and Ray in namespaces.

A 3|2 partition with the head in the minority: the majority elects a new head, and at no
sample (every 0.5 s, on every node) do two nodes act as head at once. A node acts as head
while its /v1/ray says role head, or while its Ray head process still runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import faults
from tests.harness.gpud_node import Cluster, wait_for
from tests.harness.ray_cluster import (
    FAILOVER_S,
    RAY_EXECUTABLE,
    Sampler,
    agreed_head,
    describe,
    one_ray_cluster,
    running_ray_cluster,
)

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason=f"no {RAY_EXECUTABLE}"),
]

STEADY_5_S = 300.0


@pytest.fixture(scope="module")
def ray_cluster(_harness_leftovers_removed: None) -> Iterator[Cluster]:
    with running_ray_cluster(5, "gll-") as cluster:
        yield cluster


def test_partition_head_in_minority_never_two_acting_heads(ray_cluster: Cluster) -> None:
    nodes = list(ray_cluster)
    head, term, _ = one_ray_cluster(nodes, STEADY_5_S)
    old = next(n for n in nodes if n.name == head)
    minority = [old, next(n for n in nodes if n is not old)]
    majority = [n for n in nodes if n not in minority]
    sampler = Sampler(nodes)
    sampler.start()
    try:
        with faults.partition_groups([n.host for n in majority], [n.host for n in minority]):
            new_head, new_term, _ = wait_for(
                lambda: (seen := agreed_head(majority)) and seen[0] != head and seen,
                FAILOVER_S,
                0.5,
                what=f"a ready head other than {head} on the majority side",
                describe=describe(nodes),
            )
            assert new_term > term and new_head in {n.name for n in majority}
            time.sleep(5.0)  # and it stays so for a while
    finally:
        sampler.done.set()
        sampler.join(timeout=30)
    overlaps = [(t, heads) for t, heads in sampler.samples if len(heads) > 1]
    assert not overlaps, overlaps
    # The old head stopped acting before the new one started (a gap, not an overlap).
    firsts = [t for t, heads in sampler.samples if new_head in heads]
    lasts = [t for t, heads in sampler.samples if head in heads]
    assert firsts and lasts and max(lasts) < min(firsts), sampler.samples
