"""One real agent (real serf child) on loopback: sd_notify, local API errors, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from gpud.client import ApiRefused
from tests.harness.agent import RunningAgent


def test_ready_status_watchdog_and_api(agent: RunningAgent) -> None:
    ready = agent.wait_message("READY=1")
    assert ready == "READY=1"
    assert "members alive" in agent.wait_message("STATUS=")
    agent.wait_message("WATCHDOG=1", timeout=10)
    assert os.stat(agent.socket_path).st_mode & 0o777 == 0o660

    status = agent.api("GET", "/v1/status")
    sections = {
        "serf",
        "membership",
        "network",
        "health",
        "ports",
        "ray",
        "gpus",
        "deployments",
        "router",
        "metrics",
    }
    assert set(status) == {"node", "members", "summaries", "problems", *sections}
    assert set(status["summaries"]) == sections
    assert status["node"]["name"] == "solo"
    assert status["gpus"]["count"] == 0 and status["gpus"]["nvml"] != "ok"
    assert status["ray"]["state"] == "disabled"
    members = agent.api("GET", "/v1/members")["members"]
    assert [(m["name"], m["status"]) for m in members] == [("solo", "alive")]
    assert members[0]["tags"]["v"] == 1

    human = subprocess.run(
        [sys.executable, "-m", "gpud", "status", "--socket", agent.socket_path],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert human.returncode == 0, human.stderr
    assert "solo" in human.stdout and "1 (1 alive)" in human.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "gpud", "status", "--json", "--socket", agent.socket_path],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert json.loads(as_json.stdout)["node"]["name"] == "solo"


def test_bad_requests_get_json_errors_and_change_nothing(agent: RunningAgent) -> None:
    agent.wait_message("READY=1")
    with pytest.raises(ApiRefused) as info:
        agent.api("GET", "/v1/nothing-here")
    assert info.value.status == 404 and "no such endpoint" in str(info.value)
    with pytest.raises(ApiRefused) as info:
        agent.api("POST", "/v1/status", {})
    assert info.value.status == 405 and "use GET" in str(info.value)
    before = agent.api("GET", "/v1/status")["node"]["tags"]
    leases_before = agent.api("GET", "/v1/ports/leases")
    for body in ({"owner": 5}, {"count": -1, "owner": "x"}, ["not", "an", "object"], {"x": 1}):
        with pytest.raises(ApiRefused) as info:
            agent.api("POST", "/v1/ports/leases", body)
        assert 400 <= info.value.status < 500
    with pytest.raises(ApiRefused) as info:
        agent.api("DELETE", "/v1/ports/leases/no-such-lease")
    assert info.value.status == 404
    assert agent.api("GET", "/v1/ports/leases") == leases_before
    assert agent.api("GET", "/v1/status")["node"]["tags"] == before
    assert agent.proc.poll() is None


def test_sigterm_sends_stopping_and_leaves_serf_running(agent: RunningAgent) -> None:
    """A graceful stop leaves serf to the next gpud: no leave, no stop."""
    agent.wait_message("READY=1")
    serf_pid = agent.api("GET", "/v1/status")["serf"]["supervisor"]["pid"]
    assert serf_pid
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait_message("STOPPING=1") == "STOPPING=1"
    assert agent.proc.wait(30) == 0, agent.log_text()
    try:
        os.kill(serf_pid, 0)  # still running
        assert "left running for the next gpud" in agent.log_text()
    finally:
        os.killpg(serf_pid, signal.SIGKILL)
    assert not os.path.exists(agent.socket_path)


def test_doctor_on_a_lone_healthy_node(agent: RunningAgent) -> None:
    agent.wait_message("READY=1")
    result = subprocess.run(
        [sys.executable, "-m", "gpud", "doctor", "--socket", agent.socket_path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = agent.api("GET", "/v1/doctor")
    assert report["node"] == "solo" and report["peers_checked"] == 0
    assert result.returncode == (1 if report["critical"] else 0), result.stdout
    assert "checked 0 peer(s) from solo" in result.stdout


def test_metrics_are_prometheus_text(agent: RunningAgent) -> None:
    from gpud.client import exchange

    agent.wait_message("READY=1")
    response = exchange(agent.socket_path, "GET", "/metrics", timeout=10)
    body = response.body.decode()
    assert response.status == 200
    assert response.headers.get("content-type", "").startswith("text/plain")
    assert 'gpud_members{status="alive"} 1.0' in body.splitlines()
    assert "gpud_up 1.0" in body.splitlines()
    assert "gpud_gpus 0.0" in body.splitlines()
    assert 'gpud_problems{severity="critical"} 0.0' in body.splitlines()
    assert (
        sum(
            line.startswith("gpud_health_state{") and line.endswith(" 1.0")
            for line in body.splitlines()
        )
        == 1
    )
