"""GCS monitoring: the I/O behind the ray component's checks of Ray's own ports.

Three loops' worth of probes, each fed into the pure verdicts of gpud.ray.reach:
- every node asks the GCS it belongs to which Ray nodes are alive (one long-lived query
  process per GCS address, gpud.ray.probes.GcsNodes), and finds itself among them;
- the head checks the members tagged as its workers against that list and probes the
  node-manager port of each;
- a worker connects to its head's GCS port from its advertised address every health
  interval, and gossips the verdict (tag ``hg``) that can depose a head nobody reaches;
- every node connects to the GCS port a deposed head stepped down for (its tag ``hc``), and
  gossips whether that port answers again (tag ``hx``), which ends the deposed head's
  cool-down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec

from gpud import log
from gpud.context import Member, NodeContext
from gpud.health.verdict import Direction, Thresholds, step
from gpud.netprobe import ProbeOutcome, tcp_connect
from gpud.ray.probes import GcsNodes, RayNode, alive_ray_nodes
from gpud.ray.problems import RayNodesSeen
from gpud.ray.reach import (
    GcsReach,
    WorkerCheck,
    expected_workers,
    gcs_reach_tag,
    record_gcs_probe,
    record_stepped_down_probe,
    record_worker_poll,
    registered,
    stepped_down_tag,
)
from gpud.ray.supervisor import RaySupervisor

_log = log.get("ray")

NODES_POLL_S = 0.5
# `gpud doctor` asks the GCS for its nodes within this bound.
DIAGNOSE_NODES_TIMEOUT_S = 5.0


class GcsChecks(msgspec.Struct, kw_only=True, frozen=True):
    """One fresh set of GCS checks (doctor's: each result counts at once)."""

    reach: GcsReach | None = None
    workers: list[WorkerCheck] = msgspec.field(default_factory=list)
    registration: Direction = msgspec.field(default_factory=Direction)
    stepped_down: list[GcsReach] = msgspec.field(default_factory=list)


class GcsMonitor:
    """The GCS checks of one node, kept between polls with the health component's
    hysteresis. ``head``: the head the election follows now (None without one)."""

    def __init__(
        self,
        ctx: NodeContext,
        supervisor: RaySupervisor,
        head: Callable[[], str | None],
        nodes_every_s: float,
    ) -> None:
        self.ctx = ctx
        self.supervisor = supervisor
        self._head = head
        self._nodes_every_s = nodes_every_s
        health = ctx.config.health
        self._thresholds = Thresholds(
            health.failures_before_critical, health.successes_before_passing
        )
        self.nodes = RayNodesSeen()
        self.nodes_at: float | None = None
        self.reach: GcsReach | None = None
        self.workers: dict[str, WorkerCheck] = {}
        self.registration = Direction()
        # Peers that stepped down as head for an unreachable GCS (tag ``hc``): this node's
        # probes of that GCS port, by peer.
        self.stepped_down: dict[str, GcsReach] = {}

    def nodes_seen(self) -> RayNodesSeen:
        """The last poll's nodes, with its age."""
        age = round(time.monotonic() - self.nodes_at, 1) if self.nodes_at else None
        return msgspec.structs.replace(self.nodes, age_s=age)

    async def checks_now(self) -> GcsChecks:
        """Ray's ports checked now, each result counting at once (no hysteresis): a worker
        probes its head's GCS, the head asks its GCS and probes its workers' Ray ports."""
        now = Thresholds(1, 1)
        # Both at once: each may have to wait out its connect timeouts.
        reach, peers = await asyncio.gather(
            self.probe_gcs(None, now), self.probe_stepped_down({}, now)
        )
        stepped_down = sorted(peers.values(), key=lambda r: r.head)
        address = self.gcs_address()
        # A GCS this worker cannot reach has nothing more to say (and would take its full
        # timeout to say so): doctor must answer within the CLI's 30 s.
        if address is None or (reach is not None and reach.direction.state != "passing"):
            return GcsChecks(reach=reach, stepped_down=stepped_down)
        try:
            nodes = await alive_ray_nodes(
                self.ctx.config.ray.executable, address, DIAGNOSE_NODES_TIMEOUT_S
            )
        except (RuntimeError, OSError, msgspec.DecodeError):
            # Already in the status (ray_nodes.error); the probes above still count.
            return GcsChecks(reach=reach, stepped_down=stepped_down)
        workers = await self.check_workers(nodes, {}, now)
        return GcsChecks(
            reach=reach,
            workers=sorted(workers.values(), key=lambda w: w.name),
            registration=step(Direction(), registered(self.ctx.node_name, nodes), "", now),
            stepped_down=stepped_down,
        )

    async def nodes_loop(self) -> None:
        query: GcsNodes | None = None
        try:
            while True:
                query = await self._poll_nodes(query)
                # Ask again after nodes_every_s, or at once when the GCS address changes (a
                # new head), so status shows the new cluster without waiting out the interval.
                address = query.gcs_address if query is not None else None
                for _ in range(max(1, int(self._nodes_every_s / NODES_POLL_S))):
                    await asyncio.sleep(NODES_POLL_S)
                    if self.gcs_address() != address:
                        break
        finally:
            if query is not None:
                await query.close()

    async def _poll_nodes(self, query: GcsNodes | None) -> GcsNodes | None:
        """One poll of the GCS this node belongs to, through ``query`` while the address
        stays the same (a new one for a new head); returns the query to use next time."""
        address = self.gcs_address()
        if query is not None and query.gcs_address != address:
            await query.close()
            query = None
        if address is not None:
            query = query or GcsNodes(self.ctx.config.ray.executable, address)
            try:
                nodes = await query.alive()
                self.nodes = RayNodesSeen(nodes=nodes, gcs_address=address)
                self.workers = await self.check_workers(nodes, self.workers)
                self.registration = step(
                    self.registration,
                    registered(self.ctx.node_name, nodes),
                    f"not alive in GCS {address}",
                    self._thresholds,
                )
            except (RuntimeError, OSError) as exc:
                self.nodes = RayNodesSeen(error=str(exc), gcs_address=address)
            self.nodes_at = time.monotonic()
        else:
            self.nodes, self.nodes_at = RayNodesSeen(), None
            self.workers, self.registration = {}, Direction()
        return query

    async def check_workers(
        self,
        nodes: list[RayNode],
        previous: dict[str, WorkerCheck],
        thresholds: Thresholds | None = None,
    ) -> dict[str, WorkerCheck]:
        """Head only: each member tagged as our worker, in the GCS or not, and its node-manager
        port probed (which tells a dead Ray from a blocked one, and finds a node the GCS still
        lists after its Ray is gone)."""
        target = self.supervisor.target
        if target is None or target.role != "head":
            return {}
        thresholds = thresholds or self._thresholds
        expected = expected_workers(self.ctx.members, self.ctx.node_name, self.ctx.tags.term)
        timeout = self.ctx.config.health.timeout_s

        async def node_manager(member: Member) -> ProbeOutcome | None:
            nm = member.tags.nm if member.tags is not None else 0
            return await tcp_connect(member.addr, nm, timeout) if nm else None

        probes = await asyncio.gather(*(node_manager(m) for m in expected))
        return {
            m.name: record_worker_poll(
                previous.get(m.name), m, registered(m.name, nodes), probe, thresholds
            )
            for m, probe in zip(expected, probes, strict=True)
        }

    async def reach_loop(self) -> None:
        while True:
            started = time.monotonic()
            self.reach, self.stepped_down = await asyncio.gather(
                self.probe_gcs(self.reach, self._thresholds),
                self.probe_stepped_down(self.stepped_down, self._thresholds),
            )
            await self._publish_reach()
            await asyncio.sleep(
                max(0.0, self.ctx.config.health.interval_s - (time.monotonic() - started))
            )

    async def probe_gcs(self, reach: GcsReach | None, thresholds: Thresholds) -> GcsReach | None:
        """Worker only: one connect to the head's GCS port from the advertised address (the
        path Ray uses); after a failure, one to the head's peer API, which tells a blocked
        GCS port from a head that is down."""
        target = self.supervisor.target
        if target is None or target.role != "worker" or not target.gcs_port:
            return None
        head = self._head() or ""
        member = self.ctx.members.get(head)
        if member is None or member.tags is None or member.tags.gcs != target.gcs_port:
            # The head does not (or no longer) announce this GCS as ready (its Ray restarts):
            # nothing to judge, and no verdict that could depose it for a restart.
            return None
        term = member.tags.term
        if reach is None or (reach.head_addr, reach.gcs_port, reach.head, reach.term) != (
            target.head_addr,
            target.gcs_port,
            head,
            term,
        ):
            reach = GcsReach(
                head=head, term=term, head_addr=target.head_addr, gcs_port=target.gcs_port
            )
        timeout = self.ctx.config.health.timeout_s
        source = None if self.ctx.tags.nat else self.ctx.advertise_addr
        probe = ProbeOutcome(ok=False)
        # One lost SYN costs a 1 s retransmit, longer than the timeout: one retry at once.
        for _ in range(2):
            probe = await tcp_connect(
                target.head_addr, target.gcs_port, timeout, source_addr=source
            )
            if probe.ok:
                break
        peer_api = None
        if not probe.ok and member.tags.pp:
            peer_api = await tcp_connect(member.addr, member.tags.pp, timeout, source_addr=source)
        return record_gcs_probe(reach, probe, peer_api, thresholds)

    async def probe_stepped_down(
        self, previous: dict[str, GcsReach], thresholds: Thresholds
    ) -> dict[str, GcsReach]:
        """One connect to the GCS port each alive peer stepped down for (tag ``hc``), from the
        advertised address; after an unanswered one, one to its peer API (see probe_gcs)."""
        if not self.ctx.config.ray.enabled:
            return {}
        deposed = [
            m
            for m in self.ctx.members.values()
            if m.name != self.ctx.node_name and m.alive and m.tags is not None and m.tags.hc
        ]
        timeout = self.ctx.config.health.timeout_s
        source = None if self.ctx.tags.nat else self.ctx.advertise_addr

        async def one(member: Member) -> GcsReach:
            assert member.tags is not None
            port = member.tags.hc
            reach = previous.get(member.name)
            if reach is None or (reach.head_addr, reach.gcs_port) != (member.addr, port):
                reach = GcsReach(
                    head=member.name, term=member.tags.term, head_addr=member.addr, gcs_port=port
                )
            probe = ProbeOutcome(ok=False)
            for _ in range(2):  # one lost SYN costs a 1 s retransmit: one retry at once
                probe = await tcp_connect(member.addr, port, timeout, source_addr=source)
                if probe.ok or probe.cause == "refused":
                    break
            peer_api = None
            if not probe.ok and probe.cause != "refused" and member.tags.pp:
                peer_api = await tcp_connect(
                    member.addr, member.tags.pp, timeout, source_addr=source
                )
            return record_stepped_down_probe(reach, probe, peer_api, thresholds)

        probed = await asyncio.gather(*(one(m) for m in deposed))
        return {r.head: r for r in probed}

    async def _publish_reach(self) -> None:
        ports = self.supervisor.status().ports
        nm = ports.named.get("node-manager-port", 0) if ports is not None else 0
        try:
            hg = gcs_reach_tag(self.reach, self._head(), self.ctx.tags.term)
            hx = stepped_down_tag(self.stepped_down.values())
            await self.ctx.update_tags(hg=hg, nm=nm, hx=hx)
        except Exception as exc:  # a gossip hiccup must not stop the probe loop
            log.warning(_log, "could not publish ray reach tags", error=str(exc))

    def gcs_address(self) -> str | None:
        target = self.supervisor.target
        if target is None:
            return None
        if target.role == "head":
            port = self.supervisor.gcs_ready_port
            return f"{self.ctx.advertise_addr}:{port}" if port else None
        return f"{target.head_addr}:{target.gcs_port}"
