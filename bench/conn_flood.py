"""Connection flood against a real gpud agent (with its serf child) in harness namespaces.

A 2-node cluster; from a third address on node 1's host (an outsider, not a peer's address)
one attacker opens PEER idle or half-open TCP connections to node 0's peer API and, as an
unprivileged uid, SOCK connections to node 0's local socket, and holds them. Meanwhile the
local API is timed from root (a different uid), node 1's verdict on node 0 is watched, and
node 0's journal lines are counted. Needs root.

    .venv/bin/python -m bench.conn_flood [--peer 5000] [--sock 500] [--hold 14] [--json PATH]

The attacker itself is ``python -m bench.conn_flood attack ...`` (run inside the namespace).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpud.errors import GpudError
from tests.harness.gpud_node import Cluster

# Half of the connections send the start of a request and never finish it (slowloris).
PARTIAL_REQUEST = b"POST /peer/v1/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
UNPRIVILEGED_UID = 65534
ATTACKER_ADDR_OCTET = 200


def _closed(sock: socket.socket) -> bool:
    """Has the server closed (or reset) this connection?"""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return False
        return sock.recv(4096) == b""
    except OSError:
        return True


def _open(family: int, target: Any, source: str | None, index: int) -> socket.socket | None:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        if source is not None:
            sock.bind((source, 0))
        sock.connect(target)
        if index % 2:
            sock.send(PARTIAL_REQUEST)
    except OSError:
        sock.close()
        return None
    return sock


def attack(args: argparse.Namespace) -> dict[str, Any]:
    """Open and hold the connections; report how the server treated them."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.uid is not None:
        os.setgroups([])
        os.setgid(args.uid)
        os.setuid(args.uid)
    targets: list[tuple[str, int, Any, str | None, int]] = []
    if args.peer:
        addr, port = args.peer.rsplit(":", 1)
        targets.append(("peer", socket.AF_INET, (addr, int(port)), args.source, args.peer_count))
    if args.socket:
        targets.append(("local", socket.AF_UNIX, args.socket, None, args.socket_count))
    start = time.monotonic()
    held: dict[str, list[socket.socket]] = {}
    report: dict[str, Any] = {}
    for name, family, target, source, count in targets:
        socks = [_open(family, target, source, i) for i in range(count)]
        held[name] = [s for s in socks if s is not None]
        report[name] = {"attempted": count, "connected": len(held[name])}
    report["open_s"] = round(time.monotonic() - start, 2)
    time.sleep(1.0)
    for name, socks in held.items():
        report[name]["closed_after_1s"] = sum(_closed(s) for s in socks)
    time.sleep(max(0.0, args.hold - (time.monotonic() - start)))
    for name, socks in held.items():
        report[name]["closed_at_end"] = sum(_closed(s) for s in socks)
        for s in socks:
            s.close()
    report["held_s"] = round(time.monotonic() - start, 2)
    return report


def flood(cluster: Cluster, peer_count: int, sock_count: int, hold: float) -> dict[str, Any]:
    """Run the flood against node 0 of a running 2-node cluster and measure what it costs."""
    victim, peer = cluster[0], cluster[1]
    attacker_host = peer.host
    source = str(cluster.network.subnet.network_address + ATTACKER_ADDR_OCTET)
    attacker_host.add_addr(source, cluster.network.subnet.prefixlen)
    # Let the unprivileged attacker traverse to the socket (the harness's dirs are 0700).
    for parent in Path(victim.socket).parents:
        if parent == Path("/tmp") or parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    log_lines_before = len(victim.log_text().splitlines())
    proc = attacker_host.popen(
        [
            sys.executable,
            "-m",
            "bench.conn_flood",
            "attack",
            "--peer",
            f"{victim.addr}:{victim.peer_port}",
            "--peer-count",
            str(peer_count),
            "--source",
            source,
            "--socket",
            victim.socket,
            "--socket-count",
            str(sock_count),
            "--uid",
            str(UNPRIVILEGED_UID),
            "--hold",
            str(hold),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
    )
    latencies: list[float] = []
    failures: list[str] = []
    verdicts: set[str] = set()
    deadline = time.monotonic() + hold + 30
    while proc.poll() is None and time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            victim.api("/v1/status", timeout=5.0)
            latencies.append(time.perf_counter() - t0)
        except GpudError as exc:
            failures.append(str(exc))
        with contextlib.suppress(GpudError):
            verdicts |= {
                p["state"]
                for p in peer.api("/v1/status")["health"]["pairs"]
                if p["peer"] == victim.name
            }
        time.sleep(0.2)
    try:
        stdout, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    report = json.loads(stdout)
    added = victim.log_text().splitlines()[log_lines_before:]
    report["api"] = {
        "requests": len(latencies),
        "failures": failures,
        "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
        "max_ms": round(max(latencies) * 1000, 1) if latencies else None,
    }
    report["peer_verdicts_on_victim"] = sorted(verdicts)
    report["log"] = {
        "lines": len(added),
        "tracebacks": sum("Traceback" in line for line in added),
        "refusals": sum("connection refused" in line for line in added),
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd")
    a = sub.add_parser("attack")
    a.add_argument("--peer", default="")
    a.add_argument("--peer-count", type=int, default=5000)
    a.add_argument("--source")
    a.add_argument("--socket", default="")
    a.add_argument("--socket-count", type=int, default=500)
    a.add_argument("--uid", type=int)
    a.add_argument("--hold", type=float, default=14.0)
    parser.add_argument("--peer", type=int, default=5000)
    parser.add_argument("--sock", type=int, default=500)
    parser.add_argument("--hold", type=float, default=14.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.cmd == "attack":
        print(json.dumps(attack(args)))
        return
    with Cluster(2, overrides={"api": {"socket_mode": 0o666}, "log_level": "info"}) as cluster:
        cluster.wait_converged()
        report = flood(cluster, args.peer, args.sock, args.hold)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
