"""Attacks on the Ray election with real agents: three gpud nodes (real
serf, real Ray) in namespaces, and rogues that are plain `serf agent`s holding the cluster key,
started by the test on a fourth host of its own.

- Head hijack: a rogue announces ray=head with term 10^30 and asks for no votes. Nobody
  follows it, no node adopts its term, and every gpud reports ray.unverified_head naming it.
- Quorum poisoning: five rogues join and are killed (failed in serf, never verified). The head
  stays head, and when it dies the two survivors elect a new one (2 of 3 verified members).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpud.tags import TAGS_VERSION
from tests.harness.gpud_node import Cluster, GpudNode, problems, wait_for
from tests.harness.netns import Host
from tests.harness.ray_cluster import (
    RAY_EXECUTABLE,
    agreed_head,
    describe,
    kill_host,
    ray_overrides,
)

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason=f"no {RAY_EXECUTABLE}"),
]

# Bounds for one wait on 2 busy cores: a Ray node takes ~10-20 s to start there.
STEADY_S = 150.0
SEEN_S = 60.0
# How long the cluster must hold out against a rogue (several election ticks and gossip rounds).
HOLD_S = 15.0
# The largest term a tag may carry (out-of-range terms are a tags error: test_tags_rogue_netns).
HUGE_TERM = 2**62


class Rogue:
    """A plain `serf agent` with the cluster key on ``host``: no gpud, no peer API."""

    def __init__(
        self, host: Host, name: str, *, key: str, join: str, port: int, tags: dict[str, str]
    ) -> None:
        self.name = name
        self.addr = host.addr
        argv = [
            "serf",
            "agent",
            f"-node={name}",
            f"-bind={host.addr}:{port}",
            f"-rpc-addr={host.addr}:{port + 1000}",
            f"-encrypt={key}",
            f"-join={join}",
            "-log-level=warn",
            *(f"-tag={k}={v}" for k, v in tags.items()),
        ]
        self.proc = host.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill9(self) -> None:
        """kill -9: the rogue fails in serf (it never leaves)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def trust_cluster(_harness_leftovers_removed: None, tmp_path: Path) -> Iterator[Cluster]:
    """Three gpud nodes with Ray on hosts 0-2; host 3 is left to the rogues."""
    temp_root = tempfile.mkdtemp(prefix="grt-")  # short: Ray's socket paths live under it
    cluster = Cluster(4, workdir=tmp_path / "cluster", overrides=ray_overrides(temp_root))
    try:
        cluster.network.start()
        for host in cluster.hosts[:3]:
            cluster.add_node(host, start=False)
        for node in cluster.nodes:
            node.start(cluster.start_timeout)
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(temp_root, ignore_errors=True)


def sees(node: GpudNode, names: set[str], status: str) -> bool:
    return names <= {m["name"] for m in node.members() if m["status"] == status}


def assert_nobody_follows(nodes: list[GpudNode], rogue: Rogue) -> None:
    for node in nodes:
        ray = node.api("/v1/ray")
        target = ray["process"]["target"]
        assert ray["head"] != rogue.name, (node.name, ray["summary"])
        assert target is None or target["head_addr"] != rogue.addr, (node.name, target)
        assert ray["term"] < 1000, (node.name, ray["term"])
        for member in node.members():
            if member["name"] != rogue.name and member["tags"]:
                assert member["tags"]["term"] < 1000, (node.name, member)


def test_rogue_head_with_a_huge_term_is_not_followed(trust_cluster: Cluster) -> None:
    nodes = trust_cluster.nodes
    head = wait_for(
        lambda: agreed_head(nodes), STEADY_S, 1.0, what="one Ray head", describe=describe(nodes)
    )[0]
    rogue = Rogue(
        trust_cluster.hosts[3],
        "rogue",
        key=trust_cluster.key,
        join=nodes[0].join_addr,
        port=7946,
        tags={
            "v": str(TAGS_VERSION),
            "ray": "head",
            "term": str(HUGE_TERM),
            "gcs": "6379",
            "rv": "1",
            "hl": "passing",
            "pp": "7948",
        },
    )
    wait_for(
        lambda: all(sees(n, {"rogue"}, "alive") for n in nodes),
        SEEN_S,
        0.5,
        what="every gpud sees the rogue alive",
        describe=describe(nodes),
    )
    end = time.monotonic() + HOLD_S
    while time.monotonic() < end:
        assert_nobody_follows(nodes, rogue)
        time.sleep(1.0)
    assert all(n.api("/v1/ray")["head"] == head for n in nodes), describe(nodes)()

    def reported() -> bool:
        return all(
            any(p["subject"] == "rogue" for p in problems(n, "ray.unverified_head")) for n in nodes
        )

    wait_for(reported, SEEN_S, 1.0, what="ray.unverified_head on every gpud")
    (found,) = problems(nodes[0], "ray.unverified_head", path="/v1/doctor")
    assert rogue.addr in found["message"] and str(HUGE_TERM) in found["message"]
    rogue.kill9()


def test_dead_rogues_do_not_poison_the_quorum(trust_cluster: Cluster) -> None:
    nodes = trust_cluster.nodes
    wait_for(
        lambda: agreed_head(nodes), STEADY_S, 1.0, what="one Ray head", describe=describe(nodes)
    )
    host = trust_cluster.hosts[3]
    rogues = [
        Rogue(host, f"r{i}", key=trust_cluster.key, join=nodes[0].join_addr, port=7950 + i, tags={})
        for i in range(5)
    ]
    names = {r.name for r in rogues}
    wait_for(lambda: all(sees(n, names, "alive") for n in nodes), SEEN_S, 0.5, what="rogues alive")
    for rogue in rogues:
        rogue.kill9()
    wait_for(
        lambda: all(sees(n, names, "failed") for n in nodes),
        SEEN_S,
        0.5,
        what="rogues failed on every gpud",
        describe=describe(nodes),
    )
    # 3 of 8 "known" members alive would lose the majority ("only 3 of 8 known members
    # alive, 5 needed"): no node may say so, and the cluster keeps one head.
    end = time.monotonic() + HOLD_S
    while time.monotonic() < end:
        for node in nodes:
            ray = node.api("/v1/ray")
            assert "known members alive" not in ray["election_reason"], describe(nodes)()
        time.sleep(1.0)
    head, term, _ = wait_for(
        lambda: agreed_head(nodes), STEADY_S, 1.0, what="one Ray head", describe=describe(nodes)
    )
    # The head dies: 2 of 3 verified members elect a new one (not 2 of 9).
    victim = next(n for n in nodes if n.name == head)
    kill_host(victim)
    survivors = [n for n in nodes if n is not victim]

    def new_head() -> str | None:
        heads = {n.api("/v1/ray")["head"] for n in survivors}
        roles = [n.api("/v1/ray")["role"] for n in survivors]
        (only,) = heads if len(heads) == 1 else (None,)
        return only if only not in (None, head) and "head" in roles else None

    elected = wait_for(new_head, STEADY_S, 1.0, what="a new head", describe=describe(survivors))
    assert elected in {n.name for n in survivors}
    assert all(n.api("/v1/ray")["term"] > term for n in survivors)
