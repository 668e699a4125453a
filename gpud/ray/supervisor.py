"""The node's Ray process: `ray start --block` as gpud's own child, on leased ports.

One RaySupervisor runs at most one Ray node (head or worker). A new target (head, or worker
toward another head) restarts it at once; crashes restart it with backoff (gpud.process).
gpud stops Ray by signalling the process group it created; it never runs `ray stop`. That
group is persisted (``record``), so one gpud node never runs two Ray nodes.

With ``adoption`` (the cluster-wide Ray node) Ray outlives gpud: it writes to a rotated file
under the state directory, a graceful stop of gpud leaves it running, and what it was started
for (target, ports, the leases holding them: `RayRun`) is persisted beside its group. The next
gpud adopts it (`adoption_refusal` says what must hold: the recorded leader by pid, start time
and group, the command line this gpud would run for that target and those ports, the leases
still held, a head's GCS answering), moves its leases to itself and waits on it through a
pidfd. What it cannot verify it stops, exactly that group, and releases its leases.
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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol

import msgspec

from gpud import log
from gpud.gpus.nvml import cuda_env
from gpud.process import ChildProcess, Supervisor, SupervisorStatus
from gpud.process_groups import (
    ChildGroup,
    GroupStore,
    argv_matches,
    cmdline,
    leader_verified,
    stop_leftover,
)
from gpud.ray.probes import gcs_serving
from gpud.state import Key, StateStore

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


# Ray's raylet connects to its plasma store's socket, and each core worker to its raylet, in up
# to raylet_client_num_connect_attempts tries raylet_client_connect_timeout_milliseconds apart.
# Ray's 10 x 1000 ms makes every raylet start wait a whole second for a store that listens
# milliseconds later (measured: a worker's `ray start` 2.66 s, 1.57 s with these); 200 x 50 ms
# keeps Ray's 10 s budget for a slow store. Values in gpud's environment win.
RAY_START_DEFAULTS = {
    "RAY_raylet_client_connect_timeout_milliseconds": "50",
    "RAY_raylet_client_num_connect_attempts": "200",
}

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


class RayRun(msgspec.Struct, kw_only=True, frozen=True):
    """What the running Ray node was started for, persisted beside its process group (before
    it starts, so leases leased for a start that never happened are found too)."""

    target: RayTarget
    ports: RayPorts
    leases: list[str]


# The cluster-wide Ray node's RayRun (its process group is RAY_CHILD).
RAY_RUN = Key("ray.run", RayRun)


class RayAdoption:
    """What lets a Ray node outlive gpud: where its output goes, where its RayRun is kept
    (``load`` and ``save``: one state-store key or row per Ray node), and how its port leases
    move to the gpud that adopts it."""

    def __init__(
        self,
        load: Callable[[], RayRun | None],
        save: Callable[[RayRun | None], None],
        log_path: Path,
        transfer: Callable[[str, int], Awaitable[None]],
        held: Callable[[], set[str]],
    ) -> None:
        self.load = load
        self.save = save
        self.log_path = log_path
        # Make the running process (a pid) the owner of a lease; the ids of the leases held now.
        self.transfer = transfer
        self.held = held

    @classmethod
    def under_key(
        cls,
        store: StateStore,
        key: Key[RayRun],
        log_path: Path,
        transfer: Callable[[str, int], Awaitable[None]],
        held: Callable[[], set[str]],
    ) -> RayAdoption:
        """The RayRun kept under one key of the state store."""
        return cls(
            lambda: store.get(key), lambda run: store.put(key, run), log_path, transfer, held
        )


def adoption_refusal(
    run: RayRun | None,
    group: ChildGroup | None,
    *,
    leader_ok: bool,
    argv: Sequence[str],
    cmdline: Sequence[str] | None,
    held: set[str],
    gcs_ok: bool | None,
) -> str | None:
    """Why the recorded Ray node may not be adopted, or None when it may (pure).

    ``leader_ok``: the recorded leader still runs (pid, start time, group); ``argv``: the
    command line this gpud would run for the recorded target and ports; ``cmdline``: the
    leader's (None: unreadable); ``held``: the lease ids the port service holds; ``gcs_ok``:
    a head's GCS answers (None: not asked, a worker)."""
    if run is None:
        return "no recorded Ray node"
    if group is None:
        return "no recorded process group"
    if not leader_ok:
        return "its recorded leader is not that process"
    if cmdline is None or not argv_matches(cmdline, argv):
        return "another command line (config or ports changed)"
    missing = sorted(set(run.leases) - held)
    if missing:
        return f"its port leases are gone ({', '.join(missing)})"
    if run.target.role == "head" and not gcs_ok:
        return "its GCS does not answer"
    return None


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


