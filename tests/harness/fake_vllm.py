"""A vLLM-shaped stand-in: the harness installs it as the `vllm` executable (`install`), so
tests run `engine = "vllm"` through gpud's own vLLM argv (gpud.deployments.engines).

As strict as vLLM on what gpud passes it (read from vllm-project/vllm):
- argv: `vllm serve MODEL` and exactly the flags gpud passes; any other is argparse's
  "unrecognized arguments" and exit 2, as vLLM's FlexibleArgumentParser (an ArgumentParser).
- CUDA_VISIBLE_DEVICES: `int()` of each entry (`vllm/platforms/interface.py`,
  `Platform.device_id_to_physical_device_id`), uncaught, so a UUID ends the process with vLLM's
  own line "ValueError: invalid literal for int() with base 10: 'GPU-…'"; then each index is
  opened with `nvmlDeviceGetHandleByIndex` (`vllm/platforms/cuda.py`, NvmlCudaPlatform) in the
  fake NVML that `GPUD_FAKE_NVML` names, so an index the host lacks fails there too.
- Without the Ray backend TP x PP must fit the visible GPUs (one process per GPU).
- With `--distributed-executor-backend ray` it runs vLLM's Ray executor path for real, mirroring
  `vllm/v1/executor/ray_utils.py` (`initialize_ray_cluster`; `vllm/executor/ray_utils.py` in
  2025 releases) and `vllm/v1/executor/ray_executor.py` (`RayDistributedExecutor.
  _init_workers_ray`; `vllm/executor/ray_distributed_executor.py` before): `ray.init()` joins
  RAY_ADDRESS; the driver's node must have a GPU available; a placement group of TP x PP bundles
  `{"GPU": 1}`, the first with `node:<VLLM_HOST_IP>: 0.001` so it lands on the driver's node,
  strategy PACK, waited for (bounded here: vLLM waits 1800 s); the driver's node must hold a
  bundle; one actor per bundle (`num_cpus=0, num_gpus=1`, PlacementGroupSchedulingStrategy with
  the bundle index and `placement_group_capture_child_tasks`), each reporting its node, its
  `VLLM_HOST_IP` and Ray's GPU ids; `int()` of every id; one IP per node. A VLLM_HOST_IP that is
  no Ray node's IP is Ray's "No available node types can fulfill resource request
  {'node:<ip>': 0.001}" (vllm#7815), said at once instead of after vLLM's 1800 s wait. Beyond
  vLLM, as a test oracle, each actor must see exactly one GPU, an integer index of the set its
  own Ray node was given (the raylet's CUDA_VISIBLE_DEVICES, which Ray maps its GPU ids through)
  and openable in the fake NVML, with its VLLM_HOST_IP equal to its Ray node's IP. Any violation
  ends the process with one line on stderr and a non-zero exit. Once serving, the actors are
  pinged every second; when one dies `/health` stays 200 while requests fail with 500, as vLLM
  does (vllm#16259). `GET /stand-in/workers` (not a vLLM route) shows the placement to tests.
Then it serves GET /health, /v1/models, /metrics (`vllm:num_requests_running`,
`vllm:num_requests_waiting`) and POST /v1/completions, /v1/chat/completions (`stream: true`:
server-sent events ending in `data: [DONE]`), answering only for the model it serves.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

from tests.harness import fake_nvml
from tests.harness.deploy_server import JsonHandler, serve

REPO = Path(__file__).resolve().parents[2]
# vLLM's `--distributed-executor-backend` choices (vllm/config/parallel.py).
BACKENDS = ("ray", "mp", "uni", "external_launcher")
TOKEN = " ok"
# vLLM waits PG_WAIT_TIMEOUT = 1800 s for its placement group; a test must fail within its bound.
PG_WAIT_S = 180.0
# How often the actors are pinged once serving, and how long one ping may take.
POLL_S = 1.0
PING_TIMEOUT_S = 10.0
# vLLM's EngineDeadError text (vllm/v1/engine/exceptions.py): what requests get once a worker died.
ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."


def install(bin_dir: Path, *, nvml_state: Path | None = None) -> Path:
    """Write ``bin_dir/vllm``, a script that runs this stand-in (gpud passes replicas only
    PATH-like variables, so the fake NVML's state file is written into the script)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "vllm"
    lines = ["#!/bin/sh", f"export PYTHONPATH='{REPO}'"]
    if nvml_state is not None:
        lines.append(f"export {fake_nvml.ENV}='{nvml_state}'")
    lines.append(f"exec '{sys.executable}' -m tests.harness.fake_vllm \"$@\"")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vllm")
    commands = top.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("serve", usage="vllm serve [model_tag] [options]")
    sub.add_argument("model_tag")
    sub.add_argument("--host", default=None)
    sub.add_argument("--port", type=int, default=8000)
    sub.add_argument("--tensor-parallel-size", type=int, default=1)
    sub.add_argument("--pipeline-parallel-size", type=int, default=1)
    sub.add_argument("--distributed-executor-backend", choices=BACKENDS, default=None)
    return top


def physical_gpus(environ: dict[str, str] | os._Environ[str]) -> list[int]:
    """The GPUs vLLM would open: vLLM's own int() of each entry, then NVML by index."""
    raw = environ.get("CUDA_VISIBLE_DEVICES")
    # Unset: every GPU; empty: none (CUDA sees none, whatever vLLM's NVML calls see).
    ids = [int(entry) for entry in raw.split(",")] if raw else None if raw is None else []
    if fake_nvml.ENV not in environ:
        return ids or []
    fake_nvml.nvmlInit()
    if ids is None:
        ids = list(range(fake_nvml.nvmlDeviceGetCount()))
    for index in ids:
        fake_nvml.nvmlDeviceGetHandleByIndex(index)
    return ids


class Engine:
    """Request counters for /metrics (what gpud and routers read from vLLM)."""

    def __init__(self, model: str, workers: RayWorkers | None = None) -> None:
        self.model = model
        self.workers = workers
        self.running = 0
        self.lock = threading.Lock()
        # Why the engine is dead (a Ray worker died), or None while it runs.
        self.dead: str | None = None

    def metrics(self) -> str:
        labels = f'engine="0",model_name="{self.model}"'
        return (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{labels}}} {float(self.running)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{{{labels}}} 0.0\n"
        )


