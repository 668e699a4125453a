"""`engine = "vllm"` on real gpud + serf in the namespace harness, with fake GPUs (fake NVML)
and the vLLM stand-in (tests/harness/fake_vllm.py) installed as `deployments.vllm_executable`.

gpud builds the argv and environment itself (engines.py); the stand-in refuses what vLLM would
(a UUID in CUDA_VISIBLE_DEVICES, an unknown flag), so a ready replica shows gpud passed NVML
indices. N=1 G=1: ready as judged from the other host, then a completion and a streamed chat
completion answered over the data path, and the server's own output with `gpud deploy logs` on
its host (the other host says where it runs).

N=2 G=1 on 3 hosts, and N=2 G=2 R=2 on 4: gpud runs each replica's own Ray cluster on its two
hosts and the stand-in with `--distributed-executor-backend ray`, which places a TP x PP
placement group of one-GPU bundles and one actor per bundle, exactly as vLLM's Ray executor
does; it serves only once every actor is on one of the replica's Ray nodes with one GPU index of
that node's lease. Checked for each replica from a host outside it: the placement (each actor's
node IP and GPU), a completion, a streamed chat.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.harness import fake_nvml, fake_vllm
from tests.harness.deployments import operated_cluster
from tests.harness.gpud_node import wait_for
from tests.harness.ray_cluster import RAY_EXECUTABLE
from tests.harness.vllm_cluster import (
    SPEC,
    answers_over_the_data_path,
    nvml_with_gpu0_lost,
    placement,
    post,
)

READY_S = 90.0
RAY_READY_S = 240.0


def test_vllm_replica_ready_and_answering(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = tmp_path / "nvml.json"
    nvml_with_gpu0_lost(nvml)
    monkeypatch.setenv(fake_nvml.ENV, str(nvml))
    vllm = fake_vllm.install(tmp_path / "bin", nvml_state=nvml)
    c, key_file = operated_cluster(cluster, tmp_path, 2, {"vllm_executable": str(vllm)})
    a = c.nodes[0]
    spec = tmp_path / "llm.toml"
    spec.write_text(SPEC)
    a.cli("deploy", "apply", str(spec), "--key", str(key_file))

    def ready() -> Any:
        found = [e for n in c for e in n.api("/v1/deployments/llm/endpoints")["endpoints"]]
        return len(found) == 2 and found[0]

    endpoint = wait_for(
        ready,
        READY_S,
        0.5,
        what="the vllm replica ready from both hosts",
        describe=lambda: "\n".join(n.cli("deploy", "status", "llm", check=False).stdout for n in c),
    )
    runner = next(n for n in c if n.name == endpoint["node"])
    other = next(n for n in c if n is not runner)
    answers_over_the_data_path(other, f"http://{runner.addr}:{endpoint['port']}")
    # The server's own output, from its file on the host that runs it (`gpud deploy logs`);
    # the other host says where the replica runs instead.
    shown = runner.cli("deploy", "logs", "llm", "0", "-n", "5").stdout
    assert "Starting vLLM API server on http://" in shown, shown
    elsewhere = other.cli("deploy", "logs", "llm", check=False)
    assert elsewhere.returncode == 1, elsewhere
    assert f"replica of llm runs on this host (llm.0 on {runner.name})" in elsewhere.stderr


@pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason="Ray is not installed")
@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    ("hosts", "replicas", "gpus"),
    [pytest.param(3, 1, 1, id="R1-N2-G1"), pytest.param(4, 2, 2, id="R2-N2-G2")],
)
def test_vllm_over_ray_places_one_gpu_actor_per_bundle_on_the_replicas_nodes(
    cluster: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    hosts: int,
    replicas: int,
    gpus: int,
) -> None:
    """R replicas of N=2 hosts with G GPUs each, on the fewest hosts where every replica has a
    host outside it to be checked from (R=2 N=2: the other replica's hosts)."""
    nvml = tmp_path / "nvml.json"
    nvml_with_gpu0_lost(nvml, gpus + 1)
    monkeypatch.setenv(fake_nvml.ENV, str(nvml))
    vllm = fake_vllm.install(tmp_path / "bin", nvml_state=nvml)
    ray_temp = tempfile.mkdtemp(prefix="gdv", dir="/tmp")  # short: Ray's socket paths
    try:
        c, key_file = operated_cluster(
            cluster,
            tmp_path,
            hosts,
            {"vllm_executable": str(vllm)},
            ray={"executable": RAY_EXECUTABLE, "num_cpus": 1, "temp_root": ray_temp},
        )
        spec = tmp_path / "big.toml"
        shape = f"replicas = {replicas}\ngpus_per_node = {gpus}\nnodes_per_replica = 2\n"
        spec.write_text(SPEC.replace('"llm"', '"big"').split("replicas =")[0] + shape)
        c[0].cli("deploy", "apply", str(spec), "--key", str(key_file))

        def ready() -> Any:
            found = [e for n in c for e in n.api("/v1/deployments/big/endpoints")["endpoints"]]
            return len(found) == hosts * replicas

        wait_for(
            ready,
            RAY_READY_S,
            1.0,
            what=f"{replicas} 2-node vllm replica(s) ready from all {hosts} hosts",
            describe=lambda: "\n".join(
                n.cli("deploy", "status", "big", check=False).stdout for n in c
            ),
        )
        views = c[0].api("/v1/deployments/big")["replica_views"]
        assert len(views) == replicas
        for view in views:
            group = [n for n in c if n.name in view["nodes"]]
            outside = next(n for n in c if n not in group)
            runner = next(n for n in c if n.name == view["node"])
            base = f"http://{runner.addr}:{view['port']}"
            workers = json.loads(post(outside, f"{base}/stand-in/workers", None))
            # TP=G x PP=2: G actors on each of the replica's 2 hosts (never another), each
            # with one of the G GPUs its host leased: 1..G, as GPU 0 is lost.
            assert len(group) == 2, view
            leased = placement(workers, {n.addr for n in group}, gpus)
            assert leased == {n.addr: {str(g) for g in range(1, gpus + 1)} for n in group}
            answers_over_the_data_path(outside, base)
        # No host runs two replicas' Ray nodes: the replicas' hosts are disjoint.
        assert len({m for v in views for m in v["nodes"]}) == 2 * replicas, views
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
