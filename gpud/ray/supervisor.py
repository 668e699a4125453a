"""The node's Ray process: `ray start --block` as gpud's own child, on leased ports.

One RaySupervisor runs at most one Ray node (head or worker). A new target (head, or worker
toward another head) restarts it at once; crashes restart it with backoff (gpud.process).
gpud stops Ray by signalling the process group it created; it never runs `ray stop`. That
group is persisted (``record``): a Ray node a crashed gpud left running is stopped before
this one starts another, so one gpud node never runs two Ray nodes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from typing import Literal, Protocol

import msgspec

from gpud import log
from gpud.gpus.nvml import cuda_env
from gpud.process import (
    ChildGroup,
    ChildProcess,
    GroupRecord,
    Supervisor,
    SupervisorStatus,
    stop_leftover,
)
from gpud.ray.probes import gcs_serving
from gpud.state import Key

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


# Ports Ray takes only from its environment, head only: the autoscaler monitor serves its
# metrics on AUTOSCALER_METRIC_PORT (a fixed 44217 by default) whenever prometheus_client is
# importable, so two heads on one host would collide there and it would sit outside the lease.
HEAD_ENV_PORT_NAMES = ("AUTOSCALER_METRIC_PORT",)


def port_names(role: Literal["head", "worker"], *, client_server: bool) -> tuple[str, ...]:
    """The port flags a Ray node of ``role`` gets (GCS and Ray Client server only on heads)."""
    if role == "worker":
        return WORKER_PORT_NAMES
    return ("port", *(["ray-client-server-port"] if client_server else []), *WORKER_PORT_NAMES)


# The running Ray node's process group (see GroupRecord): one gpud node, one Ray node.
RAY_CHILD = Key("ray.child", ChildGroup)
# Worker processes (one port each) a Ray node may run at once.
DEFAULT_WORKER_PORTS = 64
# A GCS readiness check is one connect and an HTTP/2 preface (milliseconds): poll often.
READY_POLL_S = 0.2
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


class SupervisorSettings(msgspec.Struct, kw_only=True, frozen=True):
    """How the Ray process is run; tests and benches pass smaller values."""

    # Worker processes (one leased port each) the Ray node may run at once.
    worker_ports: int = DEFAULT_WORKER_PORTS
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    # SIGTERM to SIGKILL when stopping Ray (Ray drains for up to 30 s on its own).
    grace_s: float = 10.0


class RayTarget(msgspec.Struct, kw_only=True, frozen=True):
    """What Ray process this node should run."""

    role: Literal["head", "worker"]
    # Worker only: the head's advertised address and GCS port.
    head_addr: str = ""
    gcs_port: int = 0
    # This node's address for Ray (--node-ip-address); empty: the supervisor's default. Part
    # of the target so that a changed advertised address restarts Ray on the new one.
    node_ip: str = ""
    # The GPUs this Ray node may use, as NVML indices (resolved from the leased UUIDs):
    # CUDA_VISIBLE_DEVICES and --num-gpus. Ray hands these entries verbatim to the workers it
    # gives GPUs, and vLLM's workers int() them. None: the supervisor's num_gpus and the
    # environment's devices. Part of the target so that a GPU turning unhealthy or leased to
    # a deployment restarts Ray without it.
    gpus: tuple[int, ...] | None = None


class RayPorts(msgspec.Struct, kw_only=True, frozen=True):
    # Flag name (without "--") -> port.
    named: dict[str, int]
    min_worker_port: int
    max_worker_port: int
    # Environment variable -> port (HEAD_ENV_PORT_NAMES).
    env: dict[str, int] = {}


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


def ray_start_env(
    base: Mapping[str, str], target: RayTarget, ports: RayPorts | None = None
) -> dict[str, str]:
    """The environment of `ray start` for ``target``: its GPUs as NVML indices in PCI bus
    order (the raylet's CUDA_VISIBLE_DEVICES entries are what its GPU workers get), and the
    leased ports Ray reads from its environment."""
    env = {**base, **cuda_env(target.gpus)} if target.gpus is not None else dict(base)
    if ports is not None:
        env.update({name: str(port) for name, port in ports.env.items()})
    return env


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
        f"--num-gpus={len(target.gpus) if target.gpus is not None else num_gpus}",
    ]
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus}")
    argv += [f"--{name}={port}" for name, port in ports.named.items()]
    argv += [
        f"--min-worker-port={ports.min_worker_port}",
        f"--max-worker-port={ports.max_worker_port}",
    ]
    return argv


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
        client_server: bool = True,
        on_change: Callable[[], None] | None = None,
        settings: SupervisorSettings | None = None,
        record: GroupRecord | None = None,
    ) -> None:
        self.executable = executable
        self.node_name = node_name
        self.node_ip = node_ip
        self._ports = ports
        self.temp_dir = temp_dir_for(temp_root, node_name)
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self._env = {**os.environ, **(env or {})}
        # Whether this Ray has Ray Client (see RayInstall.client).
        self.client_server = client_server
        self._on_change = on_change or (lambda: None)
        self.settings = settings or SupervisorSettings()
        self._record = record
        # Failures (monotonic times) and restarts of the Ray processes of earlier targets.
        self._past_failures: collections.deque[float] = collections.deque(maxlen=64)
        self._past_restarts = 0
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

    @property
    def restarts_total(self) -> int:
        """Restarts of Ray since gpud started, over every target."""
        current = self._supervisor.status.restarts if self._supervisor else 0
        return self._past_restarts + current

    def failures_within(self, window_s: float) -> int:
        """How often Ray exited on its own or could not start in the last ``window_s``."""
        since = time.monotonic() - window_s
        current = self._supervisor.failures if self._supervisor else ()
        return sum(1 for t in (*self._past_failures, *current) if t >= since)

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
        if self._record is not None:
            await stop_leftover(self._record, self.settings.grace_s)
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
                        # The target changed: a worker whose head changed has nothing to
                        # drain, and a head that steps down (lease) must stop serving before
                        # a successor is elected. Kill it now, before cancelling: the process
                        # supervisor's own stop would give it the full grace. Only gpud's own
                        # exit (cancellation) stops Ray gracefully.
                        self._kill_now()
                        run_task.cancel()
                except* Exception as group:
                    self._error = f"cannot run Ray: {_first_leaf(group)}"
                    log.error(_log, "cannot run ray", error=self._error)
                    await asyncio.sleep(self.settings.backoff_initial_s)
                    self._target_changed.set()
                finally:
                    await self._teardown()
        finally:
            await self._teardown()

    async def _run_target(self, target: RayTarget) -> None:
        await self._ports.ready()
        self._ray_ports = ports = await self._lease_ports(target)
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
            return ChildProcess(
                f"ray-{target.role}", argv, env=ray_start_env(self._env, target, ports)
            )

        self._supervisor = Supervisor(
            f"ray-{target.role}",
            make_child,
            backoff_initial_s=self.settings.backoff_initial_s,
            backoff_max_s=self.settings.backoff_max_s,
            grace_s=self.settings.grace_s,
            record=self._record,
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
        # Owned by this gpud (pid and start time): after any crash of it, power-cut style
        # included, the zombie scan frees them; the next gpud stops the leftover Ray group
        # first (GroupRecord) and leases anew. Unowned leases piled up until the block was full.
        me = os.getpid()
        env_names = HEAD_ENV_PORT_NAMES if target.role == "head" else ()
        single = await self._ports.lease(owner, len(names) + len(env_names), pid=me)
        self._leases.append(single.id)
        workers = await self._ports.lease(
            f"{owner}-workers", self.settings.worker_ports, contiguous=True, pid=me
        )
        self._leases.append(workers.id)
        return RayPorts(
            named=dict(zip(names, single.ports[: len(names)], strict=True)),
            env=dict(zip(env_names, single.ports[len(names) :], strict=True)),
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
                healthy = await gcs_serving(host, port)
                if healthy and supervisor.status.pid == pid:
                    ready_pid = pid
                    self._set_ready(port)
                    log.info(_log, "gcs ready", port=port, after_s=round(time.monotonic() - began))
            await asyncio.sleep(READY_POLL_S)

    def _set_ready(self, port: int) -> None:
        if port != self._gcs_ready_port:
            self._gcs_ready_port = port
            self._on_change()

    def _kill_now(self) -> None:
        if self._supervisor is not None and self._supervisor.child is not None:
            self._supervisor.child.signal_group(signal.SIGKILL)

    async def _teardown(self) -> None:
        if self._supervisor is not None:
            await self._supervisor.stop()
            self._past_failures.extend(self._supervisor.failures)
            self._past_restarts += self._supervisor.status.restarts
            self._supervisor = None
        self._set_ready(0)
        leases, self._leases = self._leases, []
        for lease_id in leases:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._ports.release(lease_id))
        self._ray_ports = None