class WorkerView(msgspec.Struct, frozen=True, kw_only=True):
    """What one Ray actor reports about itself (vLLM's get_node_ip, get_node_and_gpu_ids)."""

    rank: int
    bundle: int
    node_id: str
    # vLLM's get_ip() in the worker: VLLM_HOST_IP, which the worker has from its raylet.
    node_ip: str
    pid: int
    # Ray's GPU ids for the actor (get_accelerator_ids()["GPU"]), as strings.
    gpu_ids: list[str]
    # What CUDA in the actor would see.
    cuda_visible_devices: str | None
    # The raylet's CUDA_VISIBLE_DEVICES entries (the GPUs its node was given); None: unset.
    node_gpus: list[str] | None
    # Opening the GPU as a vLLM worker does (int(), then NVML by index) failed with this.
    open_error: str | None = None


class RayWorker:
    """The part of vLLM's RayWorkerWrapper that says where it runs and opens its GPU.

    Defined in the stand-in's `__main__`, so Ray ships it to the workers by value."""

    def report(self, rank: int, bundle: int) -> dict[str, Any]:
        import ray
        from ray._private.worker import global_worker

        context = ray.get_runtime_context()
        original = global_worker.original_visible_accelerator_ids.get("GPU")
        try:
            physical_gpus(os.environ)
            open_error = None
        except Exception as exc:  # the line vLLM's worker would die with
            open_error = f"{type(exc).__name__}: {exc}"
        return {
            "rank": rank,
            "bundle": bundle,
            "node_id": context.get_node_id(),
            "node_ip": os.environ.get("VLLM_HOST_IP") or ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "node_gpus": None if original is None else [str(g) for g in original],
            "open_error": open_error,
        }

    def ping(self) -> int:
        return os.getpid()


