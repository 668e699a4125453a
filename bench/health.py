"""Health timings: how fast a dead peer or a blocked port is detected, what a probe round costs.

Two modes:

- ``inproc``: N HealthService instances in this process, each with its own
  127.77.x.y address and peer port, real aiohttp servers and TCP, run inside a private network
  namespace (the script re-executes itself under ``unshare -n``). Measures the time until every
  node passes, the time from stopping a peer to the observer's "critical" verdict, the cost of
  one probe round against N peers, and peer-API ping latency.
- ``harness`` (default): real agents (gpud + serf) in the namespace harness (tests/harness),
  interval 1 s, timeout 0.5 s. Prints a table: detection time for link down and a blocked peer
  port, recovery after an address change (advertise = "auto"), false critical verdicts under
  0/5/10% random loss on every link, and per-node cost (gpud CPU from /proc/<pid>/stat, bytes
  sent on the peer port and on serf's port from nft counters) for 5, 10 and 20 hosts.

Usage: .venv/bin/python -m bench.health [harness|inproc] [--quick] [--json out]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpud import config as config_mod
from gpud import secret
from gpud.context import Member, NodeContext
from gpud.health.service import HealthService
from gpud.tags import Tags
from tests.harness.wait import async_seconds_until, async_wait_for, seconds_until

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
            await async_seconds_until(
                lambda: all(s.status().state == "passing" for s in services), 120, POLL_S
            ),
            3,
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
            detect.append(
                await async_seconds_until(lambda: victim_state() == "critical", 60, POLL_S)
            )
            tasks[-1] = group.create_task(victim.run())
            await async_wait_for(lambda: victim_state() == "passing", 60, POLL_S)
        result["detect_stopped_peer_s"] = summary(detect)
        for task in tasks:
            task.cancel()
    return result


# -- harness mode: real agents (gpud + serf) in network namespaces ---------------------------

BENCH_TABLE = "gh_bench"
SERF_PORT_NO = 7946


def pair_state(node: Any, peer: str) -> str:
    pairs = node.api("/v1/health")["pairs"]
    return next((p["state"] for p in pairs if p["peer"] == peer), "absent")


def all_passing(cluster: Any) -> bool:
    return all(n.api("/v1/health")["state"] == "passing" for n in cluster)


def detection(cluster: Any, repeats: int) -> dict[str, Any]:
    """Link down / blocked peer port on the last host, timed until the first host's verdict."""
    from tests.harness import faults
    from tests.harness.gpud_node import PEER_PORT

    observer, victim = cluster[0], cluster[-1]
    link, blocked = [], []
    for _ in range(repeats):
        seconds_until(lambda: all_passing(cluster), 120, 0.1)
        victim.host.link_down()
        try:
            link.append(
                seconds_until(lambda: pair_state(observer, victim.name) == "critical", 120, 0.1)
            )
        finally:
            victim.host.link_up()
        seconds_until(lambda: all_passing(cluster), 120, 0.1)
        with faults.block_port(victim.host, PEER_PORT):
            blocked.append(
                seconds_until(lambda: pair_state(observer, victim.name) != "passing", 120, 0.1)
            )
    seconds_until(lambda: all_passing(cluster), 120, 0.1)
    return {"link_down_critical_s": summary(link), "blocked_port_detected_s": summary(blocked)}


def address_change(cluster: Any) -> dict[str, Any]:
    """The last host (advertise = "auto") swaps its address; seconds until every other node
    sees it alive at the new address and passing, and until it passes itself."""
    victim, others = cluster[-1], cluster.nodes[:-1]
    seconds_until(lambda: all_passing(cluster), 120, 0.1)
    new = str(victim.host.network.subnet.network_address + 200)
    start = time.perf_counter()
    victim.host.set_addr(new)

    def seen() -> bool:
        for o in others:
            m = next(m for m in o.members() if m["name"] == victim.name)
            if (
                m["addr"] != new
                or m["status"] != "alive"
                or pair_state(o, victim.name) != "passing"
            ):
                return False
        return True

    readvertised = seconds_until(lambda: victim.api("/v1/status")["node"]["addr"] == new, 60, 0.1)
    seconds_until(seen, 180, 0.5)
    everyone = time.perf_counter() - start
    seconds_until(lambda: all_passing(cluster), 60, 0.1)
    return {
        "readvertised_s": round(readvertised, 3),
        "others_see_new_addr_passing_s": round(everyone, 3),
    }


