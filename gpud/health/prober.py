"""The probe loop's parts: which peers to probe (pure), and one round of data-path probes.

Per peer we keep two hysteresis machines: out (us -> peer: TCP connect + authenticated ping)
and in (peer -> us: the peer's dial-back to our advertised address, else the peer's own pings
arriving at our peer API).

Besides those slow verdicts, a peer is judged *down* within about a second of dying: a quick
TCP connect to every target between rounds, and on any failure a short burst of re-probes
(`down_verdict`, pure); one that answers nothing at all (no refusal either) is down within a
few seconds once it stays silent on every port, is not heard from, and the peers asked to try
it cannot reach it either (`silent_verdict`, pure). The same records give the Ray leader lease
its contact times.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence

from gpud import api, log
from gpud.context import Member
from gpud.deployments.claims import parse_claims
from gpud.health.peer_api import PeerCallError, PeerClient, ViewReply, ViewRow
from gpud.health.verdict import Direction, Thresholds, step
from gpud.netprobe import ProbeOutcome, tcp_connect
from gpud.tags import Tags

# Peers' views (for the reachability matrix) are fetched every this many rounds.
VIEW_EVERY_ROUNDS = 3
# Rows older than this many intervals are left out of our view (peers we no longer probe).
VIEW_FRESH_INTERVALS = 10
# Between rounds every target gets a bare TCP connect this often: a kill -9'd host answers
# with a reset at once, so it is noticed within QUICK_S instead of a full interval.
QUICK_S = 0.5
# A failed probe is re-checked this many times, CONFIRM_GAP_S apart, before the peer is judged
# down: a connect refused four times in a row is no accident of loss or of a restart.
CONFIRM_PROBES = 3
CONFIRM_GAP_S = 0.25
# A host whose packets vanish (power loss, a kernel hang, a cut cable) refuses nothing and
# answers nothing. Its silence is checked with connects long enough to include the kernel's
# first SYN retransmit (at 1 s), so one lost packet does not make a port look silent: to its
# peer API twice, to its serf's gossip port (serf runs apart from gpud: a frozen gpud's host
# still answers there) and to its workload's ports, all at once; under 5 % loss each connect
# fails about 1 % of the time, all of them together about once in a million.
SILENT_CONNECT_S = 1.5
# ... and it is down only once no request of its own reached us for this many probe intervals
# (plus a probe timeout): in a full mesh every live peer probes us every interval, so a peer we
# merely cannot reach (a one-way fault) is still heard from.
QUIET_INTERVALS = 1.25
# Peers asked to try it too, as memberlist's indirect probes: one that reaches it means a fault
# between the two of us (named by the pair verdicts), not its death.
INDIRECT_PEERS = 2
# Beyond full mesh, this many nodes besides its two ring neighbours probe the Ray head in one
# step, in turn around the ring (`watches_head`): the head's load stays bounded at any size
# (its leader lease travels down gpud.ray.lease_tree, not by probes), and up to a few dozen
# nodes each still probes it every few steps, so every view keeps a fresh row of it.
HEAD_WATCHERS = 8

_log = log.get("health")


def workload_ports(tags: Tags | None) -> list[int]:
    """The TCP ports of the workload a peer announces, which keep answering while only its
    gpud is down (gpud leaves them running across a restart): its Ray GCS as head, its node
    manager as a Ray worker, the server of each replica it reports ready, each replica GCS it
    heads and the node manager of each replica's Ray node it runs as a worker (pure)."""
    if tags is None:
        return []
    ports = [tags.gcs] if tags.ray == "head" and tags.gcs else []
    if tags.ray == "worker" and tags.nm:
        ports.append(tags.nm)
    for claim in parse_claims(tags.dp).values():
        if claim.ready:
            ports.append(claim.port)
        ports += [p for p in (claim.gcs, claim.nm) if p]
    return sorted(set(ports))


