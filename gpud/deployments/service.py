"""Component "deployments": stores specs, replicates them, places replicas, runs this node's.

Every node runs the same loop, with no leader:
1. Replicate: the `dv` tag gossips a digest of this node's record set; a verified peer whose
   digest differs is asked for its records over the authenticated peer API and they are merged
   (`version.merge`, a CRDT: every node ends with the same set). Rows are stored before the
   node acts on them, so deletes survive restarts and a node that was away catches up.
2. Place: `placement.place` over the specs this node may run (signed by a trusted operator)
   and the alive, healthy, verified members, with the assignments they announce in the `dp`
   tag (`name.replica:port`), so every node computes the same assignment.
3. Run: replicas placed here get leased GPUs and a leased port and run as gpud's own child in
   its own process group (`process.Supervisor`: restart with backoff, stop by group only). A
   replica of N > 1 nodes is its own Ray cluster: its head (`claims.replica_head`: the node
   announcing a GCS port stays head, else the best by the Ray election's rank) runs `ray start
   --head` and, once GCS answers, the server; the others join the GCS port the head announces.
   Every Ray port is leased, Ray sees only the replica's GPUs.
4. Judge: every node probes the health path of every placed replica over the data path;
   `gpud deploy status` shows the verdicts, `/endpoints` lists the ready ones. A replica's head
   asks peers for their latest probe of it and announces it ready in its claim when one passed
   (readiness in the tags, judged from another host, never over loopback).
5. Roll: a changed spec restarts replica i only once every lower replica runs it and is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import msgspec
from aiohttp import web

from gpud import api, log
from gpud.component import ComponentBase, Metric, Problem
from gpud.context import Member, NodeContext
from gpud.deployments import authority, engines, placement, spec, version
from gpud.deployments.claims import Claim, format_claims, parse_claims, replica_head
from gpud.deployments.model import (
    ApplyReply,
    ApplyRequest,
    DeleteRequest,
    DeploymentsList,
    DeploymentView,
    Endpoint,
    EndpointsReply,
    Entry,
    PeerProbesReply,
    PeerProbesRequest,
    PeerRecordsReply,
    PeerRecordsRequest,
    ProbeReport,
    ReplicaView,
    TargetGroup,
)
from gpud.deployments.store import SpecStore, set_digest
from gpud.errors import ApiError
from gpud.process import ChildGroup, ChildProcess, GroupRecord, Supervisor, stop_leftover
from gpud.ray.supervisor import RaySupervisor, RayTarget, SupervisorSettings
from gpud.state import StateStore, open_store

if TYPE_CHECKING:
    from gpud.gpus.service import GpuService
    from gpud.health.service import HealthService
    from gpud.netcheck import NetCheck
    from gpud.ports.service import PortsService

_log = log.get("deployments")

PATH_PEER_RECORDS = "/peer/v1/deployments"
PATH_PEER_PROBES = "/peer/v1/deployments/probes"
# Peers a replica's head asks for their probe of it before it announces itself ready.
READY_REPORTERS = 2
# Owner prefix of this component's GPU and port leases (leftovers are released at start).
LEASE_OWNER = "deploy:"
# vLLM counts up from VLLM_PORT; a band this wide covers its internal ports.
VLLM_PORT_BAND = 16
# What a replica's process inherits from gpud's environment; the spec and gpud set the rest.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
GROUPS_TABLE = "deployments_groups"
# Hex digits of a spec's digest announced per replica (enough to tell old from new).
DIGEST_CHARS = 4
# A replica that could not start (no free GPU or port yet) is tried again after this long.
START_RETRY_S = 5.0
# Names (deployments and tombstones) a node keeps: a bound on what peers can make it store.
MAX_NAMES = 1024
# Ray worker processes (one leased port each) of a multi-node replica's Ray node.
RAY_WORKER_PORTS = 32


_Reply = TypeVar("_Reply")


class SectionStatus(msgspec.Struct, kw_only=True):
    digest: str
    lamport: int
    deployments: int
    running_here: int
    pending: int
    # Nodes placement may use right now (alive, health passing, verified, with a GPU verdict):
    # fewer than the members means replicas cannot spread to the rest yet.
    placeable_nodes: int = 0
    fetch_errors: dict[str, str] = {}


class _GroupRow(GroupRecord):
    """One replica's process group, persisted in ``deployments_groups`` (a crashed gpud's
    leftover group is stopped at the next start, like every supervised child's)."""

    def __init__(self, store: StateStore, replica: str) -> None:
        self._db = store
        self._replica = replica

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

    def clear(self) -> None:
        with self._db.transaction() as tx:
            tx.execute(f"DELETE FROM {GROUPS_TABLE} WHERE replica = ?", (self._replica,))


class _Replica:
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
        # None when it could not start.
        self.task: asyncio.Task[None] | None = None
        self.error = ""
        self.failed_at = 0.0

    @property
    def id(self) -> str:
        return f"{self.key[0]}.{self.key[1]}"