def one_line(exc: BaseException) -> str:
    """A Ray error as one line: its last non-empty line (a worker's traceback ends with the
    exception), prefixed with its type."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def node_ip_problem(ip: str, cluster_resources: dict[str, float]) -> str | None:
    """Why a bundle pinned to ``node:<ip>`` can never be placed, or None if it can."""
    if f"node:{ip}" in cluster_resources:
        return None
    return (
        f"No available node types can fulfill resource request {{'node:{ip}': 0.001}}. "
        f"VLLM_HOST_IP={ip} is not the IP of any node of the Ray cluster at "
        f"{os.environ.get('RAY_ADDRESS')}; set it to this host's Ray node IP."
    )


def placement_problems(
    views: list[WorkerView],
    *,
    world: int,
    nodes: dict[str, str],
    driver_node: str,
    driver_ip: str,
) -> list[str]:
    """Everything wrong with where the actors run (empty: as vLLM needs it).

    ``nodes``: the replica's Ray cluster, alive node id -> node IP."""
    problems = []
    if len(views) != world:
        problems.append(f"{len(views)} workers for a world size of {world}")
    if driver_node not in {v.node_id for v in views}:
        problems.append(f"driver node id {driver_node} is not included in the placement group")
    taken: set[tuple[str, str]] = set()
    for v in views:
        where = f"worker {v.rank} (bundle {v.bundle}, pid {v.pid}) on {v.node_ip}"
        if v.node_id not in nodes:
            problems.append(f"{where}: node {v.node_id} is not a node of the replica's cluster")
        elif v.node_ip != nodes[v.node_id]:
            problems.append(
                f"{where}: VLLM_HOST_IP {v.node_ip} is not its Ray node's IP {nodes[v.node_id]}"
            )
        if len(v.gpu_ids) != 1:
            problems.append(f"{where}: Ray gave it {len(v.gpu_ids)} GPUs {v.gpu_ids}, not 1")
            continue
        gpu = v.gpu_ids[0]
        try:
            int(gpu)  # vLLM's executor: gpu_ids = [int(x) for x in gpu_ids]
        except ValueError as exc:
            problems.append(f"{where}: ValueError: {exc}")
            continue
        if v.node_gpus is None or gpu not in v.node_gpus:
            problems.append(f"{where}: GPU {gpu} is not one its Ray node was given {v.node_gpus}")
        if v.cuda_visible_devices != gpu:
            problems.append(
                f"{where}: CUDA_VISIBLE_DEVICES={v.cuda_visible_devices!r}, Ray gave GPU {gpu}"
            )
        if v.open_error is not None:
            problems.append(f"{where}: {v.open_error}")
        if (v.node_id, gpu) in taken:
            problems.append(f"{where}: GPU {gpu} is also another worker's")
        taken.add((v.node_id, gpu))
    # vLLM: "Every node should have a unique IP address".
    ips = {v.node_ip for v in views} | {driver_ip}
    node_ids = {v.node_id for v in views}
    if len(ips) != len(node_ids):
        problems.append(
            f"Every node should have a unique IP address. Got {len(node_ids)} nodes and "
            f"{len(ips)} unique IP addresses {sorted(ips)}"
        )
    return problems


