"""One real agent (real serf child) on loopback: sd_notify, local API errors, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpud import client
from gpud.client import ApiRefused
from tests.harness.netns import kill_process_tree
from tests.serf_util import free_ports


class RunningAgent:
    def __init__(self, tmp: Path) -> None:
        serf_port, rpc_port, peer_port = free_ports(3)
        self.socket_path = str(tmp / "run" / "gpud.sock")
        self.config_path = tmp / "gpud.toml"
        self.config_path.write_text(
            f"""
            [node]
            name = "solo"
            advertise = "127.0.0.1"
            [cluster]
            insecure = true
            [serf]
            bind_port = {serf_port}
            rpc_port = {rpc_port}
            [peer]
            port = {peer_port}
            [paths]
            state_dir = "{tmp / "state"}"
            runtime_dir = "{tmp / "run"}"
            [ports]
            range_start = 24000
            range_end = 24400
            block_size = 100
            reserve = false
            settle_s = 0.5
            [ray]
            enabled = false
            """
        )
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_path = str(tmp / "notify.sock")
        self.notify.bind(self.notify_path)
        self.notify.settimeout(1.0)
        self.messages: list[str] = []
        env = dict(os.environ, NOTIFY_SOCKET=self.notify_path, WATCHDOG_USEC="2000000")
        self.log = open(tmp / "agent.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpud", "agent", "--config", str(self.config_path)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        env.pop("WATCHDOG_USEC")

    def wait_message(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.messages:
                for line in message.splitlines():
                    if line.startswith(prefix):
                        return line
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except TimeoutError:
                assert self.proc.poll() is None, f"agent exited: {self.log_text()}"
        raise AssertionError(f"no {prefix} in {self.messages}; log: {self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def api(self, method: str, path: str, body: object = None) -> object:
        return client.request(self.socket_path, method, path, body, timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            kill_process_tree(self.proc.pid)
            self.proc.wait(10)
        self.notify.close()
        self.log.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    running = RunningAgent(tmp_path)
    try:
        yield running
    finally:
        running.stop()


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


def test_sigterm_sends_stopping_and_stops_serf(agent: RunningAgent) -> None:
    agent.wait_message("READY=1")
    serf_pid = agent.api("GET", "/v1/status")["serf"]["supervisor"]["pid"]
    assert serf_pid
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait_message("STOPPING=1") == "STOPPING=1"
    assert agent.proc.wait(30) == 0, agent.log_text()
    with pytest.raises(ProcessLookupError):
        os.kill(serf_pid, 0)
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
    from gpud.client import _UnixConnection

    agent.wait_message("READY=1")
    conn = _UnixConnection(agent.socket_path, 10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode()
    finally:
        conn.close()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/plain")
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
