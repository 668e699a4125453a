"""The node's Ray process: `ray start --block` as gpud's own child, on leased ports.

One RaySupervisor runs at most one Ray node (head or worker). A new target (head, or worker
toward another head) restarts it at once; crashes restart it with backoff (gpud.process).
gpud stops Ray by signalling the process group it created; it never runs `ray stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import msgspec

from gpud import log
from gpud.process import ChildProcess, Supervisor, SupervisorStatus

_log = log.get("ray")

# Ports every Ray node needs, in lease order; the head adds the GCS and client-server ports.
WORKER_PORT_NAMES = (
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "dashboard-agent-grpc-port",
    "dashboard-agent-listen-port",
    "runtime-env-agent-port",
)


def port_names(role: Literal["head", "worker"], *, client_server: bool) -> tuple[str, ...]:
    """The port flags a Ray node of ``role`` gets (GCS and Ray Client server only on heads)."""
    if role == "worker":
        return WORKER_PORT_NAMES
    return ("port", *(["ray-client-server-port"] if client_server else []), *WORKER_PORT_NAMES)


# Worker processes (one port each) a Ray node may run at once.
DEFAULT_WORKER_PORTS = 64
# `ray health-check` imports Ray (about a second) and makes one GCS RPC.
HEALTH_CHECK_TIMEOUT_S = 20.0
READY_POLL_S = 0.5
TEMP_NAME_MAX = 24


class Lease(Protocol):
    @property
    def id(self) -> object: ...

    @property
    def ports(self) -> list[int]: ...


class PortLeaser(Protocol):
    """The slice of gpud.ports.service the Ray supervisor needs."""

    async def ready(self) -> None: ...

    async def lease(
        self, owner: str, count: int, *, contiguous: bool = False, pid: int | None = None
    ) -> Lease: ...

    async def release(self, lease_id: object) -> None: ...


class RayTarget(msgspec.Struct, kw_only=True, frozen=True):
    """What Ray process this node should run."""

    role: Literal["head", "worker"]
    # Worker only: the head's advertised address and GCS port.
    head_addr: str = ""
    gcs_port: int = 0
    # This node's address for Ray (--node-ip-address); empty: the supervisor's default. Part
    # of the target so that a changed advertised address restarts Ray on the new one.
    node_ip: str = ""


class RayPorts(msgspec.Struct, kw_only=True, frozen=True):
    # Flag name (without "--") -> port.
    named: dict[str, int]
    min_worker_port: int
    max_worker_port: int


class RayProcessStatus(msgspec.Struct, kw_only=True):
    target: RayTarget | None = None
    process: SupervisorStatus = msgspec.field(default_factory=SupervisorStatus)
    # Head only: the GCS port once GCS answers a health check (0 until then).
    gcs_ready_port: int = 0
    ports: RayPorts | None = None
    temp_dir: str = ""
    error: str | None = None


def temp_dir_for(root: str, node_name: str) -> str:
    """A short per-node temp dir: Ray's unix sockets live under it (107-byte path limit)."""
    # Ray adds ~62 bytes (/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store): with the
    # default root that leaves 24 bytes for the name. Long names keep a hash to stay unique.
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", node_name).lstrip(".") or "node"
    if len(safe) > TEMP_NAME_MAX or safe != node_name:
        digest = hashlib.blake2b(node_name.encode(), digest_size=4).hexdigest()
        safe = f"{safe[: TEMP_NAME_MAX - 9]}-{digest}"
    return os.path.join(root, safe)


def ray_start_argv(
    executable: str,
    target: RayTarget,
    ports: RayPorts,
    *,
    node_name: str,
    node_ip: str,
    temp_dir: str,
    num_cpus: int | None,
    num_gpus: int,
) -> list[str]:
    """The `ray start --block` command line for ``target``. Every port is explicit."""
    argv = [executable, "start", "--block"]
    if target.role == "head":
        argv += ["--head", "--include-dashboard=false"]
    else:
        argv.append(f"--address={target.head_addr}:{target.gcs_port}")
    argv += [
        f"--node-ip-address={node_ip}",
        f"--node-name={node_name}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--num-gpus={num_gpus}",
    ]
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus}")
    argv += [f"--{name}={port}" for name, port in ports.named.items()]
    argv += [
        f"--min-worker-port={ports.min_worker_port}",
        f"--max-worker-port={ports.max_worker_port}",
    ]
    return argv