def _all_refused(outcomes: Sequence[ProbeOutcome]) -> bool:
    return len(outcomes) >= 1 + CONFIRM_PROBES and all(
        not o.ok and o.cause == "refused" for o in outcomes
    )


def _answers(workload: Sequence[ProbeOutcome]) -> bool:
    return bool(workload) and all(w.ok for w in workload)


def restarting(
    outcomes: Sequence[ProbeOutcome],
    workload: Sequence[ProbeOutcome],
    *,
    failing_for_s: float,
    grace_s: float,
) -> bool:
    """Is the peer's gpud restarting: its peer API refuses (``outcomes``, a confirmed burst)
    while every port of the workload it announces answers (``workload``, one connect each,
    at least one), for less than ``grace_s`` so far (pure)."""
    return _all_refused(outcomes) and _answers(workload) and failing_for_s < grace_s


def down_verdict(
    name: str,
    outcomes: Sequence[ProbeOutcome],
    workload: Sequence[ProbeOutcome],
    *,
    heard_since: bool,
    failing_for_s: float = 0.0,
    grace_s: float = 0.0,
) -> str | None:
    """Why ``name`` is down, or None. ``outcomes``: a failed probe and its re-probes; every
    one must be refused: immediate evidence that nothing listens on its peer port (kill -9,
    crash, host up without gpud). Timeouts are not: a frozen gpud, a dropping firewall and
    loss look the same, so they stay with the pair verdicts and Serf. ``heard_since``: the
    peer's own requests reached us since it began failing, so it is alive. ``workload``: a
    TCP connect to each port of the workload it announces (`workload_ports`): while they all
    answer, its gpud is restarting, not its host dying, and it is down only once it has
    refused for ``grace_s`` (``failing_for_s``: since its first failure)."""
    if heard_since or not _all_refused(outcomes):
        return None
    if restarting(outcomes, workload, failing_for_s=failing_for_s, grace_s=grace_s):
        return None
    lead = f"{name} is down: its peer API port refuses connections (gpud is not running there)"
    if _answers(workload):
        return (
            f"{lead} for {failing_for_s:.0f} s, longer than health.restart_grace_s "
            f"({grace_s:g} s), though its workload's ports still answer"
        )
    silent = [w.error for w in workload if not w.ok]
    return f"{lead}, {len(outcomes)} probes in a row" + (
        f"; its workload refuses too ({silent[0]})" if silent else ""
    )


def silent_verdict(
    name: str,
    outcomes: Sequence[ProbeOutcome],
    *,
    quiet_for_s: float,
    window_s: float,
    reached_by_others: bool | None,
) -> str | None:
    """Why ``name`` is down though it refuses nothing, or None (pure). ``outcomes``: the silence
    check's connects (at least two); every one must have timed out. ``quiet_for_s``: since its
    last request reached us; ``window_s``: how long a live peer may go without one.
    ``reached_by_others``: True when a peer asked to try reached it, False when those asked did
    not, None when none could be asked or none answered (then our own probes decide)."""
    if len(outcomes) < 2 or not all(not o.ok and o.cause == "timeout" for o in outcomes):
        return None
    if quiet_for_s < window_s or reached_by_others:
        return None
    others = "" if reached_by_others is None else ", nor from the peers asked to try it"
    return (
        f"{name} is down: it answers nothing ({len(outcomes)} connects to its peer API, serf "
        f"and workload ports timed out{others}; no request from it for {quiet_for_s:.1f} s): "
        "power loss, a kernel hang or a cut cable"
    )


def host_answers(outcomes: Sequence[ProbeOutcome]) -> bool:
    """Did the host answer at all: a connect accepted or refused (its kernel is alive) (pure)."""
    return any(o.ok or o.cause == "refused" for o in outcomes)


