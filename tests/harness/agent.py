"""One real `gpud agent` process (real serf child) on loopback ports, with its own sd_notify
socket: what systemd would see (READY=, STATUS=, WATCHDOG=), its log and its local API."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpud import client
from tests.harness.config import merge, to_toml
from tests.harness.netns import kill_process_tree
from tests.harness.serf import free_ports


def solo_config(
    tmp: Path, ports: tuple[int, int, int], **sections: dict[str, Any]
) -> dict[str, Any]:
    """The config of a `gpud agent` alone in its cluster on loopback: serf, RPC and peer
    ``ports``, state and runtime dirs under ``tmp``, a small unreserved port range, no Ray;
    ``sections`` merged over it."""
    serf_port, rpc_port, peer_port = ports
    base = {
        "node": {"name": "solo", "advertise": "127.0.0.1"},
        "cluster": {"insecure": True},
        "serf": {"bind_port": serf_port, "rpc_port": rpc_port},
        "peer": {"port": peer_port},
        "paths": {"state_dir": str(tmp / "state"), "runtime_dir": str(tmp / "run")},
        "ports": {
            "range_start": 24000,
            "range_end": 24400,
            "block_size": 100,
            "reserve": False,
            "settle_s": 0.5,
        },
        "ray": {"enabled": False},
    }
    return merge(base, sections)


class RunningAgent:
    """A started agent alone in its cluster; `stop` kills its whole process tree."""

    def __init__(self, tmp: Path) -> None:
        serf_port, rpc_port, peer_port = free_ports(3)
        self.socket_path = str(tmp / "run" / "gpud.sock")
        self.config_path = tmp / "gpud.toml"
        self.config_path.write_text(to_toml(solo_config(tmp, (serf_port, rpc_port, peer_port))))
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
