"""The cluster-wide Ray node and serf outlive gpud, on real gpud, serf and Ray in
namespaces.

On the Ray head's host and then on a worker's, gpud is stopped gracefully (SIGTERM to its pid
alone) and started again, then killed with SIGKILL alone and started again. Every time the
head stays the same (name, term, GCS port), no Ray process on any host changes pid (`ray
start`, the GCS, every raylet), the restarted node keeps its serf, and no peer's `gpud members`
shows it anything but alive, sampled every 0.3 s throughout.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpud.process_groups import cmdline, group_members
from tests.harness.gpud_node import Cluster, GpudNode, wait_for
from tests.harness.ray_cluster import (
    RAY_EXECUTABLE,
    STEADY_S,
    agreed_head,
    describe,
    one_ray_cluster,
    running_ray_cluster,
)

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason=f"no {RAY_EXECUTABLE}"),
]

# How long a restarted gpud may take to adopt and settle (its first election step waits for
# the prober to verify its peers).
SETTLE_S = 60.0
SAMPLE_S = 0.3


@pytest.fixture(scope="module")
def ray_cluster(_harness_leftovers_removed: None) -> Iterator[Cluster]:
    with running_ray_cluster(3, "gar-") as cluster:
        yield cluster


def ray_pids(node: GpudNode) -> dict[str, int]:
    """The pids of ``node``'s Ray node: `ray start` (its group's leader) and the group's
    GCS server and raylet, by program name."""
    leader = node.api("/v1/ray")["process"]["process"]["pid"]
    assert leader is not None, f"{node.name} runs no Ray node"
    found = {"ray start": leader}
    for pid in group_members(leader):
        argv = cmdline(pid) or [""]
        name = os.path.basename(argv[0])
        if name in ("gcs_server", "raylet"):
            found[name] = pid
    assert "raylet" in found, (node.name, found)
    return found


def serf_pid(node: GpudNode) -> int:
    pid = node.api("/v1/status")["serf"]["supervisor"]["pid"]
    assert pid is not None, f"{node.name} runs no serf"
    return pid


class MemberSampler(threading.Thread):
    """Every SAMPLE_S, each running node's `gpud members`: (observer, member, status) of every
    member shown as anything but alive."""

    def __init__(self, nodes: list[GpudNode]) -> None:
        super().__init__(daemon=True)
        self.nodes = nodes
        self.bad: list[tuple[str, str, str]] = []
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for node in self.nodes:
                try:
                    members = node.members() if node.running() else []
                except Exception:
                    continue  # a gpud that is restarting has no API: its peers are sampled
                self.samples += bool(members)
                self.bad += [
                    (node.name, m["name"], m["status"]) for m in members if m["status"] != "alive"
                ]
            self.done.wait(SAMPLE_S)


def adoption_lines(node: GpudNode) -> list[str]:
    """What ``node``'s log says about adoption and elections (for a failure's message)."""
    words = ("adopt", "harness: starting", "elected", "stepping down", "ray target", "serf")
    lines = [
        line[:240]
        for line in node.log_text().splitlines()
        if any(w in line for w in words) and "source=" not in line  # not serf's own lines
    ]
    return lines[-30:]


def settled(node: GpudNode, role: str) -> bool:
    ray = node.api("/v1/ray")
    return ray["role"] == role and ray["action"] in ("lead", "follow")


def restart(node: GpudNode, how: str, timeout: float) -> None:
    if how == "kill9":
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGKILL)  # gpud's pid alone: its children run on
        node.proc.wait(timeout=10)
    else:
        assert node.terminate() == 0
    node.start(timeout)


def test_ray_and_serf_survive_gpud_restarts(ray_cluster: Cluster) -> None:
    nodes = list(ray_cluster)
    head = one_ray_cluster(nodes, STEADY_S)
    by_name = {n.name: n for n in nodes}
    worker = next(n for n in nodes if n.name != head[0])
    ray_before = {n.name: ray_pids(n) for n in nodes}
    assert "gcs_server" in ray_before[head[0]]
    serf_before = {n.name: serf_pid(n) for n in nodes}
    sampler = MemberSampler(nodes)
    sampler.start()
    try:
        for node, role in ((by_name[head[0]], "head"), (worker, "worker")):
            for how in ("sigterm", "kill9"):
                began = time.monotonic()
                restart(node, how, ray_cluster.start_timeout)
                wait_for(
                    lambda node=node, role=role: settled(node, role) and agreed_head(nodes),
                    SETTLE_S,
                    0.5,
                    what=f"{node.name} settled as {role} after {how}",
                    describe=describe(nodes),
                )
                took = time.monotonic() - began
                print(f"{node.name} ({role}) {how}: settled {took:.1f} s after the stop")
                print([line for line in adoption_lines(node) if "first election" in line][-1:])
                if agreed_head(nodes) != head:
                    print("\n".join(adoption_lines(node)))
                assert agreed_head(nodes) == head, (describe(nodes)(), adoption_lines(node))
                assert {n.name: ray_pids(n) for n in nodes} == ray_before, how
                assert serf_pid(node) == serf_before[node.name], how
                assert "ray node adopted" in node.log_text()
        # Nothing changed after the settling either (no delayed restart or step-down).
        time.sleep(5)
        assert agreed_head(nodes) == head
        assert {n.name: ray_pids(n) for n in nodes} == ray_before
        assert {n.name: serf_pid(n) for n in nodes} == serf_before
    finally:
        sampler.done.set()
        sampler.join(timeout=30)
    assert sampler.samples > 20
    assert not sampler.bad, sampler.bad[:10]
