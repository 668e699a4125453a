"""Membership benchmark: convergence, kill -9 detection (gpud vs bare serf), status latency, RSS.

Runs real gpud agents (each with its real serf child) in network namespaces of the test
harness, so it needs root. Every figure comes from one run of this script; compare ratios
within a run, not absolute numbers across machines.

gpud's detection time: kill -9 of one host until every other node shows it down, with a
reason, both in `gpud members` (/v1/members: down, down_reason) and in /v1/health (pair kind
"down"). Bare Serf's: until every other plain `serf agent` lists it `failed`. The ratio is
gpud's median over bare Serf's median, per size.

    .venv/bin/python -m bench.membership [--sizes 3,10,20] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpud import client
from tests.harness.gpud_node import Cluster, GpudNode, wait_for
from tests.harness.netns import Host, Network
from tests.harness.wait import seconds_until

POLL_S = 0.1
DETECT_TIMEOUT_S = 60.0


def _median_max(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def _sees_down(node: GpudNode, name: str) -> bool:
    """``node`` shows ``name`` down with a reason in its member view and in /v1/health."""
    try:
        member = next((m for m in node.members() if m["name"] == name), None)
        pairs = {p["peer"]: p for p in node.api("/v1/health")["pairs"]}
    except Exception:
        return False
    pair = pairs.get(name)
    return (
        member is not None
        and bool(member.get("down"))
        and bool(member.get("down_reason"))
        and pair is not None
        and pair["kind"] == "down"
    )


def _rss_kib(pid: int | None) -> int:
    if pid is None:
        return 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bench_gpud(size: int, repeats: int) -> dict[str, object]:
    began = time.monotonic()
    with Cluster(size, overrides={"log_level": "info"}) as cluster:
        cluster.wait_converged(timeout=120)
        converge_s = time.monotonic() - began
        detect: list[float] = []
        for round_ in range(repeats):
            victim = cluster[1 + round_ % (size - 1)]
            observers = [n for n in cluster if n is not victim]
            victim.kill9()
            detect.append(
                seconds_until(
                    lambda v=victim, o=observers: all(_sees_down(n, v.name) for n in o),
                    DETECT_TIMEOUT_S,
                    POLL_S,
                    what=f"{victim.name} down everywhere",
                )
            )
            victim.restart()
            cluster.wait_converged(timeout=120)
        result: dict[str, object] = {
            "converge_s": round(converge_s, 2),
            "detect_kill9_s": _median_max(detect),
        }
        if size == min(SIZES):
            result.update(_status_latency(cluster[0]))
            result["rss_gpud_mib"] = round(_rss_kib(cluster[0].pid) / 1024, 1)
            result["rss_serf_mib"] = round(_rss_kib(cluster[0].serf_pid()) / 1024, 1)
        return result


def _status_latency(node: GpudNode, count: int = 40) -> dict[str, object]:
    api_ms: list[float] = []
    cli_ms: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        client.request(node.socket, "GET", "/v1/status")
        api_ms.append((time.perf_counter() - t0) * 1000)
    for _ in range(count // 2):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "gpud", "status", "--socket", node.socket],
            check=True,
            capture_output=True,
        )
        cli_ms.append((time.perf_counter() - t0) * 1000)
    return {
        "status_api_ms": {
            "median": round(statistics.median(api_ms), 2),
            "p99": round(_percentile(api_ms, 99), 2),
        },
        "status_cli_ms": {
            "median": round(statistics.median(cli_ms), 1),
            "p99": round(_percentile(cli_ms, 99), 1),
        },
    }


def _serf_members(host: Host) -> dict[str, str]:
    out = host.run(["serf", "members", "-rpc-addr=127.0.0.1:7373", "-format=json"], check=False)
    if out.returncode != 0:
        return {}
    return {m["name"]: m["status"] for m in json.loads(out.stdout)["members"]}


def bench_bare_serf(size: int, repeats: int) -> dict[str, object]:
    """The same kill -9 measurement for plain `serf agent`s without gpud."""
    with Network(size) as net:

        def start(host: Host) -> subprocess.Popen[bytes]:
            return host.popen(
                [
                    "serf",
                    "agent",
                    f"-node={host.name}",
                    f"-bind={host.addr}:7946",
                    "-rpc-addr=127.0.0.1:7373",
                    f"-retry-join={net.hosts[0].addr}:7946",
                    "-retry-interval=1s",
                    "-log-level=err",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        procs = {host.name: start(host) for host in net.hosts}
        converged = lambda: all(  # noqa: E731
            list(_serf_members(h).values()).count("alive") == size for h in net.hosts
        )
        wait_for(converged, 120, 0.5, what="bare serf convergence")
        detect: list[float] = []
        for round_ in range(repeats):
            victim = net.hosts[1 + round_ % (size - 1)]
            observers = [h for h in net.hosts if h is not victim]
            procs[victim.name].kill()
            procs[victim.name].wait()
            detect.append(
                seconds_until(
                    lambda v=victim, o=observers: all(
                        _serf_members(h).get(v.name) == "failed" for h in o
                    ),
                    DETECT_TIMEOUT_S,
                    POLL_S,
                    what=f"bare serf {victim.name} failed everywhere",
                )
            )
            procs[victim.name] = start(victim)
            wait_for(converged, 120, 0.5, what="bare serf reconvergence")
        return {"detect_kill9_s": _median_max(detect)}


SIZES = [3, 10, 20]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,10,20", help="comma-separated host counts")
    parser.add_argument("--repeats", type=int, default=3, help="kill -9 rounds per size")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    SIZES[:] = [int(s) for s in args.sizes.split(",")]
    results: dict[str, object] = {}
    print(
        f"{'hosts':>5} {'converge s':>11} {'gpud detect s (med/max)':>24} "
        f"{'bare serf detect s':>19} {'ratio':>6}"
    )
    for size in SIZES:
        gpud = bench_gpud(size, args.repeats)
        bare = bench_bare_serf(size, args.repeats)
        g, b = gpud["detect_kill9_s"], bare["detect_kill9_s"]
        ratio = round(g["median"] / b["median"], 2)  # type: ignore[index]
        results[str(size)] = {"gpud": gpud, "bare_serf": bare, "detect_ratio": ratio}
        print(
            f"{size:>5} {gpud['converge_s']:>11} {g['median']:>12} / {g['max']:<9} "  # type: ignore[index]
            f"{b['median']:>8} / {b['max']:<8} {ratio:>6}",  # type: ignore[index]
            flush=True,
        )
    first = results[str(SIZES[0])]["gpud"]  # type: ignore[index]
    print(
        f"gpud status over the API: median {first['status_api_ms']['median']} ms, "
        f"p99 {first['status_api_ms']['p99']} ms; `gpud status` CLI end to end: median "
        f"{first['status_cli_ms']['median']} ms, p99 {first['status_cli_ms']['p99']} ms"
    )
    print(
        f"RSS: gpud agent {first['rss_gpud_mib']} MiB, its serf child {first['rss_serf_mib']} MiB"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
