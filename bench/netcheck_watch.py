"""Netcheck timings, in a private namespace ("gn-bench-<pid>", addresses in 10.77.250.0/24).

- detection: `ip addr del` of the advertised address -> NetCheck's callback (old, None)
- route check: one `route get` pass over N peers (what every refresh costs)

Usage: sudo .venv/bin/python bench/netcheck_watch.py [--rounds 20] [--peers 1000] [--json out]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import time

from gpud.config import Config, NodeConfig
from gpud.context import NodeContext
from gpud.netcheck import NetCheck, read_host_network, read_routes

NS = f"gn-bench-{os.getpid()}"
ADDR = "10.77.250.1"


def ip(*args: str) -> None:
    subprocess.run(["ip", "-n", NS, *args], check=True, capture_output=True, timeout=10)


async def detection(rounds: int) -> list[float]:
    ctx = NodeContext(Config(node=NodeConfig(name="bench", advertise=ADDR)), ADDR)
    removed: asyncio.Queue[float] = asyncio.Queue()

    async def on_change(_old: str | None, new: str | None) -> None:
        if new is None:
            removed.put_nowait(time.perf_counter())

    check = NetCheck(ctx, on_change, refresh_s=3600, netns=NS)
    task = asyncio.create_task(check.run())
    samples = []
    try:
        await asyncio.wait_for(check.checked.wait(), 10)
        for _ in range(rounds):
            start = time.perf_counter()
            await asyncio.to_thread(ip, "addr", "del", f"{ADDR}/24", "dev", "vb0")
            samples.append((await asyncio.wait_for(removed.get(), 10)) - start)
            await asyncio.to_thread(ip, "addr", "add", f"{ADDR}/24", "dev", "vb0")
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return samples


async def route_pass(peers: int) -> float:
    host = await read_host_network(NS)
    targets = [(f"p{i}", f"10.77.{251 + i // 250}.{i % 250 + 1}") for i in range(peers)]
    start = time.perf_counter()
    routes = await read_routes(targets, host, NS)
    elapsed = time.perf_counter() - start
    errors = {r.error for r in routes if r.error is not None}
    assert not errors, errors
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--json")
    args = parser.parse_args()
    subprocess.run(["ip", "netns", "add", NS], check=True, timeout=10)
    try:
        ip("link", "add", "vb0", "type", "veth", "peer", "name", "vb1")
        ip("link", "set", "vb0", "up")
        ip("addr", "add", f"{ADDR}/24", "dev", "vb0")
        ip("route", "add", "10.77.248.0/21", "dev", "vb0")
        # First: removing the last address of vb0 makes the kernel drop the /21 route.
        route_s = asyncio.run(route_pass(args.peers))
        samples = asyncio.run(detection(args.rounds))
    finally:
        subprocess.run(["ip", "netns", "del", NS], timeout=10)
    result = {
        "detection_ms_median": round(statistics.median(samples) * 1000, 2),
        "detection_ms_max": round(max(samples) * 1000, 2),
        "rounds": len(samples),
        "route_check_peers": args.peers,
        "route_check_ms": round(route_s * 1000, 1),
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out)


if __name__ == "__main__":
    main()
