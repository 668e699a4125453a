"""A real Prometheus server (Debian's `prometheus`) in one of the harness's namespaces.

`monitor_host` adds a host to a started `Network`'s bridge that runs no gpud: Prometheus there
scrapes every node over the data path, and a partition between nodes does not cut it off from
either side. `Prometheus` writes its own config and TSDB under a work directory, listens on
that host's bridge address only (nothing outside the namespaces can reach it), and is stopped
by its own pid. The test process reaches its HTTP API through a socket opened inside the
namespace (`connect_in_netns`), so polling costs no client process per request.

`shortened_rules` copies a rules file with only the ``for:`` durations rewritten, so alerts
fire within a test's time while the expressions stay the shipped ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.harness.netns import NETNS_DIR, HarnessError, Host, Network
from tests.harness.wait import WaitAbort, wait_for

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PORT = 9090
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_CLONE_NEWNET = 0x40000000
_FOR_RE = re.compile(r"^(\s*for:\s*)\S+\s*$", re.MULTILINE)


def monitor_host(network: Network) -> Host:
    """One more host on ``network``'s bridge (the next address; not in ``network.hosts``, so no
    cluster joins it). `Network.close()` deletes it with the rest of the network's namespaces."""
    return network._add_host(len(network.hosts))


def connect_in_netns(netns: str, address: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection opened from inside ``netns``. setns() moves only the calling thread,
    and a socket keeps the namespace it was made in, so a throwaway thread does it."""
    done: dict[str, Any] = {}

    def dial() -> None:
        try:
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns into {netns}: {os.strerror(errno)}")
            finally:
                os.close(fd)
            done["sock"] = socket.create_connection(address, timeout=timeout)
        except OSError as exc:
            done["error"] = exc

    thread = threading.Thread(target=dial, name=f"dial-{netns}")
    thread.start()
    thread.join()
    if "error" in done:
        raise done["error"]
    return done["sock"]


class _NetnsConnection(http.client.HTTPConnection):
    def __init__(self, netns: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._netns = netns

    def connect(self) -> None:
        self.sock = connect_in_netns(self._netns, (self.host, self.port), self.timeout)


def shortened_rules(source: Path, dest: Path, for_s: int) -> Path:
    """Copy a rules file with every ``for:`` set to ``for_s`` seconds; nothing else changes."""
    text, count = _FOR_RE.subn(lambda m: f"{m.group(1)}{for_s}s", source.read_text())
    if count == 0:
        raise HarnessError(f"{source}: no `for:` durations to shorten")
    dest.write_text(text)
    return dest


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
    )


class Prometheus:
    """One Prometheus scraping ``targets`` ("ip:port") as job ``job`` with ``rules``, scrape
    and rule evaluation every ``interval_s``. Call `start()`; `close()` stops it by pid."""

    def __init__(
        self,
        host: Host,
        workdir: Path,
        targets: Sequence[str],
        rules: Path,
        *,
        job: str = "gpud",
        interval_s: int = 1,
        port: int = PORT,
    ) -> None:
        self.host = host
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.targets = list(targets)
        self.rules = rules
        self.job = job
        self.interval_s = interval_s
        self.port = port
        self.config_file = self.dir / "prometheus.yml"
        self.log_file = self.dir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def listen(self) -> str:
        return f"{self.host.addr}:{self.port}"

    def write_config(self) -> None:
        interval = f"{self.interval_s}s"
        config = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "rule_files": [str(self.rules)],
            "scrape_configs": [
                {"job_name": self.job, "static_configs": [{"targets": self.targets}]}
            ],
        }
        # JSON is YAML: no YAML writer needed for Prometheus' config.
        self.config_file.write_text(json.dumps(config, indent=2) + "\n")

    def start(self, timeout: float = START_TIMEOUT_S) -> Prometheus:
        if self.proc is not None:
            raise HarnessError(f"prometheus already started (pid {self.proc.pid})")
        self.write_config()
        with self.log_file.open("ab") as log:
            self.proc = self.host.popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.config_file}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address={self.listen}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise WaitAbort(f"prometheus exited with {self.proc.returncode}")
            return self._get("/-/ready")[0] == 200

        try:
            wait_for(ready, timeout, 0.2, what=f"prometheus ready on {self.listen}")
        except HarnessError as exc:
            raise type(exc)(f"{exc}\n--- {self.log_file} (tail) ---\n{self.log_tail()}") from None
        return self

    def _get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        conn = _NetnsConnection(self.host.netns, self.host.addr, self.port, timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the ``data`` of a success, else HarnessError with Prometheus'
        error text."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = self._get(f"/api/v1/{path}{query}")
        reply = json.loads(body)
        if status != 200 or reply.get("status") != "success":
            raise HarnessError(f"prometheus {path} {params}: {status} {reply.get('error')}")
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (a vector's samples, or a matrix's series)."""
        data = self.api("query", query=expr)
        result = data["result"]
        return result if data["resultType"] in ("vector", "matrix") else [{"value": result}]

    def alerts(self, name: str | None = None) -> list[dict[str, Any]]:
        """Pending and firing alerts (resolved ones are not listed)."""
        found = self.api("alerts")["alerts"]
        return [a for a in found if name is None or a["labels"]["alertname"] == name]

    def targets_up(self) -> bool:
        active = self.api("targets", state="active")["activeTargets"]
        return len(active) == len(self.targets) and all(t["health"] == "up" for t in active)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def close(self) -> None:
        """SIGTERM Prometheus' own pid (``ip netns exec`` execs it), then SIGKILL it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_TIMEOUT_S)
                return
