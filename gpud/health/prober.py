"""The probe loop's parts: which peers to probe (pure), and one round of data-path probes.

Per peer we keep two hysteresis machines: out (us -> peer: TCP connect + authenticated ping)
and in (peer -> us: the peer's dial-back to our advertised address, else the peer's own pings
arriving at our peer API).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence

from gpud.context import Member
from gpud.health.peer_api import PeerCallError, PeerClient, ProbeOutcome, ViewReply, ViewRow
from gpud.health.verdict import Direction, Thresholds, step

# Peers' views (for the reachability matrix) are fetched every this many rounds.
VIEW_EVERY_ROUNDS = 3
# Rows older than this many intervals are left out of our view (peers we no longer probe).
VIEW_FRESH_INTERVALS = 10


def select_targets(
    self_name: str,
    peers: Sequence[str],
    *,
    head: str | None,
    full_mesh_max: int,
    random_peers: int,
    rng: random.Random,
) -> list[str]:
    """Peers to probe this round: all of them while the cluster (peers + us) has at most
    ``full_mesh_max`` members; else the Ray head, our two ring neighbours (sorted names) and
    ``random_peers`` random others, so each node's cost stays O(k) at any size."""
    candidates = sorted(set(peers) - {self_name})
    if len(candidates) + 1 <= full_mesh_max:
        return candidates
    ring = sorted([*candidates, self_name])
    at = ring.index(self_name)
    chosen = {ring[(at - 1) % len(ring)], ring[(at + 1) % len(ring)]}
    if head in candidates:
        chosen.add(head)
    rest = [name for name in candidates if name not in chosen]
    chosen.update(rng.sample(rest, min(random_peers, len(rest))))
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
    ) -> None:
        self._client = client
        self._thresholds = thresholds
        self._concurrency = concurrency
        self._interval_s = interval_s
        self.records: dict[str, PeerRecord] = {}
        # When each peer's last authenticated request reached our peer API (monotonic).
        self.inbound_at: dict[str, float] = {} if inbound_at is None else inbound_at
        self._always_dial_back = always_dial_back
        self.rounds = 0

    def note_inbound(self, peer: str) -> None:
        self.inbound_at[peer] = time.monotonic()

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

    async def run_round(self, targets: Sequence[str], *, full_mesh: bool) -> None:
        gate = asyncio.Semaphore(self._concurrency)
        async with asyncio.TaskGroup() as group:
            for name in targets:
                if name in self.records:
                    group.create_task(self._probe(self.records[name], gate, full_mesh))
        self.rounds += 1

    async def _probe(self, record: PeerRecord, gate: asyncio.Semaphore, full_mesh: bool) -> None:
        async with gate:
            addr, port = record.member.addr, record.port
            if not port:
                outcome = ProbeOutcome(
                    ok=False, error="the peer announces no peer API port in its tags"
                )
            else:
                name = record.member.name
                outcome = await self._client.probe(addr, port, expect=name)
                if not outcome.ok:
                    # One lost SYN costs the kernel a 1 s retransmit, longer than the probe
                    # timeout: retry once at once so random loss does not count as failure.
                    outcome = await self._client.probe(addr, port, expect=name)
            record.last_out, record.last_out_at = outcome, time.time()
            record.out = step(record.out, outcome.ok, outcome.error, self._thresholds)
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
