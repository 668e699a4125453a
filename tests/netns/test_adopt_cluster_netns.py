"""A replica outlives its gpud, on real gpud + serf in the namespace harness (fake GPUs).

Host A serves R=1 (host B is cordoned, so the replica has nowhere else to go); a client on B
sends requests back to back to A's replica endpoint (the `openai` client,
tests/harness/router_load.py) while A's gpud is killed with SIGKILL alone, then stopped and
started gracefully 10 times in a row (bench/adoption.py runs the same scenarios): not one
request fails, at >= 20 requests/s; the server keeps its pid and port, and its leases (one
GPU, one port) belong to the gpud that runs now, still after the zombie scan's grace: none
leaked, none lost; and none of the requests sent through B's router fails either, because B
reports A as "gpud restarting" (its replica's port still answers) instead of down, and keeps
the replica placed and routed. A second test holds A's gpud down past a short grace.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from bench import adoption
from gpud.health.prober import workload_ports
from gpud.process_groups import process_start
from tests.harness import fake_nvml
from tests.harness.deployments import operated_cluster
from tests.harness.gpud_node import Cluster, GpudNode, wait_for

GRACEFUL_RESTARTS = 10


def adoption_cluster(
    cluster: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    size: int,
    **sections: dict[str, Any],
) -> tuple[Cluster, Path]:
    """bench.adoption's cluster of ``size`` hosts (2 fake GPUs each) and its operator key."""
    nvml = tmp_path / "nvml.json"
    fake_nvml.write_state(nvml, fake_nvml.node(2))
    monkeypatch.setenv(fake_nvml.ENV, str(nvml))
    return operated_cluster(
        cluster, tmp_path, size, adoption.DEPLOYMENTS, router=adoption.ROUTER, **sections
    )


