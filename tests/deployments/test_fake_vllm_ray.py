"""The vLLM stand-in's Ray executor path against a real one-node Ray on a loopback address.

Ray is real (`ray start --head`, 2 fake GPUs: the raylet's CUDA_VISIBLE_DEVICES=0,1, as gpud
gives its Ray nodes); the stand-in runs as the `vllm` executable with TP=2 and the Ray backend:
two actors in a placement group, one GPU each. A VLLM_HOST_IP that is not a Ray node's IP ends
it at once with Ray's own reason; a worker killed while serving leaves /health at 200 while
requests fail with 500 (vllm#16259). The placement checks themselves are a pure function,
driven here with generated placements.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud.gpus.nvml import cuda_env
from gpud.process_groups import group_members
from tests.harness import fake_nvml, fake_vllm
from tests.harness.ray_cluster import RAY_EXECUTABLE
from tests.harness.wait import wait_for

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason="Ray is not installed"),
]

# A loopback address of its own: Ray binds some fixed default ports on its node IP.
NODE_IP = "127.0.0.37"
START_S = 120.0


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGTERM the process group we started, SIGKILL what is left after a bounded wait."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=15)
    wait_for(lambda: group_members(proc.pid) == [], 15, 0.2, what="the process group gone")


class RayHead(msgspec.Struct):
    address: str
    nvml: str
    vllm: str


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    root = Path(tempfile.mkdtemp(prefix="gfv", dir="/tmp"))  # short: Ray's socket paths
    nvml = root / "nvml.json"
    fake_nvml.write_state(nvml, fake_nvml.node(2))
    vllm = fake_vllm.install(root / "bin", nvml_state=nvml)
    port = free_port(NODE_IP)
    env = {
        **os.environ,
        **cuda_env((0, 1)),
        "VLLM_HOST_IP": NODE_IP,
        fake_nvml.ENV: str(nvml),
    }
    argv = [
        RAY_EXECUTABLE,
        "start",
        "--head",
        "--block",
        f"--node-ip-address={NODE_IP}",
        f"--port={port}",
        "--num-cpus=1",
        "--num-gpus=2",
        f"--temp-dir={root / 'ray'}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    head = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def gcs_open() -> bool:
            if head.poll() is not None:
                raise AssertionError(f"ray start exited with {head.returncode}")
            with socket.socket() as s:
                return s.connect_ex((NODE_IP, port)) == 0

        wait_for(gcs_open, START_S, 0.5, what="the Ray head's GCS port open")
        yield RayHead(address=f"{NODE_IP}:{port}", nvml=str(nvml), vllm=str(vllm))
    finally:
        stop_group(head)
        shutil.rmtree(root, ignore_errors=True)


def stand_in(head: RayHead, host_ip: str, port: int) -> subprocess.Popen[str]:
    """The stand-in as gpud starts a vLLM server: TP=2, PP=1, the Ray backend."""
    argv = [
        head.vllm,
        "serve",
        "test-model",
        "--host",
        NODE_IP,
        "--port",
        str(port),
        "--tensor-parallel-size",
        "2",
        "--pipeline-parallel-size",
        "1",
        "--distributed-executor-backend",
        "ray",
    ]
    env = {
        "PATH": os.environ["PATH"],
        "RAY_ADDRESS": head.address,
        "VLLM_HOST_IP": host_ip,
        **cuda_env((0,)),
    }
    return subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd="/",
    )


def request(url: str, body: dict[str, object] | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.timeout(240)
def test_a_vllm_host_ip_that_is_no_ray_node_fails_with_rays_reason(ray_head: RayHead) -> None:
    proc = stand_in(ray_head, "127.0.0.99", free_port(NODE_IP))
    try:
        _, stderr = proc.communicate(timeout=START_S)
    finally:
        stop_group(proc)
    assert proc.returncode != 0
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(
        "No available node types can fulfill resource request {'node:127.0.0.99': 0.001}"
    ), stderr
    assert ray_head.address in last, last


@pytest.mark.timeout(240)
def test_two_workers_one_gpu_each_then_a_dead_worker_fails_requests(ray_head: RayHead) -> None:
    port = free_port(NODE_IP)
    base = f"http://{NODE_IP}:{port}"
    proc = stand_in(ray_head, NODE_IP, port)
    try:

        def serving() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the stand-in exited: {proc.stderr and proc.stderr.read()}")
            return request(base + "/health")[0] == 200

        wait_for(serving, START_S, 0.5, what="the stand-in serving")
        _, raw = request(base + "/stand-in/workers")
        workers = msgspec.convert(json.loads(raw)["workers"], list[fake_vllm.WorkerView])
        # One actor per bundle, each with one GPU of the node's two, none shared, on the node.
        assert sorted(w.gpu_ids[0] for w in workers) == ["0", "1"], workers
        assert all(len(w.gpu_ids) == 1 and w.node_gpus == ["0", "1"] for w in workers), workers
        assert all(w.cuda_visible_devices == w.gpu_ids[0] for w in workers), workers
        assert {w.node_ip for w in workers} == {NODE_IP}, workers
        body = {"model": "test-model", "prompt": "hi", "max_tokens": 2}
        status, raw = request(base + "/v1/completions", body)
        assert status == 200 and json.loads(raw)["choices"][0]["text"] == " ok ok", raw

        # kill -9 one worker (a process of the Ray we started): the API server stays "healthy"
        # while every request fails, as vLLM's does.
        os.kill(workers[1].pid, signal.SIGKILL)
        wait_for(
            lambda: request(base + "/v1/completions", body)[0] == 500,
            60,
            0.5,
            what="requests failing after a worker died",
        )
        status, raw = request(base + "/v1/completions", body)
        assert status == 500 and json.loads(raw)["message"] == fake_vllm.ENGINE_DEAD, raw
        assert request(base + "/health")[0] == 200
        assert json.loads(request(base + "/stand-in/workers")[1])["dead"].startswith(
            "ActorDiedError"
        )
    finally:
        stop_group(proc)


# ---- the placement checks (pure) ------------------------------------------------------------

NODES = {"n1": "10.0.0.1", "n2": "10.0.0.2", "n3": "10.0.0.3"}


@st.composite
def placements(draw: st.DrawFn) -> tuple[list[fake_vllm.WorkerView], str]:
    """A placement as vLLM needs it: each worker on a cluster node, its VLLM_HOST_IP the
    node's IP, one GPU of its node's set, no GPU twice; the driver's node among them."""
    node_ids = draw(st.lists(st.sampled_from(sorted(NODES)), min_size=1, max_size=6))
    node_gpus = {
        n: [str(i) for i in range(node_ids.count(n) + draw(st.integers(0, 2)))] for n in NODES
    }
    used: dict[str, int] = {}
    views = []
    for rank, node in enumerate(node_ids):
        gpu = node_gpus[node][used.get(node, 0)]
        used[node] = used.get(node, 0) + 1
        views.append(
            fake_vllm.WorkerView(
                rank=rank,
                bundle=rank,
                node_id=node,
                node_ip=NODES[node],
                pid=1000 + rank,
                gpu_ids=[gpu],
                cuda_visible_devices=gpu,
                node_gpus=node_gpus[node],
            )
        )
    return views, draw(st.sampled_from(node_ids))


