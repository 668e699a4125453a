"""Deployments benchmark: spec propagation, apply -> all replicas ready, kill -9 -> ready again.

Real gpud agents (with serf) in the harness's network namespaces (needs root), 2 fake GPUs per
host (tests/fake_nvml.py), the `command` engine running tests/deploy_server.py, R=2 N=1 G=1.

- propagation: `gpud deploy apply` on one host until every host lists the spec;
- apply -> ready: until every host lists R ready endpoints (probed over the data path);
- kill -9 -> ready: kill -9 of a host that runs a replica (gpud, serf and the server) until
  every surviving host lists R ready endpoints, none on the killed host (median/max over
  --repeats; the killed host is restarted between repeats).

    .venv/bin/python -m bench.deployments [--sizes 4,8] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpud.deployments import authority
from tests import fake_nvml
from tests.harness.gpud_node import Cluster, wait_for
from tests.test_deploy_cluster import READY_S, ready_everywhere, spec_text

POLL_S = 0.1
REPLICAS = 2


def _timed(predicate: Any, what: str) -> float:
    began = time.monotonic()
    wait_for(predicate, READY_S, POLL_S, what=what)
    return time.monotonic() - began


def run_size(size: int, repeats: int, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    nvml = workdir / "nvml.json"
    fake_nvml.write_state(nvml, fake_nvml.node(2))
    os.environ[fake_nvml.ENV] = str(nvml)
    private, public = authority.keygen()
    key = workdir / "operator.key"
    key.write_text(private + "\n")
    spec = workdir / "bench.toml"
    spec.write_text(spec_text("bench", replicas=REPLICAS))
    overrides = {
        "log_level": "info",
        "gpus": {"nvml_module": "tests.fake_nvml", "poll_interval_s": 0.5},
        "deployments": {"operators": [public], "command_allow": [sys.executable]},
    }
    with Cluster(size, workdir=workdir / f"c{size}", overrides=overrides) as c:
        c.wait_converged(timeout=120)
        c.wait_placeable(timeout=120)
        began = time.monotonic()
        c[0].cli("deploy", "apply", str(spec), "--key", str(key))
        wait_for(
            lambda: all(n.api("/v1/deployments")["deployments"] for n in c),
            READY_S,
            POLL_S,
            what="the spec on every host",
        )
        propagation = time.monotonic() - began
        wait_for(
            lambda: ready_everywhere(c.nodes, "bench", REPLICAS), READY_S, POLL_S, what="ready"
        )
        apply_ready = time.monotonic() - began
        recoveries = []
        for _ in range(repeats):
            endpoints = ready_everywhere(c.nodes, "bench", REPLICAS)["endpoints"]
            victim = next(n for n in c if n.name == endpoints[-1][0])
            survivors = [n for n in c if n is not victim]
            victim.kill9()
            recoveries.append(
                _timed(
                    lambda survivors=survivors, victim=victim: (
                        (r := ready_everywhere(survivors, "bench", REPLICAS))
                        and victim.name not in {e[0] for e in r["endpoints"]}
                    ),
                    "ready again after kill -9",
                )
            )
            victim.reap_children()
            victim.start()
            c.wait_converged(timeout=120)
            wait_for(
                lambda: ready_everywhere(c.nodes, "bench", REPLICAS),
                READY_S,
                POLL_S,
                what="ready on every host after the rejoin",
            )
    return {
        "hosts": size,
        "replicas": REPLICAS,
        "propagation_s": round(propagation, 2),
        "apply_to_ready_s": round(apply_ready, 2),
        "kill9_to_ready_s": {
            "median": round(statistics.median(recoveries), 2),
            "max": round(max(recoveries), 2),
            "runs": [round(r, 2) for r in recoveries],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4", help="comma-separated host counts (default 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="bench-deployments.json", help="write results here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="gpud-bench-deploy-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            results.append(run_size(size, args.repeats, Path(tmp) / str(size)))
    print(
        f"{'hosts':>5} {'propagation s':>14} {'apply->ready s':>15} {'kill9->ready s (med/max)':>26}"
    )
    for r in results:
        k = r["kill9_to_ready_s"]
        print(
            f"{r['hosts']:>5} {r['propagation_s']:>14} {r['apply_to_ready_s']:>15} "
            f"{k['median']:>17} / {k['max']}"
        )
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
