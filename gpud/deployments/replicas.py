"""The replicas placed on this node: their leases, their server and, for a replica of N > 1
nodes, this node's Ray node of the replica's own cluster.

A replica gets leased GPUs and a leased port and runs as gpud's own child in its own process
group (`process.Supervisor`: restart with backoff, stop by group only). A replica of N > 1 nodes
is its own Ray cluster: its head runs `ray start --head` and, once GCS answers, the server; the
others join the GCS port the head announces. Every Ray port is leased, Ray sees only the
replica's GPUs. Each group is persisted with the spec digest it runs.

A replica outlives gpud: its server and, N > 1, its Ray node write to their own files under
the state directory (``logs/deploy-<replica>.log`` and ``deploy-<replica>.ray.log``,
rotated), a graceful stop of gpud leaves them running, and the next gpud re-adopts them
(`adopt_leftovers`) when each leader is verifiably the process recorded (pid, start time,
group, its command line), the spec is still the one it runs and its leases are all there:
same port, same GPUs, the leases transferred to the new gpud in one durable write each. The
Ray node is adopted as the cluster-wide one is (`RaySupervisor.settle`, its `RayRun` kept in
``deployments.ray_runs``; a head only while its GCS answers), and for `ADOPT_SETTLE_S` keeps
its target whatever the still partial view says (`holds_adopted`). Whatever it cannot adopt
it stops and releases, as after a crash; a head's Ray node adopted without its server gets a
new server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from gpud import log
from gpud.context import Member, NodeContext
from gpud.deployments import engines, placement, spec
from gpud.deployments.claims import Claim
from gpud.deployments.model import Entry
from gpud.errors import ApiError
from gpud.process import ChildProcess, Supervisor
from gpud.process_groups import ChildGroup, leader_verified, runs_argv, stop_leftover
from gpud.ray.supervisor import (
    RayAdoption,
    RayRun,
    RaySupervisor,
    RayTarget,
    SupervisorSettings,
)
from gpud.state import Key, StateStore

if TYPE_CHECKING:
    from gpud.gpus.service import GpuService
    from gpud.netcheck import NetCheck
    from gpud.ports.service import PortsService

_log = log.get("deployments")

# Owner prefix of this component's GPU and port leases (leftovers are released at start).
LEASE_OWNER = "deploy:"
# vLLM counts up from VLLM_PORT; a band this wide covers its internal ports.
VLLM_PORT_BAND = 16
# What a replica's process inherits from gpud's environment; the spec and gpud set the rest.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
GROUPS_TABLE = "deployments_groups"
# The spec digest each recorded server runs: a server of another spec is not adopted.
DIGESTS_TABLE = "deployments_group_digests"
# The row of a replica's Ray node in GROUPS_TABLE is the replica's id with this suffix.
RAY_GROUP_SUFFIX = ".ray"
# What each multi-node replica's Ray node here was started for (`RayRun`), by replica id.
RAY_RUNS = Key("deployments.ray_runs", dict[str, RayRun])
# A replica that could not start (no free GPU or port yet) is tried again after this long.
START_RETRY_S = 5.0
# Why gpud itself restarted a replica's server: no passed probe within startup_timeout_s of its
# start, or none for `readiness.LIVENESS_ROUNDS` rounds after it had answered, or (N > 1, the
# replica as a whole) its Ray cluster lost a node (`readiness.cluster_step`).
RestartCause = Literal["", "startup_timeout", "unresponsive", "ray_node_lost"]
# Ray worker processes (one leased port each) of a multi-node replica's Ray node.
RAY_WORKER_PORTS = 32
# Last output lines of a replica's server kept to quote when it is restarted for being late.
OUTPUT_LINES = 3
# Grace of a server stopped by gpud (SIGTERM, then SIGKILL of its group).
SERVER_GRACE_S = 5.0
# How long adoption waits for the network check to verify the interface servers are given.
INTERFACE_WAIT_S = 15.0
INTERFACE_POLL_S = 0.1
# How long an adopted replica that placement puts on no node is kept: right after gpud starts,
# this node's own health and GPU verdicts (which make it placeable) are not yet in its view.
ADOPT_SETTLE_S = 30.0


class ReplicaGroup:
    """One replica's process group (its server, or its Ray node), persisted as a row of
    ``deployments_groups`` (a `process_groups.GroupStore`): replicas come and go by name,
    where a `process_groups.GroupRecord` is one key declared once. `Supervisor` and
    `stop_leftover` stop a crashed gpud's leftover group at the next start, like every
    supervised child's."""

    def __init__(self, store: StateStore, replica: str, digest: str = "") -> None:
        self._db = store
        self._replica = replica
        self._digest = digest

    def load(self) -> ChildGroup | None:
        rows = self._db.query(
            f"SELECT pgid, start FROM {GROUPS_TABLE} WHERE replica = ?", (self._replica,)
        )
        return ChildGroup(pgid=rows[0][0], start=rows[0][1]) if rows else None

    def save(self, group: ChildGroup) -> None:
        with self._db.transaction() as tx:
            tx.execute(
                f"INSERT INTO {GROUPS_TABLE} (replica, pgid, start) VALUES (?, ?, ?) "
                "ON CONFLICT(replica) DO UPDATE SET pgid = excluded.pgid, start = excluded.start",
                (self._replica, group.pgid, group.start),
            )
            tx.execute(
                f"INSERT INTO {DIGESTS_TABLE} (replica, digest) VALUES (?, ?) "
                "ON CONFLICT(replica) DO UPDATE SET digest = excluded.digest",
                (self._replica, self._digest),
            )

    def clear(self) -> None:
        with self._db.transaction() as tx:
            tx.execute(f"DELETE FROM {GROUPS_TABLE} WHERE replica = ?", (self._replica,))
            tx.execute(f"DELETE FROM {DIGESTS_TABLE} WHERE replica = ?", (self._replica,))


