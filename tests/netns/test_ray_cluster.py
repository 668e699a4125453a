"""Ray head election with real gpud agents, real serf and real `ray start` in namespaces.

One 3-host cluster is shared by the checks that leave it whole (each starts by waiting for a
steady cluster, so their order does not matter); the kill -9 test runs last on it and
restarts the killed host afterwards. The port-mapping test has its own small cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpud.config import MetricsConfig
from gpud.process_groups import group_members
from tests.harness import faults
from tests.harness.gpud_node import Cluster, GpudNode, wait_for
from tests.harness.ray_cluster import (
    FAILOVER_S,
    RAY_EXECUTABLE,
    agreed_head,
    describe,
    head_views,
    kill_host,
    one_ray_cluster,
    ray_overrides,
    running_ray_cluster,
)

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason=f"no {RAY_EXECUTABLE}"),
]

# Bound for one wait on 2 busy cores: a Ray node takes ~10-20 s to start there.
STEADY_S = 150.0
SERF_PORT, PEER_PORT = 7946, 7948


@pytest.fixture(scope="module")
def ray_cluster(_harness_leftovers_removed: None) -> Iterator[Cluster]:
    with running_ray_cluster(3, "grt-") as cluster:
        yield cluster


def ray_process_ports(node: GpudNode) -> tuple[int, set[int]]:
    """(pid, ports) of the `ray start` process gpud runs, the ports read from its cmdline."""
    pid = node.api("/v1/ray")["process"]["process"]["pid"]
    assert pid is not None, f"{node.name} runs no Ray process"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert "start" in argv and "--block" in argv, argv
    flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    ports = {int(v) for k, v in flags.items() if k.endswith("-port") or k == "port"}
    low, high = int(flags["min-worker-port"]), int(flags["max-worker-port"])
    return pid, (ports - {low, high}) | set(range(low, high + 1))


def listening_ports(node: GpudNode) -> dict[int, str]:
    """Port -> owning process of every listening TCP / bound UDP socket in node's namespace."""
    bound = {}
    for line in node.host.run(["ss", "-ltnupH"]).stdout.splitlines():
        fields = line.split()
        bound[int(fields[4].rsplit(":", 1)[1])] = fields[-1]
    return bound


def test_one_head_three_ray_nodes_ports_inside_leases(ray_cluster: Cluster) -> None:
    nodes = list(ray_cluster)
    head, term, gcs = one_ray_cluster(nodes, STEADY_S)
    # Exactly one head, the same term in every node's view (agreed_head checks the views).
    assert all(v.heads == ((head, term, gcs),) for v in head_views(nodes))
    head_node = next(n for n in nodes if n.name == head)
    ray = head_node.api("/v1/ray")
    assert ray["role"] == "head" and ray["head_address"] == f"{head_node.addr}:{gcs}"
    assert {n["ip"] for n in ray["ray_nodes"]["nodes"]} == {n.addr for n in nodes}
    for node in nodes:
        status = node.api("/v1/ray")
        assert status["role"] == ("head" if node is head_node else "worker")
        assert status["term"] == term
        _, ports = ray_process_ports(node)
        leased = {p for lease in node.api("/v1/ports/leases") for p in lease["ports"]}
        assert ports <= leased, f"{node.name}: Ray ports outside leases: {ports - leased}"
        # And what really listens there: every TCP/UDP socket bound in the namespace is gpud's
        # own (serf, its RPC, the peer API, the metrics listener) or inside a lease.
        own = {node.serf_port, node.config["serf"]["rpc_port"], node.peer_port}
        metrics_listen = node.config.get("metrics", {}).get("listen", MetricsConfig().listen)
        if metrics_listen:
            own.add(int(metrics_listen.rsplit(":", 1)[1]))
        bound = listening_ports(node)
        assert set(bound) - own <= leased, {p: bound[p] for p in set(bound) - own - leased}
        # The GCS port is a head's port only, and it is the one announced in the tags.
        flags = status["process"]["ports"]["named"]
        assert ("port" in flags) == (node is head_node)
        if node is head_node:
            assert flags["port"] == gcs
    # Ray's own output, from the file it writes (it outlives gpud): `gpud ray logs`.
    shown = head_node.cli("ray", "logs", "-n", "50").stdout
    assert "Ray runtime started" in shown, shown


