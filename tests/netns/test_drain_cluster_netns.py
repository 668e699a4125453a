"""`gpud drain` and `gpud uncordon` on real gpud + serf in the namespace harness.

3 hosts with the router on and R=2 (tests/netns/test_router_cluster_netns.py): `gpud drain` of a
replica's host during load through the routers of all 3 hosts fails no request, the new copy
served requests before the old one stopped (make-before-break), and a long request already on
the old copy finished before it stopped. The cordon shows in status, members and doctor;
`gpud uncordon` makes the host placeable again; a replica that fits nowhere else stays on a
drained host; the cordon survives a restart of gpud.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness.router_cluster import (
    results,
    routed_cluster,
    spec_text,
    start_load,
)
from tests.harness.wait import wait_for

# One completion that takes LONG_S (the stand-in's ``delay_s``): prints its status and when
# it ended.
LONG_S = 10.0
LONG_REQUEST = """
import json, sys, time, urllib.request
body = json.dumps({"model": "m", "prompt": "hi", "delay_s": float(sys.argv[2])}).encode()
request = urllib.request.Request(sys.argv[1], body, {"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as reply:
    reply.read()
    print(reply.status, time.time())
"""


def test_drain_moves_replicas_make_before_break_and_uncordon_restores(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c, found, key_file = routed_cluster(cluster, tmp_path, monkeypatch)
    drained = next(n for n in c if n.name == found["endpoints"][0][0])
    old = f"{drained.addr}:{found['endpoints'][0][1]}"
    runners = {name for name, _ in found["endpoints"]}
    free = next(n for n in c if n.name not in runners)

    # A bad timeout is refused with the reason, and nothing changes.
    bad = drained.cli("drain", "--timeout", "0", check=False)
    assert bad.returncode != 0 and "timeout_s" in bad.stderr, bad.stderr
    assert not drained.api("/v1/status")["deployments"]["cordoned"]

    stop = tmp_path / "stop-load"
    procs = [start_load(n, 120.0, stop_file=stop) for n in c]
    firsts = [p.stdout.readline() if p.stdout else "" for p in procs]
    # A long generation already on the old copy (sent to it directly, as a router did before
    # the drain): the old copy stops only once it is done, well after its new copy is ready.
    long = drained.host.popen(
        [sys.executable, "-c", LONG_REQUEST, f"http://{old}/v1/completions", str(LONG_S)],
        stdout=subprocess.PIPE,
        text=True,
    )
    started = time.time()
    time.sleep(1.0)
    out = drained.cli("drain", "--timeout", "60", timeout=90)
    finished = time.time()
    long_status, long_done = long.communicate(timeout=30)[0].split()
    time.sleep(1.0)
    stop.touch()
    served = [r for p, first in zip(procs, firsts, strict=True) for r in results(p, 5.0, first)]
    failed = [r for r in served if not r["ok"]]
    by_old = [r for r in served if r["replica"] == old]
    new = {r["replica"] for r in served if r["replica"].startswith(f"{free.addr}:")}
    print(
        f"drain of {drained.name} during load through 3 routers: {len(served)} requests, "
        f"{len(failed)} failed, drain took {finished - started - 1.0:.1f} s; {out.stdout.strip()}"
    )
    assert not failed, failed[:3]
    assert "drained" in out.stdout, out.stdout
    assert long_status == "200" and float(long_done) <= finished, (long_status, long_done)
    # Make-before-break: the new copy (on the free host) answered before the old one's last.
    assert len(new) == 1, new
    first_new = min(r["done"] for r in served if r["replica"] in new)
    assert by_old and first_new < max(r["done"] for r in by_old), "old stopped before new served"
    assert drained.api("/v1/status")["deployments"]["running_here"] == 0

    def cordon_shown() -> bool:
        status = drained.api("/v1/status")
        doctor = drained.api("/v1/doctor")
        members = c.nodes[0].cli("members").stdout
        return (
            status["deployments"]["cordoned"]
            and any(p["code"] == "deployments.cordoned" for p in doctor["problems"])
            and any(drained.name in line and "cordoned" in line for line in members.splitlines())
        )

    wait_for(cordon_shown, 30, 0.5, what="the cordon in status, doctor and members")
    # A replica of 2 GPUs fits only on the drained host (the others run one of 1 GPU each):
    # pending while it is cordoned, placed there and ready once it is uncordoned.
    spec = tmp_path / "whole.toml"
    spec.write_text(spec_text("whole", replicas=1, gpus=2))
    c.nodes[1].cli("deploy", "apply", str(spec), "--key", str(key_file))

    def whole() -> dict[str, Any]:
        view = json.loads(c.nodes[1].cli("deploy", "status", "whole", "--json").stdout)
        return view["replica_views"][0]

    wait_for(
        lambda: whole()["state"] == "pending",
        60,
        0.5,
        what="a 2-GPU replica pending while the only host with 2 free GPUs is cordoned",
    )
    time.sleep(3.0)
    assert whole()["state"] == "pending", whole()
    assert "uncordoned" in drained.cli("uncordon").stdout
    wait_for(
        lambda: (r := whole())["state"] == "ready" and r["node"] == drained.name,
        90,
        0.5,
        what="the 2-GPU replica ready on the uncordoned host",
        describe=lambda: drained.cli("deploy", "status", "whole").stdout,
    )
    assert not drained.api("/v1/status")["deployments"]["cordoned"]

    # Drained again, the 2-GPU replica fits nowhere else: it stays and serves, and the command
    # says so when its timeout ends. The cordon survives a restart of gpud.
    again = drained.cli("drain", "--timeout", "4", check=False, timeout=30)
    assert again.returncode == 1 and "still draining" in again.stderr, again
    assert (r := whole())["state"] == "ready" and r["node"] == drained.name, r
    drained.restart()
    status = drained.api("/v1/status")["deployments"]
    assert status["cordoned"], status
    assert any(p["code"] == "deployments.cordoned" for p in drained.api("/v1/doctor")["problems"])
