"""`engine = "vllm"` on real gpud + serf in the namespace harness, with fake GPUs (fake NVML)
and the vLLM stand-in (tests/harness/fake_vllm.py) installed as `deployments.vllm_executable`.

gpud builds the argv and environment itself (engines.py); the stand-in refuses what vLLM would
(a UUID in CUDA_VISIBLE_DEVICES, an unknown flag), so a ready replica shows gpud passed NVML
indices. N=1 G=1: ready as judged from the other host, then a completion and a streamed chat
completion answered over the data path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from gpud.deployments import authority
from tests import fake_nvml
from tests.harness import fake_vllm
from tests.harness.gpud_node import Cluster, GpudNode, wait_for

pytestmark = pytest.mark.netns

READY_S = 90.0
SPEC = 'name = "llm"\nengine = "vllm"\nmodel = "test-model"\nreplicas = 1\ngpus_per_node = 1\n'


def post(node: GpudNode, url: str, body: dict[str, Any]) -> str:
    """POST from inside ``node``'s namespace (the data path), the raw reply body."""
    code = (
        "import sys,urllib.request;r=urllib.request.Request(sys.argv[1],sys.argv[2].encode(),"
        "{'Content-Type':'application/json'});print(urllib.request.urlopen(r,timeout=10)"
        ".read().decode())"
    )
    return node.host.run([sys.executable, "-c", code, url, json.dumps(body)]).stdout


def test_vllm_replica_ready_and_answering(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = tmp_path / "nvml.json"
    # GPU 0 is unhealthy: the replica must get GPU 1, so index 0 would be the wrong GPU.
    state = fake_nvml.node(2)
    state["devices"][0]["errors"] = {"*": "gpu_is_lost"}
    fake_nvml.write_state(nvml, state)
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
    base = f"http://{runner.addr}:{endpoint['port']}"
    reply = json.loads(
        post(
            other,
            f"{base}/v1/completions",
            {"model": "test-model", "prompt": "hi", "max_tokens": 3},
        )
    )
    assert reply["choices"][0]["text"] == " ok ok ok", reply
    stream = post(
        other,
        f"{base}/v1/chat/completions",
        {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    events = [e for e in stream.strip().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) > 2, stream
    assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"