def test_partition_minority_has_no_head_and_heals_to_one_cluster(ray_cluster: Cluster) -> None:
    nodes = list(ray_cluster)
    head, term, _ = one_ray_cluster(nodes, STEADY_S)
    # Put the head in the minority when we can: then the majority must elect a new one.
    minority = next(n for n in nodes if n.name == head)
    majority = [n for n in nodes if n is not minority]
    with faults.partition_groups([n.host for n in majority], [minority.host]):
        new_head, new_term, _ = wait_for(
            lambda: (seen := agreed_head(majority)) and seen[0] != head and seen,
            FAILOVER_S,
            1.0,
            what=f"a ready head other than {head} on the majority side",
            describe=describe(nodes),
        )
        assert new_head != head and new_term > term

        def minority_headless() -> bool:
            ray = minority.api("/v1/ray")
            return ray["role"] != "head" and not any(
                name == minority.name for name, *_ in head_views([minority])[0].heads
            )

        wait_for(
            minority_headless,
            FAILOVER_S,
            1.0,
            what=f"{minority.name} (cut off alone) to give up the head role",
            describe=describe(nodes),
        )
        # Alone it never gathers a majority: it stays headless for a while.
        for _ in range(5):
            assert minority_headless(), describe(nodes)()
            assert minority.api("/v1/ray")["action"] != "lead"
            time.sleep(1.0)
    healed_head, healed_term, _ = one_ray_cluster(nodes, STEADY_S)
    assert healed_term >= new_term
    assert healed_head in {n.name for n in majority}


def test_kill9_of_gpud_alone_leaves_no_second_ray_node_nor_serf(ray_cluster: Cluster) -> None:
    """kill -9 of a worker's gpud only (not under systemd, nothing else dies): its serf and
    its `ray start` group live on. The next gpud adopts exactly those groups instead of
    starting its own, so the head never counts two Ray nodes for one host (0.1
    counted 4 on 3)."""
    nodes = list(ray_cluster)
    head, _, _ = one_ray_cluster(nodes, STEADY_S)
    victim = next(n for n in nodes if n.name != head)
    ray_pid, serf_pid = victim.api("/v1/ray")["process"]["process"]["pid"], victim.serf_pid()
    assert ray_pid is not None and serf_pid is not None
    groups = {"ray": os.getpgid(ray_pid), "serf": os.getpgid(serf_pid)}
    assert victim.proc is not None
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    assert all(group_members(g) for g in groups.values()), "gpud's children should outlive it"
    victim.start()
    wait_for(
        lambda: (
            (
                victim.api("/v1/ray")["process"]["process"]["pid"],
                victim.api("/v1/status")["serf"]["supervisor"]["pid"],
            )
            == (ray_pid, serf_pid)
        ),
        60,
        0.5,
        what=f"the groups {groups} the killed gpud left on {victim.name} adopted",
    )
    head, _, _ = one_ray_cluster(nodes, STEADY_S)
    head_node = next(n for n in nodes if n.name == head)

    def one_ray_node_per_host() -> bool:
        seen = head_node.api("/v1/ray")["ray_nodes"]["nodes"] or []
        return sorted(n["name"] for n in seen) == sorted(n.name for n in nodes)

    wait_for(
        one_ray_node_per_host,
        60,
        1.0,
        what="exactly one alive Ray node per host in the head's GCS",
        describe=lambda: str(head_node.api("/v1/ray")["ray_nodes"]),
    )


def test_kill9_head_host_new_head_with_survivors(ray_cluster: Cluster) -> None:
    nodes = list(ray_cluster)
    head, term, _ = one_ray_cluster(nodes, STEADY_S)
    victim = next(n for n in nodes if n.name == head)
    survivors = [n for n in nodes if n is not victim]
    leftovers = kill_host(victim)
    try:
        assert not victim.running()
        # GpudNode.kill9 takes Ray down with gpud: nothing was left in the namespace.
        assert leftovers == [], f"alive after kill9 on {victim.name}: {leftovers}"
        new_head, new_term, _ = one_ray_cluster(survivors, FAILOVER_S)
        assert new_head != head and new_term > term
    finally:
        # Give the shared cluster its third host back (a fresh start of the same node).
        victim.reap_children()
        victim.start()
    one_ray_cluster(nodes, STEADY_S)


