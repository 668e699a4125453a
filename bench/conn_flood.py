"""Connection flood against a real gpud agent (with its serf child) in harness namespaces.

A 2-node cluster; from a third address on node 1's host (an outsider, not a peer's address)
one attacker opens PEER idle or half-open TCP connections to node 0's peer API and, as an
unprivileged uid, SOCK connections to node 0's local socket, and holds them. Meanwhile the
local API is timed from root (a different uid), node 1's verdict on node 0 is watched, and
node 0's journal lines are counted. Needs root.

    .venv/bin/python -m bench.conn_flood [--peer 5000] [--sock 500] [--hold 14] [--json PATH]

``slow_body_flood`` is the other shape: from many outsider addresses, connections that send a
complete header (plausible authentication headers, ``Content-Length: 100``) and never finish
the body; it measures how long each stays open and what the victim and its peer conclude.

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
# Slow body: the header is complete and looks signed (fresh stamp, a nonce, a signature that
# will not verify), so the server must wait for the body to check it.
SLOW_BODY_REQUEST = (
    "POST /peer/v1/ping HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    "Content-Length: 100\r\nX-Gpud-Node: n1\r\nX-Gpud-Timestamp: {stamp:.3f}\r\n"
    "X-Gpud-Nonce: {nonce}\r\nX-Gpud-Signature: {sig}\r\n\r\n{{"
)
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


def _open(
    family: int, target: Any, source: str | None, index: int, *, slow_body: bool = False
) -> socket.socket | None:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        if source is not None:
            sock.bind((source, 0))
        sock.connect(target)
        if slow_body:
            request = SLOW_BODY_REQUEST.format(
                stamp=time.time(), nonce=os.urandom(16).hex(), sig=os.urandom(32).hex()
            )
            sock.send(request.encode())
        elif index % 2:
            sock.send(PARTIAL_REQUEST)
    except OSError:
        sock.close()
        return None
    return sock


def slow_body_attack(args: argparse.Namespace) -> dict[str, Any]:
    """Open ``count`` slow-body connections round-robin from ``sources``; report how long the
    last of them stayed open (the server's closing is what is timed)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    addr, port = args.peer.rsplit(":", 1)
    sources = args.sources.split(",")
    start = time.monotonic()
    opened: dict[int, tuple[socket.socket, float]] = {}
    failed = 0
    for i in range(args.peer_count):
        sock = _open(
            socket.AF_INET, (addr, int(port)), sources[i % len(sources)], i, slow_body=True
        )
        if sock is None:
            failed += 1
        else:
            opened[sock.fileno()] = (sock, time.monotonic())
    open_s = time.monotonic() - start
    poller = select.poll()
    for fd in opened:
        poller.register(fd, select.POLLIN)
    lifetimes: list[float] = []
    deadline = start + args.hold
    while opened and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            sock, at = opened[fd]
            if _closed(sock):
                lifetimes.append(time.monotonic() - at)
                poller.unregister(fd)
                del opened[fd]
                sock.close()
    for sock, _ in opened.values():
        sock.close()
    return {
        "attempted": args.peer_count,
        "sources": len(sources),
        "connect_failed": failed,
        "closed": len(lifetimes),
        "still_open": len(opened),
        "open_s": round(open_s, 2),
        "max_open_s": round(max(lifetimes), 2) if lifetimes else None,
        "closed_at_once": sum(t < 1.0 for t in lifetimes),
    }


def slow_body_flood(
    cluster: Cluster, count: int, sources: int, hold: float, on_sample: Any = None
) -> dict[str, Any]:
    """Run the slow-body flood from ``sources`` outsider addresses on node 1's host against
    node 0's peer API; ``on_sample()`` runs every 0.5 s while it lasts (the caller samples
    status and doctor there) and its results are returned in ``samples``."""
    victim, peer = cluster[0], cluster[1]
    net = cluster.network.subnet
    addrs = [str(net.network_address + ATTACKER_ADDR_OCTET + i) for i in range(sources)]
    for a in addrs:
        peer.host.add_addr(a, net.prefixlen)
    proc = peer.host.popen(
        [
            sys.executable,
            "-m",
            "bench.conn_flood",
            "slow-body",
            "--peer",
            f"{victim.addr}:{victim.peer_port}",
            "--peer-count",
            str(count),
            "--sources",
            ",".join(addrs),
            "--hold",
            str(hold),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
    )
    samples: list[Any] = []
    deadline = time.monotonic() + hold + 30
    while proc.poll() is None and time.monotonic() < deadline:
        if on_sample is not None:
            samples.append(on_sample())
        time.sleep(0.5)
    try:
        stdout, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    report = json.loads(stdout)
    report["samples"] = samples
    return report


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
    b = sub.add_parser("slow-body")
    b.add_argument("--peer", required=True)
    b.add_argument("--peer-count", type=int, default=1024)
    b.add_argument("--sources", required=True, help="comma-separated source addresses")
    b.add_argument("--hold", type=float, default=20.0)
    parser.add_argument("--peer", type=int, default=5000)
    parser.add_argument("--sock", type=int, default=500)
    parser.add_argument("--hold", type=float, default=14.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.cmd == "attack":
        print(json.dumps(attack(args)))
        return
    if args.cmd == "slow-body":
        print(json.dumps(slow_body_attack(args)))
        return
    with Cluster(2, overrides={"api": {"socket_mode": 0o666}, "log_level": "info"}) as cluster:
        cluster.wait_converged()
        report = flood(cluster, args.peer, args.sock, args.hold)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
