"""The leader lease without fan-in: the head's renewals travel down a tree of its members and
the acknowledgements come back up, so the head sends FANOUT messages per renewal at any size.

The lease rule stays the one of gpud.ray.lease: the head acts while a majority of the
known members confirmed it within LEASE_S, each member refuses a successor until LEASE_S +
LEASE_MARGIN_S after it last heard from the head. Relaying keeps the one inequality that rule
rests on: the head counts a member as confirmed at the moment it *sent* the renewal the member
acknowledged, and the member counts the head as heard at the moment that renewal *reached* it,
which is never earlier (a relay can only delay a renewal, and a delay makes the member refuse
longer, never shorter). So any successor's majority meets a member still refusing it while
the old head acts. The tree is rebuilt per renewal (the ring rotated), so a dead relay cuts
off its subtree for one renewal only; members it lists outside the range it was given are not
believed.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated

import msgspec

# Children per node of the tree: the head sends this many messages per renewal, every other
# member at most this many and receives one; depth ~ log_FANOUT(N) (5 hops at 5,000).
FANOUT = 8
# How long the head waits for a renewal's acknowledgements, and what each hop keeps for its
# own answer: a renewal every RENEW_S confirmed within the budget keeps a live head's lease at
# most RENEW_S + BUDGET_S old, well inside LEASE_S (2.5 s) even with one renewal lost.
RENEW_S = 0.5
BUDGET_S = 0.4
HOP_S = 0.04


# Bounds a sender cannot exceed: a member name (gpud's limit), a position in any ring, and
# no more waiting than the head itself allows.
_Name = Annotated[str, msgspec.Meta(max_length=200)]
_Position = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]


class Renewal(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``head`` renews its lease of ``term``: pass it to positions [lo, hi) of the renewal's
    order (`relay_order`) within ``budget_ms``, and answer who received it."""

    head: _Name
    term: Annotated[int, msgspec.Meta(ge=0, le=2**62)]
    epoch: Annotated[int, msgspec.Meta(ge=0, le=2**62)]
    # The ring's first member after the head in this renewal's order (`relay_order`).
    start: _Name
    lo: _Position
    hi: _Position
    budget_ms: Annotated[int, msgspec.Meta(ge=0, le=int(BUDGET_S * 1000))]