class Replica:
    """A replica placed on this node: its leases and its supervised server."""

    def __init__(self, key: placement.ReplicaKey, entry: Entry) -> None:
        self.key = key
        self.entry = entry
        self.port = 0
        self.gpus: list[str] = []
        self.lease_ids: list[tuple[str, str]] = []  # ("gpus" | "ports", lease id)
        self.lease: engines.NodeLease | None = None
        # The server (on the replica's head node only when N > 1).
        self.supervisor: Supervisor | None = None
        self.server_task: asyncio.Task[None] | None = None
        # N > 1: this node's Ray node of the replica's own cluster, and its GCS port once this
        # node is the replica's head and GCS answers (announced in the claim).
        self.ray: RaySupervisor | None = None
        self.gcs = 0
        # Its server runs here and a peer's probe of it over the data path passed (announced).
        self.ready = False
        # What runs while the replica is started: the server (N = 1) or the Ray node (N > 1);
        # None when it could not start (then ``failed_at`` says when).
        self.task: asyncio.Task[None] | None = None
        self.error = ""
        self.failed_at = 0.0
        # The server's latest start (monotonic), whether a probe of it passed since
        # (`readiness.startup_step`), rounds without a passed probe after that
        # (`readiness.liveness_step`), its last output lines, and why gpud itself last
        # restarted it (cause code, text; cleared once a probe of a later start passes).
        self.started_at = 0.0
        self.answered = False
        self.silent_rounds = 0
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self.restarted: tuple[RestartCause, str] = ("", "")
        # When (monotonic) this gpud adopted the replica from its predecessor; 0: it started it.
        self.adopted_at = 0.0

    @property
    def id(self) -> str:
        return f"{self.key[0]}.{self.key[1]}"


class _ReplicaPorts:
    """The port service as a Ray node of a replica sees it: leases owned by the replica (so a
    crashed gpud's are released at start) and tied to gpud's life."""

    def __init__(self, ports: PortsService, owner: str) -> None:
        self._ports = ports
        self._owner = owner

    async def ready(self) -> None:
        await self._ports.ready()

    async def lease(
        self, owner: str, count: int, *, contiguous: bool = False, pid: int | None = None
    ) -> Any:
        return await self._ports.lease(
            f"{self._owner}:{owner}", count, contiguous=contiguous, pid=pid or os.getpid()
        )

    async def release(self, lease_id: object) -> None:
        await self._ports.release(str(lease_id))


