"""The CLI as an operator runs it: a `gpud` process against one real agent (real serf child)
on loopback. Views, the API's own JSON, lease ids, $GPUD_SOCKET, a hung daemon (stopped with
SIGSTOP) as exit 3 within --timeout, and no agent dependency loaded by any client command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpud import client
from tests.harness.agent import solo_config
from tests.harness.config import to_toml
from tests.harness.netns import kill_process_tree
from tests.harness.serf import free_ports
from tests.harness.wait import wait_for

# What a client command must never load: the agent's own dependencies, and what made `gpud
# status` slow to start (http.client pulls email and ssl; NVML loads ctypes).
HEAVY = ("aiohttp", "pyroute2", "sqlite3", "asyncio", "pynvml", "ray", "prometheus_client")
HEAVY += ("http", "email", "ssl", "ctypes", "cryptography")


class Agent:
    def __init__(self, tmp: Path) -> None:
        serf_port, rpc_port, peer_port = free_ports(3)
        self.socket = str(tmp / "run" / "gpud.sock")
        config = solo_config(tmp, (serf_port, rpc_port, peer_port), metrics={"listen": ""})
        self.config = tmp / "gpud.toml"
        self.config.write_text(to_toml(config))
        self.log = open(tmp / "agent.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpud", "agent", "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self._ports_confirmed, 60, 0.3, what="agent ready", describe=self.log_text)

    def _ports_confirmed(self) -> bool:
        assert self.proc.poll() is None, self.log_text()
        summary = client.request(self.socket, "GET", "/v1/status", timeout=2)["summaries"]
        return "confirmed" in summary["ports"]

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        kill_process_tree(self.proc.pid)
        self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    running = Agent(tmp_path_factory.mktemp("cli-agent"))
    try:
        yield running
    finally:
        running.stop()


def gpud(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpud", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_views_show_what_the_api_has(agent: Agent) -> None:
    for command, expect in [
        ("status", "ports        block"),
        ("members", "solo"),
        ("health", "health passing"),
        ("network", "advertise 127.0.0.1 (chosen by config), on a local interface on lo"),
        ("ray", "ray disabled (ray.enabled = false)"),
        ("ports", "confirmed"),
        ("gpus", "NVML"),
        ("doctor", "checked 0 peer(s) from solo"),
    ]:
        result = gpud(command, "--socket", agent.socket)
        assert result.returncode == 0, (command, result.stderr)
        assert expect in result.stdout, (command, result.stdout)
        assert result.stderr == "", (command, result.stderr)


@pytest.mark.parametrize(
    ("command", "path"),
    [
        ("members", "/v1/members"),
        ("status", "/v1/status"),
        ("health", "/v1/health"),
        ("network", "/v1/network"),
        ("ports", "/v1/ports"),
        ("gpus", "/v1/gpus"),
    ],
)
def test_json_is_the_api_reply_exactly(agent: Agent, command: str, path: str) -> None:
    result = gpud(command, "--json", "--socket", agent.socket)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    api = client.request(agent.socket, "GET", path, timeout=5)
    if command in ("members", "ports", "network"):  # stable between two reads
        assert shown == api
    else:
        assert shown.keys() == api.keys()
    if command == "members":
        assert list(shown) == ["members"] and shown["members"][0]["name"] == "solo"


def test_lease_prints_the_id_that_release_takes(agent: Agent) -> None:
    leased = gpud("ports", "lease", "--owner", "job", "--count", "2", "--socket", agent.socket)
    assert leased.returncode == 0, leased.stderr
    ports = [int(p) for p in leased.stdout.split()]
    assert len(ports) == 2
    word, lease_id, *_ = leased.stderr.split()
    assert word == "lease" and "gpud ports release ID" in leased.stderr
    leases = client.request(agent.socket, "GET", "/v1/ports", timeout=5)["leases"]
    assert [lease["id"] for lease in leases if lease["ports"] == ports] == [lease_id]
    released = gpud("ports", "release", lease_id, "--socket", agent.socket)
    assert released.returncode == 0, released.stderr
    assert client.request(agent.socket, "GET", "/v1/ports", timeout=5)["leases"] == []


def test_gpud_socket_names_the_socket_and_socket_flag_wins(agent: Agent, tmp_path: Path) -> None:
    env = dict(os.environ, GPUD_SOCKET=agent.socket, GPUD_CONFIG=str(tmp_path / "absent.toml"))
    result = gpud("members", env=env)
    assert result.returncode == 0 and "solo" in result.stdout, result.stderr
    missing = str(tmp_path / "none.sock")
    result = gpud("members", "--socket", missing, env=env)
    assert result.returncode == 3 and missing in result.stderr, result.stderr


def test_a_hung_daemon_is_exit_3_within_the_timeout(agent: Agent) -> None:
    os.killpg(agent.proc.pid, signal.SIGSTOP)  # the agent (and its serf): answers nothing
    try:
        began = time.monotonic()
        result = gpud("status", "--timeout", "1", "--socket", agent.socket)
        took = time.monotonic() - began
    finally:
        os.killpg(agent.proc.pid, signal.SIGCONT)
    assert result.returncode == 3, result
    assert "did not answer GET /v1/status" in result.stderr and "within 1s" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert took < 10, took
    wait_for(lambda: gpud("members", "--socket", agent.socket).returncode == 0, 30, 0.5)


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["members"],
        ["doctor"],
        ["health"],
        ["network"],
        ["ray"],
        ["ports"],
        ["gpus"],
        ["keys", "list"],
        ["deploy", "list"],
        ["version"],
        ["manpage"],
        ["completion", "bash"],
    ],
)
def test_client_commands_load_none_of_the_agent(agent: Agent, argv: list[str]) -> None:
    probe = (
        "import sys\n"
        "from gpud.cli import main\n"
        "code = main(sys.argv[1:])\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print('LOADED', heavy, file=sys.stderr)\n"
    )
    offline = argv[0] in ("version", "manpage", "completion")
    extra = [] if offline else ["--socket", agent.socket]
    result = subprocess.run(
        [sys.executable, "-c", probe, *argv, *extra], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and "LOADED []" in result.stderr, result.stderr