class RayWorkers:
    """The placement group and its actors, as vLLM's Ray executor makes them."""

    def __init__(self, tensor_parallel: int, pipeline_parallel: int) -> None:
        self.world = tensor_parallel * pipeline_parallel
        self.actors: list[Any] = []
        self.views: list[WorkerView] = []

    def start(self) -> None:
        """Join, place, start and check the workers; SystemExit with one line if anything is
        not as vLLM needs it."""
        import ray
        from ray._private.state import available_resources_per_node
        from ray.util import placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not os.environ.get("RAY_ADDRESS"):
            # vLLM would start a Ray of its own here; gpud always names the replica's cluster.
            raise SystemExit("RAY_ADDRESS is not set: no Ray cluster to run the workers on")
        # As vLLM: ray.init(address=None, runtime_env=...) joins RAY_ADDRESS. The runtime env
        # stands for vLLM being installed in the workers' Python: they import this repo's code.
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}, log_to_driver=False)
        driver_ip = os.environ.get("VLLM_HOST_IP") or ray.util.get_node_ip_address()
        driver_node = ray.get_runtime_context().get_node_id()
        problem = node_ip_problem(driver_ip, ray.cluster_resources())
        if problem is not None:
            raise SystemExit(problem)
        here = available_resources_per_node().get(driver_node, {})
        if here.get("GPU", 0) < 1:
            raise SystemExit(
                f"ValueError: Current node has no GPU available. current_node_resource={here}. "
                f"vLLM engine cannot start without GPU. Make sure you have at least 1 GPU "
                f"available in a node current_node_id={driver_node!r} current_ip={driver_ip!r}."
            )
        specs: list[dict[str, float]] = [{"GPU": 1.0} for _ in range(self.world)]
        specs[0][f"node:{driver_ip}"] = 0.001
        group = ray.util.placement_group(specs, strategy="PACK")
        ready, _ = ray.wait([group.ready()], timeout=PG_WAIT_S)
        if not ready:
            raise SystemExit(
                f"ValueError: Cannot provide a placement group of placement_group_specs={specs} "
                f"within {PG_WAIT_S:.0f} seconds. See `ray status` and `ray list nodes` to make "
                "sure the cluster has enough resources."
            )
        placed = placement_group_table(group)["bundles_to_node_id"]
        if driver_node not in placed.values():
            raise SystemExit(
                f"RuntimeError: driver node id {driver_node} is not included in a placement "
                f"group {group.id}. Node id -> bundles {placed}."
            )
        remote = ray.remote(RayWorker)
        for bundle in range(self.world):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=group,
                placement_group_capture_child_tasks=True,
                placement_group_bundle_index=bundle,
            )
            self.actors.append(
                remote.options(num_cpus=0, num_gpus=1, scheduling_strategy=strategy).remote()
            )
        try:
            reports = ray.get(
                [a.report.remote(rank, rank) for rank, a in enumerate(self.actors)],
                timeout=PG_WAIT_S,
            )
        except ray.exceptions.RayError as exc:
            raise SystemExit(f"the Ray workers did not start: {one_line(exc)}") from None
        self.views = [msgspec.convert(r, WorkerView) for r in reports]
        alive = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        problems = placement_problems(
            self.views,
            world=self.world,
            nodes=alive,
            driver_node=driver_node,
            driver_ip=driver_ip,
        )
        if problems:
            raise SystemExit("; ".join(problems))

    def watch(self, engine: Engine) -> None:
        """Ping every actor each POLL_S until one is dead, then mark the engine dead (vLLM's
        API server keeps answering /health)."""
        import ray

        while True:
            try:
                ray.get([a.ping.remote() for a in self.actors], timeout=PING_TIMEOUT_S)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
                pass  # slow or restarting is not dead (vLLM would hang here)
            except ray.exceptions.RayError as exc:
                engine.dead = one_line(exc)
                print(f"a Ray worker died: {engine.dead}", file=sys.stderr, flush=True)
                return
            time.sleep(POLL_S)


