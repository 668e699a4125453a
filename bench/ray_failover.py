"""Ray head failover: how long from kill -9 of the head host until Ray works again.

Three modes, printed as numbers (and written as JSON with --json); median and max over
--repeats failovers each:

  harness     Real gpud agents (real serf, real `ray start`) on 3 hosts in network namespaces
              (tests/harness). Per --fault: `kill9` kills every process on the head's host
              (its peers get refusals at once); `cable` first pulls its cable (the interface
              goes down, so its packets vanish as at a power loss or a kernel hang), then
              kills its processes. Then (a) the surviving nodes agree on a new head, (b) they
              all see its GCS announced ready, (c) the new GCS lists every surviving node
              alive. Failure detection is included. The host comes back between rounds.
  managed     In-process gpud nodes (RayService, election over an in-process query transport,
              real `ray start` on 127.0.0.x); the others see the head failed at once, so Serf's
              failure detection is NOT included.
  unmanaged   A plain Ray worker joined to a plain head; SIGKILL the head's process group and
              time until the worker's `ray start --block` exits by itself (Ray's
              RAY_gcs_rpc_server_reconnect_timeout_s, default 60 s). Nothing brings it back.

(c) is polled with one GCS query per try (a Python subprocess, about 1-2 s on a busy host), so
it may read up to one query late.

Run (root, for the namespaces):  .venv/bin/python -m bench.ray_failover
    [--mode harness unmanaged managed] [--fault kill9 cable] [--repeats 3] [--hosts 3]
    [--vote-timeout 1.0] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import msgspec

from gpud.config import RayConfig
from gpud.ray.probes import GcsNodes, alive_ray_nodes, gcs_healthy
from gpud.ray.service import RayServiceSettings
from gpud.ray.supervisor import WORKER_PORT_NAMES, SupervisorSettings
from tests.harness.gpud_node import Cluster, GpudNode
from tests.harness.ray_cluster import RAY_EXECUTABLE, head_views, kill_host, ray_overrides
from tests.harness.ray_loopback import Nodes, SimplePorts
from tests.harness.wait import async_seconds_until, async_wait_for, wait_for


class FailoverResult(msgspec.Struct, kw_only=True):
    old_head: str
    new_head: str
    old_term: int
    new_term: int
    # Every survivor shows the old head down (gpud's verdict, or Serf's failed).
    detected_s: float
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

    def sees_down(self, name: str) -> bool:
        """Every surviving node shows ``name`` down or not alive."""

    async def ray_nodes(self, address: str) -> list[str]:
        """Names of the Ray nodes the GCS at ``address`` reports alive (raises RuntimeError)."""


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

    async def detected() -> bool:
        return cluster.sees_down(old_head)

    async def since_kill(predicate: Callable[[], Awaitable[bool]], what: str) -> float:
        took = await async_seconds_until(predicate, limit_s, 0.1, since=began, what=what)
        return round(took, 2)

    detected_s = await since_kill(detected, f"{old_head} seen down")
    elected_s = await since_kill(elected, "a new head elected")
    gcs_ready_s = await since_kill(gcs_ready, "the new head's GCS ready")
    new = cluster.head()
    assert new is not None
    address = f"{cluster.head_address(new[0])}:{new[2]}"
    expected = cluster.ray_workers() | {new[0]}
    seen_nodes: list[str] = []

    async def registered() -> bool:
        nonlocal seen_nodes
        try:
            seen_nodes = await cluster.ray_nodes(address)
        except RuntimeError:
            return False
        return expected <= set(seen_nodes)

    workers_s = await since_kill(registered, "every worker registered with the new head")
    return FailoverResult(
        old_head=old_head,
        new_head=new[0],
        old_term=old_term,
        new_term=new[1],
        detected_s=detected_s,
        elected_s=elected_s,
        gcs_ready_s=gcs_ready_s,
        workers_registered_s=workers_s,
        surviving_ray_nodes=len(seen_nodes),
    )


class InProcessCluster:
    """FailoverProbes over tests.harness.ray_loopback.Nodes (in-process gpud nodes, real Ray)."""

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

    def sees_down(self, name: str) -> bool:
        return True  # in-process: the others see the head failed at once

    async def ray_nodes(self, address: str) -> list[str]:
        return [n.name for n in await alive_ray_nodes(RAY_EXECUTABLE, address, timeout_s=3)]


async def managed(ray_nodes: int) -> FailoverResult:
    with tempfile.TemporaryDirectory(prefix="gpud-ray-bench-") as state:
        config = RayConfig(executable=RAY_EXECUTABLE, num_cpus=1)
        names = {f"n{i}": config for i in range(ray_nodes)}
        names["voter"] = RayConfig(enabled=False)  # an extra voter keeps a majority after a kill
        settings = RayServiceSettings(
            supervisor=SupervisorSettings(grace_s=3.0, worker_ports=8),
            nodes_every_s=3600.0,  # the bench asks the GCS itself
        )
        nodes = Nodes(Path(state), names, port_range=(25000, 26000), settings=settings)
        cluster = InProcessCluster(nodes)
        nodes.start()
        try:
            began = time.monotonic()
            h = await async_wait_for(
                lambda: (head := cluster.head()) and head[2] and head, 180, 0.2, what="a ready head"
            )
            address = f"{cluster.head_address(h[0])}:{h[2]}"

            async def joined() -> bool:
                return len(await _alive_or_empty(address)) >= ray_nodes

            await async_seconds_until(joined, 240, 1.0, since=began, what="the workers joined")
            print(
                f"managed: {ray_nodes} Ray nodes up in {time.monotonic() - began:.1f}s, "
                f"head {h[0]}",
                flush=True,
            )
            return await measure_failover(cluster)
        finally:
            await nodes.stop_all()


class HarnessCluster:
    """FailoverProbes over real gpud agents (serf, Ray) in the netns harness. The bench runs in
    the root namespace, which cannot reach the harness subnet: GCS is asked from inside a
    surviving host's namespace."""

    def __init__(self, cluster: Cluster, fault: str = "kill9") -> None:
        self.cluster = cluster
        self.fault = fault
        self._query: GcsNodes | None = None

    def _running(self) -> list[GpudNode]:
        return [n for n in self.cluster if n.running()]

    def head(self) -> tuple[str, int, int] | None:
        """The head every running node sees (one alive head, itself running); its GCS port
        only once every running node has seen it announced."""
        running = self._running()
        names = {n.name for n in running}
        seen = set()
        for view in head_views(running):
            heads = [h for h in view.heads if h[0] in names]
            if len(heads) != 1:
                return None
            seen.add(heads[0])
        if len({(name, term) for name, term, _ in seen}) != 1:
            return None
        name, term, _ = next(iter(seen))
        return name, term, min(gcs for _, _, gcs in seen)

    def head_address(self, name: str) -> str:
        return next(n.addr for n in self.cluster if n.name == name)

    def ray_workers(self) -> set[str]:
        return {n.name for n in self._running()}

    async def kill_host(self, name: str) -> None:
        node = next(n for n in self.cluster if n.name == name)
        if self.fault == "cable":
            node.host.link_down()
        await asyncio.to_thread(kill_host, node)

    def sees_down(self, name: str) -> bool:
        for node in self._running():
            try:
                member = next((m for m in node.members() if m["name"] == name), None)
            except Exception:
                return False
            if member is not None and member["status"] == "alive" and not member.get("down"):
                return False
        return True

    async def ray_nodes(self, address: str) -> list[str]:
        # One long-lived query process, moved from GCS to GCS (as gpud polls): a process per
        # poll, or per new head, would take a CPU core from the Ray nodes whose start this
        # measures, and its Ray import would be counted as their registration. It runs in the
        # namespace of a host that is not the head, so it outlives the head's fault.
        if self._query is None:
            head = self.head()
            via = next(n for n in self._running() if head is None or n.name != head[0]).host
            self._query = GcsNodes(
                RAY_EXECUTABLE, address, argv_prefix=["ip", "netns", "exec", via.netns]
            )
        self._query.gcs_address = address
        return [n.name for n in await self._query.alive(timeout_s=3)]

    async def close(self) -> None:
        if self._query is not None:
            await self._query.close()
        self._query = None


