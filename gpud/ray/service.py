"""The "ray" component: this node's part in the Ray cluster, on the component contract.

RayService wires three parts that know nothing of each other: the head election
(gpud.ray.head_election), the target decision (gpud.ray.target, pure) and the Ray process
(gpud.ray.supervisor). It announces the GCS port once the head's GCS answers, asks the GCS
which Ray nodes are alive, and reports problems (`ray_problems`, pure) and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import msgspec
from aiohttp import web

from gpud import log, secret
from gpud.component import ComponentBase, Metric, Problem, gauge
from gpud.config import UNENCRYPTED, unkeyed_refusal
from gpud.context import Member, NodeContext
from gpud.health.verdict import Direction, Thresholds, WorkloadCheck, step
from gpud.netprobe import TcpProbe, tcp_connect
from gpud.process import GroupRecord
from gpud.ray.election import GCS_UNREACHABLE, Plan, ineligible_reason, workers_reach_gcs
from gpud.ray.head_election import RETRY_S, HeadElection, LeaseSource, QueryTransport
from gpud.ray.probes import GcsNodes, RayInstall, RayNode, alive_ray_nodes, probe_ray
from gpud.ray.reach import (
    GcsReach,
    WorkerCheck,
    expected_workers,
    gcs_reach_problem,
    gcs_reach_tag,
    missing_worker_problem,
    record_gcs_probe,
    record_worker_poll,
    registered,
    registration_problem,
)
from gpud.ray.supervisor import (
    RAY_CHILD,
    PortLeaser,
    RayProcessStatus,
    RaySupervisor,
    SupervisorSettings,
)
from gpud.ray.target import decide_target
from gpud.ray.votes import VoteStore
from gpud.state import open_store
from gpud.tags import RayRole

_log = log.get("ray")

# Seconds between election steps when nothing else wakes the loop.
TICK_S = 1.0
NODES_POLL_S = 0.5
# `gpud doctor` asks the GCS for its nodes within this bound.
DIAGNOSE_NODES_TIMEOUT_S = 5.0
# How often to look for a missing `ray` executable again.
PROBE_EVERY_S = 60.0
# Ray failures (exits or failed starts) within CRASH_WINDOW_S that make a crash loop; a head
# in a crash loop gives up its eligibility for CRASH_COOLDOWN_S.
CRASH_LOOP_RESTARTS = 3
CRASH_WINDOW_S = 300.0
CRASH_COOLDOWN_S = 300.0


class RayServiceSettings(msgspec.Struct, kw_only=True, frozen=True):
    """Timings of the ray component; tests and benches pass their own."""

    supervisor: SupervisorSettings = msgspec.field(default_factory=SupervisorSettings)
    # How often to ask the GCS which Ray nodes are alive (one RPC through the long-lived
    # query process). A worker is missing after failures_before_critical polls in a row, so
    # this times 3 must outlast a worker's `ray start` (seconds on a busy host): a shorter
    # interval reported starting workers as missing.
    nodes_every_s: float = 10.0
    # A candidate that lost waits a random time in this range before standing again.
    retry_s: tuple[float, float] = RETRY_S


class DataPathHealth(Protocol):
    """The health component's verdict on a node, as seen by a majority of its peers."""

    def healthy_by_majority(self, node: str) -> bool | None: ...


class RayNodesSeen(msgspec.Struct, kw_only=True):
    nodes: list[RayNode] | None = None
    error: str | None = None
    gcs_address: str | None = None
    age_s: float | None = None


class RayStatus(msgspec.Struct, kw_only=True):
    enabled: bool
    role: RayRole
    term: int
    head: str | None = None
    # The node the election waits for, while there is no head.
    candidate: str | None = None
    # head_addr:gcs_port once the head's GCS is ready.
    head_address: str | None = None
    # The election plan: lead, stand, follow, step_down or wait, and its reason.
    action: str
    election_reason: str = ""
    eligible: bool
    not_eligible_reason: str | None = None
    ray_available: bool
    ray_version: str = ""
    process: RayProcessStatus
    # Ray exits and failed starts in the last CRASH_WINDOW_S, and restarts since gpud started.
    recent_failures: int = 0
    restarts_total: int = 0
    ray_nodes: RayNodesSeen
    # Worker: its probes of the head's GCS port over the data path (None when not a worker).
    gcs_reach: GcsReach | None = None
    # Head: members tagged as its workers, checked against its GCS (missing ones probed).
    workers: list[WorkerCheck] = msgspec.field(default_factory=list)
    # Whether this node's own Ray is alive in the GCS (passing), or missing (critical).
    registration: Direction = msgspec.field(default_factory=Direction)
    # Head: a majority of its workers cannot reach its GCS, yet no other node could lead.
    gcs_unreachable_kept: bool = False
    last_election: str = ""
    # Why this node runs no Ray / has no head (None when all is well).
    reason: str | None = None
    summary: str