class Replicas:
    """The runtime of this node's replicas (``running``): start, drive, stop, leftovers."""

    def __init__(
        self,
        ctx: NodeContext,
        store: StateStore,
        *,
        ports: PortsService,
        gpus: GpuService,
        network: NetCheck | None,
    ) -> None:
        self._ctx = ctx
        self._db = store
        self._ports = ports
        self._gpus = gpus
        self._network = network
        self._db.ensure_table(
            GROUPS_TABLE,
            1,
            f"CREATE TABLE {GROUPS_TABLE} (replica TEXT PRIMARY KEY, pgid INTEGER NOT NULL, "
            "start INTEGER NOT NULL)",
        )
        self._db.ensure_table(
            DIGESTS_TABLE,
            1,
            f"CREATE TABLE {DIGESTS_TABLE} (replica TEXT PRIMARY KEY, digest TEXT NOT NULL)",
        )
        self.running: dict[placement.ReplicaKey, Replica] = {}

    async def adopt_leftovers(self, entries: Mapping[str, Entry], tg: asyncio.TaskGroup) -> None:
        """What a previous gpud left: adopt each replica it can verify (module docstring) into
        ``running``; stop every other group and release every other lease of this component.
        Not after the port block's confirmation: an adopted server already holds its port."""
        await self._gpus.ready()  # GPU indices come from the first poll
        rows = self._db.query(
            f"SELECT g.replica, d.digest FROM {GROUPS_TABLE} g "
            f"LEFT JOIN {DIGESTS_TABLE} d USING (replica) ORDER BY g.replica"
        )
        if rows and self._network is not None:
            # A server's environment names the verified interface (NCCL/Gloo): right after
            # start the network check may not have verified it yet; rebuilding the server's
            # command line without it would refuse every adoption.
            for _ in range(int(INTERFACE_WAIT_S / INTERFACE_POLL_S)):
                if self._network.status().interface:
                    break
                await asyncio.sleep(INTERFACE_POLL_S)
        # One replica's rows: its server's (``ID``) and, N > 1, its Ray node's (``ID.ray``).
        digests: dict[str, str] = {}
        for group_id, digest in rows:
            digests.setdefault(group_id.removesuffix(RAY_GROUP_SUFFIX), digest or "")
        for replica_id, digest in digests.items():
            if not await self._adopt(replica_id, digest, entries, tg):
                for group_id in (replica_id, replica_id + RAY_GROUP_SUFFIX):
                    await stop_leftover(ReplicaGroup(self._db, group_id), grace_s=SERVER_GRACE_S)
        adopted = {r.id for r in self.running.values()}
        await asyncio.to_thread(self._prune_ray_runs, adopted)
        kept = {lease_id for r in self.running.values() for _, lease_id in r.lease_ids}
        kept |= {i for r in self.running.values() if r.ray is not None for i in r.ray.lease_ids}
        for lease in self._gpus.leases():
            if lease.owner.startswith(LEASE_OWNER) and lease.id not in kept:
                with contextlib.suppress(ApiError):
                    await self._gpus.release(lease.id)
        for port_lease in self._ports.leases():
            if port_lease.owner.startswith(LEASE_OWNER) and port_lease.id not in kept:
                with contextlib.suppress(ApiError):
                    await self._ports.release(port_lease.id)

    async def _adopt(
        self, replica_id: str, digest: str, entries: Mapping[str, Entry], tg: asyncio.TaskGroup
    ) -> bool:
        """Adopt what runs of ``replica_id`` here with its leases: N = 1 its server; N > 1 its
        Ray node and, on the replica's head, its server. False if it cannot."""
        name, _, index = replica_id.rpartition(".")
        entry = entries.get(name)
        s = entry.record.spec if entry is not None else None
        server = ReplicaGroup(self._db, replica_id).load()
        ray_group = ReplicaGroup(self._db, replica_id + RAY_GROUP_SUFFIX).load()
        refused = (
            "no such deployment now" if entry is None or s is None
            else "not a replica index" if not index.isdigit()
            else "its spec changed" if digest != entry.record.digest
            else "no recorded process group" if (server if s.nodes_per_replica == 1 else ray_group) is None
            else ""
        )  # fmt: skip
        if refused:
            log.info(_log, "not adopting", replica=replica_id, reason=refused)
            return False
        assert entry is not None and s is not None
        replica = self._adopt_leases(replica_id, (name, int(index)), entry)
        if replica is None or replica.lease is None:
            return False
        lease = replica.lease
        if s.nodes_per_replica > 1:
            replica.ray = self._ray_node(replica, s, lease)
            if not await replica.ray.settle():
                log.info(_log, "not adopting", replica=replica_id, reason="its Ray node is not")
                return False
            target = replica.ray.target
            replica.gcs = replica.ray.gcs_ready_port if target and target.role == "head" else 0
            if replica.gcs:
                lease = msgspec.structs.replace(
                    lease, ray_address=f"{self._ctx.advertise_addr}:{replica.gcs}"
                )
        child = None
        if server is not None and (replica.ray is None or replica.gcs):
            child = self._adoptable_server(replica, server, lease)
        if child is None and replica.ray is None:
            return False
        if not await self._transfer(replica):
            if child is not None:
                child.detach()
            return False
        replica.adopted_at = time.monotonic()
        self.running[replica.key] = replica
        if replica.ray is not None:
            replica.task = tg.create_task(replica.ray.run(), name=f"{replica.id}-ray")
        if child is not None:
            # It ran past its start before: judged by liveness, announced as it was (the next
            # probe round confirms or withdraws that).
            replica.started_at, replica.answered, replica.ready = replica.adopted_at, True, True
            self._start_server(replica, lease, tg, adopted=child)
            replica.task = replica.task or replica.server_task
        elif server is not None:
            # N > 1 and not adoptable: the Ray node stays, `drive` starts a new server on it.
            await stop_leftover(ReplicaGroup(self._db, replica_id), grace_s=SERVER_GRACE_S)
        log.info(
            _log, "replica adopted", replica=replica_id, port=replica.port,
            server=child.pid if child is not None else None,
            ray=replica.ray.target.role if replica.ray and replica.ray.target else None,
        )  # fmt: skip
        return True

    def _adopt_leases(
        self, replica_id: str, key: placement.ReplicaKey, entry: Entry
    ) -> Replica | None:
        """The replica with the leases its predecessor held for it (not yet transferred), or
        None when they are not all there or do not fit the spec."""
        assert entry.record.spec is not None
        s = entry.record.spec
        owner = f"{LEASE_OWNER}{replica_id}"
        gpu_leases = [g for g in self._gpus.leases() if g.owner == owner]
        port_leases = [p for p in self._ports.leases() if p.owner == owner]
        singles = [p for p in port_leases if len(p.ports) == 1]
        bands = [p for p in port_leases if len(p.ports) == VLLM_PORT_BAND]
        gpus = [u for g in gpu_leases for u in g.gpus]
        if len(singles) != 1 or len(bands) != (s.engine == "vllm") or len(gpus) != s.gpus_per_node:
            log.info(
                _log, "not adopting", replica=replica_id,
                reason=f"its leases are not all there ({len(singles)} port, {len(bands)} band, "
                f"{len(gpus)} GPU)",
            )  # fmt: skip
            return None
        replica = Replica(key, entry)
        replica.gpus = gpus
        replica.lease_ids = [("gpus", g.id) for g in gpu_leases]
        replica.lease_ids += [("ports", p.id) for p in singles + bands]
        try:
            replica.lease = self._node_lease(
                replica, singles[0].ports[0], bands[0].ports[0] if bands else None
            )
        except (ApiError, engines.EngineError) as exc:
            log.info(_log, "not adopting", replica=replica_id, reason=str(exc))
            return None
        replica.port = replica.lease.port
        return replica

    def _adoptable_server(
        self, replica: Replica, group: ChildGroup, lease: engines.NodeLease
    ) -> ChildProcess | None:
        """The recorded server of ``replica`` watched as an adopted child, or None when it is
        not verifiably the process this gpud would run for ``lease``."""
        try:
            child = self._server_child(replica, lease)
        except engines.EngineError as exc:
            refused = str(exc)
        else:
            refused = (
                "its recorded leader is not that process" if not leader_verified(group)
                else "another command line" if not runs_argv(group.pgid, child.argv)
                else "cannot watch its process" if not child.adopt(group)
                else ""
            )  # fmt: skip
        if refused:
            log.info(_log, "not adopting its server", replica=replica.id, reason=refused)
            return None
        return child

    async def _transfer(self, replica: Replica) -> bool:
        """Move the replica's GPU and port leases to this gpud (one durable write each)."""
        try:
            for kind, lease_id in replica.lease_ids:
                service: Any = self._gpus if kind == "gpus" else self._ports
                await service.transfer(lease_id, os.getpid())
        except ApiError as exc:
            log.warning(_log, "cannot adopt: its leases", replica=replica.id, error=str(exc))
            return False
        return True

    def _ray_run(self, replica_id: str) -> RayRun | None:
        return (self._db.get(RAY_RUNS) or {}).get(replica_id)

    def _save_ray_run(self, replica_id: str, run: RayRun | None) -> None:
        with self._db.transaction() as tx:
            runs = tx.get(RAY_RUNS) or {}
            if run is None:
                runs.pop(replica_id, None)
            else:
                runs[replica_id] = run
            tx.put(RAY_RUNS, runs or None)

    def _prune_ray_runs(self, keep: set[str]) -> None:
        """The RayRuns of Ray nodes that were not adopted (stopped above): forgotten."""
        with self._db.transaction() as tx:
            runs = tx.get(RAY_RUNS) or {}
            tx.put(RAY_RUNS, {k: v for k, v in runs.items() if k in keep} or None)

    def _node_lease(self, replica: Replica, port: int, band: int | None) -> engines.NodeLease:
        interface = self._network.status().interface if self._network else ""
        return engines.NodeLease(
            host_ip=self._ctx.advertise_addr,
            interface=interface,
            port=port,
            port_band_base=band,
            gpu_uuids=tuple(replica.gpus),
            # Resolved at each start: an index names a GPU only until the next reboot.
            gpu_indices=self._gpus.indices(replica.gpus),
        )

    async def start(
        self, key: placement.ReplicaKey, entry: Entry, tg: asyncio.TaskGroup
    ) -> Replica:
        """Lease what the replica needs here and, for N > 1, start this node's Ray node; the
        server starts in `drive`. On failure the replica stays with ``failed_at`` set."""
        assert entry.record.spec is not None
        s = entry.record.spec
        replica = Replica(key, entry)
        self.running[key] = replica
        owner = f"{LEASE_OWNER}{replica.id}"
        # Off the loop: a model path on a hung network mount would block it.
        missing = await asyncio.to_thread(engines.local_model_missing, s)
        if missing:
            await self._not_started(replica, engines.EngineError(missing))
            return replica
        try:
            await self._ports.ready()
            if s.gpus_per_node:
                gpu_lease = await self._gpus.lease(owner, s.gpus_per_node, pid=os.getpid())
                replica.lease_ids.append(("gpus", gpu_lease.id))
                replica.gpus = list(gpu_lease.gpus)
            port_lease = await self._ports.lease(owner, 1, pid=os.getpid())
            replica.lease_ids.append(("ports", port_lease.id))
            band = None
            if s.engine == "vllm":
                band_lease = await self._ports.lease(
                    owner, VLLM_PORT_BAND, contiguous=True, pid=os.getpid()
                )
                replica.lease_ids.append(("ports", band_lease.id))
                band = band_lease.ports[0]
            lease = self._node_lease(replica, port_lease.ports[0], band)
            replica.lease, replica.port = lease, lease.port
            if s.nodes_per_replica > 1:
                replica.ray = self._ray_node(replica, s, lease)
                replica.task = tg.create_task(replica.ray.run(), name=f"{replica.id}-ray")
        except (ApiError, engines.EngineError) as exc:
            await self._not_started(replica, exc)
            return replica
        log.info(_log, "replica started", replica=replica.id, port=replica.port, gpus=replica.gpus)
        return replica

    async def _not_started(self, replica: Replica, exc: Exception) -> None:
        replica.error = f"cannot start: {exc}"
        replica.failed_at = time.monotonic()
        log.warning(_log, "replica not started", replica=replica.id, error=str(exc))
        await self._release(replica)

    async def drive(
        self,
        replica: Replica,
        tg: asyncio.TaskGroup,
        head: str,
        head_member: Member | None,
        head_claim: Claim | None,
    ) -> None:
        """Start or steer what the replica runs here, given its ``head`` (`claims.replica_head`,
        the same on every node): N = 1, its server; N > 1, the head runs Ray's head and, once
        GCS answers, the server; the others join the GCS the head announces."""
        if replica.failed_at or replica.lease is None:
            return
        lease = replica.lease
        me = self._ctx.advertise_addr
        if replica.ray is not None:
            is_head = head == self._ctx.node_name
            target = ray_target(
                is_head, me, lease.gpu_indices, head_member, head_claim, replica.ray.target
            )
            if holds_adopted(replica.adopted_at, replica.ray.target, target, time.monotonic()):
                return
            replica.ray.set_target(target)
            if not is_head:
                replica.gcs = 0
                await stop_server(replica)  # this node is no longer the replica's head
                return
            replica.gcs = replica.ray.gcs_ready_port
            if not replica.gcs:
                # No cluster (Ray restarted, the replica as a whole included): the server
                # starts again on the new one.
                await stop_server(replica)
                return
            lease = msgspec.structs.replace(lease, ray_address=f"{me}:{replica.gcs}")
        if replica.supervisor is not None:
            return
        try:
            self._start_server(replica, lease, tg)
        except engines.EngineError as exc:
            if replica.ray is None:
                await self._not_started(replica, exc)
            else:
                replica.error = f"cannot start the server: {exc}"
            return
        if replica.ray is None:
            replica.task = replica.server_task

    def _server_child(self, replica: Replica, lease: engines.NodeLease) -> ChildProcess:
        """The replica's server as a child (not started); raises EngineError if the leases do
        not fit the spec."""
        assert replica.entry.record.spec is not None
        s = replica.entry.record.spec
        argv = engines.server_argv(s, lease, vllm=self._ctx.config.deployments.vllm_executable)
        env = engines.node_env(s, lease, {k: os.environ[k] for k in PASSED_ENV if k in os.environ})

        def on_line(text: str) -> bool:
            if text.strip():
                replica.output.append(text.strip())
            return True

        return ChildProcess(
            f"deploy-{replica.id}",
            argv,
            env=env,
            on_line=on_line,
            log_path=self.log_path(replica.id),
        )

    def log_path(self, replica_id: str) -> Path:
        """The file a replica's server writes its output to."""
        return self._ctx.config.state_dir / "logs" / f"deploy-{replica_id}.log"

    def _start_server(
        self,
        replica: Replica,
        lease: engines.NodeLease,
        tg: asyncio.TaskGroup,
        *,
        adopted: ChildProcess | None = None,
    ) -> None:
        """Run the replica's server under a Supervisor (first ``adopted``, when given);
        raises EngineError if the leases do not fit the spec."""
        assert replica.entry.record.spec is not None
        s = replica.entry.record.spec
        self._server_child(replica, lease)  # EngineError now, not in the Supervisor

        async def make_child() -> ChildProcess:
            replica.started_at, replica.answered = time.monotonic(), False
            replica.silent_rounds = 0
            replica.output.clear()
            return self._server_child(replica, lease)

        replica.supervisor = Supervisor(
            f"deploy-{replica.id}",
            make_child,
            backoff_max_s=10.0,
            # A server stopped for being late ran its whole start window: that is no sign of
            # health, so the backoff keeps growing until one outlives it.
            stable_s=spec.startup_timeout(s) + 30.0,
            grace_s=SERVER_GRACE_S,
            record=ReplicaGroup(self._db, replica.id, replica.entry.record.digest),
            adopted=adopted,
            # A graceful stop of gpud leaves the server to the next gpud (module docstring).
            keep_on_cancel=True,
        )
        replica.server_task = tg.create_task(replica.supervisor.run(), name=replica.id)

    def _ray_node(
        self, replica: Replica, s: spec.DeploymentSpec, lease: engines.NodeLease
    ) -> RaySupervisor:
        """This node's Ray node of the replica's own cluster (its target is set by `drive`):
        every port leased, only the replica's GPUs, the verified address."""
        ray_cfg = self._ctx.config.ray
        return RaySupervisor(
            executable=ray_cfg.executable,
            node_name=f"{self._ctx.node_name}-{replica.id}",
            node_ip=self._ctx.advertise_addr,
            ports=_ReplicaPorts(self._ports, f"{LEASE_OWNER}{replica.id}"),
            temp_root=os.path.join(ray_cfg.temp_root, "deploy"),
            num_cpus=ray_cfg.num_cpus,
            num_gpus=s.gpus_per_node,
            env=engines.ray_node_env(s, lease),
            client_server=False,  # the server connects as a driver on the head (no Ray Client)
            settings=SupervisorSettings(worker_ports=RAY_WORKER_PORTS, backoff_max_s=10.0),
            record=ReplicaGroup(
                self._db, replica.id + RAY_GROUP_SUFFIX, replica.entry.record.digest
            ),
            # It outlives gpud as the server on it does (module docstring).
            adoption=RayAdoption(
                lambda: self._ray_run(replica.id),
                lambda run: self._save_ray_run(replica.id, run),
                self.log_path(replica.id + RAY_GROUP_SUFFIX),
                self._ports.transfer,
                lambda: {p.id for p in self._ports.leases()},
            ),
        )

    async def stop(self, key: placement.ReplicaKey, why: str) -> None:
        replica = self.running.pop(key)
        await stop_server(replica)
        if replica.ray is not None:
            replica.ray.stop_on_cancel()
        if replica.task is not None:
            replica.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await replica.task
        await self._release(replica)
        log.info(_log, "replica stopped", replica=replica.id, why=why)

    async def _release(self, replica: Replica) -> None:
        for kind, lease_id in replica.lease_ids:
            service: Any = self._gpus if kind == "gpus" else self._ports
            with contextlib.suppress(ApiError):
                await service.release(lease_id)
        replica.lease_ids = []


