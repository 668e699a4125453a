"""The health component: the peer API server, the probe loop, verdicts and `gpud doctor`."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec
from aiohttp import web

from gpud import log, secret
from gpud.component import ComponentBase, Metric, Problem, gauge
from gpud.config import Config
from gpud.context import Member, MemberStatus, NodeContext
from gpud.health.peer_api import PeerApiServer, PeerCallError, PeerClient
from gpud.health.prober import (
    INDIRECT_PEERS,
    QUICK_S,
    SILENT_CONNECT_S,
    PeerRecord,
    Prober,
    host_answers,
    ring_neighbours,
    select_targets,
    sweep_steps,
)
from gpud.health.verdict import (
    HEALTH_STATES,
    Direction,
    DirectionState,
    Endpoint,
    HealthState,
    NatVerdict,
    PairKind,
    PairVerdict,
    Thresholds,
    WorkloadCheck,
    detect_nat,
    judge_node,
    judge_pair,
    majority_verdict,
    restarting_verdict,
)
from gpud.netcheck import NetCheck, NetworkStatus
from gpud.netprobe import tcp_connect

_log = log.get("health")

# Probe-interval jitter (fraction either side) so nodes started together do not probe in step.
JITTER = 0.2


class PeerRow(msgspec.Struct):
    """One direction of one pair. out: us -> peer, in: peer -> us."""

    peer: str
    addr: str
    port: int
    direction: Literal["out", "in"]
    state: DirectionState
    rtt_ms: float | None
    reason: str
    serf: MemberStatus
    # What the in direction is judged from: "dial-back", "inbound probes" or "no evidence..."
    # ("" for out).
    source: str = ""


class PairRow(msgspec.Struct):
    peer: str
    state: HealthState
    kind: PairKind
    message: str
    fix: str


class MatrixEdge(msgspec.Struct):
    """Who reaches whom, from our probes and the views peers shared with us."""

    src: str
    dst: str
    state: DirectionState
    rtt_ms: float | None


# Beyond full mesh, a node that judged a peer down tells the others to check it (peer API).
PATH_SUSPECT = "/v1/peer/health/suspect"
# A down verdict reached within this long of a notice about that peer came from the notice.
NOTICE_S = 5.0


class SuspectNotice(msgspec.Struct, forbid_unknown_fields=True):
    peer: str


class SuspectReply(msgspec.Struct):
    # False: no check started (not a peer we track, already down, or one is running).
    checking: bool


# A node that finds a peer silent asks a few others whether they reach it (`Prober`'s
# `others_reach`): a fault between two nodes is not the death of one.
PATH_REACH = "/v1/peer/health/reach"


class ReachRequest(msgspec.Struct, forbid_unknown_fields=True):
    peer: str


class ReachReply(msgspec.Struct):
    # None: not a peer we track (no opinion).
    answered: bool | None


class HealthStatus(msgspec.Struct):
    state: HealthState
    reasons: list[str]
    behind_nat: bool
    nat_message: str
    rounds: int
    peers: list[PeerRow]
    pairs: list[PairRow]
    matrix: list[MatrixEdge]
    # The workload's own ports, from the components that run it (HealthService.add_workload).
    workload: list[WorkloadCheck] = []


NetworkSource = NetCheck | Callable[[], NetworkStatus | None]


def nat_address_input(status: NetworkStatus | None) -> bool | None:
    """``address_is_local`` as NAT detection should read it: an address that was local and is
    gone (DHCP drift) is a network problem that NetCheck reports, not NAT; only an address that
    was never on a local interface means NAT or port mapping."""
    if status is None or status.address_is_local is None:
        return None
    if status.address_is_local:
        return True
    return False if not status.interface else None


# NetCheck's code for an advertised address that is on no local interface: our NAT verdict
# explains the same thing with more evidence, so it supersedes that problem.
ADDRESS_NOT_LOCAL = "network.address_not_local"


def network_problems(status: NetworkStatus | None, nat: NatVerdict) -> list[Problem]:
    """NetCheck's problems, less its not-local warning when our NAT verdict already says it."""
    if status is None:
        return []
    return [p for p in status.problems if not (nat.behind_nat and p.code == ADDRESS_NOT_LOCAL)]


