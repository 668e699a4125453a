"""Leader lease with real gpud, serf and Ray in namespaces (issue 11 item 3).

A 3|2 partition with the head in the minority: the majority elects a new head, and at no
sample (every 0.5 s, on every node) do two nodes act as head at once. A node acts as head
while its /v1/ray says role head, or while its Ray head process still runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import faults
from tests.harness.gpud_node import Cluster, GpudNode, wait_for
from tests.ray_helpers import RAY_EXECUTABLE, agreed_head, running_ray_cluster
from tests.test_ray_cluster import FAILOVER_S, describe, wait_steady

pytestmark = [
    pytest.mark.netns,
    pytest.mark.ray,
    pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason=f"no {RAY_EXECUTABLE}"),
]

SAMPLE_S = 0.5
STEADY_5_S = 300.0


@pytest.fixture(scope="module")
def ray_cluster(_harness_leftovers_removed: None) -> Iterator[Cluster]:
    with running_ray_cluster(5, "gll-") as cluster:
        yield cluster


def acting_head(node: GpudNode) -> bool:
    try:
        ray = node.api("/v1/ray", timeout=2.0)
    except Exception:
        return False  # a node that cannot answer its own API is not announcing anything
    target = ray["process"]["target"]
    running_head = (
        target is not None
        and target["role"] == "head"
        and ray["process"]["process"]["pid"] is not None
    )
    return ray["role"] == "head" or running_head


class Sampler(threading.Thread):
    """Which nodes act as head, every SAMPLE_S, until stopped."""

    def __init__(self, nodes: list[GpudNode]) -> None:
        super().__init__(daemon=True)
        self.nodes = nodes
        self.samples: list[tuple[float, list[str]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        began = time.monotonic()
        while not self.done.is_set():
            heads = [n.name for n in self.nodes if acting_head(n)]
            self.samples.append((round(time.monotonic() - began, 1), heads))
            self.done.wait(SAMPLE_S)


def test_partition_head_in_minority_never_two_acting_heads(ray_cluster: Cluster) -> None:
    nodes = list(ray_cluster)
    head, term, _ = wait_steady(nodes, STEADY_5_S)
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