@pytest.mark.timeout(420)
def test_replica_survives_gpud_kill9_and_graceful_restarts(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c, key_file = adoption_cluster(cluster, tmp_path, monkeypatch, 2)
    a, _ = c.nodes
    served = adoption.serve(c, tmp_path, key_file)
    assert adoption.leases(a) == [("deploy:solo.0", a.pid, 1)] * 2

    scenarios = adoption.restarts(c, served, tmp_path, ["kill9"] + ["sigterm"] * GRACEFUL_RESTARTS)
    print(scenarios)
    assert [s.name for s in scenarios] == ["kill9"] + ["sigterm"] * GRACEFUL_RESTARTS
    assert [s.failed for s in scenarios] == [0] * len(scenarios)
    assert [s.routed_failed for s in scenarios] == [0] * len(scenarios)
    # Each window spans the restart and SETTLE_S of load after the adoption.
    for s in scenarios:
        assert s.requests >= 20 * (s.adoption_s + adoption.SETTLE_S), s
    assert "replica adopted" in a.log_text()
    # The zombie scan had its grace several times over: the leases are still the replica's.
    time.sleep(3.0)
    assert adoption.leases(a) == [("deploy:solo.0", a.pid, 1)] * 2
    assert adoption.serving(a) == (served.pid, served.port)
    assert process_start(served.pid) == served.start


GRACE_S = 15.0


def pair_kind(observer: GpudNode, peer: GpudNode) -> tuple[str, str, str]:
    """(kind, state, message) of observer's pair verdict on peer."""
    for pair in observer.api("/v1/health")["pairs"]:
        if pair["peer"] == peer.name:
            return pair["kind"], pair["state"], pair["message"]
    return "none", "none", ""


@pytest.mark.timeout(300)
def test_a_stopped_gpud_is_restarting_for_the_grace_then_down(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c, key_file = adoption_cluster(
        cluster, tmp_path, monkeypatch, 2, health={"restart_grace_s": GRACE_S}
    )
    a, b = c.nodes
    served = adoption.serve(c, tmp_path, key_file)
    # The evidence B needs: A announces the replica ready (its port then must answer).
    wait_for(
        lambda: workload_ports(b.member_tags(a.name)) == [served.port],
        20.0,
        0.2,
        what="A's replica announced ready, as B sees it",
    )

    # Stopped and not started again: a warning on B, the replica still routed, A alive.
    assert a.terminate() == 0
    stopped = time.monotonic()
    _, state, message = wait_for(
        lambda: (v := pair_kind(b, a))[0] == "restarting" and v,
        10.0,
        0.2,
        what="B to report A's gpud restarting",
        describe=lambda: str(pair_kind(b, a)),
    )
    assert state == "warning" and "restart_grace_s" in message, message
    codes = {p["code"]: p["severity"] for p in b.api("/v1/status")["problems"]}
    assert codes.get("health.restarting") == "warning", codes
    while time.monotonic() - stopped < GRACE_S - 2.0:
        assert pair_kind(b, a)[0] == "restarting", pair_kind(b, a)
        assert a.name in b.alive_members()
        assert adoption.routes_to_replica(b), b.api("/v1/status")["router"]
        time.sleep(0.5)
    # Past the grace: down, as a dead gpud is.
    wait_for(
        lambda: pair_kind(b, a)[0] == "down",
        10.0,
        0.2,
        what="B to judge A down once the grace is over",
        describe=lambda: str(pair_kind(b, a)),
    )
    assert time.monotonic() - stopped >= GRACE_S - 1.0
    assert "longer than health.restart_grace_s" in pair_kind(b, a)[2]

    # Back within the grace: adopted, and B's verdict is ok again.
    a.start()
    wait_for(lambda: adoption.serving(a) == (served.pid, served.port), 30.0, 0.2, what="adopted")
    wait_for(lambda: pair_kind(b, a)[0] == "ok", 20.0, 0.2, what="B to see A ok again")

    # Stopped again, and its workload stops answering too: down at once, no grace.
    assert a.terminate() == 0
    wait_for(lambda: pair_kind(b, a)[0] == "restarting", 10.0, 0.2, what="restarting again")
    os.kill(served.pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(
        lambda: pair_kind(b, a)[0] == "down",
        GRACE_S / 2,
        0.2,
        what="B to judge A down once its replica stopped answering",
        describe=lambda: str(pair_kind(b, a)),
    )
    assert time.monotonic() - killed < GRACE_S / 2
    assert "its workload refuses too" in pair_kind(b, a)[2]


def served_here(node: GpudNode) -> tuple[int, int] | None:
    """(pid, port) of the replica's server when it is ready on ``node`` itself."""
    v = adoption.view(node)
    ready = v is not None and v["state"] == "ready" and v["node"] == node.name
    return (v["pid"], v["port"]) if ready and v is not None else None


@pytest.mark.timeout(400)
def test_a_gpud_stopped_past_the_grace_loses_its_replica_and_stops_the_old_copy_on_return(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 hosts, B cordoned: the replica runs on X. X's gpud stops for longer than the grace:
    the replica is placed on Y and gets ready there while X's old copy (nobody supervises it)
    still serves; when X's gpud returns it adopts the old copy, sees the replica placed
    elsewhere, stops it and releases its leases, and Y's copy keeps serving."""
    grace = 10.0
    c, key_file = adoption_cluster(
        cluster, tmp_path, monkeypatch, 3, health={"restart_grace_s": grace}
    )
    first, b, third = c.nodes
    b.cli("drain")
    spec = tmp_path / "solo.toml"
    spec.write_text(adoption.spec_text("solo"))
    b.cli("deploy", "apply", str(spec), "--key", str(key_file))
    x = wait_for(
        lambda: next((n for n in (first, third) if served_here(n)), None),
        adoption.READY_S,
        0.5,
        what="solo ready on one of the uncordoned hosts",
    )
    y = third if x is first else first
    old_pid, old_port = served_here(x) or (0, 0)
    old_start = process_start(old_pid)
    wait_for(
        lambda: workload_ports(b.member_tags(x.name)) == [old_port],
        20.0,
        0.2,
        what="X's replica announced ready, as B sees it",
    )

    assert x.terminate() == 0
    stopped = time.monotonic()
    new_pid, new_port = wait_for(
        lambda: served_here(y),
        grace + adoption.READY_S,
        0.5,
        what="the replica ready on Y once X's grace is over",
        describe=lambda: str(adoption.view(y)),
    )
    assert time.monotonic() - stopped >= grace - 1.0, "re-placed before the grace ended"
    assert process_start(old_pid) == old_start, "X's old copy stopped while its gpud was down"

    x.start()
    wait_for(
        lambda: process_start(old_pid) != old_start,
        60.0,
        0.5,
        what="X's returning gpud to stop its old copy",
        describe=lambda: x.log_tail(),
    )
    wait_for(lambda: adoption.leases(x) == [], 30.0, 0.5, what="X's leases released")
    assert served_here(y) == (new_pid, new_port)
    assert adoption.leases(y) == [("deploy:solo.0", y.pid, 1)] * 2
