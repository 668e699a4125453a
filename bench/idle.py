"""Idle cost per node: CPU and RSS of each gpud and of the serf beside it, against cluster size.

Real gpud agents (each with its real serf child) in the harness's network namespaces, so it
needs root; no Ray, the default health timing (`health.interval_s` and `timeout_s` as gpud
ships them, not the harness's faster ones). Per size: start the cluster, wait until every node
sees every member alive, let it settle, then read each process's utime + stime from
/proc/<pid>/stat over one window. Prints medians over the nodes (cores = CPU seconds per
second), the gpud / serf ratio and the growth from the smallest size to each larger one. The
machine is shared: compare the ratios within one run, not figures across runs.

    .venv/bin/python -m bench.idle [--hosts 10,20] [--window 30] [--settle 30] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from gpud.config import HealthConfig
from tests.harness.gpud_node import Cluster

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(size: int, window_s: float, settle_s: float) -> dict[str, Any]:
    defaults = HealthConfig()
    overrides = {
        "log_level": "info",
        "health": {"interval_s": defaults.interval_s, "timeout_s": defaults.timeout_s},
    }
    began = time.monotonic()
    with Cluster(size, overrides=overrides, start_timeout=120) as cluster:
        cluster.wait_converged(timeout=180)
        converge_s = time.monotonic() - began
        time.sleep(settle_s)
        pairs = [(n.pid, n.serf_pid()) for n in cluster]
        pids = [(g, s) for g, s in pairs if g is not None and s is not None]
        if len(pids) != size:
            raise RuntimeError(f"{size - len(pids)} nodes lost their gpud or serf process")
        before = [(cpu_s(g), cpu_s(s)) for g, s in pids]
        start = time.perf_counter()
        time.sleep(window_s)
        elapsed = time.perf_counter() - start
        after = [(cpu_s(g), cpu_s(s)) for g, s in pids]
        gpud = [(a[0] - b[0]) / elapsed for a, b in zip(after, before, strict=True)]
        serf = [(a[1] - b[1]) / elapsed for a, b in zip(after, before, strict=True)]
        rss = [rss_mib(g) for g, _ in pids]
        still = cluster.converged()
    gpud_median, serf_median = statistics.median(gpud), statistics.median(serf)
    return {
        "hosts": size,
        "converge_s": round(converge_s, 1),
        "window_s": round(elapsed, 1),
        "converged_after_window": still,
        "gpud_cores_median": round(gpud_median, 4),
        "gpud_cores_max": round(max(gpud), 4),
        "serf_cores_median": round(serf_median, 4),
        "gpud_over_serf": round(gpud_median / serf_median, 2) if serf_median else None,
        "gpud_rss_mib_median": round(statistics.median(rss), 1),
        "gpud_rss_mib_max": round(max(rss), 1),
    }


def table(result: dict[str, Any]) -> str:
    rows = result["sizes"]
    base = rows[0]["gpud_cores_median"]
    lines = [
        f"idle bench (real gpud + serf, no Ray, health interval {result['interval_s']} s, "
        f"window {result['window_s']} s)",
        "hosts  converge s  gpud cores  serf cores  gpud/serf  vs first  RSS MiB (median/max)",
    ]
    for r in rows:
        growth = r["gpud_cores_median"] / base if base else float("nan")
        lines.append(
            f"{r['hosts']:>5}  {r['converge_s']:>10}  {r['gpud_cores_median']:>10.4f}  "
            f"{r['serf_cores_median']:>10.4f}  {r['gpud_over_serf']!s:>9}  {growth:>8.2f}  "
            f"{r['gpud_rss_mib_median']:.1f} / {r['gpud_rss_mib_max']:.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="10,20", help="comma-separated cluster sizes")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of CPU sampling")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds after convergence")
    parser.add_argument("--json", help="default: bench/results/idle-<time>.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.hosts.split(",") if s.strip()]
    if not sizes or any(s < 2 for s in sizes):
        parser.error("--hosts needs sizes of at least 2, e.g. 10,20")
    result: dict[str, Any] = {
        "interval_s": HealthConfig().interval_s,
        "window_s": args.window,
        "settle_s": args.settle,
        "sizes": [measure(size, args.window, args.settle) for size in sizes],
    }
    print(table(result))
    out = Path(args.json) if args.json else RESULTS / f"idle-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
