"""A replica outlives its gpud, on real gpud + serf in the namespace harness (fake GPUs).

Host A serves R=1 (host B is cordoned, so the replica has nowhere else to go); a client on B
sends requests back to back to A's replica endpoint (the `openai` client,
tests/harness/router_load.py) while A's gpud is killed with SIGKILL alone, then stopped and
started gracefully 10 times in a row (bench/adoption.py runs the same scenarios): not one
request fails, at >= 20 requests/s; the server keeps its pid and port, and its leases (one
GPU, one port) belong to the gpud that runs now, still after the zombie scan's grace: none
leaked, none lost. (The bench also sends load through B's router: while A's gpud is down, B
judges A down and un-places the replica, so routed requests fail until A is back; peers'
ride-through grace for a restarting gpud is not built.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bench import adoption
from gpud.deployments import authority
from gpud.process import process_start
from tests.harness import fake_nvml
from tests.harness.gpud_node import Cluster

GRACEFUL_RESTARTS = 10


@pytest.mark.timeout(420)
def test_replica_survives_gpud_kill9_and_graceful_restarts(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = tmp_path / "nvml.json"
    fake_nvml.write_state(nvml, fake_nvml.node(2))
    monkeypatch.setenv(fake_nvml.ENV, str(nvml))
    private, public = authority.keygen()
    key_file = tmp_path / "operator.key"
    key_file.write_text(private + "\n")
    c: Cluster = cluster(2, overrides=adoption.overrides(public))
    c.wait_converged()
    c.wait_placeable()
    a, _ = c.nodes
    served = adoption.serve(c, tmp_path, key_file)
    assert adoption.leases(a) == [("deploy:solo.0", a.pid, 1)] * 2

    scenarios = adoption.restarts(c, served, tmp_path, ["kill9"] + ["sigterm"] * GRACEFUL_RESTARTS)
    print(scenarios)
    assert [s.name for s in scenarios] == ["kill9"] + ["sigterm"] * GRACEFUL_RESTARTS
    assert [s.failed for s in scenarios] == [0] * len(scenarios)
    # Each window spans the restart and SETTLE_S of load after the adoption.
    for s in scenarios:
        assert s.requests >= 20 * (s.adoption_s + adoption.SETTLE_S), s
    assert "replica adopted" in a.log_text()
    # The zombie scan had its grace several times over: the leases are still the replica's.
    time.sleep(3.0)
    assert adoption.leases(a) == [("deploy:solo.0", a.pid, 1)] * 2
    assert adoption.serving(a) == (served.pid, served.port)
    assert process_start(served.pid) == served.start