def sweep_order(ring_size: int) -> list[int]:
    """Ring offsets the sweep visits, beyond the two neighbours (offsets 1 and -1): 2, -2, 3,
    -3, ... as positive offsets. Each offset d sits beside its mirror ring_size - d, so when
    every node probes the same offsets in the same step, the peer it probes at d probes it
    back at -d: both directions of the pair are judged from probes, without a dial-back."""
    order: list[int] = []
    for d in range(2, ring_size // 2 + 1):
        order.append(d)
        if ring_size - d != d:
            order.append(ring_size - d)
    return order


def sweep_steps(peers: int, random_peers: int) -> int:
    """Consecutive steps in which `select_targets` probes every one of ``peers`` peers at
    least once beyond full mesh (the bound the hypothesis test checks)."""
    others = max(0, peers - 2)
    return max(1, -(-others // random_peers))


def ring_neighbours(self_name: str, peers: Sequence[str]) -> tuple[str, str] | None:
    """The peers before and after us on the ring of sorted names (us included), or None
    without peers (with one peer it is both)."""
    ring = sorted({*peers, self_name})
    if len(ring) < 2:
        return None
    at = ring.index(self_name)
    return ring[(at - 1) % len(ring)], ring[(at + 1) % len(ring)]


def watches_head(ring: Sequence[str], at: int, head_at: int, step: int) -> bool:
    """Does the node at ring position ``at`` probe the head (at ``head_at``) in ``step``: its
    two ring neighbours always, HEAD_WATCHERS others in turn, all of them within
    ceil((len(ring) - 1) / HEAD_WATCHERS) steps (pure)."""
    others = len(ring) - 1
    d = (at - head_at) % len(ring)
    if d in (1, others):
        return True
    return (d - 1 - step * HEAD_WATCHERS) % others < HEAD_WATCHERS


def select_targets(
    self_name: str,
    peers: Sequence[str],
    *,
    head: str | None,
    full_mesh_max: int,
    random_peers: int,
    step: int,
    watch: Sequence[str] = (),
) -> list[str]:
    """Peers to probe this round: all of them while the cluster (peers + us) has at most
    ``full_mesh_max`` members; else the Ray head (when `watches_head`), our two ring
    neighbours (sorted names), the ``watch`` peers (failing ones, checked every round until
    they are judged) and
    ``random_peers`` others taken in turn from the ring (`sweep_order`) by ``step``, so each
    node's cost stays O(k) at any size while every pair is still probed within
    `sweep_steps` steps. ``step`` counts shared wall-clock intervals: every node sweeps the
    same offsets at once, so each probe is answered by the peer's own probe back."""
    candidates = sorted(set(peers) - {self_name})
    if len(candidates) + 1 <= full_mesh_max:
        return candidates
    ring = sorted([*candidates, self_name])
    at = ring.index(self_name)
    chosen = set(ring_neighbours(self_name, candidates) or ())
    if head in candidates and watches_head(ring, at, ring.index(head), step):
        chosen.add(head)
    chosen.update(name for name in watch if name in candidates)
    order = [ring[(at + d) % len(ring)] for d in sweep_order(len(ring))]
    if order:
        start = (step * random_peers) % len(order)
        rest = [n for n in order[start:] + order[:start] if n not in chosen]
        chosen.update(rest[:random_peers])
    return sorted(chosen)


class PeerRecord:
    """What we know about reaching one peer."""

    def __init__(self, member: Member) -> None:
        self.member = member
        self.out = Direction()
        self.inbound = Direction()
        self.last_out: ProbeOutcome | None = None
        self.last_out_at = 0.0
        self.inbound_source = ""
        self.dial_back: ProbeOutcome | None = None
        self.view: ViewReply | None = None
        # Down verdict (None: not down) and whether a re-probe burst is running.
        self.down_reason: str | None = None
        self.confirming = False
        # A failed round probe waiting for quick_tick to confirm it.
        self.suspect: ProbeOutcome | None = None
        # Monotonic time of the first failure since the last success (None while answering).
        self.failing_since: float | None = None
        # Head only: did its GCS port answer at the last down check (None: not checked).
        self.gcs_answers: bool | None = None
        # Its gpud refuses but its workload answers, within the restart grace (`restarting`).
        self.restarting = False
        # The down verdict is `silent_verdict`'s: any request from it ends the verdict.
        self.silent = False
        # Monotonic send and reply times of the last successful probe (leader lease).
        self.ok_sent_at = 0.0
        self.ok_at = 0.0

    @property
    def port(self) -> int:
        return self.member.tags.pp if self.member.tags is not None else 0


class Prober:
    """Runs probe rounds against peers and keeps their records."""

    def __init__(
        self,
        client: PeerClient,
        thresholds: Thresholds,
        concurrency: int,
        interval_s: float,
        *,
        inbound_at: dict[str, float] | None = None,
        always_dial_back: bool = False,
        on_down_change: Callable[[], None] | None = None,
        confirm_down: bool = True,
        restart_grace_s: float = 0.0,
        others_reach: Callable[[str], Awaitable[bool | None]] | None = None,
    ) -> None:
        self._client = client
        # Asks other peers whether they reach a silent peer (`silent_verdict`).
        self._others_reach = others_reach
        # How long a peer whose gpud refuses but whose workload answers is not judged down.
        self._restart_grace_s = restart_grace_s
        self._thresholds = thresholds
        self._concurrency = concurrency
        self._interval_s = interval_s
        self.records: dict[str, PeerRecord] = {}
        # When each peer's last authenticated request reached our peer API (monotonic).
        self.inbound_at: dict[str, float] = {} if inbound_at is None else inbound_at
        self._always_dial_back = always_dial_back
        self._on_down_change = on_down_change or (lambda: None)
        # False for one-shot checks (doctor): no re-probe bursts, no down verdicts.
        self._confirm = confirm_down
        self.rounds = 0
        self._swept: set[str] = set()
        self._swept_window_s = 0.0
        # Probes that raised instead of returning an outcome (a bug, or a peer's input no
        # check foresaw): each is logged (rate-limited) and counted, and ends nothing else.
        self.errors = 0
        self._errors_log = api.RateLimitedLog(_log)

    async def _contained(self, name: str, probe: Coroutine[None, None, None]) -> None:
        try:
            await probe
        except Exception as exc:
            self.errors += 1
            self._errors_log.event(
                logging.ERROR, "probe failed", peer=name, error=f"{type(exc).__name__}: {exc}"
            )

    def set_thresholds(self, thresholds: Thresholds) -> None:
        """New hysteresis thresholds (a config reload); directions keep their counts."""
        self._thresholds = thresholds

    def note_inbound(self, peer: str) -> None:
        self.inbound_at[peer] = time.monotonic()
        record = self.records.get(peer)
        if record is not None and record.silent:
            self._set_down(record, None)  # judged silent, yet its request reached us

    def sync(self, members: dict[str, Member], self_name: str) -> None:
        """Track alive and failed peers; forget those that left."""
        keep = {
            name: m
            for name, m in members.items()
            if name != self_name and m.status in ("alive", "failed", "leaving")
        }
        for name in list(self.records):
            if name not in keep:
                del self.records[name]
                self._client.forget(name)
        for name, member in keep.items():
            record = self.records.get(name)
            if record is None:
                self.records[name] = PeerRecord(member)
            else:
                record.member = member

    async def run_round(
        self,
        targets: Sequence[str],
        *,
        full_mesh: bool,
        swept: Collection[str] = (),
        swept_window_s: float = 0.0,
    ) -> None:
        """Probe ``targets``. ``swept``: targets that probe us only once per sweep of the
        ring, not every round: their requests count as evidence of the way back for
        ``swept_window_s``, so a pair both sides sweep needs no dial-back."""
        self._swept, self._swept_window_s = set(swept), swept_window_s
        gate = asyncio.Semaphore(self._concurrency)
        async with asyncio.TaskGroup() as group:
            for name in targets:
                if name in self.records:
                    probe = self._probe(self.records[name], gate, full_mesh)
                    group.create_task(self._contained(name, probe))
        self.rounds += 1

    async def _probe(self, record: PeerRecord, gate: asyncio.Semaphore, full_mesh: bool) -> None:
        async with gate:
            addr, port = record.member.addr, record.port
            if not port:
                outcome = ProbeOutcome(
                    ok=False, error="the peer announces no peer API port in its tags", cause="other"
                )
            else:
                name = record.member.name
                sent = time.monotonic()
                outcome = await self._client.probe(addr, port, expect=name)
                if not outcome.ok:
                    # One lost SYN costs the kernel a 1 s retransmit, longer than the probe
                    # timeout: retry once at once so random loss does not count as failure.
                    sent = time.monotonic()
                    outcome = await self._client.probe(addr, port, expect=name)
                if outcome.ok:
                    record.ok_sent_at, record.ok_at = sent, time.monotonic()
            record.last_out, record.last_out_at = outcome, time.time()
            record.out = step(
                record.out, outcome.ok, outcome.error, self._thresholds, outcome.cause
            )
            if outcome.ok:
                record.failing_since, record.restarting = None, False
                self._set_down(record, None)
            elif port and self._confirm:
                # Confirmed between rounds (quick_tick), so a dead peer never slows a round.
                record.suspect = outcome
                record.failing_since = record.failing_since or sent
            if outcome.ok and self.rounds % VIEW_EVERY_ROUNDS == 0:
                try:
                    record.view = await self._client.view(addr, port)
                except PeerCallError:
                    record.view = None
            inbound = await self._inbound_evidence(record, outcome.ok, full_mesh)
            if inbound is None:
                # No evidence either way: old results must not keep vouching for this direction.
                record.inbound = Direction()
                record.inbound_source = "no evidence: the peer did not probe us, no dial-back"
            else:
                ok, reason = inbound
                record.inbound = step(record.inbound, ok, reason, self._thresholds)

    def quick_tick(
        self, targets: Sequence[str], spawn: Callable[[Coroutine[None, None, None]], object]
    ) -> None:
        """Between rounds: re-probe peers whose last round probe failed, and give every other
        target that is not down a bare TCP connect (a failure starts the same re-probes); the
        Ray head gets a full authenticated probe instead, so both sides of its leader lease
        hear from each other every QUICK_S (beyond full mesh only its ring predecessor quick-
        checks it: the lease renewals come down gpud.ray.lease_tree).
        ``spawn`` runs each check as a task of the caller's TaskGroup, so no check holds up
        another, nor the rounds; at most one check per peer runs at a time. A failed round
        probe is confirmed whether or not its peer is among ``targets``."""
        failed = [n for n, r in self.records.items() if r.suspect is not None and n not in targets]
        for name in [*targets, *failed]:
            record = self.records.get(name)
            if record is None or not record.port or record.confirming:
                continue
            first, record.suspect = record.suspect, None
            if first is None and record.down_reason is not None:
                continue  # already down: the rounds notice when it answers again
            record.confirming = True
            spawn(self._contained(name, self._check(record, first)))

    def check_now(self, name: str, spawn: Callable[[Coroutine[None, None, None]], object]) -> bool:
        """Check ``name`` now as quick_tick would (a peer told us it found it down); False
        when it is not a peer we track, is already down, or a check of it is running."""
        record = self.records.get(name)
        if record is None or not record.port or record.confirming or record.down_reason:
            return False
        record.confirming = True
        spawn(self._contained(name, self._check(record, None)))
        return True

    async def _check(self, record: PeerRecord, first: ProbeOutcome | None) -> None:
        try:
            tags = record.member.tags
            if first is None and tags is not None and tags.ray == "head":
                sent = time.monotonic()
                outcome = await self._client.probe(
                    record.member.addr, record.port, expect=record.member.name
                )
                if outcome.ok:
                    record.ok_sent_at, record.ok_at = sent, time.monotonic()
                    return
                first = outcome
            if first is None:
                tcp = await tcp_connect(
                    record.member.addr,
                    record.port,
                    min(self._client.timeout_s, QUICK_S),
                    source_addr=self._client.source_addr,
                )
                if tcp.ok:
                    return
                first = tcp
            await self._confirm_down(record, first)
        finally:
            record.confirming = False

    async def _confirm_down(self, record: PeerRecord, first: ProbeOutcome) -> None:
        """Re-probe a peer that just failed, CONFIRM_GAP_S apart, and judge it (down_verdict)."""
        started = time.monotonic()
        record.failing_since = record.failing_since or started
        if first.cause == "timeout" and await self._judged_silent(record):
            return
        name, addr, port = record.member.name, record.member.addr, record.port
        outcomes = [first]
        for _ in range(CONFIRM_PROBES):
            await asyncio.sleep(CONFIRM_GAP_S)
            outcome = await self._client.probe(addr, port, expect=name)
            if outcome.ok:
                record.failing_since, record.restarting = None, False
                self._set_down(record, None)
                return
            outcomes.append(outcome)
        tags = record.member.tags
        ports = workload_ports(tags)
        workload = await asyncio.gather(
            *(
                tcp_connect(addr, p, self._client.timeout_s, source_addr=self._client.source_addr)
                for p in ports
            )
        )
        if tags is not None and tags.ray == "head" and tags.gcs in ports:
            record.gcs_answers = workload[ports.index(tags.gcs)].ok
        else:
            record.gcs_answers = None
        if record.failing_since is None:
            return  # a round probe got an answer meanwhile
        heard = self.inbound_at.get(name, 0.0) > record.failing_since
        failing_for = time.monotonic() - record.failing_since
        grace = self._restart_grace_s
        record.restarting = not heard and restarting(
            outcomes, workload, failing_for_s=failing_for, grace_s=grace
        )
        self._set_down(
            record,
            down_verdict(
                name,
                outcomes,
                workload,
                heard_since=heard,
                failing_for_s=failing_for,
                grace_s=grace,
            ),
        )

    async def _judged_silent(self, record: PeerRecord) -> bool:
        """A peer whose probe timed out: connect to all it listens on at once and judge it by
        `silent_verdict`. False when something refused (its kernel answers: the refusal rules
        judge it)."""
        member, name = record.member, record.member.name
        workload = workload_ports(member.tags)
        ports = [record.port, record.port, member.port, *workload]
        outcomes = await asyncio.gather(
            *(
                tcp_connect(member.addr, p, SILENT_CONNECT_S, source_addr=self._client.source_addr)
                for p in ports
            )
        )
        tags = member.tags
        if tags is not None and tags.ray == "head" and tags.gcs in workload:
            record.gcs_answers = outcomes[3 + workload.index(tags.gcs)].ok
        if any(o.cause == "refused" for o in outcomes):
            return False
        if host_answers(outcomes):
            return True  # slow or frozen, not gone: the pair verdicts and Serf judge it
        window = QUIET_INTERVALS * self._interval_s + self._client.timeout_s
        async with asyncio.TaskGroup() as group:
            asked = group.create_task(self._others_reach(name)) if self._others_reach else None
            quiet = time.monotonic() - self.inbound_at.get(name, -math.inf)
            if quiet < window:
                await asyncio.sleep(window - quiet)
        reached = asked.result() if asked is not None else None
        if record.failing_since is None:
            return True  # a round probe got an answer meanwhile
        quiet = time.monotonic() - self.inbound_at.get(name, -math.inf)
        verdict = silent_verdict(
            name, outcomes, quiet_for_s=quiet, window_s=window, reached_by_others=reached
        )
        self._set_down(record, verdict, silent=verdict is not None)
        return True

    def _set_down(self, record: PeerRecord, reason: str | None, *, silent: bool = False) -> None:
        record.silent = silent
        if reason != record.down_reason:
            record.down_reason = reason
            self._on_down_change()

    def watch(self, limit: int) -> list[str]:
        """Peers to probe every round beyond full mesh, not only when the sweep comes round
        to them: those whose probes fail but are not judged yet, then those judged down (so
        a restarted gpud is seen again within a round). At most ``limit``, so a mass failure
        cannot make a round O(N)."""
        records = sorted(self.records.items())
        pending = [
            n
            for n, r in records
            if r.down_reason is None and r.failing_since is not None and r.out.state != "critical"
        ]
        down = [n for n, r in records if r.down_reason is not None]
        return [*pending, *down][:limit]

    def down(self) -> dict[str, str]:
        """Peers judged down now: name -> reason."""
        return {n: r.down_reason for n, r in self.records.items() if r.down_reason is not None}

    def lease_contacts(self) -> dict[str, float]:
        """For the head's lease: per peer, the latest monotonic time that is surely no later
        than the peer last heard from us (our successful probe's send time, or its request's
        arrival here)."""
        return {n: max(r.ok_sent_at, self.inbound_at.get(n, 0.0)) for n, r in self.records.items()}

    def heard_from(self) -> dict[str, float]:
        """For a voter's side of the lease: per peer, the latest monotonic time we heard from
        it (reply to our probe, or its request's arrival): never earlier than its own view."""
        return {n: max(r.ok_at, self.inbound_at.get(n, 0.0)) for n, r in self.records.items()}

    async def _inbound_evidence(
        self, record: PeerRecord, reached: bool, full_mesh: bool
    ) -> tuple[bool, str] | None:
        """(ok, reason) for the peer -> us direction this round, or None with no evidence.

        The peer's own probes arriving at our API are the cheapest evidence: they went to the
        address and port the peer has for us, exactly where a dial-back would go. A dial-back
        is asked for only without them (beyond full mesh, or a peer that cannot reach us), or
        always when ``always_dial_back`` (doctor)."""
        name = record.member.name
        at = self.inbound_at.get(name)
        window = 2 * self._interval_s + self._client.timeout_s
        if name in self._swept:
            window = max(window, self._swept_window_s)
        fresh = at is not None and time.monotonic() - at <= window
        if fresh and not self._always_dial_back:
            record.inbound_source, record.dial_back = "inbound probes", None
            return True, ""
        if reached:
            try:
                reply = await self._client.dial_back(record.member.addr, record.port)
            except PeerCallError:
                record.dial_back = None
            else:
                record.dial_back, record.inbound_source = reply.outcome, "dial-back"
                if reply.outcome.ok:
                    return True, ""
                return (
                    False,
                    f"{name} dialled back to {reply.addr}:{reply.port}: {reply.outcome.error}",
                )
        if fresh:
            record.inbound_source, record.dial_back = "inbound probes", None
            return True, ""
        # In a full mesh every live peer probes us every interval: their absence is a failure.
        if full_mesh:
            record.inbound_source = "inbound probes"
            return False, f"no probe from {name} has reached us for {window:g} s"
        return None

    def verified(self, name: str) -> bool:
        """Is ``name`` a verified gpud node: it answered our authenticated ping as itself, at
        the address and peer port gossip announces for it now. A member we do not track (left,
        never seen, or ourselves) is not. Election, port blocks and dial-backs ask this."""
        record = self.records.get(name)
        if record is None or not record.port:
            return False
        return self._client.verified(name, record.member.addr, record.port)

    def view_rows(self) -> list[ViewRow]:
        fresh_after = time.time() - VIEW_FRESH_INTERVALS * self._interval_s
        return [
            ViewRow(
                peer=name,
                addr=r.member.addr,
                port=r.port,
                state=r.out.state,
                ok=r.last_out.ok,
                rtt_ms=r.last_out.rtt_ms,
                error=r.last_out.error,
                at=r.last_out_at,
            )
            for name, r in sorted(self.records.items())
            if r.last_out is not None and r.last_out_at >= fresh_after
        ]
