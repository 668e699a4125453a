"""No price in false alarms, with real gpud, serf and Ray in namespaces.

1. The head's gpud is frozen (SIGSTOP of its pid only; its serf and Ray keep running) for
   30 s: no peer judges any node down, the head and term stay, no Ray process restarts;
   after SIGCONT the head re-checks its lease and keeps leading.
2. 5% random loss on every link (inbound on every host) for LOSS_S = 90 s in the suite (the
   issue asks for 5 minutes: `GPUD_LOSS_S=300` runs exactly that, bounded to 30 minutes):
   0 down verdicts and 0 head changes, sampled every 0.5 s on every node.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.harness import faults
from tests.harness.gpud_node import Cluster, GpudNode
from tests.harness.ray_cluster import (
    RAY_EXECUTABLE,
    STEADY_S,
    describe,
    one_ray_cluster,
    running_ray_cluster,
)

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason=f"no {RAY_EXECUTABLE}"),
]

FREEZE_S = 30.0
LOSS_S = min(float(os.environ.get("GPUD_LOSS_S", "90")), 1800.0)
SAMPLE_S = 0.5


@pytest.fixture(scope="module")
def ray_cluster(_harness_leftovers_removed: None) -> Iterator[Cluster]:
    with running_ray_cluster(3, "gfa-") as cluster:
        yield cluster


def ray_state(node: GpudNode) -> tuple[str, int, int | None, int]:
    ray = node.api("/v1/ray")
    return ray["role"], ray["term"], ray["process"]["process"]["pid"], ray["restarts_total"]


def false_verdicts(nodes: list[GpudNode]) -> list[str]:
    """Every member some node shows down or not alive (all hosts are up in these tests)."""
    found = []
    for node in nodes:
        for m in node.members():
            if m.get("down") or m["status"] != "alive":
                found.append(f"{node.name} sees {m['name']} {m['status']} {m.get('down_reason')}")
    return found


def sample(nodes: list[GpudNode], seconds: float, head: str, term: int) -> list[str]:
    """Sample every SAMPLE_S on every node; what went wrong (empty: nothing)."""
    wrong: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        wrong += false_verdicts(nodes)
        for node in nodes:
            heads = {
                (m["name"], m["tags"]["term"])
                for m in node.members()
                if m["tags"] and m["tags"]["ray"] == "head"
            }
            if heads != {(head, term)}:
                wrong.append(f"{node.name} sees heads {sorted(heads)}, not {head} term {term}")
        time.sleep(SAMPLE_S)
    return wrong


def test_frozen_head_gpud_is_kept_and_no_ray_restarts(ray_cluster: Cluster) -> None:
    nodes = list(ray_cluster)
    head, term, _ = one_ray_cluster(nodes, STEADY_S)
    frozen = next(n for n in nodes if n.name == head)
    others = [n for n in nodes if n is not frozen]
    before = {n.name: ray_state(n) for n in nodes}
    assert frozen.pid is not None
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        wrong = sample(others, FREEZE_S, head, term)
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    wrong += sample(nodes, 10.0, head, term)
    assert not wrong, [*wrong[:10], describe(nodes)()]
    after = {n.name: ray_state(n) for n in nodes}
    assert after == before, (before, after)


# pytest-timeout bounds a test at 300 s; a longer GPUD_LOSS_S needs the loss time on top.
@pytest.mark.timeout(LOSS_S + 300)
def test_five_percent_loss_no_down_verdicts_no_head_change(ray_cluster: Cluster) -> None:
    nodes = list(ray_cluster)
    head, term, _ = one_ray_cluster(nodes, STEADY_S)
    before = {n.name: ray_state(n) for n in nodes}
    with ExitStack() as stack:
        for node in nodes:
            stack.enter_context(faults.loss(node.host, 5, direction="in"))
        wrong = sample(nodes, LOSS_S, head, term)
    assert not wrong, [*wrong[:10], describe(nodes)()]
    assert {n.name: ray_state(n) for n in nodes} == before
