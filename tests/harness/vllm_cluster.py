"""`engine = "vllm"` tests in namespace clusters: the spec, requests over the data path from
inside a host, fake GPUs with a lost GPU 0, and the check of where a replica's actors run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.harness import fake_nvml
from tests.harness.gpud_node import GpudNode

# One replica of the stand-in on one GPU (tests change replicas, N and G in it).
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
