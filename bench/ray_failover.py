"""Ray head failover: how long from kill -9 of the head host until Ray works again.

Three measurements, printed as numbers (and written as JSON with --json):

  managed     In-process gpud nodes (the real RayService, election over an in-process query
              transport, real `ray start` on 127.0.0.x loopback addresses). The head "host" is
              killed: SIGKILL of its Ray process group and its gpud task, and the others see it
              failed at once. Measures (a) new head elected, (b) new GCS ready, (c) every
              surviving Ray worker registered with the new GCS. Serf's own failure detection is
              NOT included (add it: ~5.8 s for 3 agents, measured in DESIGN.md).
  unmanaged   A plain Ray worker joined to a plain head; SIGKILL the head's process group and
              time until the worker's `ray start --block` exits by itself (Ray's
              RAY_gcs_rpc_server_reconnect_timeout_s, default 60 s). Nothing brings it back.
  harness     TODO(integrator): the same (a)/(b)/(c) in network namespaces with real serf and
              gpud agents, via the netns harness (kill -9 of the whole namespace's processes).
              `measure_failover` below takes the probes that harness has to provide.

Run:  .venv/bin/python bench/ray_failover.py [--mode managed|unmanaged|both] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpud.config import RayConfig  # noqa: E402
from gpud.ray import service as ray_service  # noqa: E402
from gpud.ray.supervisor import alive_ray_nodes, gcs_healthy  # noqa: E402
from tests.ray_helpers import Nodes, SimplePorts  # noqa: E402

RAY = str(ROOT / ".venv" / "bin" / "ray")


class FailoverResult(msgspec.Struct, kw_only=True):
    old_head: str
    new_head: str
    old_term: int
    new_term: int
    elected_s: float
    gcs_ready_s: float
    workers_registered_s: float
    surviving_ray_nodes: int


class UnmanagedResult(msgspec.Struct, kw_only=True):
    reconnect_timeout_env: str | None
    worker_exit_s: float | None
    worker_exit_code: int | None


class FailoverProbes(Protocol):
    """What a cluster (in-process here, netns harness later) must provide to be measured."""

    def head(self) -> tuple[str, int, int] | None:
        """(head name, term, gcs port or 0) as the surviving nodes see it; None if no head."""

    def head_address(self, name: str) -> str: ...

    def ray_workers(self) -> set[str]:
        """Names of surviving nodes that should run a Ray worker."""

    async def kill_host(self, name: str) -> None: ...


async def _until(predicate: Callable[[], Awaitable[bool]], began: float, limit_s: float) -> float:
    while not await predicate():
        if time.monotonic() - began > limit_s:
            raise TimeoutError(f"no progress after {limit_s}s")
        await asyncio.sleep(0.1)
    return round(time.monotonic() - began, 2)


async def measure_failover(cluster: FailoverProbes, limit_s: float = 180.0) -> FailoverResult:
    """Kill the head host and time (a) election, (b) GCS ready, (c) workers registered."""
    current = cluster.head()
    assert current is not None and current[2], "no ready head to kill"
    old_head, old_term, _ = current
    began = time.monotonic()
    await cluster.kill_host(old_head)

    async def elected() -> bool:
        seen = cluster.head()
        return seen is not None and seen[0] != old_head and seen[1] > old_term

    async def gcs_ready() -> bool:
        seen = cluster.head()
        return seen is not None and seen[0] != old_head and seen[2] != 0

    elected_s = await _until(elected, began, limit_s)
    gcs_ready_s = await _until(gcs_ready, began, limit_s)
    new = cluster.head()
    assert new is not None
    address = f"{cluster.head_address(new[0])}:{new[2]}"
    expected = cluster.ray_workers() | {new[0]}
    seen_nodes: list[str] = []

    async def registered() -> bool:
        nonlocal seen_nodes
        try:
            seen_nodes = [n.name for n in await alive_ray_nodes(RAY, address, timeout_s=3)]
        except RuntimeError:
            return False
        return expected <= set(seen_nodes)

    workers_s = await _until(registered, began, limit_s)
    return FailoverResult(
        old_head=old_head,
        new_head=new[0],
        old_term=old_term,
        new_term=new[1],
        elected_s=elected_s,
        gcs_ready_s=gcs_ready_s,
        workers_registered_s=workers_s,
        surviving_ray_nodes=len(seen_nodes),
    )


class InProcessCluster:
    """FailoverProbes over tests.ray_helpers.Nodes (in-process gpud nodes, real Ray)."""

    def __init__(self, nodes: Nodes) -> None:
        self.nodes = nodes

    def head(self) -> tuple[str, int, int] | None:
        heads = [
            (name, s.ctx.tags.term, s.ctx.tags.gcs)
            for name, s in self.nodes.services.items()
            if name not in self.nodes.down and s.ctx.tags.ray == "head"
        ]
        return max(heads, key=lambda h: h[1]) if heads else None

    def head_address(self, name: str) -> str:
        return self.nodes.services[name].ctx.advertise_addr

    def ray_workers(self) -> set[str]:
        return {
            name
            for name, s in self.nodes.services.items()
            if name not in self.nodes.down and s.ctx.config.ray.enabled
        }

    async def kill_host(self, name: str) -> None:
        pid = self.nodes.services[name].supervisor.status().process.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.nodes.down.add(name)
        await self.nodes.stop(name)


async def managed(ray_nodes: int) -> FailoverResult:
    ray_service.RAY_NODES_EVERY_S = 3600.0  # the bench asks the GCS itself
    with tempfile.TemporaryDirectory(prefix="gpud-ray-bench-") as state:
        config = RayConfig(executable=RAY, num_cpus=1)
        names = {f"n{i}": config for i in range(ray_nodes)}
        names["voter"] = RayConfig(enabled=False)  # an extra voter keeps a majority after a kill
        nodes = Nodes(Path(state), names, port_range=(25000, 26000))
        for s in nodes.services.values():
            s.supervisor._grace_s = 3.0
            s.supervisor._worker_ports = 8
        cluster = InProcessCluster(nodes)
        nodes.start()
        try:
            began = time.monotonic()
            while not ((h := cluster.head()) and h[2]):
                if time.monotonic() - began > 180:
                    raise TimeoutError("no head came up")
                await asyncio.sleep(0.2)
            address = f"{cluster.head_address(h[0])}:{h[2]}"
            while len(await _alive_or_empty(address)) < ray_nodes:
                if time.monotonic() - began > 240:
                    raise TimeoutError("workers did not join")
                await asyncio.sleep(1)
            print(
                f"managed: {ray_nodes} Ray nodes up in {time.monotonic() - began:.1f}s, "
                f"head {h[0]}",
                flush=True,
            )
            return await measure_failover(cluster)
        finally:
            await nodes.stop_all()


async def _alive_or_empty(address: str) -> list[str]:
    try:
        return [n.name for n in await alive_ray_nodes(RAY, address, timeout_s=3)]
    except RuntimeError:
        return []


async def _start(argv: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )


async def unmanaged(reconnect_timeout_s: str | None, limit_s: float = 240.0) -> UnmanagedResult:
    env = dict(os.environ)
    if reconnect_timeout_s is not None:
        env["RAY_gcs_rpc_server_reconnect_timeout_s"] = reconnect_timeout_s
    ports = SimplePorts(26000, 27000)
    temp = f"/tmp/gpud-ray-bu-{os.getpid()}"
    common = ["--block", "--disable-usage-stats", "--num-cpus=1", "--num-gpus=0"]

    async def ray_ports(head: bool) -> list[str]:
        names = [
            "node-manager-port",
            "object-manager-port",
            "metrics-export-port",
            "dashboard-agent-grpc-port",
            "dashboard-agent-listen-port",
            "runtime-env-agent-port",
        ] + (["port"] if head else [])
        single = await ports.lease("bench", len(names))
        workers = await ports.lease("bench", 8, contiguous=True)
        return [f"--{n}={p}" for n, p in zip(names, single.ports, strict=True)] + [
            f"--min-worker-port={workers.ports[0]}",
            f"--max-worker-port={workers.ports[-1]}",
        ]

    head_flags = await ray_ports(head=True)
    gcs = int(next(f for f in head_flags if f.startswith("--port=")).split("=")[1])
    head = await _start(
        [
            RAY,
            "start",
            "--head",
            "--include-dashboard=false",
            "--node-ip-address=127.0.0.2",
            f"--temp-dir={temp}/h",
            *common,
            *head_flags,
        ],
        env,
    )
    worker: asyncio.subprocess.Process | None = None
    try:
        began = time.monotonic()
        while not await gcs_healthy(RAY, "127.0.0.2", gcs):
            if time.monotonic() - began > 120:
                raise TimeoutError("head GCS not ready")
            await asyncio.sleep(0.5)
        worker = await _start(
            [
                RAY,
                "start",
                f"--address=127.0.0.2:{gcs}",
                "--node-ip-address=127.0.0.3",
                f"--temp-dir={temp}/w",
                *common,
                *await ray_ports(head=False),
            ],
            env,
        )
        while len(await _alive_or_empty(f"127.0.0.2:{gcs}")) < 2:
            if time.monotonic() - began > 180:
                raise TimeoutError("worker did not join")
            await asyncio.sleep(1)
        os.killpg(head.pid, signal.SIGKILL)
        killed = time.monotonic()
        try:
            code = await asyncio.wait_for(worker.wait(), limit_s)
            exit_s: float | None = round(time.monotonic() - killed, 1)
        except TimeoutError:
            code, exit_s = None, None
        return UnmanagedResult(
            reconnect_timeout_env=reconnect_timeout_s, worker_exit_s=exit_s, worker_exit_code=code
        )
    finally:
        for proc in (head, worker):
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


async def measure(args: argparse.Namespace) -> dict[str, object]:
    results: dict[str, object] = {}
    if args.mode in ("managed", "both"):
        result = await managed(args.ray_nodes)
        results["managed"] = result
        print(
            f"managed: head {result.old_head} killed -> {result.new_head} elected "
            f"{result.elected_s}s, GCS ready {result.gcs_ready_s}s, "
            f"{result.surviving_ray_nodes} Ray nodes registered {result.workers_registered_s}s"
            " (plus Serf failure detection)",
            flush=True,
        )
    if args.mode in ("unmanaged", "both"):
        un = await unmanaged(args.reconnect_timeout)
        results["unmanaged"] = un
        print(
            f"unmanaged: worker exited {un.worker_exit_s}s after head SIGKILL "
            f"(code {un.worker_exit_code}, RAY_gcs_rpc_server_reconnect_timeout_s="
            f"{un.reconnect_timeout_env or 'default'}); it never rejoins",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mode", choices=["managed", "unmanaged", "both"], default="both")
    parser.add_argument("--ray-nodes", type=int, default=3, help="managed: gpud nodes with Ray")
    parser.add_argument(
        "--reconnect-timeout",
        default=None,
        help="unmanaged: RAY_gcs_rpc_server_reconnect_timeout_s (default: Ray's)",
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = asyncio.run(measure(args))
    if args.json:
        Path(args.json).write_bytes(msgspec.json.encode(results))


if __name__ == "__main__":
    main()
