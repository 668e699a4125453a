"""A replica across restarts of its gpud: adoption time and failed requests per scenario.

Real gpud + serf on 2 hosts in network namespaces (tests/harness), fake GPUs. Host A serves
R=1 of the stand-in server (host B is cordoned, so the replica can go nowhere else); clients
on B send requests back to back to A's replica endpoint and through B's router (the `openai`
client, tests/harness/router_load.py, 2 workers each). Scenarios, in a row: kill -9 of A's gpud
pid alone, then --restarts graceful stops (SIGTERM) and starts. Per scenario: adoption time (the
new gpud started -> its API shows the replica ready with the same server pid and port) and the
requests that failed from the stop to the next scenario, straight to the replica and routed.

Run (root, for the namespaces):  .venv/bin/python -m bench.adoption [--restarts 3] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from gpud.deployments import authority
from gpud.process_groups import process_start
from tests.harness import fake_nvml
from tests.harness.deployments import FAKE_GPUS, SERVER
from tests.harness.gpud_node import Cluster, GpudNode, wait_for
from tests.harness.router_cluster import ROUTER_PORT, background_load, records

READY_S = 90.0
ADOPT_TIMEOUT_S = 30.0
# Load between scenarios, so each one's failures are counted apart.
SETTLE_S = 2.0
MODEL = "test-model"


class Scenario(msgspec.Struct, kw_only=True):
    name: str  # "kill9" or "sigterm"
    adoption_s: float
    requests: int
    failed: int
    # The same window through B's router (which routes to A's replica).
    routed: int
    routed_failed: int


class Serving(msgspec.Struct, kw_only=True):
    pid: int
    port: int
    start: int


# The stand-in server runs under this Python; B's router is the one the routed load goes through.
DEPLOYMENTS = {"command_allow": [sys.executable]}
ROUTER = {"enabled": True, "port": ROUTER_PORT}


def overrides(public_key: str) -> dict[str, Any]:
    return {
        "gpus": FAKE_GPUS,
        "deployments": {"operators": [public_key], **DEPLOYMENTS},
        "router": ROUTER,
    }


def spec_text(name: str) -> str:
    command = [
        sys.executable,
        SERVER,
        "--port",
        "{port}",
        "--host",
        "{host_ip}",
        "--model",
        "{model}",
    ]
    return (
        f'name = "{name}"\nengine = "command"\nmodel = "{MODEL}"\nreplicas = 1\n'
        f"gpus_per_node = 1\ncommand = {json.dumps(command)}\n"
    )


def view(node: GpudNode) -> dict[str, Any] | None:
    views = node.api("/v1/deployments/solo")["replica_views"]
    return views[0] if views else None


def serving(node: GpudNode) -> tuple[int, int] | None:
    """(pid, port) of the replica's server once it is ready here."""
    v = view(node)
    return (v["pid"], v["port"]) if v and v["state"] == "ready" else None


def leases(node: GpudNode) -> list[tuple[str, int | None, int]]:
    """The deployments' leases as (owner, owner pid, how many): GPUs and ports."""
    gpus = [(g["owner"], g["pid"], len(g["gpus"])) for g in node.api("/v1/gpus/leases")]
    ports = [(p["owner"], p["pid"], len(p["ports"])) for p in node.api("/v1/ports/leases")]
    return sorted(lease for lease in gpus + ports if lease[0].startswith("deploy:"))


def routes_to_replica(node: GpudNode) -> bool:
    router = node.api("/v1/status")["router"]
    return router["state"] == "serving" and router["upstreams"] == 1 and MODEL in router["models"]


def serve(c: Cluster, work: Path, key_file: Path) -> Serving:
    """Cordon B, apply R=1 from A; the server once it is ready on A."""
    a, b = c.nodes
    b.cli("drain")
    spec = work / "solo.toml"
    spec.write_text(spec_text("solo"))
    a.cli("deploy", "apply", str(spec), "--key", str(key_file))
    pid, port = wait_for(lambda: serving(a), READY_S, 0.5, what="solo ready on A")
    wait_for(
        lambda: routes_to_replica(b),
        READY_S,
        0.5,
        what="B's router with A's replica",
        describe=lambda: str(b.api("/v1/status")["router"]),
    )
    start = process_start(pid)
    assert start is not None
    return Serving(pid=pid, port=port, start=start)


def restarts(c: Cluster, s: Serving, work: Path, steps: list[str]) -> list[Scenario]:
    """Run ``steps`` ("kill9" / "sigterm") on A's gpud under load from B; raises if the server
    dies with gpud, or is not adopted with its pid, port and leases."""
    a, b = c.nodes
    bases = {
        "direct": f"http://{a.addr}:{s.port}/v1",
        "routed": f"http://{b.addr}:{ROUTER_PORT}/v1",
    }
    marks: list[tuple[str, float, float]] = []  # (step, stopped at wall clock, adoption s)
    with background_load(b.host, bases, work, MODEL) as files:
        time.sleep(SETTLE_S)
        for step in steps:
            assert a.proc is not None
            stopped = time.time()
            if step == "kill9":
                os.kill(a.proc.pid, signal.SIGKILL)
                a.proc.wait(timeout=10)
            else:
                code = a.terminate()
                assert code == 0, f"gpud exited {code}\n{a.log_tail()}"
            assert process_start(s.pid) == s.start, f"the server died with gpud ({step})"
            began = time.monotonic()
            a.start()
            wait_for(
                lambda: serving(a) == (s.pid, s.port),
                ADOPT_TIMEOUT_S,
                0.1,
                what=f"the same server adopted after {step}",
                describe=lambda: f"{view(a)}\n{a.log_tail()}",
            )
            marks.append((step, stopped, time.monotonic() - began))
            owned = leases(a)
            assert owned == [("deploy:solo.0", a.pid, 1)] * 2, owned
            time.sleep(SETTLE_S)
    loaded = {name: records(path) for name, path in files.items()}
    ends = [m[1] for m in marks[1:]] + [float("inf")]

    def window(name: str, start: float, end: float) -> list[dict[str, Any]]:
        return [r for r in loaded[name] if start <= r["sent"] < end]

    return [
        Scenario(
            name=step,
            adoption_s=round(adoption, 2),
            requests=len(direct := window("direct", stopped, end)),
            failed=sum(1 for r in direct if not r["ok"]),
            routed=len(routed := window("routed", stopped, end)),
            routed_failed=sum(1 for r in routed if not r["ok"]),
        )
        for (step, stopped, adoption), end in zip(marks, ends, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=3, help="graceful restarts after kill -9")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gp-adopt-"))
    nvml = work / "nvml.json"
    fake_nvml.write_state(nvml, fake_nvml.node(2))
    os.environ[fake_nvml.ENV] = str(nvml)
    private, public = authority.keygen()
    key_file = work / "operator.key"
    key_file.write_text(private + "\n")
    with Cluster(2, workdir=work / "cluster", overrides=overrides(public)) as c:
        c.wait_converged()
        c.wait_placeable()
        s = serve(c, work, key_file)
        results = restarts(c, s, work, ["kill9"] + ["sigterm"] * args.restarts)
    print(
        f"{'scenario':<10} {'adoption s':>10} {'requests':>9} {'failed':>7} {'routed':>7} {'failed':>7}"
    )
    for r in results:
        print(
            f"{r.name:<10} {r.adoption_s:>10.2f} {r.requests:>9} {r.failed:>7} "
            f"{r.routed:>7} {r.routed_failed:>7}"
        )
    if args.json is not None:
        args.json.write_bytes(msgspec.json.encode({"scenarios": results}))


if __name__ == "__main__":
    main()
