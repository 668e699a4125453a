"""Health timings: how fast a dead peer or a blocked port is detected, what a probe round costs.

Two modes:

- ``inproc`` (default): N HealthService instances in this process, each with its own
  127.77.x.y address and peer port, real aiohttp servers and TCP, run inside a private network
  namespace (the script re-executes itself under ``unshare -n``). Measures the time until every
  node passes, the time from stopping a peer to the observer's "critical" verdict, the cost of
  one probe round against N peers, and peer-API ping latency.
- ``harness``: real agents (gpud + serf) in the namespace harness (tests/harness): kill -9 of a
  node and a blocked peer port, timed until a survivor's GET /v1/health says critical.

Usage: sudo .venv/bin/python bench/health.py [inproc|harness] [--nodes 8] [--rounds 5] [--json out]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpud import config as config_mod
from gpud import secret
from gpud.context import Member, NodeContext
from gpud.health.service import HealthService
from gpud.tags import Tags

BASE_PORT = 17000
POLL_S = 0.02


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "median": round(statistics.median(ordered), 4),
        "p90": round(ordered[math.ceil(0.9 * len(ordered)) - 1], 4),
        "max": round(ordered[-1], 4),
    }


def node_config(
    name: str, port: int, key_file: Path, interval_s: float, timeout_s: float, full_mesh_max: int
) -> config_mod.Config:
    return config_mod.parse(
        f'[node]\nname = "{name}"\n[cluster]\nkey_file = "{key_file}"\n[peer]\nport = {port}\n'
        f"[health]\ninterval_s = {interval_s}\ntimeout_s = {timeout_s}\n"
        f"full_mesh_max = {full_mesh_max}\n"
    )


async def wait_until(predicate: Callable[[], bool], limit_s: float) -> float:
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > limit_s:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(POLL_S)
    return time.perf_counter() - start


async def inproc(
    nodes: int, rounds: int, interval_s: float, timeout_s: float, full_mesh_max: int
) -> dict[str, Any]:
    key_file = Path(tempfile.mkdtemp(prefix="gk-bench-")) / "cluster.key"
    key_file.write_text(secret.keygen())
    contexts = []
    for i in range(nodes):
        addr = f"127.77.{i // 250}.{i % 250 + 1}"
        cfg = node_config(
            f"n{i:04d}", BASE_PORT + i, key_file, interval_s, timeout_s, full_mesh_max
        )
        contexts.append(NodeContext(cfg, addr))
    members = {
        c.node_name: Member(
            name=c.node_name,
            addr=c.advertise_addr,
            port=7946,
            status="alive",
            tags=Tags(pp=c.config.peer.port),
        )
        for c in contexts
    }
    for c in contexts:
        c.set_members(dict(members))
    services = [HealthService(c, seed=i) for i, c in enumerate(contexts)]
    observer, victim = services[0], services[-1]
    victim_name = contexts[-1].node_name

    def victim_state() -> str:
        return next(p.state for p in observer.status().pairs if p.peer == victim_name)

    result: dict[str, Any] = {
        "mode": "inproc",
        "nodes": nodes,
        "interval_s": interval_s,
        "full_mesh_max": full_mesh_max,
    }
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(s.run()) for s in services]
        result["all_passing_s"] = round(
            await wait_until(lambda: all(s.status().state == "passing" for s in services), 120), 3
        )
        # Cost of one round: every peer up to full_mesh_max, else head + ring + k random.
        round_s = []
        for _ in range(rounds):
            start = time.perf_counter()
            await observer.probe_round()
            round_s.append(time.perf_counter() - start)
        result["round_s"] = summary(round_s)
        pings = []
        target = contexts[1]
        for _ in range(200):
            start = time.perf_counter()
            await observer.client.ping(target.advertise_addr, target.config.peer.port)
            pings.append((time.perf_counter() - start) * 1000)
        result["ping_ms"] = summary(pings)
        detect = []
        for _ in range(rounds):
            tasks[-1].cancel()
            await asyncio.gather(tasks[-1], return_exceptions=True)
            detect.append(await wait_until(lambda: victim_state() == "critical", 60))
            tasks[-1] = group.create_task(victim.run())
            await wait_until(lambda: victim_state() == "passing", 60)
        result["detect_stopped_peer_s"] = summary(detect)
        for task in tasks:
            task.cancel()
    return result


def harness(nodes: int, rounds: int) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.harness import faults
    from tests.harness.gpud_node import PEER_PORT, Cluster, GpudNode

    def pair_state(node: GpudNode, peer: str) -> str:
        pairs = node.api("/v1/health")["pairs"]
        return next((p["state"] for p in pairs if p["peer"] == peer), "absent")

    def wait(predicate: Callable[[], bool], limit_s: float = 120) -> float:
        start = time.perf_counter()
        while not predicate():
            if time.perf_counter() - start > limit_s:
                raise TimeoutError("condition not reached")
            time.sleep(0.05)
        return time.perf_counter() - start

    result: dict[str, Any] = {"mode": "harness", "nodes": nodes}
    with Cluster(nodes) as cluster:
        observer, victim = cluster[0], cluster[-1]
        wait(lambda: pair_state(observer, victim.name) == "passing")
        blocked = []
        for _ in range(rounds):
            with faults.block_port(victim.host, PEER_PORT, source=observer.host):
                blocked.append(wait(lambda: pair_state(observer, victim.name) != "passing"))
            wait(lambda: pair_state(observer, victim.name) == "passing")
        result["detect_blocked_peer_port_s"] = summary(blocked)
        victim.kill9()
        result["detect_kill9_s"] = round(
            wait(lambda: pair_state(observer, victim.name) == "critical"), 3
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", nargs="?", choices=["inproc", "harness"], default="inproc")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=0.5)
    parser.add_argument("--full-mesh-max", type=int, default=32)
    parser.add_argument("--json")
    parser.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "inproc" and not args.in_namespace:
        # Loopback of a private namespace: nothing the bench does is visible outside it.
        argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--in-namespace"]
        sys.exit(subprocess.run(["unshare", "-n", "--", *argv], check=False).returncode)
    if args.in_namespace:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        result = asyncio.run(
            inproc(args.nodes, args.rounds, args.interval, args.timeout, args.full_mesh_max)
        )
    else:
        result = harness(args.nodes, args.rounds)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