async def _ray_nodes_once(probes: HarnessCluster, address: str) -> list[str]:
    try:
        return await probes.ray_nodes(address)
    finally:
        await probes.close()


async def _failover_once(cluster: Cluster, fault: str) -> FailoverResult:
    probes = HarnessCluster(cluster, fault)
    try:
        head = probes.head()
        assert head is not None and head[2], "no ready head"
        # The query process imports Ray before the fault, not after it.
        await probes.ray_nodes(f"{probes.head_address(head[0])}:{head[2]}")
        return await measure_failover(probes)
    finally:
        await probes.close()


def _steady(cluster: Cluster, limit_s: float = 240.0) -> tuple[str, int, int]:
    """Until every node agrees on a ready head whose GCS lists every node alive."""
    probes = HarnessCluster(cluster)
    names = {n.name for n in cluster}

    def steady() -> tuple[str, int, int] | None:
        head = probes.head()
        if head is None or not head[2]:
            return None
        address = f"{probes.head_address(head[0])}:{head[2]}"
        return head if names <= set(asyncio.run(_ray_nodes_once(probes, address))) else None

    return wait_for(steady, limit_s, 1.0, what="a steady Ray cluster", describe=cluster.describe)


def harness(
    repeats: int, vote_timeout_s: float, hosts: int = 3, fault: str = "kill9"
) -> list[FailoverResult]:
    """``fault`` on the head host `repeats` times in one cluster of ``hosts``; the host comes
    back (cable in, gpud restarted) and the cluster is steady again before the next round."""
    results = []
    temp_root = tempfile.mkdtemp(prefix="grb-")
    overrides = ray_overrides(temp_root, vote_timeout_s=vote_timeout_s)
    try:
        with Cluster(hosts, overrides=overrides) as c:
            began = time.monotonic()
            head = _steady(c)
            print(f"harness: {hosts} hosts, head {head[0]}, up in {time.monotonic() - began:.1f}s")
            for i in range(repeats):
                result = asyncio.run(_failover_once(c, fault))
                results.append(result)
                print(f"harness {fault} #{i + 1}: {_line(result)}", flush=True)
                victim = next(n for n in c if n.name == result.old_head)
                if fault == "cable":
                    victim.host.link_up()
                victim.reap_children()
                victim.start()
                _steady(c)
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)
    return results