class RayService(ComponentBase):
    """Component "ray"."""

    name = "ray"

    def __init__(
        self,
        ctx: NodeContext,
        serf: QueryTransport,
        ports: PortLeaser,
        health: DataPathHealth | None = None,
        *,
        ray_gpus: Callable[[], list[str]] | None = None,
        settings: RayServiceSettings | None = None,
        verified: Callable[[str], bool] | None = None,
        keyring_file: Path | None = None,
    ) -> None:
        """``ray_gpus``: UUIDs of the GPUs the cluster-wide Ray may use (the GPU component's
        healthy GPUs that no deployment leases); Ray gets only those (CUDA_VISIBLE_DEVICES and
        --num-gpus). None: every GPU the tags count.
        ``verified``: is a member a verified gpud node (the health prober's); only those count
        in the election (None: every member, for tests without a health component).
        ``keyring_file``: serf's keyring; votes are signed with keys derived from it."""
        self.ctx = ctx
        self._ray_gpus = ray_gpus
        self.settings = settings or RayServiceSettings()
        config = ctx.config.ray
        verdict = health.healthy_by_majority if health is not None else None
        self._verdict = verdict
        self.election = HeadElection(
            ctx,
            serf,
            VoteStore(open_store(ctx.config.state_dir)),
            verdict,
            verified=verified,
            vote_keys=secret.PeerApiKeys(ctx.config, keyring_file, purpose="vote"),
            vote_timeout_s=config.vote_timeout_s,
            retry_s=self.settings.retry_s,
            # The leader lease needs the data-path probes' contact times (issue 11).
            lease=health if isinstance(health, LeaseSource) else None,
        )
        self._wake = asyncio.Event()
        ctx.on_members_changed(lambda _members: self._wake.set())
        self.supervisor = RaySupervisor(
            executable=config.executable,
            node_name=ctx.node_name,
            node_ip=ctx.advertise_addr,  # default; each target carries the current address
            ports=ports,
            temp_root=config.temp_root,
            num_cpus=config.num_cpus,
            num_gpus=ctx.tags.gpu,
            env=config.env,
            on_change=self._wake.set,
            settings=self.settings.supervisor,
            record=GroupRecord(open_store(ctx.config.state_dir), RAY_CHILD),
        )
        self.install: RayInstall | None = None
        self._unavailable_until = 0.0
        self._crash_reason: str | None = None
        self._nodes = RayNodesSeen()
        self._nodes_at: float | None = None
        # Issue 11 item 1: Ray's own ports, judged with the health component's hysteresis.
        health = ctx.config.health
        self._thresholds = Thresholds(
            health.failures_before_critical, health.successes_before_passing
        )
        self._reach: GcsReach | None = None
        self._workers: dict[str, WorkerCheck] = {}
        self._registration = Direction()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.supervisor.run())
            tg.create_task(self._probe_loop())
            tg.create_task(self._nodes_loop())
            tg.create_task(self._election_loop())
            tg.create_task(self._reach_loop())

    async def _probe_loop(self) -> None:
        if not self.ctx.config.ray.enabled:
            await self.ctx.update_tags(rv=False)
            return
        reported: str | None = None
        while True:
            install = await probe_ray(self.ctx.config.ray.executable)
            self.install = install
            self.supervisor.client_server = install.client
            if install.reason is not None and install.reason != reported:
                # Once per cause (status and doctor keep saying it), not every probe.
                log.warning(_log, "ray not available", reason=install.reason)
                reported = install.reason
            self._wake.set()
            if install.reason is None:
                return
            await asyncio.sleep(PROBE_EVERY_S)

    def _ray_usable(self) -> bool:
        install = self.install
        return (
            self.ctx.config.ray.enabled
            # --- issue 10.10 (trust): never Ray on an unkeyed cluster without consent ---
            and unkeyed_refusal(self.ctx.config) is None
            and install is not None
            and install.reason is None
            and time.monotonic() >= self._unavailable_until
        )

    async def _election_loop(self) -> None:
        while True:
            self._wake.clear()
            self._watch_crash_loop()
            await self.ctx.update_tags(rv=self._ray_usable())
            current = await self.election.step()
            self._note_deposed(current)
            await self._apply(current)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.election.next_step_in(TICK_S))

    def _note_deposed(self, current: Plan) -> None:
        if current.action == "step_down" and GCS_UNREACHABLE in current.reason:
            # Stay out of the next election: its GCS port is still blocked for the workers.
            self._crash_reason = f"{GCS_UNREACHABLE} (stepped down); retry later"
            self._unavailable_until = time.monotonic() + CRASH_COOLDOWN_S
            log.warning(_log, "ray head deposed by its workers", reason=current.reason)

    def _watch_crash_loop(self) -> None:
        target = self.supervisor.target
        failures = self.supervisor.failures_within(CRASH_WINDOW_S)
        if (
            target is not None
            and target.role == "head"
            and failures >= CRASH_LOOP_RESTARTS
            and self.supervisor.gcs_ready_port == 0
        ):
            # Stop being a candidate for a while instead of holding the head role with no GCS.
            # (A crashing worker keeps retrying with backoff; ray.crash_loop says why.)
            last = self.supervisor.status().process.last_error
            self._crash_reason = f"Ray keeps crashing ({last}); retry later"
            self._unavailable_until = time.monotonic() + CRASH_COOLDOWN_S
            log.warning(_log, "ray crash loop", reason=self._crash_reason)
        elif time.monotonic() >= self._unavailable_until:
            self._crash_reason = None

    async def _apply(self, current: Plan) -> None:
        gpus = tuple(self._ray_gpus()) if self._ray_gpus is not None else None
        if gpus is None:
            self.supervisor.num_gpus = self.ctx.tags.gpu
        self.supervisor.set_target(
            decide_target(
                current,
                self.election.view(),
                usable=self._ray_usable(),
                node_ip=self.ctx.advertise_addr,
                running=self.supervisor.target,
                gpus=gpus,
            )
        )
        target = self.supervisor.target
        ready = self.supervisor.gcs_ready_port if target and target.role == "head" else 0
        if current.action == "lead" and ready != self.ctx.tags.gcs:
            await self.ctx.update_tags(gcs=ready)
            log.info(_log, "head gcs announced", gcs=ready, term=self.ctx.tags.term)

    async def _nodes_loop(self) -> None:
        query: GcsNodes | None = None
        try:
            while True:
                query = await self._poll_nodes(query)
                # Ask again after nodes_every_s, or at once when the GCS address changes (a
                # new head), so status shows the new cluster without waiting out the interval.
                address = query.gcs_address if query is not None else None
                for _ in range(max(1, int(self.settings.nodes_every_s / NODES_POLL_S))):
                    await asyncio.sleep(NODES_POLL_S)
                    if self._gcs_address() != address:
                        break
        finally:
            if query is not None:
                await query.close()

    async def _poll_nodes(self, query: GcsNodes | None) -> GcsNodes | None:
        """One poll of the GCS this node belongs to, through ``query`` while the address
        stays the same (a new one for a new head); returns the query to use next time."""
        address = self._gcs_address()
        if query is not None and query.gcs_address != address:
            await query.close()
            query = None
        if address is not None:
            query = query or GcsNodes(self.ctx.config.ray.executable, address)
            try:
                nodes = await query.alive()
                self._nodes = RayNodesSeen(nodes=nodes, gcs_address=address)
                self._workers = await self._check_workers(nodes, self._workers)
                self._registration = step(
                    self._registration,
                    registered(self.ctx.node_name, nodes),
                    f"not alive in GCS {address}",
                    self._thresholds,
                )
            except (RuntimeError, OSError) as exc:
                self._nodes = RayNodesSeen(error=str(exc), gcs_address=address)
            self._nodes_at = time.monotonic()
        else:
            self._nodes, self._nodes_at = RayNodesSeen(), None
            self._workers, self._registration = {}, Direction()
        return query

    async def _check_workers(
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

        async def node_manager(member: Member) -> TcpProbe | None:
            nm = member.tags.nm if member.tags is not None else 0
            return await tcp_connect(member.addr, nm, timeout) if nm else None

        probes = await asyncio.gather(*(node_manager(m) for m in expected))
        return {
            m.name: record_worker_poll(
                previous.get(m.name), m, registered(m.name, nodes), probe, thresholds
            )
            for m, probe in zip(expected, probes, strict=True)
        }

    async def _reach_loop(self) -> None:
        while True:
            started = time.monotonic()
            self._reach = await self._probe_gcs(self._reach, self._thresholds)
            await self._publish_reach()
            await asyncio.sleep(
                max(0.0, self.ctx.config.health.interval_s - (time.monotonic() - started))
            )

    async def _probe_gcs(self, reach: GcsReach | None, thresholds: Thresholds) -> GcsReach | None:
        """Worker only: one connect to the head's GCS port from the advertised address (the
        path Ray uses); after a failure, one to the head's peer API, which tells a blocked
        GCS port from a head that is down."""
        target = self.supervisor.target
        if target is None or target.role != "worker" or not target.gcs_port:
            return None
        head = self.election.plan.head or ""
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
        probe = TcpProbe(ok=False)
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

    async def _publish_reach(self) -> None:
        ports = self.supervisor.status().ports
        nm = ports.named.get("node-manager-port", 0) if ports is not None else 0
        try:
            hg = gcs_reach_tag(self._reach, self.election.plan.head, self.ctx.tags.term)
            await self.ctx.update_tags(hg=hg, nm=nm)
        except Exception as exc:  # a gossip hiccup must not stop the probe loop
            log.warning(_log, "could not publish ray reach tags", error=str(exc))

    def _gcs_address(self) -> str | None:
        target = self.supervisor.target
        if target is None:
            return None
        if target.role == "head":
            port = self.supervisor.gcs_ready_port
            return f"{self.ctx.advertise_addr}:{port}" if port else None
        return f"{target.head_addr}:{target.gcs_port}"

    def status(self) -> RayStatus:
        tags = self.ctx.tags
        current = self.election.plan
        members = self.election.view()
        own_reason = ineligible_reason(members[self.ctx.node_name], self._verdict)
        install = self.install
        if not self.ctx.config.ray.enabled:
            own_reason = "ray.enabled = false in the config"
        elif unkeyed_refusal(self.ctx.config) is not None:  # issue 10.10 (trust)
            own_reason = unkeyed_refusal(self.ctx.config)
        elif install is None:
            own_reason = own_reason or "checking the ray executable"
        elif install.reason is not None:
            own_reason = install.reason
        elif self._crash_reason is not None:
            own_reason = self._crash_reason
        head = members.get(current.head) if current.head else None
        head_address = None
        if head is not None and head.tags is not None and head.tags.gcs:
            head_address = f"{head.addr}:{head.tags.gcs}"
        process = self.supervisor.status()
        failures = self.supervisor.failures_within(CRASH_WINDOW_S)
        reason = self._reason(current, process, own_reason)
        nodes = msgspec.structs.replace(
            self._nodes,
            age_s=round(time.monotonic() - self._nodes_at, 1) if self._nodes_at else None,
        )
        own = members.get(self.ctx.node_name)
        kept = (
            tags.ray == "head"
            and own is not None
            and workers_reach_gcs(own, members) is False
            and current.action == "lead"
        )
        if failures >= CRASH_LOOP_RESTARTS and process.target is not None:
            summary = _crash_summary(tags.ray, tags.term, process, failures)
        else:
            summary = _summary(tags.ray, tags.term, current, head_address, process, nodes, reason)
            summary += _reach_text(
                self._reach, list(self._workers.values()), self._registration, nodes.gcs_address
            )
        return RayStatus(
            enabled=self.ctx.config.ray.enabled,
            role=tags.ray,
            term=tags.term,
            head=current.head,
            candidate=current.candidate,
            head_address=head_address,
            action=current.action,
            election_reason=current.reason,
            eligible=own_reason is None,
            not_eligible_reason=own_reason,
            ray_available=install is not None and install.reason is None,
            ray_version=install.version if install else "",
            process=process,
            recent_failures=failures,
            restarts_total=self.supervisor.restarts_total,
            ray_nodes=nodes,
            gcs_reach=self._reach,
            workers=sorted(self._workers.values(), key=lambda w: w.name),
            registration=self._registration,
            gcs_unreachable_kept=kept,
            last_election=self.election.last_election,
            reason=reason,
            summary=summary,
        )

    def _reason(
        self, current: Plan, process: RayProcessStatus, own_reason: str | None
    ) -> str | None:
        if not self._ray_usable():
            return own_reason
        if process.error:
            return process.error
        if process.process.state == "backoff":
            return (
                f"Ray {process.process.last_error}; restart in {process.process.next_start_in_s}s"
            )
        if current.action in ("wait", "step_down"):
            return current.reason
        if current.action == "follow" and process.target is None:
            return f"waiting for {current.head} to announce its GCS"
        return None

    def workload_checks(self) -> list[WorkloadCheck]:
        return workload_checks(self.status(), self.ctx.node_name)

    def summary(self) -> str:
        return self.status().summary

    def problems(self) -> list[Problem]:
        # The election's own findings: claims it refused to believe (rogue heads, wild terms).
        return ray_problems(self.status(), self.ctx.node_name) + self.election.problems()

    async def diagnose(self) -> list[Problem]:
        """Ray's ports checked now, each result counting at once (no hysteresis): a worker
        probes its head's GCS, the head asks its GCS and probes its workers' Ray ports."""
        now = Thresholds(1, 1)
        status = self.status()
        reach = await self._probe_gcs(None, now)
        workers: dict[str, WorkerCheck] = {}
        registration = Direction()
        address = self._gcs_address()
        # A GCS this worker cannot reach has nothing more to say (and would take its full
        # timeout to say so): doctor must answer within the CLI's 30 s.
        if address is not None and (reach is None or reach.direction.state == "passing"):
            try:
                nodes = await alive_ray_nodes(
                    self.ctx.config.ray.executable, address, DIAGNOSE_NODES_TIMEOUT_S
                )
            except (RuntimeError, OSError, msgspec.DecodeError):
                pass  # already in the status (ray_nodes.error); the probes above still count
            else:
                workers = await self._check_workers(nodes, {}, now)
                registration = step(Direction(), registered(self.ctx.node_name, nodes), "", now)
        fresh = msgspec.structs.replace(
            status,
            gcs_reach=reach,
            workers=sorted(workers.values(), key=lambda w: w.name),
            registration=registration,
        )
        return ray_problems(fresh, self.ctx.node_name) + self.election.problems()

    def metrics(self) -> list[Metric]:
        tags = self.ctx.tags
        reach = self._reach
        nodes = self._nodes.nodes
        reachable = []
        if reach is not None and reach.direction.state != "unknown":
            labels = {"head": reach.head, "address": reach.address}
            reachable.append((labels, float(reach.direction.state == "passing")))
        return [
            Metric(
                name="gpud_ray_gcs_reachable",
                help="Worker: 1 while its head's GCS port answers over the data path, 0 when "
                "critical (absent while unknown or not a worker).",
                samples=reachable,
            ),
            Metric(
                name="gpud_ray_nodes_alive",
                help="Ray nodes the GCS reports alive (absent while unknown).",
                samples=[({}, float(len(nodes)))] if nodes is not None else [],
            ),
            gauge(
                "gpud_ray_workers_missing",
                "Head: members tagged as its Ray workers that its GCS does not list alive or "
                "whose node-manager port does not answer.",
                sum(w.direction.state == "critical" for w in self._workers.values()),
            ),
            gauge("gpud_ray_head", "1 while this node is the Ray head.", tags.ray == "head"),
            gauge("gpud_ray_term", "Ray head election term.", tags.term),
            Metric(
                name="gpud_ray_restarts_total",
                help="Restarts of this node's Ray process since gpud started.",
                samples=[({}, float(self.supervisor.restarts_total))],
                kind="counter",
            ),
        ]

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/ray", self._get_ray)]

    async def _get_ray(self, request: web.Request) -> web.Response:
        return web.Response(
            body=msgspec.json.encode(self.status()), content_type="application/json"
        )


def _nodes_text(nodes: RayNodesSeen) -> str:
    """ ", N Ray nodes alive", or why the count is not known."""
    if nodes.nodes is not None:
        return f", {len(nodes.nodes)} Ray nodes alive"
    if nodes.error is not None:
        return f", Ray nodes unknown ({nodes.error})"
    if nodes.gcs_address is None:
        return ", Ray nodes unknown (no GCS to ask yet)"
    return ", Ray nodes not counted yet"


def _summary(
    role: RayRole,
    term: int,
    current: Plan,
    head_address: str | None,
    process: RayProcessStatus,
    nodes: RayNodesSeen,
    reason: str | None,
) -> str:
    state = process.process.state
    if role == "head":
        gcs = f"GCS {head_address} ready" if head_address else "GCS starting"
        text = f"head, term {term}, {gcs}, ray {state}{_nodes_text(nodes)}"
    elif role == "worker":
        text = (
            f"worker of {current.head} ({head_address or 'GCS not ready'}), term {term}, "
            f"ray {state}{_nodes_text(nodes)}"
        )
    else:
        text = f"no Ray role, term {term}"
    return f"{text}: {reason}" if reason else text


def _reach_text(
    reach: GcsReach | None,
    workers: list[WorkerCheck],
    registration: Direction,
    gcs: str | None,
) -> str:
    """ "; GCS ... unreachable" for a worker, "; N workers missing from GCS: ..." for a head,
    "; not alive in GCS ..." for a node whose Ray runs but is not registered."""
    text = ""
    if registration.state == "critical":
        text += f"; not alive in GCS {gcs}"
    if reach is not None and reach.direction.state == "critical":
        text += f"; GCS {reach.address} unreachable ({reach.direction.reason})"
    missing = [w.name for w in workers if w.direction.state == "critical"]
    if missing:
        text += f"; {len(missing)} workers missing from GCS: {', '.join(missing)}"
    return text


def _crash_summary(role: RayRole, term: int, process: RayProcessStatus, failures: int) -> str:
    # A Ray that keeps restarting is never "running", even in the moment it happens to be up.
    return (
        f"{role if role != 'none' else 'no Ray role'}, term {term}, ray crash loop "
        f"({failures} failures in {CRASH_WINDOW_S / 60:.0f} min; last: "
        f"{process.process.last_error or process.error})"
    )


def _eligibility_fix(reason: str) -> str:
    if UNENCRYPTED in reason:  # issue 10.10 (trust)
        return "set cluster.key_file on every host (`gpud keygen`), or cluster.insecure = true"
    if "not found" in reason or "cannot run" in reason or "--version" in reason:
        return "install Ray on this host, or point ray.executable at its `ray`"
    if "NAT" in reason:
        return (
            "advertise an address assigned to a local interface (host networking, no port "
            "mapping); a node behind NAT can be a worker but not the head"
        )
    if "data path" in reason or "critical health" in reason:
        return "see the health section of `gpud status`: peers cannot reach this node"
    if GCS_UNREACHABLE in reason:
        return "open this node's GCS port to the workers (see ray.gcs_unreachable on them)"
    if "keeps crashing" in reason:
        return "see ray.crash_loop: fix what makes Ray exit; gpud retries after a cool-down"
    if "ray.head" in reason:
        return 'set ray.head to allow this node to lead (it is "never")'
    if "ray.enabled" in reason:
        return "set ray.enabled = true on this node"
    return "see the ray section of `gpud status` on this node"


def ray_problems(status: RayStatus, node: str) -> list[Problem]:
    """What is wrong with Ray on this node, from its status (pure)."""
    if not status.enabled:
        return []
    found: list[Problem] = []
    process = status.process
    target = process.target
    crash_loop = target is not None and status.recent_failures >= CRASH_LOOP_RESTARTS
    last = process.error or process.process.last_error
    if crash_loop:
        assert target is not None
        found.append(
            Problem(
                code="ray.crash_loop",
                severity="critical",
                subject=node,
                message=(
                    f"Ray ({target.role}) failed {status.recent_failures} times in the last "
                    f"{CRASH_WINDOW_S / 60:.0f} min; last: {last}"
                ),
                fix=(
                    f"read this node's journal (component=ray-{target.role}) for the Ray "
                    "component that fails; check the ray installation, its temp dir and "
                    "that its leased ports are free"
                ),
                supersedes=frozenset({"ray.down"}),
            )
        )
    if target is not None and process.process.state != "running" and last is not None:
        retry = process.process.next_start_in_s
        found.append(
            Problem(
                code="ray.down",
                severity="critical" if target.role == "head" else "warning",
                subject=node,
                message=f"Ray {target.role} is not running: {last}"
                + (f"; next start in {retry:g}s" if retry is not None else ""),
                fix=f"read this node's journal (component=ray-{target.role}) for why it exits",
            )
        )
    found += _reach_problems(status, node)
    # No head and nobody standing: the election cannot produce one (a candidate is still
    # being elected otherwise).
    no_head = status.head is None and status.candidate is None and status.action == "wait"
    if status.not_eligible_reason is not None and (
        no_head or status.role == "head" or status.action == "step_down"
    ):
        # It matters when nobody can lead, or when this node leads (it is about to step down).
        found.append(
            Problem(
                code="ray.not_eligible",
                severity="warning",
                subject=node,
                message=f"this node may not be Ray head: {status.not_eligible_reason}",
                fix=_eligibility_fix(status.not_eligible_reason),
            )
        )
    if no_head and status.election_reason not in ("", "starting"):
        majority = "majority" in status.election_reason
        found.append(
            Problem(
                code="ray.no_head",
                severity="critical",
                subject="cluster",
                message=f"no Ray head: {status.election_reason}",
                fix=(
                    "bring enough members back (or let the dead ones leave) so that a majority "
                    "of the known members is alive"
                    if majority
                    else "make at least one node eligible (see ray.not_eligible in "
                    "`gpud doctor` on each node)"
                ),
            )
        )
    return found


def workload_checks(status: RayStatus, node: str) -> list[WorkloadCheck]:
    """Ray's ports as /v1/health shows them (pure): this worker's probes of its head's GCS,
    the head's checks of each tagged worker, and this node's registration in its GCS."""
    checks = []
    reach = status.gcs_reach
    if reach is not None:
        checks.append(
            WorkloadCheck(
                check="ray.gcs",
                subject=reach.head,
                target=reach.address,
                state=reach.direction.state,
                reason=reach.direction.reason,
            )
        )
    gcs = status.ray_nodes.gcs_address or ""
    if status.role == "head":
        for worker in status.workers:
            checks.append(
                WorkloadCheck(
                    check="ray.worker",
                    subject=worker.name,
                    target=f"{worker.addr}:{worker.node_manager_port}"
                    if worker.node_manager_port
                    else gcs,
                    state=worker.direction.state,
                    reason=worker.direction.reason,
                )
            )
    if gcs and status.process.process.state == "running":
        checks.append(
            WorkloadCheck(
                check="ray.registered",
                subject=node,
                target=gcs,
                state=status.registration.state,
                reason=status.registration.reason,
            )
        )
    return checks


def _reach_problems(status: RayStatus, node: str) -> list[Problem]:
    """Ray's own ports: the worker's GCS probes, the head's tagged workers missing from its
    GCS, this node missing from the GCS, and a head kept although its workers cannot reach it."""
    found: list[Problem] = []
    source = status.process.target.node_ip if status.process.target else ""
    reach = gcs_reach_problem(node, source or "this node", status.gcs_reach)
    if reach is not None:
        found.append(reach)
    gcs = status.ray_nodes.gcs_address or "?"
    if status.role == "head":
        for worker in status.workers:
            problem = missing_worker_problem(node, gcs, worker)
            if problem is not None:
                found.append(problem)
    running = status.process.process.state == "running"
    registration = registration_problem(node, gcs, status.registration, running)
    if registration is not None:
        found.append(registration)
    if status.gcs_unreachable_kept:
        found.append(
            Problem(
                code="ray.head_gcs_unreachable",
                severity="critical",
                subject=node,
                message=f"{GCS_UNREACHABLE}; {node} stays head: no other node is eligible",
                fix="open this node's GCS port to the workers (see ray.gcs_unreachable on "
                "them), or make another node eligible to lead",
            )
        )
    return found
