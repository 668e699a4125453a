"""Deployments benchmark: spec propagation, apply -> all replicas ready, kill -9 -> ready again.

Real gpud agents (with serf) in the harness's network namespaces (needs root), 2 fake GPUs per
host (tests/harness/fake_nvml.py), the `command` engine running tests/harness/deploy_server.py.

Single-node replicas, R=2 N=1 G=1, on each of --sizes hosts:
- propagation: `gpud deploy apply` on one host until every host lists the spec;
- apply -> ready: until every host lists R ready endpoints (probed over the data path);
- kill -9 -> ready: kill -9 of a host that runs a replica (gpud, serf and the server) until
  every surviving host lists R ready endpoints, none on the killed host (median/max over
  --repeats; the killed host is restarted between repeats).

Multi-node replicas with Ray, R=2 N=2 G=2, on each of --ray-hosts hosts (real Ray; 0 skips): each
replica is its own Ray cluster of 2 nodes. With `--ray-engine vllm` (the default) the replica runs
`engine = "vllm"` through gpud's own vLLM argv with the vLLM stand-in (tests/harness/fake_vllm.py),
which places a TP x PP placement group of one-GPU actors on the replica's nodes before it serves;
with `command`, tests/harness/deploy_server.py joins the cluster and serves once it has 2 nodes. apply ->
ready as above; then --runs kills -9 of a replica's host (a worker host each time, or worker and
head alternating with `--ray-kill alternate`) until every surviving host lists 2 ready replicas,
none on the killed host, each replica's server sees exactly its 2 nodes (its actors' nodes, for
vllm), and the hit replica's Ray cluster is a new one (gpud restarts a replica that lost a node as
a whole). With more than 4 hosts a free host takes the killed one's place; with exactly 4 none
can, and the killed host is restarted at once (the figure then includes its restart and rejoin).

    .venv/bin/python -m bench.deployments [--sizes 4,8] [--repeats 3] [--ray-hosts 4,5] [--runs 3]
        [--ray-engine vllm|command] [--ray-kill worker|alternate] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpud.deployments import authority
from tests.harness import fake_nvml, fake_vllm
from tests.harness.deployments import FAKE_GPUS, READY_S, SERVER, ready_everywhere, spec_text
from tests.harness.gpud_node import Cluster, GpudNode, wait_for
from tests.harness.ray_cluster import RAY_EXECUTABLE

POLL_S = 0.1
REPLICAS = 2
# The multi-node case: each readiness check asks the replicas' servers for their Ray view.
RAY_POLL_S = 0.5
RAY_READY_S = 300.0
NODES_PER_REPLICA = 2


def _timed(predicate: Any, what: str) -> float:
    began = time.monotonic()
    wait_for(predicate, READY_S, POLL_S, what=what)
    return time.monotonic() - began


def _setup(workdir: Path) -> tuple[Path, dict[str, Any]]:
    """Fake GPUs (2 per host), an operator key; returns (key file, config overrides)."""
    workdir.mkdir(parents=True, exist_ok=True)
    nvml = workdir / "nvml.json"
    fake_nvml.write_state(nvml, fake_nvml.node(2))
    os.environ[fake_nvml.ENV] = str(nvml)
    private, public = authority.keygen()
    key = workdir / "operator.key"
    key.write_text(private + "\n")
    overrides = {
        "log_level": "info",
        "gpus": FAKE_GPUS,
        "deployments": {"operators": [public], "command_allow": [sys.executable]},
    }
    return key, overrides


def run_size(size: int, repeats: int, workdir: Path) -> dict[str, Any]:
    key, overrides = _setup(workdir)
    spec = workdir / "bench.toml"
    spec.write_text(spec_text("bench", replicas=REPLICAS))
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
        "case": f"R={REPLICAS} N=1 G=1",
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


def _ray_view(fetcher: GpudNode, addr: str, port: int, engine: str) -> dict[str, Any]:
    """A replica's Ray cluster as its server (asked from ``fetcher``'s host over the data path)
    reports it: the addresses and IDs of its alive nodes (of its live actors' nodes, for the
    vLLM stand-in); {} when it does not answer or an actor is dead."""
    path = "/stand-in/workers" if engine == "vllm" else "/v1/models"
    result = fetcher.host.run(
        [
            sys.executable,
            "-c",
            "import urllib.request;print(urllib.request.urlopen("
            f"'http://{addr}:{port}{path}',timeout=5).read().decode())",
        ],
        check=False,
    )
    if result.returncode != 0:
        return {}
    reply = json.loads(result.stdout)
    if engine != "vllm":
        return reply["gpud"]["ray"]
    if reply["dead"] is not None:
        return {}
    workers = reply["workers"]
    return {
        "nodes": sorted({w["node_ip"] for w in workers}),
        "node_ids": sorted({w["node_id"] for w in workers}),
    }


def _ray_ids(
    nodes: list[GpudNode], engine: str, moved: str = ""
) -> dict[int, frozenset[str]] | None:
    """Replica index -> the node IDs of its Ray cluster, once every host in ``nodes`` lists R
    ready replicas, none holding ``moved``, and each replica's server sees exactly its N
    nodes alive in its own Ray cluster; None until then."""
    if not ready_everywhere(nodes, "big", REPLICAS):
        return None
    addr_of = {n.name: n.addr for n in nodes}
    ids = {}
    for view in nodes[0].api("/v1/deployments/big")["replica_views"]:
        members = view["nodes"]
        if view["state"] != "ready" or moved in members or len(members) != NODES_PER_REPLICA:
            return None
        fetcher = next(n for n in nodes if n.name not in members)
        ray = _ray_view(fetcher, addr_of[view["node"]], view["port"], engine)
        if not ray or ray["nodes"] != sorted(addr_of.get(m, "") for m in members):
            return None
        ids[view["index"]] = frozenset(ray["node_ids"])
    return ids


def _recovered(
    nodes: list[GpudNode],
    engine: str,
    moved: str,
    index: int,
    before: frozenset[str],
    role: str,
) -> dict[int, frozenset[str]] | None:
    """`_ray_ids`, and replica ``index``'s Ray cluster is a new one (a head was killed) or has
    a new node in place of the killed worker's (Ray lists a dead node alive for a while)."""
    ids = _ray_ids(nodes, engine, moved)
    if ids is None:
        return None
    now = ids[index]
    return ids if (now.isdisjoint(before) if role == "head" else now != before) else None