def false_criticals(cluster: Any, percents: list[int], window_s: float) -> dict[str, Any]:
    """Random loss on every host's link for ``window_s``: critical verdicts seen (node states
    and pair transitions to critical, polled every 0.5 s) while every node is in fact up."""
    from tests.harness import faults

    out: dict[str, Any] = {}
    for percent in percents:
        seconds_until(lambda: all_passing(cluster), 90, 0.1)
        applied = [faults.loss(h, percent) for h in cluster.hosts]
        node_critical = pair_transitions = polls = 0
        last: dict[tuple[str, str], str] = {}
        try:
            deadline = time.monotonic() + window_s
            while time.monotonic() < deadline:
                for node in cluster:
                    health = node.api("/v1/health")
                    polls += 1
                    node_critical += health["state"] == "critical"
                    for p in health["pairs"]:
                        key = (node.name, p["peer"])
                        if p["state"] == "critical" and last.get(key) != "critical":
                            pair_transitions += 1
                        last[key] = p["state"]
                time.sleep(0.5)
        finally:
            for fault in applied:
                fault.heal()
        out[f"{percent}%"] = {
            "node_critical_polls": node_critical,
            "polls": polls,
            "pair_critical_transitions": pair_transitions,
        }
    return out


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _install_counters(host: Any, peer_port: int) -> None:
    """Named nft counters of bytes each host sends on eth0: peer API traffic, serf traffic."""
    th = "meta l4proto { tcp, udp } th"
    script = f"""add table inet {BENCH_TABLE}
add counter inet {BENCH_TABLE} peer_out
add counter inet {BENCH_TABLE} serf_out
add chain inet {BENCH_TABLE} out {{ type filter hook postrouting priority 200; }}
add rule inet {BENCH_TABLE} out oifname "eth0" tcp dport {peer_port} counter name peer_out
add rule inet {BENCH_TABLE} out oifname "eth0" tcp sport {peer_port} counter name peer_out
add rule inet {BENCH_TABLE} out oifname "eth0" {th} dport {SERF_PORT_NO} counter name serf_out
add rule inet {BENCH_TABLE} out oifname "eth0" {th} sport {SERF_PORT_NO} {th} dport != {SERF_PORT_NO} counter name serf_out
"""
    host.run(["nft", "-f", "-"], input=script)


def _counter_bytes(host: Any, name: str) -> int:
    text = host.run(["nft", "list", "counter", "inet", BENCH_TABLE, name]).stdout
    match = re.search(r"bytes (\d+)", text)
    return int(match.group(1)) if match else 0


def cost(size: int, window_s: float) -> dict[str, Any]:
    """Steady-state cost per node in a ``size``-host cluster (full mesh below full_mesh_max)."""
    from tests.harness.gpud_node import PEER_PORT, Cluster

    with Cluster(size, overrides={"log_level": "info"}, start_timeout=60) as cluster:
        cluster.wait_converged(120)
        seconds_until(lambda: all_passing(cluster), 120, 0.5)
        for host in cluster.hosts:
            _install_counters(host, PEER_PORT)
        pids = [n.pid for n in cluster if n.pid is not None]
        cpu0 = [_cpu_s(p) for p in pids]
        peer0 = [_counter_bytes(h, "peer_out") for h in cluster.hosts]
        serf0 = [_counter_bytes(h, "serf_out") for h in cluster.hosts]
        start = time.perf_counter()
        time.sleep(window_s)
        elapsed = time.perf_counter() - start
        cpu = [_cpu_s(p) - c for p, c in zip(pids, cpu0, strict=True)]
        peer = [
            _counter_bytes(h, "peer_out") - b for h, b in zip(cluster.hosts, peer0, strict=True)
        ]
        serf = [
            _counter_bytes(h, "serf_out") - b for h, b in zip(cluster.hosts, serf0, strict=True)
        ]
    return {
        "hosts": size,
        "gpud_cpu_s_per_s": round(statistics.mean(cpu) / elapsed, 4),
        "probe_bytes_per_node_s": round(statistics.mean(peer) / elapsed),
        "serf_bytes_per_node_s": round(statistics.mean(serf) / elapsed),
    }