# `ray start` writes its GCS address into this file of its temp dir once its node is up, head
# and worker alike (after Ray's Node.__init__, which waits until the node's raylet is
# registered in the GCS). The supervisor removes it before each start.
RAY_ADDRESS_FILE = "ray_current_cluster"


def node_registered(temp_dir: str, gcs_address: str) -> bool:
    """Whether the `ray start` writing into ``temp_dir`` has its node registered in the GCS
    at ``gcs_address`` ("host:port"; IPv6 hosts in brackets, as Ray writes them).

    A head's GCS answers well before that: it writes the session name, starts its other
    processes and only then registers its raylet. A worker's `ray start` first reads the
    session name and the head node's record from the GCS, and sleeps 2 s before it asks
    again when either is missing; announced at its first answer, a new head's GCS cost every
    worker those 2 s of a failover."""
    try:
        return Path(temp_dir, RAY_ADDRESS_FILE).read_text() == gcs_address
    except OSError:
        return False


def gcs_address_of(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        record: GroupStore | None = None,
        adoption: RayAdoption | None = None,
    ) -> None:
        self.executable = executable
        self.node_name = node_name
        self.node_ip = node_ip
        self._ports = ports
        self.temp_dir = temp_dir_for(temp_root, node_name)
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self._env = {**RAY_START_DEFAULTS, **os.environ, **(env or {})}
        # Whether this Ray has Ray Client (see RayInstall.client).
        self.client_server = client_server
        self._on_change = on_change or (lambda: None)
        self.settings = settings or SupervisorSettings()
        self._record = record
        self._adoption = adoption
        # gpud's own exit leaves a file-logged Ray node to the next gpud (until stop_on_cancel).
        self._keep_on_cancel = adoption is not None
        # Set once a predecessor's Ray node was adopted or stopped (`settle`).
        self.settled = asyncio.Event()
        # When (monotonic) this gpud adopted its predecessor's Ray node; 0: it did not.
        self.adopted_at = 0.0
        self._adopted: ChildProcess | None = None
        # Set once gpud's exit left the Ray node running for the next gpud.
        self.left_running = False
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

    async def settle(self) -> bool:
        """What a predecessor left: adopt its Ray node, or stop it (exactly its group) and
        release its leases. Once; `run` does it first unless a caller did. Whether adopted."""
        if self.settled.is_set():
            return self.adopted_at > 0
        adopted = await self._adopt()
        if not adopted and self._record is not None:
            await stop_leftover(self._record, self.settings.grace_s)
            await self._release_recorded()
        self.settled.set()
        return adopted

    def stop_on_cancel(self) -> None:
        """A later cancel of `run` stops Ray (its workload is going away), never leaves it."""
        self._keep_on_cancel = False
        if self._supervisor is not None:
            self._supervisor.stop_on_cancel()

    @property
    def lease_ids(self) -> list[str]:
        """The port leases the running Ray node holds."""
        return [str(lease_id) for lease_id in self._leases]

    async def run(self) -> None:
        await self.settle()
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
                        # exit (cancellation) stops Ray gracefully, or leaves it running.
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

    def _argv(self, target: RayTarget, ports: RayPorts) -> list[str]:
        return ray_start_argv(
            self.executable,
            target,
            ports,
            node_name=self.node_name,
            node_ip=target.node_ip or self.node_ip,
            temp_dir=self.temp_dir,
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
        )

    def _child(self, target: RayTarget, ports: RayPorts) -> ChildProcess:
        return ChildProcess(
            f"ray-{target.role}",
            self._argv(target, ports),
            env=ray_start_env(self._env, target, ports),
            log_path=self._adoption.log_path if self._adoption is not None else None,
        )

    async def _adopt(self) -> bool:
        """Adopt the Ray node a previous gpud left running, when it verifies (module
        docstring): it becomes the current target, its ports and leases this run's."""
        if self._adoption is None or self._record is None:
            return False
        run = await asyncio.to_thread(self._adoption.load)
        group = await asyncio.to_thread(self._record.load)
        gcs_ok = None
        if run is not None and run.target.role == "head":
            host = run.target.node_ip or self.node_ip
            gcs_ok = await gcs_serving(host, run.ports.named.get("port", 0))
        refused = adoption_refusal(
            run,
            group,
            leader_ok=group is not None and leader_verified(group),
            argv=self._argv(run.target, run.ports) if run is not None else [],
            cmdline=cmdline(group.pgid) if group is not None else None,
            held=self._adoption.held(),
            gcs_ok=gcs_ok,
        )
        if refused is None:
            assert run is not None and group is not None
            child = self._child(run.target, run.ports)
            if not child.adopt(group):
                refused = "cannot watch its process"
        if refused is not None:
            if run is not None or group is not None:
                log.info(_log, "not adopting the ray node", reason=refused)
            return False
        assert run is not None and group is not None
        try:
            for lease_id in run.leases:
                await self._adoption.transfer(lease_id, os.getpid())
        except Exception as exc:  # the port service refused: stopped and leased anew
            log.warning(_log, "cannot adopt the ray node: its leases", error=str(exc))
            child.detach()
            return False
        self._target, self._ray_ports, self._leases = run.target, run.ports, list(run.leases)
        self._adopted, self.adopted_at = child, time.monotonic()
        if gcs_ok:
            self._set_ready(run.ports.named["port"])
        log.info(_log, "ray node adopted", role=run.target.role, pid=group.pgid)
        return True

    async def _release_recorded(self) -> None:
        """The leases of a Ray node that was not adopted (it was stopped): released."""
        run = await asyncio.to_thread(self._adoption.load) if self._adoption else None
        if run is None:
            return
        for lease_id in run.leases:
            with contextlib.suppress(Exception):
                await self._ports.release(lease_id)
        await asyncio.to_thread(self._adoption.save, None)

    async def _run_target(self, target: RayTarget) -> None:
        adopted, self._adopted = self._adopted, None
        if adopted is None:
            await self._ports.ready()
            self._ray_ports = await self._lease_ports(target)
            if self._adoption is not None:
                run = RayRun(target=target, ports=self._ray_ports, leases=self.lease_ids)
                await asyncio.to_thread(self._adoption.save, run)
        assert self._ray_ports is not None
        ports = self._ray_ports
        self._error = None

        async def make_child() -> ChildProcess:
            os.makedirs(self.temp_dir, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # a predecessor's: see node_registered
                os.unlink(os.path.join(self.temp_dir, RAY_ADDRESS_FILE))
            return self._child(target, ports)

        self._supervisor = Supervisor(
            f"ray-{target.role}",
            make_child,
            backoff_initial_s=self.settings.backoff_initial_s,
            backoff_max_s=self.settings.backoff_max_s,
            grace_s=self.settings.grace_s,
            record=self._record,
            adopted=adopted,
            keep_on_cancel=self._keep_on_cancel,
        )
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._supervisor.run())
            if target.role == "head":
                tg.create_task(
                    self._watch_gcs(
                        self._supervisor,
                        target.node_ip or self.node_ip,
                        ports.named["port"],
                        ready=adopted is not None and self._gcs_ready_port == ports.named["port"],
                    )
                )

    async def _lease_ports(self, target: RayTarget) -> RayPorts:
        names = port_names(target.role, client_server=self.client_server)
        owner = f"ray-{target.role}"
        # Owned by this gpud (pid and start time): after any crash of it, power-cut style
        # included, the zombie scan frees them unless the next gpud adopts the Ray node (the
        # leases move to it) or stops it first (GroupRecord) and leases anew. Unowned leases
        # piled up until the block was full.
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

    async def _watch_gcs(
        self, supervisor: Supervisor, host: str, port: int, *, ready: bool = False
    ) -> None:
        """Keep gcs_ready_port current: set once the head's node is registered in its GCS
        (node_registered) and the GCS answers, cleared when the process goes.
        ``ready``: an adopted head whose GCS answered already (its port stays announced)."""
        ready_pid: int | None = None
        if ready:
            await supervisor.started.wait()
            ready_pid = supervisor.status.pid
        began = time.monotonic()
        while True:
            pid = supervisor.status.pid
            if pid != ready_pid:
                ready_pid = None
                self._set_ready(0)
            if pid is not None and ready_pid is None:
                up = node_registered(self.temp_dir, gcs_address_of(host, port))
                healthy = up and await gcs_serving(host, port)
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
        if self._supervisor is not None:
            self._supervisor.stop_on_cancel()  # a target change stops Ray, never leaves it
            if self._supervisor.child is not None:
                self._supervisor.child.signal_group(signal.SIGKILL)

    async def _teardown(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor.left_running:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # gpud is exiting and Ray runs on for the next gpud: its record, ports and
                # leases stay as they are (RayRun).
                self._leases, self._ray_ports = [], None
                self.left_running = True
                return
            # Left running by a failure inside this run, not by gpud's exit: stop that group.
            assert self._record is not None
            await asyncio.shield(stop_leftover(self._record, self.settings.grace_s))
            supervisor = None
        if supervisor is not None:
            await supervisor.stop()
            self._past_failures.extend(supervisor.failures)
            self._past_restarts += supervisor.status.restarts
        self._set_ready(0)
        leases, self._leases = self._leases, []
        for lease_id in leases:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._ports.release(lease_id))
        if leases and self._adoption is not None:
            await asyncio.shield(asyncio.to_thread(self._adoption.save, None))
        self._ray_ports = None