def run_ray(
    hosts: int, runs: int, workdir: Path, engine: str, kill: str, keep: bool = False
) -> dict[str, Any]:
    key, overrides = _setup(workdir)
    # Short: Ray's unix socket paths under it must fit in 107 bytes.
    ray_temp = tempfile.mkdtemp(prefix="gdb", dir="/tmp")
    overrides["ray"] = {"executable": RAY_EXECUTABLE, "num_cpus": 1, "temp_root": ray_temp}
    shape = f"replicas = {REPLICAS}\nnodes_per_replica = {NODES_PER_REPLICA}\ngpus_per_node = 2\n"
    spec = workdir / "big.toml"
    if engine == "vllm":
        vllm = fake_vllm.install(workdir / "bin", nvml_state=Path(os.environ[fake_nvml.ENV]))
        overrides["deployments"]["vllm_executable"] = str(vllm)
        spec.write_text(f'name = "big"\nengine = "vllm"\nmodel = "test-model"\n{shape}')
    else:
        command = [sys.executable, SERVER, "--port", "{port}", "--host", "{host_ip}"]
        command += ["--ray-nodes", str(NODES_PER_REPLICA)]
        spec.write_text(
            f'name = "big"\nengine = "command"\n{shape}command = {json.dumps(command)}\n'
        )
    # With a free host the killed host's replica moves there; without, it waits for the host.
    free_host = hosts > REPLICAS * NODES_PER_REPLICA
    try:
        with Cluster(hosts, workdir=workdir / f"ray{hosts}", overrides=overrides) as c:
            c.wait_converged(timeout=120)
            c.wait_placeable(timeout=120)
            began = time.monotonic()
            c[0].cli("deploy", "apply", str(spec), "--key", str(key))
            ids = wait_for(lambda: _ray_ids(c.nodes, engine), RAY_READY_S, RAY_POLL_S, what="ready")
            apply_ready = time.monotonic() - began
            timings = []
            for i in range(runs):
                view = c[0].api("/v1/deployments/big")["replica_views"][i % REPLICAS]
                role = "head" if kill == "alternate" and i % 2 else "worker"
                workers = [n for n in view["nodes"] if n != view["node"]]
                victim_name = view["node"] if role == "head" else workers[0]
                victim = next(n for n in c if n.name == victim_name)
                victim.kill9()
                killed = time.monotonic()
                killed_at = time.time()
                survivors = [n for n in c if n is not victim]
                if not free_host:
                    victim.reap_children()
                    victim.start()
                    survivors = c.nodes
                ids = wait_for(
                    lambda nodes=survivors, moved=victim_name if free_host else "", view=view, role=role, before=ids[view["index"]]: (
                        _recovered(nodes, engine, moved, view["index"], before, role)
                    ),
                    RAY_READY_S,
                    RAY_POLL_S,
                    what=f"ready again after kill -9 of a {role} host",
                )
                timings.append(
                    {
                        "killed": role,
                        "host": victim_name,
                        "killed_at": round(killed_at, 2),
                        "s": round(time.monotonic() - killed, 2),
                    }
                )
                if free_host:
                    victim.reap_children()
                    victim.start()
                    c.wait_converged(timeout=120)
                    c.wait_placeable(timeout=120)
    finally:
        if not keep:  # kept: Ray's own session logs, with timestamps
            shutil.rmtree(ray_temp, ignore_errors=True)
    seconds = [r["s"] for r in timings]
    return {
        "case": f"R={REPLICAS} N={NODES_PER_REPLICA} G=2 {engine}",
        "hosts": hosts,
        "replicas": REPLICAS,
        "apply_to_ready_s": round(apply_ready, 2),
        "kill9_to_ready_s": {
            "median": round(statistics.median(seconds), 2),
            "max": round(max(seconds), 2),
            "runs": timings,
            "victim_restarted_at_once": not free_host,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4", help="comma-separated host counts (default 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--ray-hosts",
        default="4,5",
        help="comma-separated host counts for the R=2 N=2 G=2 Ray case (default 4,5; 0 skips)",
    )
    parser.add_argument("--runs", type=int, default=3, help="kills -9 in the Ray case (default 3)")
    parser.add_argument(
        "--ray-engine",
        choices=("vllm", "command"),
        default="vllm",
        help="the Ray case's server: the vLLM stand-in (default) or tests/harness/deploy_server.py",
    )
    parser.add_argument(
        "--ray-kill",
        choices=("worker", "alternate"),
        default="worker",
        help="kill a worker host every run (default), or a worker then a head host",
    )
    parser.add_argument("--json", default="bench-deployments.json", help="write results here")
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="work in DIR and keep it: every agent's gpud.log, the replicas' output files and "
        "Ray's session logs (under /tmp/gdb*), to see where the time goes (each run's "
        "killed_at is in the JSON)",
    )
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="gpud-bench-deploy-") as scratch:
        tmp = args.keep or scratch
        for size in (int(s) for s in args.sizes.split(",") if s.strip()):
            results.append(run_size(size, args.repeats, Path(tmp) / str(size)))
        for hosts in (int(s) for s in args.ray_hosts.split(",") if s.strip() and int(s)):
            workdir = Path(tmp) / f"ray{hosts}"
            results.append(
                run_ray(hosts, args.runs, workdir, args.ray_engine, args.ray_kill, bool(args.keep))
            )
    print(
        f"{'case':<22} {'hosts':>5} {'propagation s':>14} {'apply->ready s':>15} "
        f"{'kill9->ready s (med/max)':>26}"
    )
    for r in results:
        k = r["kill9_to_ready_s"]
        print(
            f"{r['case']:<22} {r['hosts']:>5} {r.get('propagation_s', '-'):>14} "
            f"{r['apply_to_ready_s']:>15} {k['median']:>17} / {k['max']}"
        )
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
