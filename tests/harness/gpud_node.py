"""Real gpud daemons (each with its real serf child) in the harness's namespaces.

`GpudNode` writes a per-node TOML config, runs ``<python> -m gpud agent --config FILE`` in its
host's namespace (own process group, output to ``<dir>/gpud.log``) and talks to it through
``gpud status --json`` (the CLI, end to end) or directly over the Unix socket (`api`, cheap
enough for polling). `Cluster` is a `Network` plus one node per host.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import msgspec

from gpud import client, secret
from gpud.tags import Tags
from tests.harness.config import merge, to_toml
from tests.harness.netns import HarnessError, Host, Network, children_of, group_alive
from tests.harness.wait import WaitAbort, WaitTimeout, wait_for

__all__ = ["Cluster", "GpudNode", "HarnessError", "WaitAbort", "WaitTimeout", "wait_for"]

SERF_PORT = 7946
RPC_PORT = 7373
PEER_PORT = 7948
START_TIMEOUT_S = 30.0
# gpud's own stop may take Ray's full grace (a head draining on SIGTERM: 10 s) plus serf's
# leave; the unit allows 90 s.
STOP_TIMEOUT_S = 30.0
# Unix socket paths are limited to 107 bytes; keep ours well inside.
MAX_SOCKET_PATH = 100

T = TypeVar("T")


class GpudNode:
    """One gpud agent in ``host``'s namespace. Call `start()` (or use as a context manager)."""

    def __init__(
        self,
        host: Host,
        workdir: Path,
        *,
        key: str,
        join: Sequence[str] = (),
        name: str | None = None,
        serf_port: int = SERF_PORT,
        rpc_port: int = RPC_PORT,
        peer_port: int = PEER_PORT,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.host = host
        self.name = name or host.name
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key_file = self.dir / "cluster.key"
        self.key_file.write_text(key + "\n")
        self.key_file.chmod(0o600)
        self.config_file = self.dir / "gpud.toml"
        self.log_file = self.dir / "gpud.log"
        runtime = self.dir / "run"
        if len(str(runtime / "gpud.sock")) > MAX_SOCKET_PATH:
            runtime = Path(tempfile.mkdtemp(prefix="ghrun-"))
            self._own_runtime: Path | None = runtime
        else:
            self._own_runtime = None
        self.socket = str(runtime / "gpud.sock")
        self.serf_port = serf_port
        self.peer_port = peer_port
        self.config: dict[str, Any] = merge(
            {
                "log_level": "debug",
                "node": {"name": self.name, "advertise": host.advertise_addr},
                "cluster": {"name": "gpud-harness", "key_file": str(self.key_file)},
                "serf": {
                    "bind_port": serf_port,
                    "rpc_port": rpc_port,
                    "retry_join": list(join),
                    "retry_interval_s": 1.0,
                    "leave_timeout_s": 2.0,
                },
                "api": {"socket": self.socket, "socket_group": "root"},
                "paths": {"state_dir": str(self.dir / "state"), "runtime_dir": str(runtime)},
                "peer": {"port": peer_port},
                "health": {"interval_s": 1.0, "timeout_s": 0.5},
                "ports": {"settle_s": 1.0},
                "ray": {"enabled": False},
            },
            overrides or {},
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"GpudNode({self.name!r} on {self.host.netns}, pid={self.pid})"

    @property
    def addr(self) -> str:
        return self.host.advertise_addr

    @property
    def join_addr(self) -> str:
        """What other nodes put in serf.retry_join to reach this one."""
        return f"{self.addr}:{self.serf_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write_config(self) -> None:
        self.config_file.write_text(to_toml(self.config))

    def start(self, timeout: float = START_TIMEOUT_S) -> Self:
        if self.running():
            raise HarnessError(f"{self.name}: already running (pid {self.pid})")
        self.write_config()
        with self.log_file.open("ab") as log:
            log.write(f"==== harness: starting gpud at {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.proc = self.host.popen(
                [sys.executable, "-m", "gpud", "agent", "--config", str(self.config_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        def ready() -> bool:
            if not self.running():
                raise WaitAbort(
                    f"{self.name}: gpud exited with {self.proc and self.proc.returncode}"
                )
            self.api("/v1/status", timeout=2.0)
            return True

        try:
            wait_for(ready, timeout, 0.2, what=f"{self.name}'s API on {self.socket}")
        except (WaitTimeout, WaitAbort) as exc:
            raise type(exc)(f"{exc}\n--- {self.log_file} (tail) ---\n{self.log_tail()}") from None

    def api(self, path: str, *, timeout: float = 5.0) -> Any:
        """GET ``path`` on the local API directly (no CLI process; for polling)."""
        return client.request(self.socket, "GET", path, timeout=timeout)

    def cli(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``<python> -m gpud ARGS --socket SOCK`` in the node's namespace."""
        return self.host.run(
            [sys.executable, "-m", "gpud", *args, "--socket", self.socket],
            check=check,
            timeout=timeout,
        )

    def status(self) -> dict[str, Any]:
        """``gpud status --json`` through the CLI, parsed."""
        return json.loads(self.cli("status", "--json").stdout)

    def status_text(self) -> str:
        return self.cli("status").stdout

    def members(self) -> list[dict[str, Any]]:
        """The members list of /v1/status (same data as ``gpud status --json``)."""
        return self.api("/v1/status")["members"]

    def member_tags(self, name: str) -> Tags | None:
        """Member ``name``'s tags as this node sees them (None: not a member or no tags)."""
        for m in self.members():
            if m["name"] == name and m.get("tags") is not None:
                return msgspec.convert(m["tags"], Tags)
        return None

    def alive_members(self) -> set[str]:
        return {m["name"] for m in self.members() if m.get("status") == "alive"}

    def _groups(self) -> list[int]:
        """gpud's process group and those of its descendants (serf runs in its own group)."""
        if self.proc is None:
            return []
        groups = [self.proc.pid]
        for child in children_of(self.proc.pid):
            with contextlib.suppress(OSError):
                pgid = os.getpgid(child)
                if pgid not in groups:
                    groups.append(pgid)
        return groups

    def kill9(self) -> None:
        """SIGKILL gpud and its children (serf), as if the host's daemon crashed hard."""
        if self.proc is None:
            return
        for pgid in self._groups():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT_S)

    def serf_pid(self) -> int | None:
        if self.proc is None:
            return None
        binary = os.path.basename(self.config["serf"].get("binary", "serf"))
        for child in children_of(self.proc.pid):
            with contextlib.suppress(OSError):
                argv0 = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0].decode()
                if os.path.basename(argv0) == binary:
                    return child
        return None

    def kill9_serf(self) -> int:
        """SIGKILL gpud's serf child (found among gpud's descendants). Returns its pid."""
        pid = self.serf_pid()
        if pid is None:
            raise HarnessError(f"{self.name}: no serf child of gpud pid {self.pid}")
        os.kill(pid, signal.SIGKILL)
        return pid

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM gpud's pid only (a graceful stop) and wait for it; returns the exit code."""
        if not self.running():
            return self.proc.returncode if self.proc else None
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(
                f"{self.name}: gpud did not exit {timeout}s after SIGTERM\n{self.log_tail()}"
            ) from None

    def restart(self, timeout: float = START_TIMEOUT_S) -> Self:
        self.terminate()
        self.reap_children()
        return self.start(timeout)

    def reap_children(self) -> None:
        """After gpud is gone, SIGKILL whatever of its process groups is still alive."""
        if self.proc is None:
            return
        ours = {os.stat(f"/run/netns/{self.host.netns}").st_ino}
        for pgid in self._groups():
            if group_alive(pgid, ours):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def close(self) -> None:
        """Stop gpud (SIGTERM, then SIGKILL of its groups); Network.close() catches the rest."""
        if self.running():
            try:
                self.terminate(timeout=STOP_TIMEOUT_S)
            except HarnessError:
                self.kill9()
        self.reap_children()
        if self._own_runtime is not None:
            shutil.rmtree(self._own_runtime, ignore_errors=True)


class Cluster:
    """A Network of ``size`` hosts with one GpudNode each, every node joining all others.

    ``overrides`` is merged into every node's config; ``node_overrides[i]`` into node i's."""

    def __init__(
        self,
        size: int = 3,
        *,
        workdir: Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        node_overrides: Mapping[int, Mapping[str, Any]] | None = None,
        start_timeout: float = START_TIMEOUT_S,
        keep_workdir: bool = False,
    ) -> None:
        self.network = Network(size)
        self.key = secret.keygen()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="gpud-harness-"))
        self.overrides = overrides or {}
        self.node_overrides = node_overrides or {}
        self.start_timeout = start_timeout
        self.keep_workdir = keep_workdir
        self.nodes: list[GpudNode] = []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, index: int) -> GpudNode:
        return self.nodes[index]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.nodes)

    @property
    def hosts(self) -> list[Host]:
        return self.network.hosts

    def start(self) -> Self:
        try:
            self.network.start()
            for i, host in enumerate(self.hosts):
                self.add_node(host, overrides=self.node_overrides.get(i, {}), start=False)
            for node in self.nodes:
                node.start(self.start_timeout)
        except BaseException:
            self.close()
            raise
        return self

    def add_node(
        self,
        host: Host,
        *,
        overrides: Mapping[str, Any] | None = None,
        start: bool = True,
        **kwargs: Any,
    ) -> GpudNode:
        """Add a node on ``host`` (e.g. a faults.port_mapped_host) that joins every existing node."""
        node = GpudNode(
            host,
            self.workdir / host.name,
            key=self.key,
            join=self._join_list(host),
            overrides=merge(self.overrides, overrides or {}),
            **kwargs,
        )
        self.nodes.append(node)
        if start:
            node.start(self.start_timeout)
        return node

    def _join_list(self, host: Host) -> list[str]:
        """Existing nodes' serf addresses, plus every other host at the default serf port."""
        join = [node.join_addr for node in self.nodes if node.host is not host]
        for other in self.hosts:
            entry = f"{other.advertise_addr}:{SERF_PORT}"
            if other is not host and entry not in join:
                join.append(entry)
        return join

    def describe(self) -> str:
        """Each running node's member view, for failure messages."""
        out = []
        for node in self.nodes:
            try:
                view = [(m["name"], m["addr"], m["status"]) for m in node.members()]
            except Exception as exc:
                view = f"<{type(exc).__name__}: {exc}>"  # type: ignore[assignment]
            out.append(f"{node.name} ({node.addr}) sees {view}")
        return "\n".join(out)

    def converged(self, expected: int | None = None) -> bool:
        want = len(self.nodes) if expected is None else expected
        return all(len(node.alive_members()) == want for node in self.nodes if node.running())

    def wait_converged(self, timeout: float = 60.0, expected: int | None = None) -> None:
        """Until every running node sees ``expected`` (default: all) members alive."""
        wait_for(
            lambda: self.converged(expected),
            timeout,
            0.5,
            what=f"{expected or len(self.nodes)} alive members on every node",
            describe=self.describe,
        )

    def wait_placeable(self, timeout: float = 60.0) -> None:
        """Until every running node's placement may use every node (alive, health passing,
        verified, GPU verdict in): only then does a new deployment spread over all of them."""
        want = len(self.nodes)
        wait_for(
            lambda: all(
                node.api("/v1/status")["deployments"]["placeable_nodes"] == want
                for node in self.nodes
                if node.running()
            ),
            timeout,
            0.5,
            what=f"{want} placeable nodes on every node",
            describe=lambda: ", ".join(
                f"{n.name}: {n.api('/v1/status')['deployments']['placeable_nodes']}"
                for n in self.nodes
                if n.running()
            ),
        )

    def close(self) -> None:
        try:
            for node in self.nodes:
                with contextlib.suppress(Exception):
                    node.close()
        finally:
            self.network.close()
            if self._own_workdir and not self.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)


def problems(node: GpudNode, code: str, *, path: str = "/v1/status") -> list[dict[str, Any]]:
    """The problems with ``code`` in ``node``'s status (or /v1/doctor: ``path``); the timeout
    allows for a doctor run's checks."""
    return [p for p in node.api(path, timeout=30.0)["problems"] if p["code"] == code]