def _line(result: FailoverResult) -> str:
    return (
        f"head {result.old_head} killed -> {result.new_head} (term {result.new_term}) detected "
        f"{result.detected_s}s, elected {result.elected_s}s, GCS ready {result.gcs_ready_s}s, {result.surviving_ray_nodes} "
        f"Ray nodes registered {result.workers_registered_s}s"
    )


class Spread(msgspec.Struct, kw_only=True):
    n: int
    median: float | None
    max: float | None


def spread(values: list[float | None]) -> Spread:
    known = [v for v in values if v is not None]
    return Spread(
        n=len(values),
        median=round(statistics.median(known), 2) if known else None,
        max=max(known) if known else None,
    )


async def _alive_or_empty(address: str) -> list[str]:
    try:
        return [n.name for n in await alive_ray_nodes(RAY_EXECUTABLE, address, timeout_s=3)]
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
        names = [*WORKER_PORT_NAMES, *(["port"] if head else [])]
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
            RAY_EXECUTABLE,
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
        await async_wait_for(
            lambda: gcs_healthy(RAY_EXECUTABLE, "127.0.0.2", gcs), 120, 0.5, what="head GCS ready"
        )
        worker = await _start(
            [
                RAY_EXECUTABLE,
                "start",
                f"--address=127.0.0.2:{gcs}",
                "--node-ip-address=127.0.0.3",
                f"--temp-dir={temp}/w",
                *common,
                *await ray_ports(head=False),
            ],
            env,
        )

        async def joined() -> bool:
            return len(await _alive_or_empty(f"127.0.0.2:{gcs}")) >= 2

        await async_seconds_until(joined, 180, 1.0, since=began, what="the worker joined")
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