def make_handler(engine: Engine) -> type[JsonHandler]:
    class Handler(JsonHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                self._raw(200, b"", "application/json")
            elif self.path == "/v1/models":
                model = {"id": engine.model, "object": "model", "owned_by": "vllm"}
                self._reply(200, {"object": "list", "data": [model]})
            elif self.path == "/metrics":
                self._raw(200, engine.metrics().encode(), "text/plain; version=0.0.4")
            elif self.path == "/stand-in/workers" and engine.workers is not None:
                views = msgspec.to_builtins(engine.workers.views)
                self._reply(200, {"workers": views, "dead": engine.dead})
            else:
                self._error(404, "Not Found", "NotFoundError")

        def do_POST(self) -> None:
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                self._error(404, "Not Found", "NotFoundError")
                return
            if engine.dead is not None:
                self._error(500, ENGINE_DEAD, "InternalServerError")
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if not isinstance(body, dict):
                    raise ValueError("the body is not a JSON object")
            except ValueError as exc:
                self._error(400, f"invalid JSON body: {exc}", "BadRequestError")
                return
            if body.get("model") != engine.model:
                self._error(
                    404, f"The model `{body.get('model')}` does not exist.", "NotFoundError"
                )
                return
            tokens = int(body.get("max_tokens") or 16)
            with engine.lock:
                engine.running += 1
            try:
                if self.path == "/v1/completions":
                    self._completion(tokens)
                elif body.get("stream"):
                    self._chat_stream(tokens)
                else:
                    self._chat(tokens)
            finally:
                with engine.lock:
                    engine.running -= 1

        def _completion(self, tokens: int) -> None:
            choice = {"index": 0, "text": TOKEN * tokens, "finish_reason": "length"}
            self._reply(200, self._envelope("text_completion", choice, tokens))

        def _chat(self, tokens: int) -> None:
            message = {"role": "assistant", "content": TOKEN * tokens}
            choice = {"index": 0, "message": message, "finish_reason": "length"}
            self._reply(200, self._envelope("chat.completion", choice, tokens))

        def _chat_stream(self, tokens: int) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
            rid = f"chatcmpl-{uuid.uuid4().hex}"
            deltas = [{"role": "assistant", "content": ""}] + [{"content": TOKEN}] * tokens
            for i, delta in enumerate(deltas):
                last = i == len(deltas) - 1
                chunk = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": engine.model,
                    "choices": [
                        {"index": 0, "delta": delta, "finish_reason": "length" if last else None}
                    ],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

        def _envelope(self, kind: str, choice: dict[str, Any], tokens: int) -> dict[str, Any]:
            return {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": kind,
                "created": int(time.time()),
                "model": engine.model,
                "choices": [choice],
                "usage": {
                    "prompt_tokens": 1,
                    "completion_tokens": tokens,
                    "total_tokens": 1 + tokens,
                },
            }

        def _error(self, status: int, message: str, kind: str) -> None:
            self._reply(
                status,
                {
                    "object": "error",
                    "message": message,
                    "type": kind,
                    "param": None,
                    "code": status,
                },
            )

        def _raw(self, status: int, raw: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    return Handler


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    world = args.tensor_parallel_size * args.pipeline_parallel_size
    gpus = physical_gpus(os.environ)
    workers = None
    if args.distributed_executor_backend == "ray":
        workers = RayWorkers(args.tensor_parallel_size, args.pipeline_parallel_size)
        workers.start()
    elif world > len(gpus):
        raise SystemExit(
            f"ValueError: world size {world} (TP {args.tensor_parallel_size} x PP "
            f"{args.pipeline_parallel_size}) is larger than the {len(gpus)} GPUs visible here"
        )
    engine = Engine(args.model_tag, workers)
    if workers is not None:
        threading.Thread(target=workers.watch, args=(engine,), daemon=True).start()
    # vLLM's own line once its engine is up (vllm/entrypoints/openai/api_server.py): the output
    # an operator reads with `gpud deploy logs`.
    host = args.host or "0.0.0.0"
    print(f"INFO api_server.py: Starting vLLM API server on http://{host}:{args.port}", flush=True)
    serve(host, args.port, make_handler(engine))


if __name__ == "__main__":
    main()
