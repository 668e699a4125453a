"""`engine = "vllm"` on real gpud + serf in the namespace harness, with fake GPUs (fake NVML)
and the vLLM stand-in (tests/harness/fake_vllm.py) installed as `deployments.vllm_executable`.

gpud builds the argv and environment itself (engines.py); the stand-in refuses what vLLM would
(a UUID in CUDA_VISIBLE_DEVICES, an unknown flag), so a ready replica shows gpud passed NVML
indices. N=1 G=1: ready as judged from the other host, then a completion and a streamed chat
completion answered over the data path.

N=2 G=1 on 3 hosts: gpud runs the replica's own Ray cluster on two hosts and the stand-in with
`--distributed-executor-backend ray`, which places a TP x PP placement group of one-GPU bundles
and one actor per bundle, exactly as vLLM's Ray executor does; it serves only once every actor
is on one of the replica's Ray nodes with one GPU index of that node's lease. Checked from the
third host: the placement (each actor's node IP and GPU), a completion, a streamed chat.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from gpud.deployments import authority
from tests import fake_nvml
from tests.harness import fake_vllm
from tests.harness.gpud_node import Cluster, GpudNode, wait_for
from tests.ray_helpers import RAY_EXECUTABLE

pytestmark = pytest.mark.netns

READY_S = 90.0
RAY_READY_S = 240.0
SPEC = 'name = "llm"\nengine = "vllm"\nmodel = "test-model"\nreplicas = 1\ngpus_per_node = 1\n'


def post(node: GpudNode, url: str, body: dict[str, Any] | None) -> str:
    """POST ``body`` (GET when None) from inside ``node``'s namespace (the data path), the raw
    reply body."""
    code = (
        "import sys,urllib.request;b=sys.argv[2];r=urllib.request.Request(sys.argv[1],"
        "b.encode() if b else None,{'Content-Type':'application/json'});"
        "print(urllib.request.urlopen(r,timeout=10).read().decode())"
    )
    data = "" if body is None else json.dumps(body)
    return node.host.run([sys.executable, "-c", code, url, data]).stdout


def nvml_with_gpu0_lost(path: Path, gpus: int = 2) -> None:
    """``gpus`` GPUs per host, GPU 0 unhealthy: replicas must never get index 0."""
    state = fake_nvml.node(gpus)
    state["devices"][0]["errors"] = {"*": "gpu_is_lost"}
    fake_nvml.write_state(path, state)


def answers_over_the_data_path(client: GpudNode, base: str) -> None:
    """A completion and a streamed chat completion from ``client`` to the server at ``base``."""
    reply = json.loads(
        post(
            client,
            f"{base}/v1/completions",
            {"model": "test-model", "prompt": "hi", "max_tokens": 3},
        )
    )
    assert reply["choices"][0]["text"] == " ok ok ok", reply
    stream = post(
        client,
        f"{base}/v1/chat/completions",
        {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    events = [e for e in stream.strip().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) > 2, stream
    assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"


def test_vllm_replica_ready_and_answering(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = tmp_path / "nvml.json"
    nvml_with_gpu0_lost(nvml)
    monkeypatch.setenv(fake_nvml.ENV, str(nvml))
    vllm = fake_vllm.install(tmp_path / "bin", nvml_state=nvml)
    private, public = authority.keygen()
    key_file = tmp_path / "operator.key"
    key_file.write_text(private + "\n")
    c: Cluster = cluster(
        2,
        overrides={
            "gpus": {"nvml_module": "tests.fake_nvml", "poll_interval_s": 0.5},
            "deployments": {"operators": [public], "vllm_executable": str(vllm)},
        },
    )
    c.wait_converged()
    c.wait_placeable()
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


def placement(workers: dict[str, Any], addrs: set[str], gpus: int) -> dict[str, set[str]]:
    """Check one replica's actors (the stand-in's /stand-in/workers): alive, on exactly its
    hosts, ``gpus`` per host, each with one GPU of the set its host's Ray node was given, all
    of them used, never the lost GPU 0. Returns host address -> that set."""
    assert workers["dead"] is None, workers
    by_host: dict[str, list[dict[str, Any]]] = {}
    for w in workers["workers"]:
        by_host.setdefault(w["node_ip"], []).append(w)
    assert set(by_host) == addrs, workers
    leased = {}
    for addr, ws in by_host.items():
        node_gpus = ws[0]["node_gpus"]
        assert all(len(w["gpu_ids"]) == 1 and w["node_gpus"] == node_gpus for w in ws), ws
        assert len(ws) == gpus and sorted(w["gpu_ids"][0] for w in ws) == sorted(node_gpus), ws
        assert "0" not in node_gpus, ws
        leased[addr] = set(node_gpus)
    return leased


@pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason="Ray is not installed")
@pytest.mark.timeout(420)
def test_vllm_over_ray_places_one_gpu_actor_per_bundle_on_the_replicas_nodes(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = tmp_path / "nvml.json"
    nvml_with_gpu0_lost(nvml)
    monkeypatch.setenv(fake_nvml.ENV, str(nvml))
    vllm = fake_vllm.install(tmp_path / "bin", nvml_state=nvml)
    private, public = authority.keygen()
    key_file = tmp_path / "operator.key"
    key_file.write_text(private + "\n")
    ray_temp = tempfile.mkdtemp(prefix="gdv", dir="/tmp")  # short: Ray's socket paths
    try:
        c: Cluster = cluster(
            3,
            overrides={
                "gpus": {"nvml_module": "tests.fake_nvml", "poll_interval_s": 0.5},
                "ray": {"executable": RAY_EXECUTABLE, "num_cpus": 1, "temp_root": ray_temp},
                "deployments": {"operators": [public], "vllm_executable": str(vllm)},
            },
        )
        c.wait_converged()
        c.wait_placeable()
        spec = tmp_path / "big.toml"
        spec.write_text(SPEC.replace('"llm"', '"big"') + "nodes_per_replica = 2\n")
        c[0].cli("deploy", "apply", str(spec), "--key", str(key_file))

        def ready() -> Any:
            found = [e for n in c for e in n.api("/v1/deployments/big/endpoints")["endpoints"]]
            return len(found) == 3 and found[0]

        endpoint = wait_for(
            ready,
            RAY_READY_S,
            1.0,
            what="the 2-node vllm replica ready from all 3 hosts",
            describe=lambda: "\n".join(
                n.cli("deploy", "status", "big", check=False).stdout for n in c
            ),
        )
        (view,) = c[0].api("/v1/deployments/big")["replica_views"]
        group = [n for n in c if n.name in view["nodes"]]
        outside = next(n for n in c if n not in group)
        runner = next(n for n in c if n.name == endpoint["node"])
        base = f"http://{runner.addr}:{endpoint['port']}"
        workers = json.loads(post(outside, f"{base}/stand-in/workers", None))
        # TP=1 x PP=2: one actor on each of the replica's 2 hosts (never the third), with the
        # one GPU its host leased: index 1, as GPU 0 is lost.
        assert len(group) == 2, view
        leased = placement(workers, {n.addr for n in group}, 1)
        assert leased == {n.addr: {"1"} for n in group}, workers
        answers_over_the_data_path(outside, base)
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