def harness(quick: bool) -> dict[str, Any]:
    from tests.harness.gpud_node import Cluster

    repeats, window_s = (2, 10.0) if quick else (3, 30.0)
    sizes = [5, 10] if quick else [5, 10, 20]
    result: dict[str, Any] = {
        "mode": "harness",
        "quick": quick,
        "interval_s": 1.0,
        "timeout_s": 0.5,
    }
    auto = {"node": {"advertise": "auto", "interface": "eth0"}, "log_level": "info"}
    with Cluster(3, overrides={"log_level": "info"}, node_overrides={2: auto}) as cluster:
        cluster.wait_converged(60)
        result["detection"] = detection(cluster, repeats)
        result["loss_window_s"] = window_s
        result["false_critical"] = false_criticals(cluster, [0, 5, 10], window_s)
        # After the faults above this node carries a higher memberlist incarnation (it was
        # suspected and refuted): the slow path of an address change.
        result["address_change_after_faults"] = address_change(cluster)
    fresh_runs = []
    for _ in range(repeats):
        with Cluster(3, overrides={"log_level": "info"}, node_overrides={2: auto}) as fresh:
            fresh.wait_converged(60)
            fresh_runs.append(address_change(fresh))
    result["address_change"] = {
        key: summary([run[key] for run in fresh_runs])
        for key in ("readvertised_s", "others_see_new_addr_passing_s")
    }
    result["cost"] = [cost(n, 10.0 if quick else 20.0) for n in sizes]
    return result


def table(result: dict[str, Any]) -> str:
    d = result["detection"]
    lines = [
        f"health bench (real gpud + serf, 3 hosts, interval {result['interval_s']} s, "
        f"timeout {result['timeout_s']} s)",
        f"{'measure':<46} {'value':>24}",
    ]

    def row(name: str, value: str) -> None:
        lines.append(f"{name:<46} {value:>24}")

    for key, label in (
        ("link_down_critical_s", "link down -> critical (s)"),
        ("blocked_port_detected_s", "blocked peer port -> detected (s)"),
    ):
        s = d[key]
        row(label, f"median {s['median']:.2f} max {s['max']:.2f} (n={s['n']})")
    for key, label in (
        ("readvertised_s", "address change -> re-advertised (s)"),
        ("others_see_new_addr_passing_s", "address change -> others see it passing (s)"),
    ):
        s = result["address_change"][key]
        row(label, f"median {s['median']:.2f} max {s['max']:.2f} (n={s['n']})")
    late = result["address_change_after_faults"]["others_see_new_addr_passing_s"]
    row("  same, node suspected before (s)", f"{late:.2f}")
    for percent, v in result["false_critical"].items():
        row(
            f"false critical, {percent} loss, {result['loss_window_s']:g} s",
            f"{v['pair_critical_transitions']} pair / {v['node_critical_polls']} node",
        )
    lines.append(f"{'hosts':>6} {'gpud CPU s/s':>14} {'probe B/node/s':>16} {'serf B/node/s':>15}")
    for c in result["cost"]:
        lines.append(
            f"{c['hosts']:>6} {c['gpud_cpu_s_per_s']:>14.4f} "
            f"{c['probe_bytes_per_node_s']:>16} {c['serf_bytes_per_node_s']:>15}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", nargs="?", choices=["harness", "inproc"], default="harness")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shorter windows")
    parser.add_argument("--nodes", type=int, default=8, help="inproc only")
    parser.add_argument("--rounds", type=int, default=5, help="inproc only")
    parser.add_argument("--interval", type=float, default=1.0, help="inproc only")
    parser.add_argument("--timeout", type=float, default=0.5, help="inproc only")
    parser.add_argument("--full-mesh-max", type=int, default=32, help="inproc only")
    parser.add_argument("--json")
    parser.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "inproc" and not args.in_namespace:
        # Loopback of a private namespace: nothing the bench does is visible outside it.
        argv = [sys.executable, "-m", "bench.health", *sys.argv[1:], "--in-namespace"]
        root = Path(__file__).resolve().parent.parent
        sys.exit(subprocess.run(["unshare", "-n", "--", *argv], cwd=root, check=False).returncode)
    if args.in_namespace:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        result = asyncio.run(
            inproc(args.nodes, args.rounds, args.interval, args.timeout, args.full_mesh_max)
        )
        print(json.dumps(result))
    else:
        result = harness(args.quick)
        print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