def problems(views: list[fake_vllm.WorkerView], driver: str) -> list[str]:
    return fake_vllm.placement_problems(
        views, world=len(views), nodes=NODES, driver_node=driver, driver_ip=NODES[driver]
    )


BREAKS = {
    "uuid": {"gpu_ids": ["GPU-52a3"], "cuda_visible_devices": "GPU-52a3"},
    "two gpus": {"gpu_ids": ["0", "1"]},
    "no gpu": {"gpu_ids": []},
    "not the node's gpu": {"gpu_ids": ["9"], "cuda_visible_devices": "9"},
    "cuda sees another": {"cuda_visible_devices": "0,1"},
    "wrong host ip": {"node_ip": "10.9.9.9"},
    "foreign node": {"node_id": "elsewhere"},
    "nvml": {"open_error": "NVMLError: Invalid Argument"},
}


@given(placements(), st.sampled_from(sorted(BREAKS)), st.data())
def test_placement_problems_accept_what_vllm_needs_and_name_each_break(
    placement: tuple[list[fake_vllm.WorkerView], str], kind: str, data: st.DataObject
) -> None:
    views, driver = placement
    assert problems(views, driver) == []
    victim = data.draw(st.integers(0, len(views) - 1))
    broken = list(views)
    broken[victim] = msgspec.structs.replace(views[victim], **BREAKS[kind])
    found = problems(broken, driver)
    assert found and any(f"worker {victim} " in p for p in found), (kind, found)


@given(placements())
def test_a_driver_outside_the_group_and_a_missing_worker_are_problems(
    placement: tuple[list[fake_vllm.WorkerView], str],
) -> None:
    views, driver = placement
    outside = next((n for n in NODES if n not in {v.node_id for v in views}), None)
    if outside is not None:
        found = fake_vllm.placement_problems(
            views, world=len(views), nodes=NODES, driver_node=outside, driver_ip=NODES[outside]
        )
        assert any("is not included in the placement group" in p for p in found), found
    found = fake_vllm.placement_problems(
        views, world=len(views) + 1, nodes=NODES, driver_node=driver, driver_ip=NODES[driver]
    )
    assert any("for a world size of" in p for p in found), found
