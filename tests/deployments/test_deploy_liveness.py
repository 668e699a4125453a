"""Liveness of a multi-node replica: its Ray cluster lost a node, so it is restarted as a whole.

Pure: `readiness.cluster_step`, the head's judgement of its replica's cluster from what its GCS
lists alive and where the replica is placed, driven round by round as production does.

Harness (real gpud + serf + Ray in namespaces, the vLLM stand-in as `vllm`, 4 hosts, R=1 N=2
G=1, `ready_check = "completion"`): kill -9 of the replica's worker host. Within seconds no
surviving host lists the replica ready; it is restarted as a whole (a new Ray cluster, with the
free host in the killed one's place) and gets ready again, every actor on its new nodes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud.deployments.readiness import cluster_step
from tests.harness import fake_nvml, fake_vllm
from tests.harness.deployments import operated_cluster
from tests.harness.gpud_node import GpudNode, wait_for
from tests.harness.ray_cluster import RAY_EXECUTABLE
from tests.harness.vllm_cluster import (
    SPEC,
    answers_over_the_data_path,
    nvml_with_gpu0_lost,
    placement,
    post,
)

# ---- pure decision -------------------------------------------------------------------------

names = st.frozensets(st.sampled_from("abcdef"), max_size=6)


@given(names, st.none() | names, names)
def test_cluster_step_loses_exactly_the_joined_nodes_not_alive_or_not_members(
    joined: frozenset[str], alive: frozenset[str] | None, members: frozenset[str]
) -> None:
    seen, lost = cluster_step(joined, alive, members)
    assert joined <= seen <= joined | members
    if alive is None:  # the GCS did not answer: only the membership counts, nothing is learned
        assert seen == joined and lost == joined - members
    else:
        assert seen == joined | (alive & members)
        assert lost == {n for n in seen if n not in alive or n not in members}
        assert not lost & alive & members  # alive in the GCS and a member is never lost


@given(
    st.lists(st.tuples(st.none() | names, names), max_size=20),
    st.frozensets(st.sampled_from("abcdef"), min_size=1, max_size=3),
)
def test_cluster_step_rounds_restart_once_a_node_that_joined_is_gone(
    rounds: list[tuple[frozenset[str] | None, frozenset[str]]], nodes: frozenset[str]
) -> None:
    """Rounds in order, as the head judges them; a restart is a new cluster (nothing joined).
    A node never seen alive (still joining) never restarts it; a healthy cluster (every node
    alive in the GCS and a member each round) never restarts."""
    joined: frozenset[str] = frozenset()
    for alive, members in rounds:
        before = joined
        joined, lost = cluster_step(joined, alive, members)
        gone = {n for n in before if n not in members or (alive is not None and n not in alive)}
        assert lost == gone
        if lost:
            joined = frozenset()
    joined = frozenset()
    for _ in rounds:
        joined, lost = cluster_step(joined, nodes, nodes)
        assert not lost and joined == nodes


def test_cluster_step_a_killed_worker_host() -> None:
    """The cases the harness test drives: the worker's host leaves the membership (failed)
    while the GCS still lists it alive; or the GCS marks it dead first."""
    both = frozenset({"head", "worker"})
    joined, lost = cluster_step(frozenset(), both, both | {"free"})
    assert joined == both and not lost
    _, lost = cluster_step(joined, both, frozenset({"head", "free"}))
    assert lost == {"worker"}
    _, lost = cluster_step(joined, frozenset({"head"}), both)
    assert lost == {"worker"}
    _, lost = cluster_step(joined, None, both)  # the GCS did not answer this round
    assert not lost


# ---- harness -------------------------------------------------------------------------------

NOT_READY_S = 30.0  # serf's failure detection, then one readiness round
RECOVERED_S = 240.0
RAY_READY_S = 240.0


def endpoints(nodes: list[GpudNode]) -> list[list[dict[str, Any]]]:
    return [n.api("/v1/deployments/big/endpoints")["endpoints"] for n in nodes]


@pytest.mark.netns
@pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason="Ray is not installed")
@pytest.mark.timeout(600)
def test_kill9_of_a_worker_host_restarts_the_replica_as_a_whole_on_the_free_host(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = tmp_path / "nvml.json"
    nvml_with_gpu0_lost(nvml)
    monkeypatch.setenv(fake_nvml.ENV, str(nvml))
    vllm = fake_vllm.install(tmp_path / "bin", nvml_state=nvml)
    ray_temp = tempfile.mkdtemp(prefix="gdl", dir="/tmp")  # short: Ray's socket paths
    try:
        c, key_file = operated_cluster(
            cluster,
            tmp_path,
            4,
            {"vllm_executable": str(vllm)},
            ray={"executable": RAY_EXECUTABLE, "num_cpus": 1, "temp_root": ray_temp},
        )
        spec = tmp_path / "big.toml"
        spec.write_text(
            SPEC.replace('"llm"', '"big"') + 'nodes_per_replica = 2\nready_check = "completion"\n'
        )
        c[0].cli("deploy", "apply", str(spec), "--key", str(key_file))

        def status(nodes: list[GpudNode]) -> str:
            return "\n".join(n.cli("deploy", "status", "big", check=False).stdout for n in nodes)

        wait_for(
            lambda: all(len(e) == 1 for e in endpoints(c.nodes)),
            RAY_READY_S,
            1.0,
            what="the 2-node replica ready from all 4 hosts",
            describe=lambda: status(c.nodes),
        )
        (view,) = c[0].api("/v1/deployments/big")["replica_views"]
        head = next(n for n in c if n.name == view["node"])
        victim = next(n for n in c if n.name in view["nodes"] and n is not head)
        survivors = [n for n in c if n is not victim]
        victim.kill9()
        killed = time.monotonic()
        wait_for(
            lambda: not any(endpoints(survivors)),
            NOT_READY_S,
            0.25,
            what="the replica not ready on every surviving host",
            describe=lambda: status(survivors),
        )
        not_ready = time.monotonic() - killed
        # The head says why, until a later start of the replica passes a probe.
        lost = [
            p
            for p in head.api("/v1/doctor")["problems"]
            if p["code"] == "deployments.replica_ray_node_lost"
        ]
        assert lost and victim.name in lost[0]["message"], lost

        def whole_again() -> Any:
            found = endpoints(survivors)
            if not all(len(e) == 1 for e in found):
                return None
            (v,) = survivors[0].api("/v1/deployments/big")["replica_views"]
            return v["state"] == "ready" and victim.name not in v["nodes"] and v

        view = wait_for(
            whole_again,
            RECOVERED_S,
            0.5,
            what="the replica ready again on the free host",
            describe=lambda: status(survivors),
        )
        recovered = time.monotonic() - killed
        print(
            f"kill -9 of a worker host: not ready in {not_ready:.1f} s, "
            f"whole again in {recovered:.1f} s"
        )
        group = [n for n in survivors if n.name in view["nodes"]]
        outside = next(n for n in survivors if n not in group)
        runner = next(n for n in group if n.name == view["node"])
        base = f"http://{runner.addr}:{view['port']}"
        # A new cluster: one actor on each of the replica's two nodes now, none on the dead host.
        workers = json.loads(post(outside, f"{base}/stand-in/workers", None))
        assert placement(workers, {n.addr for n in group}, 1), workers
        answers_over_the_data_path(outside, base)
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
