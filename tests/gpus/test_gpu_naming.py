"""GPUs are named the way every engine parses them: NVML indices in PCI bus order, never UUIDs.

Leases stay by UUID; the indices come from NVML (here tests/harness/fake_nvml.py through gpud's own
reader). The vLLM stand-in (tests/harness/fake_vllm.py) is as strict as vLLM: a UUID entry
ends it with vLLM's own ValueError line, and gpud's supervisor reports that line.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud.deployments.engines import NodeLease, node_env, server_argv
from gpud.deployments.spec import load_spec
from gpud.gpus import nvml
from gpud.gpus.signals import UNREAD_UUID_PREFIX, GpuReadings
from gpud.process import ChildProcess, Supervisor
from gpud.ray.supervisor import RayTarget, ray_start_env
from tests.harness import fake_nvml, fake_vllm
from tests.harness.wait import async_wait_for

INT_ERROR = "ValueError: invalid literal for int() with base 10: 'GPU-"


@given(
    order=st.permutations(range(6)),
    picked=st.lists(st.integers(0, 5), unique=True, max_size=6),
)
def test_indices_are_nvml_indices_of_the_uuids(order: list[int], picked: list[int]) -> None:
    # NVML may list GPUs in any order relative to their UUIDs; the index is NVML's own.
    gpus = [GpuReadings(index=i, uuid=f"GPU-{n}") for i, n in enumerate(order)]
    uuids = [f"GPU-{n}" for n in picked]
    indices = nvml.indices_of(gpus, uuids)
    assert [gpus[i].uuid for i in indices] == uuids
    env = nvml.cuda_env(indices)
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert [int(e) for e in env["CUDA_VISIBLE_DEVICES"].split(",") if e] == list(indices)
    assert "GPU-" not in env["CUDA_VISIBLE_DEVICES"]


def test_a_gpu_nvml_does_not_list_cannot_be_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "nvml.json"
    fake_nvml.write_state(state, fake_nvml.node(3))
    monkeypatch.setenv(fake_nvml.ENV, str(state))
    readings = nvml.read_node(fake_nvml, None)
    uuids = [g.uuid for g in readings.gpus]
    assert nvml.indices_of(readings.gpus, [uuids[2], uuids[0]]) == (2, 0)
    with pytest.raises(nvml.GpuIndexError, match="NVML does not list GPU GPU-gone"):
        nvml.indices_of(readings.gpus, [uuids[0], "GPU-gone"])
    # An unreadable GPU (its UUID placeholder) is not a name either.
    unread = GpuReadings(index=1, uuid=f"{UNREAD_UUID_PREFIX}1")
    with pytest.raises(nvml.GpuIndexError):
        nvml.indices_of([unread], [unread.uuid])


@pytest.mark.parametrize("bad", [("GPU-aaaa",), (True,), (-1,), (0, 0)])
def test_cuda_env_refuses_what_is_not_one_index_per_gpu(bad: tuple[object, ...]) -> None:
    with pytest.raises(nvml.GpuIndexError):
        nvml.cuda_env(bad)  # type: ignore[arg-type]


def test_ray_nodes_get_indices_in_pci_order() -> None:
    env = ray_start_env({"PATH": "/usr/bin"}, RayTarget(role="head", gpus=(2, 0)))
    assert env == {
        "PATH": "/usr/bin",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "2,0",
    }
    # No GPUs named: the environment's own choice stays (the supervisor's --num-gpus).
    assert ray_start_env({"A": "b"}, RayTarget(role="head")) == {"A": "b"}
    with pytest.raises(nvml.GpuIndexError):
        ray_start_env({}, RayTarget(role="head", gpus=("GPU-aaaa",)))  # type: ignore[arg-type]


# ---- the vLLM stand-in, run through gpud's own vLLM argv -------------------------------------


def vllm_lease(port: int, indices: tuple[int, ...]) -> tuple[list[str], dict[str, str]]:
    spec = load_spec(
        b'name = "m"\nengine = "vllm"\nmodel = "test-model"\nreplicas = 1\ngpus_per_node = 1\n'
    )
    lease = NodeLease(
        host_ip="127.0.0.1",
        interface="lo",
        port=port,
        port_band_base=port + 1,
        gpu_uuids=("GPU-00000000-fake-0000-0000-000000000000",),
        gpu_indices=indices,
    )
    return server_argv(spec, lease), node_env(spec, lease, {"PATH": os.environ["PATH"]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    state = tmp_path / "nvml.json"
    fake_nvml.write_state(state, fake_nvml.node(2))
    return fake_vllm.install(tmp_path / "bin", nvml_state=state)


def run(exe: Path, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(exe), *argv[1:]], env=env, capture_output=True, text=True, timeout=30
    )


def test_stand_in_refuses_uuids_and_unknown_flags_as_vllm_does(stand_in: Path) -> None:
    argv, env = vllm_lease(free_port(), (0,))
    uuid_env = {**env, "CUDA_VISIBLE_DEVICES": "GPU-00000000-fake-0000-0000-000000000000"}
    result = run(stand_in, argv, uuid_env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(INT_ERROR), result.stderr
    result = run(stand_in, [*argv, "--no-such-flag"], env)
    assert result.returncode == 2 and "unrecognized arguments: --no-such-flag" in result.stderr
    # An index the host does not have fails in NVML, as vLLM's NvmlCudaPlatform does.
    result = run(stand_in, argv, {**env, "CUDA_VISIBLE_DEVICES": "7"})
    assert result.returncode == 1 and "Invalid Argument" in result.stderr, result.stderr


def test_gpud_reports_the_stand_ins_own_error_line(stand_in: Path) -> None:
    argv, env = vllm_lease(free_port(), (0,))
    env["CUDA_VISIBLE_DEVICES"] = "GPU-00000000-fake-0000-0000-000000000000"

    async def main() -> str:
        async def make() -> ChildProcess:
            return ChildProcess("deploy-m.0", [str(stand_in), *argv[1:]], env=env)

        supervisor = Supervisor("deploy-m.0", make, backoff_initial_s=30.0)
        task = asyncio.create_task(supervisor.run())
        try:
            await async_wait_for(lambda: supervisor.status.last_error, 30, 0.1, what="a crash")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return supervisor.status.last_error or ""

    error = asyncio.run(main())
    assert error.startswith("exited with code 1: " + INT_ERROR), error


def test_stand_in_serves_what_vllm_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "nvml.json"
    fake_nvml.write_state(state, fake_nvml.node(2))
    monkeypatch.setenv(fake_nvml.ENV, str(state))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert fake_vllm.physical_gpus(os.environ) == [1]
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake_vllm.make_handler(fake_vllm.Engine("m")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def post(path: str, body: dict[str, object]) -> tuple[int, bytes]:
        request = urllib.request.Request(
            base + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as reply:
            assert reply.status == 200
        models = json.loads(urllib.request.urlopen(base + "/v1/models", timeout=5).read())
        assert [m["id"] for m in models["data"]] == ["m"]
        status, raw = post("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2})
        assert status == 200 and json.loads(raw)["choices"][0]["text"] == " ok ok"
        status, raw = post(
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        )
        events = [line for line in raw.decode().split("\n\n") if line]
        assert status == 200 and events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip()
        status, raw = post("/v1/completions", {"model": "other", "prompt": "hi"})
        assert status == 404 and "does not exist" in json.loads(raw)["message"]
        text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert 'vllm:num_requests_running{engine="0",model_name="m"} 0.0' in text
        assert 'vllm:num_requests_waiting{engine="0",model_name="m"} 0.0' in text
    finally:
        server.shutdown()
        server.server_close()
