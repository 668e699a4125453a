"""Ray's own ports, with real gpud + serf + `ray start` in namespaces.

- The head's GCS port blocked (nftables drop on the head; gossip and peer API open): every
  worker says it cannot reach the GCS and why, in `gpud status`, /v1/ray, `gpud doctor` and
  /metrics; the head notes the tagged workers missing from its GCS; with nobody else eligible
  it stays head and says why, otherwise it is re-elected away.
- A worker's node-manager and object-manager ports blocked: its Ray fails on that host with
  the reason, and the head reports the worker missing with its node-manager port probed.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpud.ray.election import GCS_UNREACHABLE
from tests.harness import faults
from tests.harness.gpud_node import Cluster, GpudNode, problems, wait_for
from tests.harness.ray_cluster import (
    RAY_EXECUTABLE,
    STEADY_S,
    agreed_head,
    describe,
    one_ray_cluster,
    ray_node_names,
    ray_overrides,
)

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason=f"no {RAY_EXECUTABLE}"),
]

# Bounds for one wait on 2 busy cores (see STEADY_S): the head polls its GCS every 10 s.
DIAGNOSE_S = 60.0
MISSING_S = 240.0
NEVER = {"ray": {"head": "never"}}
PREFER = {"ray": {"head": "prefer"}}


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self._path)


def metrics_text(node: GpudNode) -> str:
    conn = _Unix(node.socket)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_blocked_gcs_port_is_diagnosed_and_the_head_kept_when_nobody_else_may_lead(
    cluster: Callable[..., Cluster], temp_root: str
) -> None:
    c = cluster(
        3, overrides=ray_overrides(temp_root), node_overrides={0: PREFER, 1: NEVER, 2: NEVER}
    )
    nodes = list(c)
    h0, workers = nodes[0], nodes[1:]
    head, _term, gcs = one_ray_cluster(nodes, STEADY_S)
    assert head == h0.name
    for w in workers:
        assert w.api("/v1/ray")["gcs_reach"]["direction"]["state"] == "passing"
    assert "gpud_ray_workers_missing 0.0\n" in metrics_text(h0)
    with faults.block_port(h0.host, gcs):

        def all_diagnosed() -> bool:
            return all(problems(w, "ray.gcs_unreachable") for w in workers)

        wait_for(
            all_diagnosed,
            DIAGNOSE_S,
            0.5,
            what="ray.gcs_unreachable on both workers",
            describe=describe(nodes),
        )
        for w in workers:
            (problem,) = problems(w, "ray.gcs_unreachable")
            assert problem["message"] == (
                f"{w.name} cannot reach GCS {h0.addr}:{gcs} (timed out) while {h0.name}'s peer "
                f"API answers: a firewall on {h0.name} blocks tcp/{gcs}"
            ), problem
            assert problem["severity"] == "critical" and problem["fix"]
            ray = w.api("/v1/ray")
            assert ray["gcs_reach"]["direction"]["state"] == "critical", ray
            # /v1/health shows the workload's port beside gpud's own (which still passes).
            health = w.api("/v1/health")
            (gcs_check,) = [c for c in health["workload"] if c["check"] == "ray.gcs"]
            assert gcs_check["subject"] == h0.name and gcs_check["target"] == f"{h0.addr}:{gcs}"
            assert gcs_check["state"] == "critical" and "timed out" in gcs_check["reason"]
            assert "unreachable" in ray["summary"], ray["summary"]
            reachable = f'gpud_ray_gcs_reachable{{address="{h0.addr}:{gcs}",head="{h0.name}"}}'
            assert f"{reachable} 0.0\n" in metrics_text(w)
            doctor = w.cli("doctor", check=False, timeout=120)
            assert doctor.returncode != 0, doctor.stdout + doctor.stderr
            assert "ray.gcs_unreachable" in doctor.stdout, doctor.stdout + doctor.stderr
            assert f"tcp/{gcs}" in doctor.stdout
        # Nobody else may lead: the head stays and says why, instead of leaving no Ray at all.
        wait_for(
            lambda: problems(h0, "ray.head_gcs_unreachable"),
            DIAGNOSE_S,
            0.5,
            what="ray.head_gcs_unreachable on the head",
            describe=describe(nodes),
        )
        assert agreed_head(nodes) is not None and agreed_head(nodes)[0] == h0.name  # type: ignore[index]
        # The workers' raylets give up on the GCS; the head notes them missing, probed.
        wait_for(
            lambda: (
                {p["subject"] for p in problems(h0, "ray.worker_missing")}
                == {w.name for w in workers}
            ),
            MISSING_S,
            1.0,
            what="both workers missing from the head's GCS",
            describe=describe(nodes),
        )
        for problem in problems(h0, "ray.worker_missing"):
            # Which of the two the head says depends on when it polls: a GCS lists a raylet
            # that gave up alive for a while. Both name the node-manager probe.
            message = problem["message"]
            assert (
                "is not alive in its GCS" in message or "is listed alive in GCS" in message
            ) and "node-manager" in message, problem
        assert "Ray nodes alive" in h0.api("/v1/ray")["summary"]
        assert "gpud_ray_workers_missing 2.0" in metrics_text(h0)
    # Healed: the workers reach the GCS again and rejoin.
    one_ray_cluster(nodes, STEADY_S)
    wait_for(
        lambda: not any(problems(w, "ray.gcs_unreachable") for w in workers),
        DIAGNOSE_S,
        0.5,
        what="ray.gcs_unreachable cleared",
        describe=describe(nodes),
    )


def test_blocked_gcs_port_re_elects_the_head(
    cluster: Callable[..., Cluster], temp_root: str
) -> None:
    c = cluster(3, overrides=ray_overrides(temp_root))
    nodes = list(c)
    head, term, gcs = one_ray_cluster(nodes, STEADY_S)
    # Whichever node won (start order decides), its GCS port is the one blocked.
    h0 = next(n for n in nodes if n.name == head)
    with faults.block_port(h0.host, gcs):

        def new_head() -> tuple[str, int, int] | None:
            found = agreed_head(nodes)
            return found if found is not None and found[0] != h0.name else None

        moved, new_term, _ = wait_for(
            new_head, STEADY_S, 0.5, what="a head other than h0", describe=describe(nodes)
        )
        assert new_term > term
        ray = h0.api("/v1/ray")
        assert GCS_UNREACHABLE in (ray["not_eligible_reason"] or ""), ray
        # One Ray cluster under the new head, the deposed head in it as a worker (only its
        # GCS port was blocked; tests/netns/test_ray_stepdown_netns.py times it).
        by_name = {n.name: n for n in nodes}
        wait_for(
            lambda: ray_node_names(by_name[moved]) == {n.name for n in nodes},
            STEADY_S,
            1.0,
            what="all three registered with the new head",
            describe=describe(nodes),
        )


def test_blocked_worker_ray_ports_are_diagnosed_on_the_worker_and_the_head(
    cluster: Callable[..., Cluster], temp_root: str
) -> None:
    c = cluster(3, overrides=ray_overrides(temp_root))
    nodes = list(c)
    head, _term, _gcs = one_ray_cluster(nodes, STEADY_S)
    h0 = next(n for n in nodes if n.name == head)
    h2 = next(n for n in nodes if n is not h0)
    named = h2.api("/v1/ray")["process"]["ports"]["named"]
    nm, om = named["node-manager-port"], named["object-manager-port"]
    on_worker = ("ray.crash_loop", "ray.down", "ray.not_registered")
    seen: dict[str, dict[str, Any]] = {}

    def both_diagnosed() -> bool:
        # The worker's Ray fails and restarts on the same leased ports: record what each
        # host said at any moment, since a restart briefly looks fine again.
        for problem in h2.api("/v1/status")["problems"]:
            if problem["code"] in on_worker:
                seen.setdefault("worker", problem)
        for problem in problems(h0, "ray.worker_missing"):
            if problem["subject"] == h2.name:
                seen.setdefault("head", problem)
        for check in h0.api("/v1/health")["workload"]:
            if check["check"] == "ray.worker" and check["subject"] == h2.name:
                if check["state"] == "critical":
                    seen.setdefault("health", check)
        return {"worker", "head", "health"} <= seen.keys()

    with faults.block_port(h2.host, nm), faults.block_port(h2.host, om):
        wait_for(
            both_diagnosed,
            MISSING_S,
            0.5,
            what="the blocked worker diagnosed on both",
            describe=describe(nodes),
        )
    worker, missing = seen["worker"], seen["head"]
    assert worker["subject"] == h2.name and worker["message"], worker
    assert f"node-manager {h2.addr}:{nm}" in missing["message"], missing
    assert seen["health"]["target"] == f"{h2.addr}:{nm}", seen["health"]
    one_ray_cluster(nodes, STEADY_S)


def test_port_mapped_node_crash_looping_ray_is_reported_with_the_reason(
    cluster: Callable[..., Cluster], temp_root: str
) -> None:
    # Only gossip and the peer API are mapped into the inner namespace: Ray cannot work there.
    serf_port, peer_port = 7956, 7958
    c = cluster(2, overrides=ray_overrides(temp_root))
    inner = faults.port_mapped_host(c.hosts[1], [serf_port, peer_port])
    mapped = c.add_node(inner, serf_port=serf_port, rpc_port=7383, peer_port=peer_port)
    plain = [n for n in c if n is not mapped]
    nodes = list(c)
    head = wait_for(
        lambda: agreed_head(nodes), STEADY_S, 1.0, what="a ready head", describe=describe(nodes)
    )[0]
    head_node = next(n for n in plain if n.name == head)
    seen: dict[str, dict[str, Any]] = {}

    def both_diagnosed() -> bool:
        for problem in mapped.api("/v1/status")["problems"]:
            if problem["code"] in ("ray.crash_loop", "ray.down", "ray.not_registered"):
                seen.setdefault("mapped", problem)
                summary = mapped.api("/v1/ray")["summary"]
                # Never a bare "ray running": the summary carries why it is not working.
                assert "ray running" not in summary or any(
                    why in summary for why in ("crash loop", "not alive in GCS")
                ), summary
        for problem in problems(head_node, "ray.worker_missing"):
            if problem["subject"] == mapped.name:
                seen.setdefault("head", problem)
        return {"mapped", "head"} <= seen.keys()

    wait_for(
        both_diagnosed,
        MISSING_S,
        0.5,
        what="the port-mapped node's Ray diagnosed",
        describe=describe(nodes),
    )
    assert seen["mapped"]["message"], seen
    # Whether the GCS still lists it alive (a Ray that started, then lost its head) or not at
    # all depends on where its crash loop is when the head looks: either way the head names it
    # and what its node-manager port answered.
    message = seen["head"]["message"]
    assert (
        f"{mapped.name} says it is a Ray worker of {head}" in message
        or f"{mapped.name} is listed alive in GCS" in message
    ), seen
    assert "node-manager" in message, seen
