"""Ports benchmark against real gpud agents (each with its serf child) in harness namespaces.

Leases: one agent in a namespace; 1, 16 and 128 concurrent clients (one aiohttp session each)
on its Unix socket lease 1 port, check it against every port currently held, and release it.

Claims: N agents (N = 2, 4, 8) started at once in one namespace, sharing its one address (the
worst case: every block claim can collide), joined into one Serf cluster, with the default
ports.settle_s; node names either plain ("random" rendezvous order) or chosen so that
all N prefer the same block first ("colliding": N-1 of them must move). Time = from launching the agents until every one reports a confirmed block and
the N blocks are distinct; "ready" is when the last agent's API answered. Fresh namespace,
state and node names per repeat. Needs root.

    .venv/bin/python -m bench.ports [--repeats 3] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp

from gpud.config import PortsConfig
from gpud.ports import blocks
from tests.harness.gpud_node import Cluster, GpudNode, wait_for

POLL_S = 0.1
CLAIM_TIMEOUT_S = 120.0
DEFAULTS = PortsConfig()


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
                resp = await http.delete(f"http://gpud/v1/ports/leases/{lease['id']}")
                if resp.status != 204:
                    raise RuntimeError(f"release failed: {resp.status} {await resp.text()}")
                held.difference_update(lease["ports"])

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


def _node(c: Cluster, name: str, i: int, overrides: dict[str, Any]) -> GpudNode:
    """The i-th agent on the cluster's first host, with its own ports, directory and socket."""
    node = GpudNode(
        c.hosts[0],
        c.workdir / name,
        key=c.key,
        join=[n.join_addr for n in c.nodes],
        name=name,
        serf_port=7946 + 10 * i,
        rpc_port=7373 + 10 * i,
        peer_port=7948 + 10 * i,
        overrides=overrides,
    )
    c.nodes.append(node)
    return node


def _confirmed_block(node: GpudNode) -> int | None:
    try:
        ports = node.api("/v1/status", timeout=2.0)["ports"]
    except Exception:
        return None
    return ports["block"] if ports["state"] == "confirmed" else None


def bench_leases(total: int) -> list[dict[str, float | int]]:
    c = Cluster(1)
    try:
        c.network.start()
        node = _node(c, "lease", 0, {"ports": {"block_size": 2000}, "log_level": "info"})
        node.start()
        wait_for(lambda: _confirmed_block(node) is not None, CLAIM_TIMEOUT_S, POLL_S, what="block")
        return [asyncio.run(lease_storm(node.socket, n, total)) for n in (1, 16, 128)]
    finally:
        c.close()


def colliding_names(n: int, repeat: int) -> list[str]:
    """``n`` names whose rendezvous order all starts with the same block (every claim collides)."""
    n_blocks = blocks.block_count(DEFAULTS)
    by_first: dict[int, list[str]] = {}
    for i in range(100_000):
        name = f"r{repeat}c{i}"
        group = by_first.setdefault(blocks.preference(name, n_blocks)[0], [])
        group.append(name)
        if len(group) == n:
            return group
    raise RuntimeError(f"no {n} colliding names")


def claim_run(names: list[str]) -> dict[str, float | int]:
    n = len(names)
    c = Cluster(1)
    try:
        c.network.start()
        overrides = {"ports": {"settle_s": DEFAULTS.settle_s}, "log_level": "info"}
        nodes = [_node(c, name, i, overrides) for i, name in enumerate(names)]
        for node in nodes:  # everyone joins everyone (the list was built as nodes were added)
            node.config["serf"]["retry_join"] = [o.join_addr for o in nodes if o is not node]
        t0 = time.monotonic()
        ready: list[float] = []
        with ThreadPoolExecutor(n) as pool:
            starts = [pool.submit(node.start) for node in nodes]

            def settled() -> bool:
                held = [_confirmed_block(node) for node in nodes]
                return None not in held and len(set(held)) == n

            for f in starts:
                f.add_done_callback(lambda _f: ready.append(time.monotonic() - t0))
            wait_for(settled, CLAIM_TIMEOUT_S, POLL_S, what=f"{n} distinct confirmed blocks")
            elapsed = time.monotonic() - t0
            for f in starts:
                f.result()
        n_blocks = blocks.block_count(DEFAULTS)
        held = {node.name: _confirmed_block(node) for node in nodes}
        moved = sum(1 for name, blk in held.items() if blocks.preference(name, n_blocks)[0] != blk)
        return {"settle_s": elapsed, "ready_s": max(ready), "moved": moved}
    finally:
        c.close()


def bench_claims(repeats: int) -> list[dict[str, Any]]:
    out = []
    for names, n in ((name_set, n) for n in (2, 4, 8) for name_set in ("random", "colliding")):
        runs = [
            claim_run(
                [f"r{r}n{i}" for i in range(n)] if names == "random" else colliding_names(n, r)
            )
            for r in range(repeats)
        ]
        settle = [r["settle_s"] for r in runs]
        out.append(
            {
                "nodes": n,
                "names": names,
                "ports.settle_s": DEFAULTS.settle_s,
                "median_s": round(statistics.median(settle), 2),
                "max_s": round(max(settle), 2),
                "ready_median_s": round(statistics.median(r["ready_s"] for r in runs), 2),
                "moved_median": statistics.median(r["moved"] for r in runs),
                "repeats": repeats,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="claim runs per size")
    parser.add_argument("--quick", action="store_true", help="fewer leases, one claim run")
    parser.add_argument("--json", help="write the results as JSON to this path")
    args = parser.parse_args()
    total = 2000 if args.quick else 10000
    repeats = 1 if args.quick else args.repeats
    results = {"leases": bench_leases(total), "claims": bench_claims(repeats)}

    print("leases against a real agent (Unix socket, lease 1 port + release, SQLite group commit)")
    print(f"{'clients':>8} {'leases':>7} {'leases/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'dups':>5}")
    for r in results["leases"]:
        print(
            f"{r['clients']:>8} {r['leases']:>7} {r['leases_per_s']:>9} {r['p50_ms']:>7} "
            f"{r['p99_ms']:>7} {r['duplicates']:>5}"
        )
    print(
        f"\nblock claims: N real agents on one address started at once, real Serf gossip, "
        f"ports.settle_s = {DEFAULTS.settle_s}; seconds from launch to N distinct confirmed blocks"
    )
    print(
        f"{'nodes':>6} {'names':>10} {'median s':>9} {'max s':>6} {'ready s':>8} {'moved':>6} {'repeats':>8}"
    )
    for r in results["claims"]:
        print(
            f"{r['nodes']:>6} {r['names']:>10} {r['median_s']:>9} {r['max_s']:>6} {r['ready_median_s']:>8} "
            f"{r['moved_median']:>6} {r['repeats']:>8}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