def ray_target(
    is_head: bool,
    node_ip: str,
    gpus: tuple[int, ...],
    head_member: Member | None,
    head_claim: Claim | None,
    running: RayTarget | None,
) -> RayTarget | None:
    """This node's Ray node of a multi-node replica (pure): its head runs Ray's head; the
    others join the GCS port the head announces, leave a head that announces none (its
    cluster restarts as a whole), and keep ``running`` while the head's claim is not seen."""
    if is_head:
        return RayTarget(role="head", node_ip=node_ip, gpus=gpus)
    if head_claim is None or head_member is None:
        return running
    if not head_claim.gcs:
        return None
    return RayTarget(
        role="worker",
        head_addr=head_member.addr,
        gcs_port=head_claim.gcs,
        node_ip=node_ip,
        gpus=gpus,
    )


def worker_nm(ray: RaySupervisor | None) -> int:
    """The node-manager port of a multi-node replica's Ray node here when it runs as a worker
    (0: none): announced so that peers see it answer while only gpud restarts."""
    target, ports = (ray.target, ray.ray_ports) if ray is not None else (None, None)
    if target is None or target.role != "worker" or ports is None:
        return 0
    return ports.named.get("node-manager-port", 0)


def holds_adopted(
    adopted_at: float, running: RayTarget | None, target: RayTarget | None, now: float
) -> bool:
    """Whether a Ray node adopted at ``adopted_at`` (0: not adopted) keeps ``running``
    although this node's view gives ``target`` (pure): only within ADOPT_SETTLE_S of the
    adoption. Right after gpud starts, the peers are not verified yet, so the nodes and head
    placement gives the replica come from a partial view; following it would take this node
    out of a cluster that is whole."""
    return bool(adopted_at) and now - adopted_at < ADOPT_SETTLE_S and target != running