def may_roll(replica: int, others: Mapping[int, tuple[str, bool]], new_spec: str) -> bool:
    """Whether ``replica`` may restart with the new spec now (pure): only once every other
    placed replica with a lower index runs the new spec and is ready, so a spec change takes
    down one replica at a time, and a new spec that never gets ready stops the roll at the
    first replica. ``others``: replica index -> (spec it announces, ready)."""
    return all(spec == new_spec and ready for j, (spec, ready) in others.items() if j < replica)


def majority_refusal(members: Iterable[Any], self_name: str) -> str:
    """Why an apply here must be refused (this side of a partition lacks a majority of known
    members), or "". Members that left gracefully are not counted. Pure."""
    known = {m.name: m.status for m in members if m.status != "left"}
    known.setdefault(self_name, "alive")
    alive = sum(1 for s in known.values() if s == "alive")
    if alive * 2 > len(known):
        return ""
    return (
        f"this node sees only {alive} of {len(known)} known members alive (no majority): it may "
        "be on the minority side of a partition; apply on a node of the majority side, or wait "
        "for the partition to heal"
    )


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


class DeploymentService(ComponentBase):
    name = "deployments"

    def __init__(
        self,
        ctx: NodeContext,
        *,
        ports: PortsService,
        gpus: GpuService,
        health: HealthService,
        network: NetCheck | None = None,
        store: StateStore | None = None,
    ) -> None:
        self.ctx = ctx
        self._ports = ports
        self._gpus = gpus
        self._health = health
        self._network = network
        self._db = store or open_store(ctx.config.state_dir)
        self._db.ensure_table(
            GROUPS_TABLE,
            1,
            f"CREATE TABLE {GROUPS_TABLE} (replica TEXT PRIMARY KEY, pgid INTEGER NOT NULL, "
            "start INTEGER NOT NULL)",
        )
        self._specs = SpecStore(self._db)
        self._entries, self._clock = self._specs.load()
        self._digest = set_digest(self._entries)
        self._assignment = placement.Assignment(placed=(), pending=())
        self._placeable_nodes = 0
        self._running: dict[placement.ReplicaKey, _Replica] = {}
        # This node's last probe of each placed replica: (node, port, ok, error).
        self._probes: dict[placement.ReplicaKey, tuple[str, int, bool, str]] = {}
        self._fetch_errors: dict[str, str] = {}
        self._refusals: dict[tuple[str, str, str], str] = {}
        # Deletes refused (unsigned or wrongly signed): name -> (tombstone version, reason).
        self._refused_deletes: dict[str, tuple[str, str]] = {}
        # Replicas left out of the `dp` tag because the tags would not fit (logged once).
        self._unannounced: list[str] = []
        self._wake = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        health.server.add_route(PATH_PEER_RECORDS, self._peer_records)
        health.server.add_route(PATH_PEER_PROBES, self._peer_probes)

    # ---- records ---------------------------------------------------------------------------

    async def _merge(self, incoming: Iterable[Entry]) -> list[str]:
        """Merge and persist; returns the names that changed."""
        changed: list[Entry] = []
        records = {n: e.record for n, e in self._entries.items()}
        clock = self._clock
        for entry in incoming:
            try:
                version.check(entry.record)
                if entry.record.spec is not None:
                    # The same checks as an apply: a peer's record decoded only by type.
                    spec.decode(spec.encode(entry.record.spec))
            except spec.SpecError as exc:
                log.warning(_log, "peer record refused", error=str(exc))
                continue
            if entry.record.spec is None and self._delete_refused(entry):
                continue
            if entry.record.name not in records and len(records) >= MAX_NAMES:
                log.warning(_log, "record refused: too many names", name=entry.record.name)
                continue
            clock = max(clock, entry.record.version.lamport)
            records, took = version.merge(records, entry.record)
            if took:
                self._refused_deletes.pop(entry.record.name, None)
                changed = [c for c in changed if c.record.name != entry.record.name] + [entry]
        if changed or clock != self._clock:
            await asyncio.to_thread(self._specs.save, changed, clock)
            for entry in changed:
                self._entries[entry.record.name] = entry
            self._clock = clock
            self._digest = set_digest(self._entries)
            self._wake.set()
        return [c.record.name for c in changed]

    def _delete_refused(self, entry: Entry) -> bool:
        """With operators configured, a tombstone must carry a trusted operator's signature of
        its name and version; one that does not is not merged (the record stays live) and the
        reason is kept for `gpud deploy status`."""
        operators = self.ctx.config.deployments.operators
        record = entry.record
        if not operators:
            return False
        reason = authority.delete_refusal(
            record.name, record.version, entry.operator, entry.signature, operators
        )
        if not reason:
            return False
        refused = (str(record.version), reason)
        if self._refused_deletes.get(record.name) != refused:
            self._refused_deletes[record.name] = refused
            log.warning(_log, "delete refused", name=record.name, version=refused[0], reason=reason)
        return True

    def _next_version(self) -> version.SpecVersion:
        records = {n: e.record for n, e in self._entries.items()}
        return version.next_version(records, self.ctx.node_name, self._clock)

    def refusal(self, entry: Entry) -> str:
        """Why this node will not run ``entry``'s spec ("" when it may). Cached per signature."""
        s = entry.record.spec
        if s is None:
            return "deleted"
        cache_key = (entry.record.digest, entry.operator, entry.signature)
        if cache_key not in self._refusals:
            self._refusals[cache_key] = self._judge(s, entry)
        return self._refusals[cache_key]

    def _judge(self, s: spec.DeploymentSpec, entry: Entry) -> str:
        cfg = self.ctx.config.deployments
        reason = authority.refusal(s, entry.operator, entry.signature, cfg.operators)
        if reason:
            return reason
        if s.engine == "command" and not engines.executable_allowed(
            s.command[0], cfg.command_allow
        ):
            return (
                f"command {s.command[0]!r} is not in this host's [deployments] command_allow; "
                "add its absolute path there"
            )
        return ""

    # ---- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        self.ctx.on_members_changed(lambda _members: self._wake.set())
        await self._stop_leftovers()
        await self._publish()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._probe_loop())
                while True:
                    await self._sync_peers()
                    await self._reconcile()
                    await self._publish()
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._wake.wait(), self.ctx.config.deployments.interval_s
                        )
        finally:
            self._tg = None

    async def _stop_leftovers(self) -> None:
        """A crashed gpud's replicas: stop their groups and release their leases."""
        for (replica,) in self._db.query(f"SELECT replica FROM {GROUPS_TABLE}"):
            await stop_leftover(_GroupRow(self._db, replica), grace_s=5.0)
        await self._gpus.ready()
        for lease in self._gpus.leases():
            if lease.owner.startswith(LEASE_OWNER):
                with contextlib.suppress(ApiError):
                    await self._gpus.release(lease.id)
        for port_lease in self._ports.leases():
            if port_lease.owner.startswith(LEASE_OWNER):
                with contextlib.suppress(ApiError):
                    await self._ports.release(port_lease.id)

    async def _sync_peers(self) -> None:
        """Pull the records of verified peers whose gossiped digest differs from ours."""
        wanted = [
            m
            for m in self.ctx.peers()
            if m.tags is not None
            and m.tags.dv != self._digest
            and m.tags.pp
            and self._health.prober.verified(m.name)
        ]
        if not wanted:
            return
        replies = await self._ask_peers(
            wanted, PATH_PEER_RECORDS, PeerRecordsRequest(), PeerRecordsReply
        )
        for member, reply in zip(wanted, replies, strict=True):
            if isinstance(reply, BaseException):
                self._fetch_errors[member.name] = str(reply) or type(reply).__name__
                continue
            self._fetch_errors.pop(member.name, None)
            names = await self._merge(reply.entries)
            if names:
                log.info(_log, "records merged", peer=member.name, names=",".join(names))

    async def _ask_peers(
        self, peers: list[Member], path: str, request: Any, reply: type[_Reply]
    ) -> list[_Reply | BaseException]:
        """Call ``path`` on every peer's API at once (peers have tags); one result or
        exception per peer, in order."""
        return await asyncio.gather(
            *(
                self._health.client.call(m.addr, m.tags.pp, path, request, reply)
                for m in peers
                if m.tags is not None
            ),
            return_exceptions=True,
        )

    async def _peer_records(self, body: bytes) -> bytes:
        msgspec.json.decode(body or b"{}", type=PeerRecordsRequest)
        reply = PeerRecordsReply(
            name=self.ctx.node_name, digest=self._digest, entries=list(self._entries.values())
        )
        return msgspec.json.encode(reply)

    def _runnable(self) -> list[spec.DeploymentSpec]:
        """Specs that enter placement: live and signed by a trusted operator (the same on every
        host whose config lists the same operators)."""
        out = []
        for entry in self._entries.values():
            s = entry.record.spec
            if s is not None and not self.refusal(entry):
                out.append(s)
        return sorted(out, key=lambda s: s.name)

    def _nodes(self) -> list[placement.NodeView]:
        views = []
        for member in self.ctx.members.values():
            tags = self.ctx.tags if member.name == self.ctx.node_name else member.tags
            if not member.alive or tags is None or tags.hl not in ("passing", "warning"):
                continue
            if member.name != self.ctx.node_name and not self._health.prober.verified(member.name):
                continue
            # `gpu` counts the healthy GPUs; a node whose verdict is unknown or unhealthy
            # offers none (it may still run replicas that need no GPU).
            gpus = tags.gpu if tags.gh in ("healthy", "degraded") else 0
            views.append(placement.NodeView(name=member.name, host=member.addr, gpus=gpus))
        return views

    def _claims(self) -> dict[str, dict[placement.ReplicaKey, Claim]]:
        """What each alive member announces it runs (this node: what it runs now)."""
        claims = {
            m.name: parse_claims(m.tags.dp)
            for m in self.ctx.members.values()
            if m.alive and m.tags is not None and m.name != self.ctx.node_name
        }
        claims[self.ctx.node_name] = self._own_claims()
        return claims

    def _own_claims(self) -> dict[placement.ReplicaKey, Claim]:
        return {
            k: Claim(r.port, r.entry.record.digest[:DIGEST_CHARS], r.gcs, r.ready)
            for k, r in self._running.items()
            if r.task is not None
        }

    def _head(
        self, placed: placement.Placed, claims: dict[str, dict[placement.ReplicaKey, Claim]]
    ) -> str:
        """The replica's head (`claims.replica_head`) in this node's view, own tags current."""
        members = dict(self.ctx.members)
        own = members.get(self.ctx.node_name)
        if own is not None:
            members[self.ctx.node_name] = msgspec.structs.replace(own, tags=self.ctx.tags)
        return replica_head(placed.key, placed.nodes, members, claims)

    def _may_roll(self, key: placement.ReplicaKey, entry: Entry) -> bool:
        claims = self._claims()
        others = {}
        for p in self._assignment.placed:
            if p.deployment != key[0] or p.replica == key[1]:
                continue
            head = self._head(p, claims)
            claim = claims.get(head, {}).get(p.key)
            probe = self._probes.get(p.key)
            ready = (
                claim is not None and probe is not None and probe[:3] == (head, claim.port, True)
            )
            others[p.replica] = (claim.spec if claim else "", ready)
        return may_roll(key[1], others, entry.record.digest[:DIGEST_CHARS])

    async def _reconcile(self) -> None:
        specs = self._runnable()
        claims = self._claims()
        nodes = self._nodes()
        self._placeable_nodes = len(nodes)
        in_view = {n.name for n in nodes}
        current = placement.current_from_claims(
            {node: keys.keys() for node, keys in claims.items() if node in in_view}
        )
        self._assignment = placement.place(specs, nodes, current)
        placed = {p.key: p for p in self._assignment.on_node(self.ctx.node_name)}
        wanted = set(placed)
        for key in [k for k in self._running if k not in wanted]:
            await self._stop_replica(key, "no longer placed here")
        for key in sorted(wanted):
            entry = self._entries[key[0]]
            running = self._running.get(key)
            if running is not None and running.task is None:
                if time.monotonic() - running.failed_at < START_RETRY_S:
                    continue
                del self._running[key]  # could not start: try again
                running = None
            if running is not None and running.entry.record.digest != entry.record.digest:
                if not self._may_roll(key, entry):
                    continue  # keeps serving the old spec until the lower replicas are ready
                await self._stop_replica(key, "spec changed")
                running = None
            if running is None:
                await self._start_replica(key, entry)
            replica = self._running.get(key)
            if replica is not None and replica.ray is not None:
                await self._drive_ray(replica, placed[key])

    async def _start_replica(self, key: placement.ReplicaKey, entry: Entry) -> None:
        assert entry.record.spec is not None and self._tg is not None
        s = entry.record.spec
        replica = _Replica(key, entry)
        self._running[key] = replica
        owner = f"{LEASE_OWNER}{replica.id}"
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
            interface = self._network.status().interface if self._network else ""
            lease = engines.NodeLease(
                host_ip=self.ctx.advertise_addr,
                interface=interface,
                port=port_lease.ports[0],
                port_band_base=band,
                gpu_uuids=tuple(replica.gpus),
            )
            replica.lease, replica.port = lease, lease.port
            if s.nodes_per_replica == 1:
                replica.task = self._start_server(replica, lease)
            else:
                replica.ray = self._ray_node(replica, s, lease)
                replica.task = self._tg.create_task(replica.ray.run(), name=f"{replica.id}-ray")
        except (ApiError, engines.EngineError) as exc:
            replica.error = f"cannot start: {exc}"
            replica.failed_at = time.monotonic()
            log.warning(_log, "replica not started", replica=replica.id, error=str(exc))
            await self._release(replica)
            return
        log.info(_log, "replica started", replica=replica.id, port=replica.port, gpus=replica.gpus)

    def _start_server(self, replica: _Replica, lease: engines.NodeLease) -> asyncio.Task[None]:
        """Run the replica's server under a Supervisor; raises EngineError if the leases do
        not fit the spec."""
        assert replica.entry.record.spec is not None and self._tg is not None
        s = replica.entry.record.spec
        argv = engines.server_argv(s, lease)
        env = engines.node_env(s, lease, {k: os.environ[k] for k in PASSED_ENV if k in os.environ})

        async def make_child() -> ChildProcess:
            return ChildProcess(f"deploy-{replica.id}", argv, env=env)

        replica.supervisor = Supervisor(
            f"deploy-{replica.id}",
            make_child,
            backoff_max_s=10.0,
            grace_s=5.0,
            record=_GroupRow(self._db, replica.id),
        )
        replica.server_task = self._tg.create_task(replica.supervisor.run(), name=replica.id)
        return replica.server_task

    def _ray_node(
        self, replica: _Replica, s: spec.DeploymentSpec, lease: engines.NodeLease
    ) -> RaySupervisor:
        """This node's Ray node of the replica's own cluster (its target is set by
        `_drive_ray`): every port leased, only the replica's GPUs, the verified address."""
        ray_cfg = self.ctx.config.ray
        node = RaySupervisor(
            executable=ray_cfg.executable,
            node_name=f"{self.ctx.node_name}-{replica.id}",
            node_ip=self.ctx.advertise_addr,
            ports=_ReplicaPorts(self._ports, f"{LEASE_OWNER}{replica.id}"),
            temp_root=os.path.join(ray_cfg.temp_root, "deploy"),
            num_cpus=ray_cfg.num_cpus,
            num_gpus=s.gpus_per_node,
            env=engines.ray_node_env(s, lease),
            client_server=False,  # the server connects as a driver on the head (no Ray Client)
            settings=SupervisorSettings(worker_ports=RAY_WORKER_PORTS, backoff_max_s=10.0),
            record=_GroupRow(self._db, f"{replica.id}.ray"),
        )
        return node

    async def _drive_ray(self, replica: _Replica, placed: placement.Placed) -> None:
        """N > 1: the replica's head (`claims.replica_head`, the same on every node) runs Ray's
        head and, once GCS answers, the server; the others join the GCS the head announces."""
        assert replica.ray is not None and replica.lease is not None
        claims = self._claims()
        head = self._head(placed, claims)
        me = self.ctx.node_name
        lease = replica.lease
        if head == me:
            replica.ray.set_target(
                RayTarget(role="head", node_ip=self.ctx.advertise_addr, gpus=tuple(lease.gpu_uuids))
            )
            replica.gcs = replica.ray.gcs_ready_port
            if replica.gcs and replica.supervisor is None:
                address = f"{self.ctx.advertise_addr}:{replica.gcs}"
                try:
                    self._start_server(
                        replica, msgspec.structs.replace(replica.lease, ray_address=address)
                    )
                except engines.EngineError as exc:
                    replica.error = f"cannot start the server: {exc}"
            return
        replica.gcs = 0
        await self._stop_server(replica)  # this node is no longer the replica's head
        claim = claims.get(head, {}).get(placed.key)
        member = self.ctx.members.get(head)
        if claim is not None and claim.gcs and member is not None:
            replica.ray.set_target(
                RayTarget(
                    role="worker",
                    head_addr=member.addr,
                    gcs_port=claim.gcs,
                    node_ip=self.ctx.advertise_addr,
                    gpus=tuple(lease.gpu_uuids),
                )
            )

    async def _stop_server(self, replica: _Replica) -> None:
        task, replica.server_task, replica.supervisor = replica.server_task, None, None
        if task is not None and task is not replica.task:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _stop_replica(self, key: placement.ReplicaKey, why: str) -> None:
        replica = self._running.pop(key)
        await self._stop_server(replica)
        if replica.task is not None:
            replica.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await replica.task
        await self._release(replica)
        self._probes.pop(key, None)
        log.info(_log, "replica stopped", replica=replica.id, why=why)

    async def _release(self, replica: _Replica) -> None:
        for kind, lease_id in replica.lease_ids:
            service: Any = self._gpus if kind == "gpus" else self._ports
            with contextlib.suppress(ApiError):
                await service.release(lease_id)
        replica.lease_ids = []

    async def _publish(self) -> None:
        """Gossip the record digest and this node's claims. Memberlist allows 512 bytes for all
        of a node's tags: claims that do not fit are left out (heads' first kept, as the other
        nodes of their replica join the GCS port they announce), with a warning."""
        own = self._own_claims()
        keys = sorted(own, key=lambda k: (own[k].gcs == 0, k))
        dropped: list[str] = []
        while True:
            try:
                await self.ctx.update_tags(
                    dv=self._digest, dp=format_claims({k: own[k] for k in keys})
                )
                break
            except ValueError as exc:  # TagsError: too many replicas here to announce
                if not keys:
                    log.error(_log, "deployment tags do not fit", error=str(exc))
                    break
                name, index = keys.pop()
                dropped.append(f"{name}.{index}")
        if dropped != self._unannounced:
            self._unannounced = dropped
            if dropped:
                log.warning(
                    _log,
                    "replicas left out of the tags (memberlist's 512-byte limit)",
                    replicas=",".join(sorted(dropped)),
                )

    # ---- readiness -------------------------------------------------------------------------

    def _endpoints(self) -> dict[placement.ReplicaKey, tuple[str, str, int]]:
        """Placed replicas with an announced port: replica -> (node, addr, port)."""
        claims = self._claims()
        out = {}
        for placed in self._assignment.placed:
            node = self._head(placed, claims)  # its server runs there
            claim = claims.get(node, {}).get(placed.key)
            member = self.ctx.members.get(node)
            if claim is not None and member is not None:
                out[placed.key] = (node, member.addr, claim.port)
        return out

    async def _probe_loop(self) -> None:
        cfg = self.ctx.config.deployments
        timeout = aiohttp.ClientTimeout(total=cfg.probe_timeout_s)
        while True:
            # From the advertised address (the data path replicas use) while it is ours;
            # behind NAT it is not, and the kernel picks the source.
            network = self._network.status() if self._network else None
            local = (
                None if network and network.address_is_local is False else self.ctx.advertise_addr
            )
            connector = aiohttp.TCPConnector(
                force_close=True, local_addr=(local, 0) if local else None
            )
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                targets = self._endpoints()
                results = await asyncio.gather(
                    *(
                        self._probe(session, key, addr, port)
                        for key, (_, addr, port) in targets.items()
                    )
                )
            self._probes = {
                key: (targets[key][0], targets[key][2], ok, error)
                for key, (ok, error) in zip(targets, results, strict=True)
            }
            await self._judge_readiness()
            await asyncio.sleep(cfg.interval_s)

    async def _judge_readiness(self) -> None:
        """Replicas whose server runs here are ready (announced in their claim) when a peer's
        latest probe of them over the data path passed: a probe from this host would go over
        loopback. With no verified peer to ask, this node's own probe decides."""
        me = self.ctx.node_name
        serving = [r for r in self._running.values() if r.supervisor is not None]
        # Peers by a hash of (this node, peer): each head asks its own few, not everyone the same.
        peers = sorted(
            (
                m
                for m in self.ctx.peers()
                if m.tags is not None and m.tags.pp and self._health.prober.verified(m.name)
            ),
            key=lambda m: placement.score(me, 0, m.name),
        )[:READY_REPORTERS]
        seen: set[tuple[placement.ReplicaKey, int]] = set()
        if serving and peers:
            replies = await self._ask_peers(
                peers, PATH_PEER_PROBES, PeerProbesRequest(), PeerProbesReply
            )
            for reply in replies:
                if isinstance(reply, PeerProbesReply):
                    seen.update(
                        ((p.deployment, p.replica), p.port)
                        for p in reply.probes
                        if p.ok and p.node == me
                    )
        else:
            seen = {
                (key, port)
                for key, (node, port, ok, _) in self._probes.items()
                if ok and node == me
            }
        changed = False
        for replica in self._running.values():
            ready = replica.supervisor is not None and (replica.key, replica.port) in seen
            changed |= ready != replica.ready
            replica.ready = ready
        if changed:
            self._wake.set()

    async def _peer_probes(self, body: bytes) -> bytes:
        msgspec.json.decode(body or b"{}", type=PeerProbesRequest)
        reports = [
            ProbeReport(deployment=key[0], replica=key[1], node=node, port=port, ok=ok)
            for key, (node, port, ok, _) in sorted(self._probes.items())
        ]
        return msgspec.json.encode(PeerProbesReply(name=self.ctx.node_name, probes=reports))

    async def _probe(
        self, session: aiohttp.ClientSession, key: placement.ReplicaKey, addr: str, port: int
    ) -> tuple[bool, str]:
        entry = self._entries.get(key[0])
        if entry is None or entry.record.spec is None:
            return False, "deleted"
        host = f"[{addr}]" if ":" in addr else addr
        try:
            async with session.get(f"http://{host}:{port}{entry.record.spec.health_path}") as r:
                await r.read()
                return (r.status == 200, "" if r.status == 200 else f"HTTP {r.status}")
        except TimeoutError:
            return False, "no answer in time"
        except (aiohttp.ClientError, OSError) as exc:
            return False, str(exc) or type(exc).__name__

    # ---- views -----------------------------------------------------------------------------

    def view(self, name: str) -> DeploymentView:
        entry = self._entries.get(name)
        if entry is None or entry.record.spec is None:
            raise ApiError(404, f"no deployment named {name!r}; see `gpud deploy list`")
        s = entry.record.spec
        reason = self.refusal(entry)
        return DeploymentView(
            name=name,
            version=str(entry.record.version),
            origin=entry.record.version.origin,
            digest=entry.record.digest,
            engine=s.engine,
            model=s.model,
            replicas=s.replicas,
            nodes_per_replica=s.nodes_per_replica,
            gpus_per_node=s.gpus_per_node,
            health_path=s.health_path,
            state="refused" if reason else "active",
            reason=reason,
            operator=entry.operator,
            delete_refused=self._delete_refusal_text(name),
            replica_views=self._replica_views(s, reason),
        )

    def _delete_refusal_text(self, name: str) -> str:
        refused = self._refused_deletes.get(name)
        return f"delete {refused[0]} refused: {refused[1]}" if refused else ""

    def _replica_views(self, s: spec.DeploymentSpec, refused: str) -> list[ReplicaView]:
        if refused:
            return [
                ReplicaView(index=i, state="refused", reason=refused) for i in range(s.replicas)
            ]
        placed = {p.replica: p for p in self._assignment.placed if p.deployment == s.name}
        pending = {p.replica: p for p in self._assignment.pending if p.deployment == s.name}
        claims = self._claims()
        views = []
        for i in range(s.replicas):
            if i in pending or i not in placed:
                reason = pending[i].reason if i in pending else "not placed yet"
                views.append(ReplicaView(index=i, state="pending", reason=reason))
                continue
            node = self._head(placed[i], claims)  # where the server answers
            member = self.ctx.members.get(node)
            view = ReplicaView(
                index=i,
                state="starting",
                node=node,
                nodes=list(placed[i].nodes),
                addr=member.addr if member else "",
            )
            claim = claims.get(node, {}).get((s.name, i))
            view.spec = claim.spec if claim else ""
            view.announced_ready = claim.ready if claim else False
            probe = self._probes.get((s.name, i))
            if probe is not None and probe[0] == node:
                view.port, view.probe_ok, view.probe_error = probe[1], probe[2], probe[3]
            here = self._running.get((s.name, i))
            if here is not None and here.ray is not None:
                ray_status = here.ray.status()
                view.ray_restarts = here.ray.restarts_total
                view.ray_error = ray_status.error or ray_status.process.last_error or ""
            local = here if node == self.ctx.node_name else None
            if local is not None:
                view.port, view.gpus = local.port, local.gpus
                sup = local.supervisor.status if local.supervisor else None
                if sup is not None:
                    view.pid, view.restarts = sup.pid, sup.restarts
                    view.last_error = sup.last_error or ""
                if local.error or (sup is not None and sup.state in ("backoff", "failed")):
                    view.state = "failed"
                    view.reason = local.error or view.last_error
            if view.state == "starting" and view.probe_ok:
                view.state = "ready"
            elif view.state == "starting":
                view.reason = view.probe_error or f"waiting for {node} to start it"
            views.append(view)
        return views

    def listing(self) -> DeploymentsList:
        live = sorted(n for n, e in self._entries.items() if e.record.spec is not None)
        return DeploymentsList(
            node=self.ctx.node_name,
            digest=self._digest,
            lamport=self._clock,
            deployments=[self.view(n) for n in live],
            deleted=sorted(n for n, e in self._entries.items() if e.record.spec is None),
        )

    def endpoints(self, name: str) -> list[Endpoint]:
        return [
            Endpoint(
                replica=r.index,
                node=r.node,
                addr=r.addr,
                port=r.port,
                url=f"http://{r.addr}:{r.port}",
            )
            for r in self.view(name).replica_views
            if r.state == "ready"
        ]

    # ---- component contract ----------------------------------------------------------------

    def status(self) -> SectionStatus:
        return SectionStatus(
            digest=self._digest,
            lamport=self._clock,
            deployments=sum(1 for e in self._entries.values() if e.record.spec is not None),
            running_here=len(self._running),
            pending=len(self._assignment.pending),
            placeable_nodes=self._placeable_nodes,
            fetch_errors=dict(self._fetch_errors),
        )

    def summary(self) -> str:
        st = self.status()
        return (
            f"{st.deployments} deployment(s), {st.running_here} replica(s) here, "
            f"{st.pending} pending"
        )

    def problems(self) -> list[Problem]:
        problems = []
        for name, entry in sorted(self._entries.items()):
            if entry.record.spec is None:
                continue
            reason = self.refusal(entry)
            if reason:
                problems.append(
                    Problem(
                        code="deployments.refused",
                        severity="warning",
                        subject=name,
                        message=f"this node will not run deployment {name}: {reason}",
                        fix="sign the spec with a trusted operator key and allow its command "
                        "on every host, then apply it again",
                    )
                )
        if self._unannounced:
            problems.append(
                Problem(
                    code="deployments.claims_truncated",
                    severity="warning",
                    subject=self.ctx.node_name,
                    message=f"replicas {', '.join(self._unannounced)} run here but do not fit in "
                    "this node's gossip tags (memberlist allows 512 bytes in all), so other "
                    "nodes do not see them and may place them again",
                    fix="run fewer replicas per node, or use shorter deployment names",
                )
            )
        for p in self._assignment.pending:
            problems.append(
                Problem(
                    code="deployments.pending",
                    severity="warning",
                    subject=f"{p.deployment}/{p.replica}",
                    message=f"replica cannot be placed: {p.reason}",
                    fix="add healthy GPU nodes or lower replicas / gpus_per_node",
                )
            )
        for replica in self._running.values():
            sup = replica.supervisor.status if replica.supervisor else None
            error = replica.error or (sup.last_error if sup and sup.state == "backoff" else "")
            if error:
                problems.append(
                    Problem(
                        code="deployments.replica_failed",
                        severity="critical",
                        subject=replica.id,
                        message=f"replica {replica.id} on this node: {error}",
                        fix="see `gpud deploy status` and gpud's journal for the server's output",
                    )
                )
        return problems

    def metrics(self) -> list[Metric]:
        samples: list[tuple[dict[str, str], float]] = []
        restarts: list[tuple[dict[str, str], float]] = []
        for name, entry in sorted(self._entries.items()):
            if entry.record.spec is None:
                continue
            views = self.view(name).replica_views
            samples.append(({"deployment": name, "state": "desired"}, entry.record.spec.replicas))
            for state in ("placed", "ready"):
                count = sum(1 for v in views if v.node and (state == "placed" or v.state == state))
                samples.append(({"deployment": name, "state": state}, count))
            restarts.append(({"deployment": name}, sum(v.restarts for v in views)))
        return [
            Metric(
                name="gpud_deployment_replicas",
                help="Replicas per deployment: desired, placed, ready (as this node sees them).",
                samples=samples,
            ),
            Metric(
                name="gpud_deployment_restarts",
                help="Restarts of the replicas that run on this node.",
                samples=restarts,
                kind="counter",
            ),
        ]

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/deployments", self._get_list),
            web.post("/v1/deployments", self._post_apply),
            web.get("/v1/deployments/{name}", self._get_one),
            web.delete("/v1/deployments/{name}", self._delete),
            web.get("/v1/deployments/{name}/endpoints", self._get_endpoints),
            web.get("/v1/deployments/{name}/targets", self._get_targets),
        ]

    # ---- local API -------------------------------------------------------------------------

    async def apply(self, text: bytes, operator: str = "", signature: str = "") -> ApplyReply:
        """Validate, version, store and announce a spec. ApiError (nothing changes) if bad."""
        try:
            s = spec.load_spec(text)
        except spec.SpecError as exc:
            raise ApiError(400, f"bad spec: {exc}") from None
        if (operator or signature) and authority.refusal(s, operator, signature, [operator]):
            raise ApiError(400, "bad spec: the signature does not verify for this spec")
        self._require_majority()
        held = self._entries.get(s.name)
        if held is None and len(self._entries) >= MAX_NAMES:
            raise ApiError(
                409, f"this cluster already holds {MAX_NAMES} deployment names (tombstones count)"
            )
        if (
            held is not None
            and held.record.digest == version.digest(s)
            and (held.operator, held.signature) == (operator, signature)
        ):
            return ApplyReply(
                name=s.name,
                version=str(held.record.version),
                digest=held.record.digest,
                changed=False,
            )
        record = version.applied(s, self._next_version())
        await self._merge([Entry(record=record, operator=operator, signature=signature)])
        log.info(_log, "applied", name=s.name, version=str(record.version))
        return ApplyReply(
            name=s.name, version=str(record.version), digest=record.digest, changed=True
        )

    async def delete(self, name: str, signed: DeleteRequest | None = None) -> ApplyReply:
        """Store and announce a tombstone. With operators configured it must be ``signed`` by
        one of them (`gpud deploy delete NAME --key FILE`). ApiError (nothing changes) if not."""
        held = self._entries.get(name)
        if held is None or held.record.spec is None:
            raise ApiError(404, f"no deployment named {name!r}; see `gpud deploy list`")
        operators = self.ctx.config.deployments.operators
        if signed is None:
            entry = Entry(record=version.deleted(name, self._next_version()))
        else:
            entry = Entry(
                record=version.deleted(name, signed.version),
                operator=signed.operator,
                signature=signed.signature,
            )
            if authority.delete_refusal(
                name, signed.version, signed.operator, signed.signature, [signed.operator]
            ):
                raise ApiError(400, "bad delete: the signature does not verify for it")
        if operators:
            reason = authority.delete_refusal(
                name, entry.record.version, entry.operator, entry.signature, operators
            )
            if reason:
                raise ApiError(403, f"refused: {reason}")
        if entry.record.order() <= held.record.order():
            raise ApiError(
                409,
                f"refused: {name} changed since this delete was signed (now version "
                f"{held.record.version}); run the delete again",
            )
        self._require_majority()
        record = entry.record
        await self._merge([entry])
        log.info(_log, "deleted", name=name, version=str(record.version))
        return ApplyReply(name=name, version=str(record.version), digest="", changed=True)

    def _require_majority(self) -> None:
        refusal = majority_refusal(self.ctx.members.values(), self.ctx.node_name)
        if refusal:
            raise ApiError(409, f"refused: {refusal}")

    async def _get_list(self, request: web.Request) -> web.Response:
        return api.json_response(self.listing())

    async def _get_one(self, request: web.Request) -> web.Response:
        return api.json_response(self.view(request.match_info["name"]))

    async def _post_apply(self, request: web.Request) -> web.Response:
        api.require_admin(request, self.ctx.config.api.admin_group)
        if request.content_type == "application/json":
            body = await api.read_body(request, ApplyRequest, what="apply request")
            text, operator, signature = body.spec.encode(), body.operator, body.signature
        else:
            text = await request.content.read(spec.MAX_SPEC_BYTES + 1)
            operator = request.headers.get("X-Gpud-Operator", "")
            signature = request.headers.get("X-Gpud-Signature", "")
        return api.json_response(await self.apply(text, operator, signature))

    async def _delete(self, request: web.Request) -> web.Response:
        api.require_admin(request, self.ctx.config.api.admin_group)
        signed = None
        if request.content_type == "application/json" and request.content_length:
            signed = await api.read_body(request, DeleteRequest, what="delete request")
        return api.json_response(await self.delete(request.match_info["name"], signed))

    async def _get_endpoints(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return api.json_response(EndpointsReply(name=name, endpoints=self.endpoints(name)))

    async def _get_targets(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        groups = [
            TargetGroup(
                targets=[f"{e.addr}:{e.port}"],
                labels={"deployment": name, "replica": str(e.replica), "node": e.node},
            )
            for e in self.endpoints(name)
        ]
        return api.json_response(groups)
