"""Ports benchmark: lease throughput/latency over the Unix socket, and block-claim settle time.

Leases: the ports component runs alone in a child process (`python -m gpud.ports.service`),
serving its routes on a Unix socket; 1, 16 and 128 concurrent clients (one aiohttp session
each) lease 1 port, check it against every port currently held, and release it.

Claims: the gpud agent is not wired yet, so N real PortsService instances (claim loop, SQLite
store) run in one process and exchange tags over a simulated gossip: every tag change reaches
each other node after a delay drawn uniformly from [GOSSIP_MIN_S, GOSSIP_MAX_S] (Serf's LAN
propagation plus the 1-3 s coalescing of member events), in order per pair. All nodes start at
once on one address (worst case for collisions). Time = until every node's block is confirmed.

    .venv/bin/python bench/ports.py [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from gpud import config
from gpud.context import Member, NodeContext
from gpud.ports.service import PortsService
from gpud.tags import Tags

ADDR = "127.0.0.1"
GOSSIP_MIN_S = 0.2
GOSSIP_MAX_S = 2.5


def write_config(workdir: Path, name: str, block_size: int, settle_s: float) -> Path:
    path = workdir / f"{name}.toml"
    path.write_text(
        f'[node]\nname = "{name}"\n[paths]\nstate_dir = "{workdir / name}"\n'
        f'[api]\nsocket = "{workdir / name}.sock"\n'
        f"[ports]\nrange_start = 14000\nrange_end = 26000\nblock_size = {block_size}\n"
        f"reserve = false\nsettle_s = {settle_s}\n"
    )
    return path


async def lease_storm(sock: str, clients: int, total: int) -> dict[str, float | int]:
    held: set[int] = set()
    latencies: list[float] = []
    duplicates = 0
    per_client = max(1, total // clients)

    async def client() -> None:
        nonlocal duplicates
        conn = aiohttp.UnixConnector(path=sock)
        async with aiohttp.ClientSession(connector=conn) as http:
            for _ in range(per_client):
                t0 = time.perf_counter()
                resp = await http.post(
                    "http://gpud/v1/ports/leases", json={"owner": "bench", "count": 1}
                )
                lease = await resp.json()
                latencies.append(time.perf_counter() - t0)
                if resp.status != 201:
                    raise RuntimeError(f"lease failed: {resp.status} {lease}")
                duplicates += len(held.intersection(lease["ports"]))
                held.update(lease["ports"])
                held.difference_update(lease["ports"])
                await http.delete(f"http://gpud/v1/ports/leases/{lease['id']}")

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "clients": clients,
        "leases": len(latencies),
        "leases_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        "duplicates": duplicates,
    }


@contextlib.contextmanager
def server(cfg: Path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpud.ports.service", str(cfg), ADDR], stdout=subprocess.PIPE
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        if not ready or proc.stdout is None or not proc.stdout.readline().startswith(b"ready"):
            raise RuntimeError("ports service did not start")
        yield
    finally:
        proc.kill()
        proc.wait()


class DelayedGossip:
    """Tags reach each other node after a random delay, in order per (sender, receiver)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.contexts: list[NodeContext] = []
        # receiver -> sender -> (seq, tags) last delivered
        self.views: dict[str, dict[str, tuple[int, Tags]]] = {}
        self.seq = 0
        self.last_due: dict[tuple[str, str], float] = {}

    def join(self, ctx: NodeContext) -> None:
        self.contexts.append(ctx)
        self.views[ctx.node_name] = {}

        async def publish(tags: Tags) -> None:
            ctx.tags = tags
            self.send(ctx, tags)

        ctx.set_tag_publisher(publish)

    def send(self, sender: NodeContext, tags: Tags) -> None:
        loop = asyncio.get_running_loop()
        self.seq += 1
        for receiver in self.contexts:
            key = (sender.node_name, receiver.node_name)
            delay = 0.0 if receiver is sender else self.rng.uniform(GOSSIP_MIN_S, GOSSIP_MAX_S)
            due = max(loop.time() + delay, self.last_due.get(key, 0.0))
            self.last_due[key] = due
            loop.call_at(due, self.deliver, receiver, sender.node_name, self.seq, tags)

    def deliver(self, receiver: NodeContext, sender: str, seq: int, tags: Tags) -> None:
        view = self.views[receiver.node_name]
        if sender in view and view[sender][0] > seq:
            return
        view[sender] = (seq, tags)
        receiver.set_members(
            {
                name: Member(name=name, addr=ADDR, port=7946, status="alive", tags=t)
                for name, (_, t) in view.items()
            }
        )