def keep_unplaced(replica: Replica, assigned: bool, now: float) -> bool:
    """Whether a replica that this node's placement does not put here keeps running here for
    now: one adopted less than ADOPT_SETTLE_S ago that is still ``assigned`` (placed on some
    node, or pending). Peers see it announced here meanwhile, so none starts a second copy."""
    return bool(replica.adopted_at) and assigned and now - replica.adopted_at < ADOPT_SETTLE_S


async def stop_server(replica: Replica) -> None:
    """Stop the replica's server for good (never left running for the next gpud)."""
    if replica.supervisor is not None:
        replica.supervisor.stop_on_cancel()
    task, replica.server_task, replica.supervisor = replica.server_task, None, None
    if task is not None and task is not replica.task:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def restart_server(replica: Replica, cause: RestartCause, why: str) -> None:
    """Stop the replica's running server for ``cause``; its Supervisor starts it again after
    its backoff. ``why``, with the server's last output lines, stays in ``restarted`` until a
    probe of a later start passes."""
    child = replica.supervisor.child if replica.supervisor else None
    if child is None or not child.running:
        return
    said = " | ".join(replica.output) or "(no output)"
    replica.restarted = (cause, f"{why}, so gpud restarted it; its last output: {said}")
    log.warning(_log, "replica restarted", replica=replica.id, cause=cause, output=said)
    await child.stop(SERVER_GRACE_S)