class RenewalAck(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    acked: list[str]


def renewal_start(head: str, ring: Sequence[str], epoch: int) -> str:
    """Where the head's ``epoch``-th renewal starts the ring: about 0.618 N further on each
    time, so successive trees spread each member's relay duty evenly (pure)."""
    others = [n for n in ring if n != head]
    if not others:
        return ""
    return others[epoch * max(1, int(len(others) * 0.6180339887)) % len(others)]


def relay_order(head: str, ring: Sequence[str], start: str) -> list[str]:
    """The head, then the other members of ``ring`` (sorted, unique names) from the first at
    or after ``start`` on, round the ring (pure; O(N) and no hashing, as every member computes
    it for every renewal). A view that lacks or adds a member moves the positions after it by
    one, not the whole order."""
    others = [n for n in ring if n != head]
    at = bisect.bisect_left(others, start)
    return [head, *others[at:], *others[:at]]


def split(lo: int, hi: int, fanout: int) -> list[tuple[int, int, int]]:
    """Positions [lo, hi) as at most ``fanout`` near-equal runs: (child, its lo, its hi), the
    child at the start of its run and the rest of the run its subtree (pure)."""
    count = hi - lo
    if count <= 0:
        return []
    runs = min(fanout, count)
    out, start = [], lo
    for i in range(runs):
        size = count // runs + (1 if i < count % runs else 0)
        out.append((start, start + 1, start + size))
        start += size
    return out


def tree_depth(lo: int, hi: int, fanout: int) -> int:
    """Hops from the node given positions [lo, hi) to the deepest of them (pure)."""
    runs = split(lo, hi, fanout)
    return 1 + max(tree_depth(a, b, fanout) for _, a, b in runs) if runs else 0


Send = Callable[[str, Renewal], Awaitable[RenewalAck]]


class LeaseRelay:
    """One node's part in the tree: as head it renews (and keeps when each member last
    confirmed it), as member it records the renewal and passes it on.

    ``members``: the names this node counts (its view); ``send``: one signed call to a member.
    """

    def __init__(
        self,
        me: str,
        members: Callable[[], Sequence[str]],
        send: Send,
        *,
        fanout: int = FANOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._me = me
        self._members = members
        self._send = send
        self._fanout = fanout
        self._clock = clock
        # Milliseconds at start: a restarted head's renewals are never taken for repeats.
        self._epoch = int(time.time() * 1000)
        # The members sorted, kept while the view is the same (a renewal each RENEW_S).
        self._ring: tuple[tuple[str, ...], list[str]] = ((), [])
        # As head: member -> send time of the newest renewal it acknowledged (a lease contact).
        self.contacts: dict[str, float] = {}
        # As member: head -> when a renewal from it last reached us (a voter's lease).
        self.heard: dict[str, float] = {}
        # The renewals this node passed on lately (head, epoch).
        self._passed: collections.deque[tuple[str, int]] = collections.deque(maxlen=64)
        self.sent = 0  # messages this node sent, for the scale figures

    async def renew(self, term: int) -> int:
        """Send one renewal down the tree; returns how many members acknowledged it."""
        self._epoch += 1
        sent_at = self._clock()
        ring = self._sorted([*self._members(), self._me])
        start = renewal_start(self._me, ring, self._epoch)
        order = relay_order(self._me, ring, start)
        renewal = Renewal(
            head=self._me,
            term=term,
            epoch=self._epoch,
            start=start,
            lo=1,
            hi=len(order),
            budget_ms=int(BUDGET_S * 1000),
        )
        acked = await self._forward(renewal, order)
        for name in acked:
            self.contacts[name] = max(self.contacts.get(name, -math.inf), sent_at)
        return len(acked)

    async def receive(self, renewal: Renewal) -> RenewalAck:
        """A renewal reached us: the head was alive when it sent it. Pass it on, then answer
        for this node and the subtree below it."""
        if renewal.head == self._me:
            return RenewalAck(acked=[])
        now = self._clock()
        self.heard[renewal.head] = max(self.heard.get(renewal.head, -math.inf), now)
        if (renewal.head, renewal.epoch) in self._passed:
            # Reached twice (views that differ) or replayed: passed on once, so no member
            # sends more than FANOUT per renewal.
            return RenewalAck(acked=[self._me])
        self._passed.append((renewal.head, renewal.epoch))
        ring = self._sorted([*self._members(), self._me])
        order = relay_order(renewal.head, ring, renewal.start)
        return RenewalAck(acked=[self._me, *sorted(await self._forward(renewal, order))])

    def _sorted(self, names: list[str]) -> list[str]:
        key = tuple(names)
        if key != self._ring[0]:
            self._ring = (key, sorted(set(names)))
        return self._ring[1]

    async def _forward(self, renewal: Renewal, order: list[str]) -> set[str]:
        budget_s = renewal.budget_ms / 1000 - HOP_S
        runs = split(renewal.lo, min(renewal.hi, len(order)), self._fanout)
        if budget_s <= 0:
            return set()
        budget_ms = int(budget_s * 1000)
        acked: set[str] = set()

        async def ask(child: str, lo: int, hi: int) -> None:
            sub = msgspec.structs.replace(renewal, lo=lo, hi=hi, budget_ms=budget_ms)
            self.sent += 1
            try:
                reply = await self._send(child, sub)
            except Exception:  # a member down or slow: its subtree misses this renewal
                return
            # Only the members of the run this child was given: a view that differs (or a
            # faulty relay) cannot confirm members it was never asked to reach.
            acked.update(set(reply.acked) & {child, *order[lo:hi]})

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget_s), asyncio.TaskGroup() as group:
                for child, lo, hi in runs:
                    if order[child] != self._me:
                        group.create_task(ask(order[child], lo, hi))
        return acked