def nat_problem(nat: NatVerdict) -> Problem:
    return Problem(
        code="health.behind_nat",
        severity="critical",
        subject="network",
        message=nat.message,
        fix="run gpud and Ray with host networking (docker run --network host), or map every port "
        "1:1 and set node.advertise to the address peers reach",
        supersedes=frozenset({ADDRESS_NOT_LOCAL}),
    )


def pair_problem(peer: str, verdict: PairVerdict | PairRow) -> Problem | None:
    """A problem for a pair that is warning or critical; None when passing or not yet known."""
    if verdict.state not in ("warning", "critical"):
        return None
    return Problem(
        code=f"health.{verdict.kind}",
        severity=verdict.state,
        subject=peer,
        message=verdict.message,
        fix=verdict.fix,
    )


def health_problems(status: HealthStatus, nat: NatVerdict | None = None) -> list[Problem]:
    """The NAT verdict and every pair that is not passing (pure)."""
    problems = [nat_problem(nat)] if nat is not None and nat.behind_nat else []
    for pair in status.pairs:
        problem = pair_problem(pair.peer, pair)
        if problem is not None:
            problems.append(problem)
    return problems


class HealthService(ComponentBase):
    """Component "health". ``network`` is the NetCheck component, or a callable returning its
    NetworkStatus (None while unknown)."""

    name = "health"

    def __init__(
        self,
        ctx: NodeContext,
        network: NetworkSource | None = None,
        *,
        keyring_file: Path | None = None,
        seed: int | None = None,
    ) -> None:
        self._ctx = ctx
        self._network = network
        health = ctx.config.health
        self._thresholds = Thresholds(
            health.failures_before_critical, health.successes_before_passing
        )
        # Keys from every gossip key in Serf's keyring, so peers keep talking during a rotation.
        self._key = secret.PeerApiKeys(ctx.config, keyring_file)
        self._rng = random.Random(seed)
        self.client = PeerClient(self._key, ctx.node_name, health.timeout_s)
        self.prober = Prober(
            self.client,
            self._thresholds,
            health.concurrency,
            health.interval_s,
            on_down_change=self._down_changed,
            restart_grace_s=health.restart_grace_s,
            others_reach=self._others_reach,
        )
        self.server = PeerApiServer(
            ctx, self._key, self.client, self.prober.view_rows, on_inbound=self.prober.note_inbound
        )
        self._status = HealthStatus("unknown", ["not started"], False, "", 0, [], [], [])
        self._nat_verdict: NatVerdict | None = None
        self._workload_sources: list[Callable[[], list[WorkloadCheck]]] = []
        # This round's probe targets: the quick loop checks the same peers between rounds.
        self._targets: list[str] = []
        # The quick loop's TaskGroup while it runs: checks started outside the loop join it.
        self._checks: asyncio.TaskGroup | None = None
        # Peers judged down (each new one is passed on once); when a notice made us check a
        # peer (a verdict it leads to is not passed on again).
        self._judged: set[str] = set()
        self._noticed: dict[str, float] = {}
        self.server.add_route(PATH_SUSPECT, self._suspect)
        self.server.add_route(PATH_REACH, self._reach)
        # One connect burst per peer at a time, whoever asks (`_reach`).
        self._reaching: dict[str, asyncio.Future[bool]] = {}

    def reconfigure(self, config: Config) -> None:
        """A reload's [health]: the probe loop reads interval, fan-out and concurrency from the
        config each round; the hysteresis thresholds and the probe timeout are held here."""
        health = config.health
        self._thresholds = Thresholds(
            health.failures_before_critical, health.successes_before_passing
        )
        self.prober.set_thresholds(self._thresholds)
        self.client.timeout_s = health.timeout_s

    @property
    def us(self) -> Endpoint:
        return Endpoint(self._ctx.node_name, self._ctx.advertise_addr, self._ctx.config.peer.port)

    def _network_status(self) -> NetworkStatus | None:
        if self._network is None:
            return None
        if isinstance(self._network, NetCheck):
            return self._network.status()
        return self._network()

    def _source_addr(self, network: NetworkStatus | None) -> str | None:
        """Probe from the advertised address while it is ours: that is the path Ray uses.
        Without a NetCheck the caller vouches for the address; with one, only once it has
        seen the address on a local interface."""
        if self._network is None or (network is not None and network.address_is_local):
            return self._ctx.advertise_addr
        return None

    async def run(self) -> None:
        await self.server.start()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._probe_loop())
                group.create_task(self._quick_loop())
        finally:
            await self.server.stop()
            await self.client.close()

    async def readvertise(self) -> HealthStatus:
        """After the advertised address changed (or vanished): move the peer API to the new
        address, probe from it, and re-judge at once so a lost address is critical now, not
        at the next round."""
        await self.server.follow_advertise()
        await self.client.set_source_addr(self._source_addr(self._network_status()))
        self._status = self._judge()
        await self._publish(self._status)
        return self._status

    async def _probe_loop(self) -> None:
        health = self._ctx.config.health
        while True:
            started = time.monotonic()
            await self.probe_round()
            delay = health.interval_s * self._rng.uniform(1 - JITTER, 1 + JITTER)
            await asyncio.sleep(max(0.0, delay - (time.monotonic() - started)))

    async def _quick_loop(self) -> None:
        async with asyncio.TaskGroup() as checks:
            self._checks = checks
            try:
                while True:
                    await asyncio.sleep(QUICK_S)
                    self.prober.quick_tick(self._targets, checks.create_task)
            finally:
                self._checks = None

    def _down_changed(self) -> None:
        """A peer was judged down or answers again: the member view, the election (woken by
        the membership change) and /v1/health learn it now, not at the end of the round."""
        down = self.prober.down()
        self._ctx.set_down(down)
        if self.prober.rounds:
            self._status = self._judge()
        now = time.monotonic()
        for name in sorted(down.keys() - self._judged):
            # Beyond full mesh most peers do not probe the dead one this round: tell them, so
            # each checks it now and judges it from its own probes. Only what we found
            # ourselves is passed on, so one death costs O(N) notices, not O(N^2).
            told_us = now - self._noticed.pop(name, -math.inf) <= NOTICE_S
            if self._checks is not None and not told_us:
                self._checks.create_task(self._tell_suspect(name))
        self._judged = set(down)

    async def _tell_suspect(self, name: str) -> None:
        health = self._ctx.config.health
        if len(self.prober.records) + 1 <= health.full_mesh_max:
            return  # every peer probes it every round already
        gate = asyncio.Semaphore(health.concurrency)
        notice = SuspectNotice(peer=name)

        async def tell(member: Member) -> None:
            async with gate:
                with contextlib.suppress(PeerCallError):
                    await self.client.call(
                        member.addr, member.tags.pp, PATH_SUSPECT, notice, SuspectReply
                    )

        async with asyncio.TaskGroup() as group:
            for other, record in sorted(self.prober.records.items()):
                member = record.member
                if other != name and member.alive and member.tags is not None and member.tags.pp:
                    group.create_task(tell(member))

    async def _suspect(self, body: bytes) -> bytes:
        """A peer found ``peer`` down: check it now with our own probes (one check per peer
        at a time, so repeated notices cost nothing more)."""
        notice = msgspec.json.decode(body, type=SuspectNotice)
        started = self._checks is not None and self.prober.check_now(
            notice.peer, self._checks.create_task
        )
        if started:
            self._noticed[notice.peer] = time.monotonic()
        return msgspec.json.encode(SuspectReply(checking=started))

    async def _others_reach(self, name: str) -> bool | None:
        """Ask up to INDIRECT_PEERS other alive peers whether ``name``'s host answers them:
        True when one does, False when those that answered found it silent, None when none
        could be asked or none answered."""
        askable = [
            r.member
            for other, r in sorted(self.prober.records.items())
            if other != name
            and r.down_reason is None
            and r.member.alive
            and r.member.tags is not None
            and r.member.tags.pp
        ]
        chosen = self._rng.sample(askable, min(INDIRECT_PEERS, len(askable)))
        request = ReachRequest(peer=name)

        async def ask(member: Member) -> bool | None:
            try:
                reply = await self.client.call(
                    member.addr,
                    member.tags.pp,
                    PATH_REACH,
                    request,
                    ReachReply,
                    timeout_s=SILENT_CONNECT_S + self.client.timeout_s,
                )
            except PeerCallError:
                return None
            return reply.answered

        async with asyncio.TaskGroup() as group:
            asked = [group.create_task(ask(m)) for m in chosen]
        answers = [a.result() for a in asked]
        if any(answers):
            return True
        return False if False in answers else None

    async def _reach(self, body: bytes) -> bytes:
        """A peer asks whether ``peer``'s host answers us: connects to its peer API and serf
        ports (the addresses from our own view, never from the request)."""
        name = msgspec.json.decode(body, type=ReachRequest).peer
        record = self.prober.records.get(name)
        if record is None or not record.port:
            return msgspec.json.encode(ReachReply(answered=None))
        pending = self._reaching.get(name)
        if pending is None:
            pending = asyncio.ensure_future(self._host_answers(record))
            self._reaching[name] = pending
            pending.add_done_callback(lambda _: self._reaching.pop(name, None))
        answered = await asyncio.shield(pending)
        return msgspec.json.encode(ReachReply(answered=answered))

    async def _host_answers(self, record: PeerRecord) -> bool:
        member, source = record.member, self.client.source_addr
        async with asyncio.TaskGroup() as group:
            tries = [
                group.create_task(tcp_connect(member.addr, p, SILENT_CONNECT_S, source_addr=source))
                for p in (record.port, member.port)
            ]
        return host_answers([t.result() for t in tries])

    async def confirm_now(self) -> None:
        """One probe round now: fresh contact times for the leader lease after a freeze."""
        await self.probe_round()

    def lease_contacts(self) -> dict[str, float]:
        return self.prober.lease_contacts()

    def heard_from(self) -> dict[str, float]:
        return self.prober.heard_from()

    async def probe_round(self) -> HealthStatus:
        """One round: probe this round's targets, update verdicts and tags."""
        health = self._ctx.config.health
        await self.client.set_source_addr(self._source_addr(self._network_status()))
        self.prober.sync(self._ctx.members, self._ctx.node_name)
        names = list(self.prober.records)
        head = next(
            (
                n
                for n, r in self.prober.records.items()
                if r.member.tags and r.member.tags.ray == "head"
            ),
            None,
        )
        watch = self.prober.watch(health.random_peers)
        targets = select_targets(
            self._ctx.node_name,
            names,
            head=head,
            full_mesh_max=health.full_mesh_max,
            random_peers=health.random_peers,
            step=int(time.time() / health.interval_s),
            watch=watch,
        )
        full_mesh = len(names) + 1 <= health.full_mesh_max
        neighbours = ring_neighbours(self._ctx.node_name, names) or ()
        # Between rounds, beyond full mesh, each node quick-checks only the peer after it on
        # the ring (so every node is checked by one peer, the head too: its lease needs no
        # probes, see gpud.ray.lease_tree) and the watched peers; a death that another node
        # finds reaches us by its notice (`_tell_suspect`).
        quick = {neighbours[1], *watch} if neighbours else set()
        self._targets = targets if full_mesh else [n for n in targets if n in quick]
        cycle = sweep_steps(len(names), health.random_peers) + 2
        await self.prober.run_round(
            targets,
            full_mesh=full_mesh,
            swept=[] if full_mesh else [n for n in targets if n not in neighbours],
            swept_window_s=cycle * health.interval_s + health.timeout_s,
        )
        self._status = self._judge()
        await self._publish(self._status)
        return self._status

    def _judge(self) -> HealthStatus:
        status, self._nat_verdict = self._assess(self.prober)
        return status

    def _assess(self, prober: Prober) -> tuple[HealthStatus, NatVerdict]:
        """The verdicts on ``prober``'s records: the round's (self.prober) and doctor's (a
        one-shot prober) alike, so one fault gets one problem code in status and doctor."""
        us = self.us
        records = sorted(prober.records.items())
        verdicts = [(name, self._pair(us, r)) for name, r in records]
        network = self._network_status()
        nat = self._nat(us, network, [(r.out, r.inbound) for _, r in records])
        state, reasons = judge_node(
            prober.rounds > 0,
            [v for _, v in verdicts],
            nat,
            [(p.severity, p.message) for p in network_problems(network, nat)],
        )
        status = HealthStatus(
            state=state,
            reasons=reasons,
            behind_nat=nat.behind_nat,
            nat_message=nat.message,
            rounds=prober.rounds,
            peers=[row for _, r in records for row in _rows(r)],
            pairs=[PairRow(name, v.state, v.kind, v.message, v.fix) for name, v in verdicts],
            matrix=self._matrix(records),
        )
        return status, nat

    def _pair(self, us: Endpoint, record: PeerRecord) -> PairVerdict:
        peer = Endpoint(record.member.name, record.member.addr, record.port)
        if record.restarting and record.down_reason is None:
            return restarting_verdict(peer, self._ctx.config.health.restart_grace_s)
        if record.down_reason is not None:
            # The prober's confirmed down verdict (seconds before Serf's `failed`).
            return PairVerdict(
                "critical",
                "down",
                f"{record.down_reason} (Serf: {record.member.status})",
                f"check that the host {peer.addr} is up and gpud runs on it "
                "(systemctl status gpud)",
            )
        tags = record.member.tags
        return judge_pair(
            us,
            peer,
            record.member.status,
            record.out,
            record.inbound,
            peer_nat=tags is not None and tags.nat,
        )

    @staticmethod
    def _nat(
        us: Endpoint, network: NetworkStatus | None, directions: list[tuple[Direction, Direction]]
    ) -> NatVerdict:
        reached = [inbound for out, inbound in directions if out.state == "passing"]
        no_way_back = sum(inbound.state == "critical" for inbound in reached)
        return detect_nat(us, nat_address_input(network), len(reached), no_way_back)

    def _matrix(self, records: list[tuple[str, PeerRecord]]) -> list[MatrixEdge]:
        edges = {
            (self._ctx.node_name, name): MatrixEdge(
                self._ctx.node_name, name, r.out.state, r.last_out.rtt_ms if r.last_out else None
            )
            for name, r in records
        }
        for name, r in records:
            for row in r.view.rows if r.view is not None else []:
                edges.setdefault(
                    (name, row.peer), MatrixEdge(name, row.peer, row.state, row.rtt_ms)
                )
        return [edges[key] for key in sorted(edges)]

    async def _publish(self, status: HealthStatus) -> None:
        if status.state == "unknown":
            # No verdict (no probe results yet): the last one announced stands until the next.
            # After a restart of gpud alone that is the predecessor's, so peers keep placing
            # on this node rather than take it out for the seconds its first probes take.
            return
        try:
            await self._ctx.update_tags(hl=status.state, nat=status.behind_nat)
        except Exception as exc:  # a gossip hiccup must not stop the probe loop
            log.warning(_log, "could not publish health tags", error=str(exc))

    def status(self) -> HealthStatus:
        return self.health()

    def summary(self) -> str:
        status = self._status
        out = [row for row in status.peers if row.direction == "out"]
        passing = sum(row.state == "passing" for row in out)
        line = f"{status.state}, {passing}/{len(out)} peers reached over the data path"
        return line + ("; BEHIND NAT" if status.behind_nat else "")

    def problems(self) -> list[Problem]:
        return health_problems(self._status, self._nat_verdict)

    def metrics(self) -> list[Metric]:
        status = self._status
        return [
            Metric(
                name="gpud_health_state",
                help="This node's health verdict (1 for the current state).",
                samples=[({"state": s}, float(status.state == s)) for s in HEALTH_STATES],
            ),
            gauge(
                "gpud_behind_nat",
                "1 when this node is behind NAT or port mapping.",
                float(status.behind_nat),
            ),
            Metric(
                name="gpud_peer_reachable",
                help="1 when the data path to (out) or from (in) a peer passes, 0 when critical.",
                samples=[
                    ({"peer": p.peer, "direction": p.direction}, float(p.state == "passing"))
                    for p in status.peers
                    if p.state in ("passing", "critical")
                ],
            ),
            Metric(
                name="gpud_peer_rtt_seconds",
                help="Round-trip time of the last successful probe to a peer.",
                samples=[
                    ({"peer": p.peer}, p.rtt_ms / 1000)
                    for p in status.peers
                    if p.direction == "out" and p.rtt_ms is not None
                ],
            ),
        ]

    def healthy_by_majority(self, node: str) -> bool | None:
        """Data-path verdict on ``node`` from the alive members' probes of it (the matrix)."""
        record = self.prober.records.get(node)
        if record is not None and record.down_reason is None:
            if record.gcs_answers or record.restarting:
                # Its gpud does not answer but the Ray GCS it heads (or its workload) does:
                # slow, frozen or restarting, not down. Keep it (no verdict); deposing it
                # would restart every Ray node.
                return None
        observers = {m.name for m in self._ctx.members.values() if m.alive and m.name != node}
        states = {
            e.src: e.state for e in self._status.matrix if e.dst == node and e.src in observers
        }
        return majority_verdict(list(states.values()), len(observers))

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/health", self._get_health)]

    def add_workload(self, source: Callable[[], list[WorkloadCheck]]) -> None:
        """Show ``source``'s checks of the workload's ports in /v1/health and status."""
        self._workload_sources.append(source)

    def health(self) -> HealthStatus:
        """The last verdict with the workload checks as of now."""
        workload = [c for source in self._workload_sources for c in source()]
        return msgspec.structs.replace(self._status, workload=workload)

    async def _get_health(self, request: web.Request) -> web.Response:
        return web.Response(
            body=msgspec.json.encode(self.health()), content_type="application/json"
        )

    async def diagnose(self) -> list[Problem]:
        """Probe every peer now (no hysteresis: each result counts) and report what the round
        would, built by the same function: the NAT verdict and every pair not passing."""
        network = self._network_status()
        await self.client.set_source_addr(self._source_addr(network))
        health = self._ctx.config.health
        now = Prober(
            self.client,
            Thresholds(1, 1),
            health.concurrency,
            health.interval_s,
            inbound_at=self.prober.inbound_at,
            always_dial_back=True,
            confirm_down=False,
        )
        now.sync(self._ctx.members, self._ctx.node_name)
        names = list(now.records)
        await now.run_round(names, full_mesh=len(names) + 1 <= health.full_mesh_max)
        for name, record in now.records.items():
            live = self.prober.records.get(name)
            if live is not None and record.out.state != "passing":
                # The quick loop's re-probes judged it down (or restarting) and it still does
                # not answer: the same fault status shows, with the same code.
                record.down_reason, record.restarting = live.down_reason, live.restarting
        status, nat = self._assess(now)
        return health_problems(status, nat)


def _rows(record: PeerRecord) -> list[PeerRow]:
    m = record.member
    return [
        PeerRow(
            m.name,
            m.addr,
            record.port,
            "out",
            record.out.state,
            record.last_out.rtt_ms if record.last_out else None,
            record.out.reason,
            m.status,
        ),
        PeerRow(
            m.name,
            m.addr,
            record.port,
            "in",
            record.inbound.state,
            record.dial_back.rtt_ms if record.dial_back else None,
            record.inbound.reason,
            m.status,
            record.inbound_source,
        ),
    ]