def test_port_mapped_node_never_becomes_head(cluster: Callable[..., Cluster]) -> None:
    temp_root = tempfile.mkdtemp(prefix="grn-")
    c: Cluster | None = None
    try:
        c = cluster(2, overrides=ray_overrides(temp_root))
        inner = faults.port_mapped_host(c.hosts[1], [SERF_PORT + 10, PEER_PORT + 10])
        mapped = c.add_node(
            inner,
            serf_port=SERF_PORT + 10,
            rpc_port=7383,
            peer_port=PEER_PORT + 10,
            # The most preferred node of the cluster: only NAT keeps it from being head.
            overrides={"ray": {"head": "prefer", "priority": 100}},
        )
        plain = [n for n in c if n is not mapped]
        head, _, _ = wait_for(
            lambda: agreed_head(list(c)),
            STEADY_S,
            1.0,
            what="a ready head seen by all three nodes",
            describe=describe(list(c)),
        )
        assert head in {n.name for n in plain}
        # Until its Ray install check is done its first reason is that Ray is not available.
        wait_for(
            lambda: "NAT" in (mapped.api("/v1/ray")["not_eligible_reason"] or ""),
            STEADY_S,
            0.5,
            what="the mapped node not eligible for NAT",
            describe=lambda: str(mapped.api("/v1/ray")),
        )
        assert not mapped.api("/v1/ray")["eligible"]
        # Keep watching: the preferred node must not take over once it is settled either.
        for _ in range(10):
            views = head_views(list(c))
            assert all(mapped.name not in {h[0] for h in v.heads} for v in views), views
            assert mapped.api("/v1/ray")["role"] != "head"
            time.sleep(1.0)
    finally:
        if c is not None:
            c.close()  # Ray first, or it writes into the temp root again after it is removed
        shutil.rmtree(temp_root, ignore_errors=True)


def test_ten_hard_crashes_leak_no_ray_lease(cluster: Callable[..., Cluster]) -> None:
    """Power-cut style crashes (gpud, serf and Ray SIGKILLed together) at the worst moment,
    right after Ray's ports were leased: every lease is owned by the gpud it serves, so the
    zombie scan frees them and the 11th gpud runs Ray on a block that holds only its own."""
    temp_root = tempfile.mkdtemp(prefix="gcr-")
    try:
        c = cluster(1, overrides={**ray_overrides(temp_root), "ports": {"zombie_grace_s": 0.5}})
        (node,) = list(c)

        def ray_leases() -> list[dict[str, object]]:
            leases = node.api("/v1/ports/leases")
            return [lease for lease in leases if str(lease["owner"]).startswith("ray-")]

        seen: set[object] = set()

        def new_lease() -> set[object]:
            return {lease["id"] for lease in ray_leases()} - seen

        for crash in range(10):
            wait_for(
                new_lease,
                STEADY_S,
                0.2,
                what=f"Ray's ports leased anew (before crash {crash + 1})",
                describe=lambda: f"{describe([node])()}\nleases: {ray_leases()}",
            )
            seen.update(lease["id"] for lease in ray_leases())
            kill_host(node)
            node.reap_children()
            node.start()
        wait_for(
            lambda: agreed_head([node]),
            STEADY_S,
            1.0,
            what="Ray running after 10 hard crashes",
            describe=describe([node]),
        )
        wait_for(
            lambda: (
                {(lease["owner"], lease["pid"]) for lease in ray_leases()}
                == {("ray-head", node.pid), ("ray-head-workers", node.pid)}
                and len(ray_leases()) == 2
            ),
            30,
            0.5,
            what="only the running gpud's two Ray leases",
            describe=lambda: str(ray_leases()),
        )
        doctor = node.api("/v1/doctor")
        codes = {p["code"] for p in doctor["problems"]}
        assert not codes & {"ports.block_nearly_full", "ports.block_exhausted"}, doctor
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)