async def settle_run(n: int, settle_s: float, seed: int) -> dict[str, float | int]:
    workdir = Path(tempfile.mkdtemp(prefix="gp-bench-"))
    try:
        bus = DelayedGossip(random.Random(seed))
        services = []
        for i in range(n):
            ctx = NodeContext(
                config.load(str(write_config(workdir, f"s{seed}-n{i}", 400, settle_s))), ADDR
            )
            bus.join(ctx)
            services.append(PortsService(ctx))
        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(s.run()) for s in services]
            await asyncio.wait_for(asyncio.gather(*(s.ready() for s in services)), 120)
            elapsed = time.perf_counter() - t0
            # Confirmed blocks must be distinct and stay so once every view has caught up.
            await asyncio.sleep(GOSSIP_MAX_S + 0.5)
            held = [s.block_range() for s in services]
            for task in tasks:
                task.cancel()
        distinct = len({(r.start if r else None) for r in held})
        moves = sum(1 for s in services if s.ctx.tags.blk != _first_choice(s))
        return {"nodes": n, "settle_s": elapsed, "distinct": distinct, "moved": moves}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _first_choice(service: PortsService) -> int:
    from gpud.ports import blocks

    return blocks.preference(service.ctx.node_name, blocks.block_count(service.cfg))[0]


async def run(args: argparse.Namespace) -> dict[str, list[dict[str, float | int]]]:
    total = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    total = 2000 if args.quick else 10000
    trials = 1 if args.quick else 3
    results: dict[str, list[dict[str, float | int]]] = {"leases": [], "claims": []}

    workdir = Path(tempfile.mkdtemp(prefix="gp-bench-"))
    try:
        cfg = write_config(workdir, "lease", 2000, 0.05)
        with server(cfg):
            for clients in (1, 16, 128):
                results["leases"].append(
                    await lease_storm(str(workdir / "lease.sock"), clients, total)
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    settle_s = config.PortsConfig().settle_s
    for n in (2, 4, 8):
        runs = [await settle_run(n, settle_s, seed) for seed in range(trials)]
        results["claims"].append(
            {
                "nodes": n,
                "ports.settle_s": settle_s,
                "median_s": round(statistics.median(r["settle_s"] for r in runs), 2),
                "max_s": round(max(r["settle_s"] for r in runs), 2),
                "all_distinct": all(r["distinct"] == n for r in runs),
                "moved_median": statistics.median(r["moved"] for r in runs),
                "trials": trials,
            }
        )

    print("lease allocator (Unix socket, lease 1 port + release, group-committed SQLite)")
    print(f"{'clients':>8} {'leases':>7} {'leases/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'dups':>5}")
    for r in results["leases"]:
        print(
            f"{r['clients']:>8} {r['leases']:>7} {r['leases_per_s']:>9} {r['p50_ms']:>7} "
            f"{r['p99_ms']:>7} {r['duplicates']:>5}"
        )
    print(
        f"\nblock claims, N nodes on one address, simulated gossip delay "
        f"U[{GOSSIP_MIN_S}, {GOSSIP_MAX_S}] s, ports.settle_s = {settle_s}"
    )
    print(f"{'nodes':>6} {'median s':>9} {'max s':>6} {'distinct':>9} {'moved':>6} {'trials':>7}")
    for r in results["claims"]:
        print(
            f"{r['nodes']:>6} {r['median_s']:>9} {r['max_s']:>6} {r['all_distinct']!s:>9} "
            f"{r['moved_median']:>6} {r['trials']:>7}"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--quick", action="store_true", help="fewer leases and trials")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