def measure(args: argparse.Namespace) -> dict[str, object]:
    results: dict[str, object] = {}
    for fault in args.fault if "harness" in args.mode else []:
        runs = harness(args.repeats, args.vote_timeout, args.hosts, fault)
        # kill -9 keeps its old key ("harness") so earlier JSON stays comparable.
        results["harness" if fault == "kill9" else f"harness-{fault}"] = {
            "runs": runs,
            "fault": fault,
            "hosts": args.hosts,
            "vote_timeout_s": args.vote_timeout,
            "detected_s": spread([r.detected_s for r in runs]),
            "elected_s": spread([r.elected_s for r in runs]),
            "gcs_ready_s": spread([r.gcs_ready_s for r in runs]),
            "workers_registered_s": spread([r.workers_registered_s for r in runs]),
        }
    if "managed" in args.mode:
        managed_runs = [asyncio.run(managed(args.ray_nodes)) for _ in range(args.repeats)]
        for result in managed_runs:
            print(f"managed: {_line(result)} (plus Serf failure detection)", flush=True)
        results["managed"] = {
            "runs": managed_runs,
            "detected_s": spread([r.detected_s for r in managed_runs]),
            "elected_s": spread([r.elected_s for r in managed_runs]),
            "gcs_ready_s": spread([r.gcs_ready_s for r in managed_runs]),
            "workers_registered_s": spread([r.workers_registered_s for r in managed_runs]),
        }
    if "unmanaged" in args.mode:
        un_runs = []
        for _ in range(args.repeats):
            un = asyncio.run(unmanaged(args.reconnect_timeout))
            un_runs.append(un)
            print(
                f"unmanaged: worker exited {un.worker_exit_s}s after head SIGKILL "
                f"(code {un.worker_exit_code}, RAY_gcs_rpc_server_reconnect_timeout_s="
                f"{un.reconnect_timeout_env or 'default'}); it never rejoins",
                flush=True,
            )
        results["unmanaged"] = {
            "runs": un_runs,
            "worker_exit_s": spread([r.worker_exit_s for r in un_runs]),
        }
    print("summary (seconds after the fault, median / max):")
    for mode, result in results.items():
        assert isinstance(result, dict)
        for key, value in result.items():
            if isinstance(value, Spread):
                print(f"  {mode:14} {key:22} {value.median} / {value.max}  (n={value.n})")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--mode",
        nargs="+",
        choices=["harness", "managed", "unmanaged"],
        default=["harness", "unmanaged"],
    )
    parser.add_argument(
        "--fault",
        nargs="+",
        choices=["kill9", "cable"],
        default=["kill9", "cable"],
        help="harness: kill -9 of the head host, or its cable pulled first (silent death)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="failovers per mode and fault")
    parser.add_argument("--ray-nodes", type=int, default=3, help="managed: gpud nodes with Ray")
    parser.add_argument("--hosts", type=int, default=3, help="harness: hosts in the cluster")
    parser.add_argument(
        "--vote-timeout",
        type=float,
        default=1.0,
        help="harness: ray.vote_timeout_s (how long a candidate collects votes)",
    )
    parser.add_argument(
        "--reconnect-timeout",
        default=None,
        help="unmanaged: RAY_gcs_rpc_server_reconnect_timeout_s (default: Ray's)",
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = measure(args)
    if args.json:
        Path(args.json).write_bytes(msgspec.json.encode(results))


if __name__ == "__main__":
    main()