async def _run_bounded(argv: Sequence[str], timeout_s: float) -> tuple[int | None, str]:
    """Run a short command in its own process group; (exit code or None on timeout, output)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return None, f"timed out after {timeout_s:.0f}s"
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    return proc.returncode, out.decode(errors="replace").strip()


class RayInstall(msgspec.Struct, kw_only=True):
    """What the configured `ray` executable can do."""

    # None when `ray --version` runs; otherwise why Ray is not available.
    reason: str | None = None
    version: str = ""
    # Ray Client (ray[client]) importable: then its server port must be passed explicitly,
    # or Ray binds 10001; without it `ray start` refuses the flag.
    client: bool = False


_CLIENT_PROBE = (
    "from ray._private.utils import get_ray_client_dependency_error as e; "
    "print('client' if e() is None else 'noclient')"
)


async def probe_ray(executable: str, timeout_s: float = 60.0) -> RayInstall:
    """Run `<executable> --version` (bounded) and check for Ray Client support."""
    resolved = shutil.which(executable)
    if resolved is None:
        return RayInstall(reason=f"ray executable {executable!r} not found")
    try:
        code, out = await _run_bounded([resolved, "--version"], timeout_s)
    except OSError as exc:
        return RayInstall(reason=f"ray executable {resolved} cannot run: {exc.strerror}")
    last = out.splitlines()[-1] if out else ""
    if code != 0:
        status = "timeout" if code is None else code
        return RayInstall(reason=f"`{resolved} --version` failed ({status}): {last}"[:300])
    python = python_of(resolved)
    client = True  # unknown interpreter: pass the port; Ray names the problem if it objects
    if python is not None:
        with contextlib.suppress(OSError):
            probe_code, probe_out = await _run_bounded([python, "-c", _CLIENT_PROBE], timeout_s)
            client = probe_code == 0 and probe_out.splitlines()[-1:] == ["client"]
    return RayInstall(version=last.removeprefix("ray, version ").strip(), client=client)


async def tcp_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def gcs_healthy(executable: str, host: str, port: int) -> bool:
    """GCS readiness: a TCP connect (cheap, filters the first second), then `ray health-check`,
    which opens a GcsClient and reads the cluster version from GCS's KV store over gRPC, so a
    GCS that accepts connections but cannot serve yet does not pass (KubeRay probes the same way).
    """
    if not await tcp_open(host, port):
        return False
    try:
        code, _ = await _run_bounded(
            [executable, "health-check", f"--address={host}:{port}"], HEALTH_CHECK_TIMEOUT_S
        )
    except OSError:
        return False
    return code == 0


_NODES_SCRIPT = """
import json, sys
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
client = GcsClient(address=sys.argv[1])
infos = client.get_all_node_info(
    timeout=float(sys.argv[2]), state_filter=GcsNodeInfo.GcsNodeState.ALIVE
).values()
print(json.dumps([
    {"name": i.node_name, "ip": i.node_manager_address, "head": i.is_head_node}
    for i in infos
]))
"""


class RayNode(msgspec.Struct, kw_only=True):
    name: str
    ip: str
    head: bool


def python_of(executable: str) -> str | None:
    """The interpreter of the `ray` console script (its shebang): it can import that Ray."""
    resolved = shutil.which(executable)
    if resolved is None:
        return None
    try:
        with open(resolved, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].decode(errors="replace").split()
    return parts[0] if parts and os.path.isabs(parts[0]) else None


async def alive_ray_nodes(
    executable: str,
    gcs_address: str,
    timeout_s: float = 10.0,
    *,
    argv_prefix: Sequence[str] = (),
) -> list[RayNode]:
    """The nodes GCS reports alive (one subprocess, bounded). Raises RuntimeError with a reason.
    ``argv_prefix`` runs the query through a wrapper (e.g. `ip netns exec NS`)."""
    python = python_of(executable)
    if python is None:
        raise RuntimeError(f"cannot find the Python interpreter of {executable!r}")
    code, out = await _run_bounded(
        [*argv_prefix, python, "-c", _NODES_SCRIPT, gcs_address, str(timeout_s)], timeout_s + 20
    )
    if code != 0:
        last = out.splitlines()[-1] if out else ""
        raise RuntimeError(f"asking GCS {gcs_address} for nodes failed: {last}"[:300])
    return msgspec.json.decode(out.splitlines()[-1], type=list[RayNode])


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class RaySupervisor:
    """Runs the Ray node of ``target``; restart on target change, backoff on crashes."""

    def __init__(
        self,
        *,
        executable: str,
        node_name: str,
        node_ip: str,
        ports: PortLeaser,
        temp_root: str = "/tmp/gpud-ray",
        num_cpus: int | None = None,
        num_gpus: int = 0,
        env: dict[str, str] | None = None,
        worker_ports: int = DEFAULT_WORKER_PORTS,
        client_server: bool = True,
        on_change: Callable[[], None] | None = None,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        grace_s: float = 10.0,
    ) -> None:
        self.executable = executable
        self.node_name = node_name
        self.node_ip = node_ip
        self._ports = ports
        self.temp_dir = temp_dir_for(temp_root, node_name)
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self._env = {**os.environ, **(env or {})}
        self._worker_ports = worker_ports
        # Whether this Ray has Ray Client (see RayInstall.client).
        self.client_server = client_server
        self._on_change = on_change or (lambda: None)
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._grace_s = grace_s
        self._target: RayTarget | None = None
        self._target_changed = asyncio.Event()
        self._supervisor: Supervisor | None = None
        self._leases: list[object] = []
        self._ray_ports: RayPorts | None = None
        self._gcs_ready_port = 0
        self._error: str | None = None

    @property
    def target(self) -> RayTarget | None:
        return self._target

    @property
    def gcs_ready_port(self) -> int:
        return self._gcs_ready_port

    @property
    def ray_ports(self) -> RayPorts | None:
        return self._ray_ports

    def set_target(self, target: RayTarget | None) -> None:
        """Run ``target`` (None: no Ray). A changed target restarts Ray at once."""
        if target != self._target:
            log.info(_log, "ray target", target=str(target))
            self._target = target
            self._target_changed.set()

    def status(self) -> RayProcessStatus:
        process = self._supervisor.status if self._supervisor else SupervisorStatus()
        return RayProcessStatus(
            target=self._target,
            process=msgspec.structs.replace(process),
            gcs_ready_port=self._gcs_ready_port,
            ports=self._ray_ports,
            temp_dir=self.temp_dir,
            error=self._error,
        )

    async def run(self) -> None:
        try:
            while True:
                self._target_changed.clear()
                target = self._target
                if target is None:
                    await self._target_changed.wait()
                    continue
                try:
                    async with asyncio.TaskGroup() as tg:
                        run_task = tg.create_task(self._run_target(target))
                        await self._target_changed.wait()
                        run_task.cancel()
                except* Exception as group:
                    self._error = f"cannot run Ray: {_first_leaf(group)}"
                    log.error(_log, "cannot run ray", error=self._error)
                    await asyncio.sleep(self._backoff[0])
                    self._target_changed.set()
                finally:
                    # A worker whose head changed has nothing to drain: kill it now, so it
                    # joins the new head at once instead of draining for Ray's 30 s.
                    await self._teardown(fast=target.role == "worker" and self._target != target)
        finally:
            await self._teardown()

    async def _run_target(self, target: RayTarget) -> None:
        await self._ports.ready()
        self._ray_ports = await self._lease_ports(target)
        self._error = None
        argv = ray_start_argv(
            self.executable,
            target,
            self._ray_ports,
            node_name=self.node_name,
            node_ip=target.node_ip or self.node_ip,
            temp_dir=self.temp_dir,
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
        )

        async def make_child() -> ChildProcess:
            os.makedirs(self.temp_dir, exist_ok=True)
            return ChildProcess(f"ray-{target.role}", argv, env=self._env)

        self._supervisor = Supervisor(
            f"ray-{target.role}",
            make_child,
            backoff_initial_s=self._backoff[0],
            backoff_max_s=self._backoff[1],
            grace_s=self._grace_s,
        )
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._supervisor.run())
            if target.role == "head":
                tg.create_task(
                    self._watch_gcs(
                        self._supervisor,
                        target.node_ip or self.node_ip,
                        self._ray_ports.named["port"],
                    )
                )

    async def _lease_ports(self, target: RayTarget) -> RayPorts:
        names = port_names(target.role, client_server=self.client_server)
        owner = f"ray-{target.role}"
        single = await self._ports.lease(owner, len(names))
        self._leases.append(single.id)
        workers = await self._ports.lease(f"{owner}-workers", self._worker_ports, contiguous=True)
        self._leases.append(workers.id)
        return RayPorts(
            named=dict(zip(names, single.ports, strict=True)),
            min_worker_port=min(workers.ports),
            max_worker_port=max(workers.ports),
        )

    async def _watch_gcs(self, supervisor: Supervisor, host: str, port: int) -> None:
        """Keep gcs_ready_port current: set once GCS answers, cleared when the process goes."""
        ready_pid: int | None = None
        began = time.monotonic()
        while True:
            pid = supervisor.status.pid
            if pid != ready_pid:
                ready_pid = None
                self._set_ready(0)
            if pid is not None and ready_pid is None:
                healthy = await gcs_healthy(self.executable, host, port)
                if healthy and supervisor.status.pid == pid:
                    ready_pid = pid
                    self._set_ready(port)
                    log.info(_log, "gcs ready", port=port, after_s=round(time.monotonic() - began))
            await asyncio.sleep(READY_POLL_S)

    def _set_ready(self, port: int) -> None:
        if port != self._gcs_ready_port:
            self._gcs_ready_port = port
            self._on_change()

    async def _teardown(self, *, fast: bool = False) -> None:
        if self._supervisor is not None:
            if fast and self._supervisor.child is not None:
                self._supervisor.child.signal_group(signal.SIGKILL)
            await self._supervisor.stop()
        self._set_ready(0)
        leases, self._leases = self._leases, []
        for lease_id in leases:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._ports.release(lease_id))
        self._ray_ports = None
