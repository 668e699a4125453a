"""Block claims: which block of the cluster port space this node holds (pure functions).

The port space [range_start, range_end) is cut into blocks of block_size ports. Every node
claims one block, unique among the nodes that share its host address. There is no leader:

- a node without a claim takes the first block in its own rendezvous-hash order that no
  same-address member claims in its view;
- it announces the block in its tags (``blk``; ``bc`` = when it was confirmed) and confirms it
  when no rival has contested it for ``ports.settle_s``;
- when two same-address nodes claim one block, every node ranks the claimants the same way:
  a confirmed claim beats an unconfirmed one (so a newcomer never displaces a node that is
  already using its block), an earlier confirmation beats a later one (nodes sharing an
  address share a host, hence a clock; this covers a node that confirmed before gossip
  reached it), then the higher rendezvous score for that block, then the name.
  The loser moves to its next free block.

Members that are "failed" keep their block until they are reaped; "left" members and members
that are gone hold nothing.

A member's word about itself is not enough to take a block (whoever holds the cluster key can
gossip any tags):
- only verified gpud nodes (they answered this node's signed ping as themselves, at their
  address) can make this node give up or skip a block; a block held only by an unverified
  member is free, though a node still prefers a block nobody holds;
- a confirmation time must be plausible against when this node first saw that claim: an
  announced ``bc`` more than ``CLAIM_SKEW_S`` before the first sighting counts as the first
  sighting. So a claim that appeared after a confirmed block cannot take it by announcing an
  earlier time. This node ranks its own claim the same way (after a restart its claim appears
  anew to the others, so it yields to one confirmed while it was away, as they decide too).

``step`` is the whole claim state machine (claiming, confirmed, exhausted; the settle timer;
conflicts) as one pure function: the claim loop of ``gpud.ports.service`` feeds it the
members and clocks and carries out the actions it returns, and the property tests drive it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec

from gpud.config import PortsConfig

# Member statuses that still hold a block ("failed" ones may come back until Serf reaps them).
HOLDING_STATUSES = frozenset({"alive", "leaving", "failed"})
NO_BLOCK = -1
# How much earlier than its first sighting a confirmation time may be (gossip delay: a claim is
# seen unconfirmed at least ports.settle_s before it is confirmed, so this is only slack).
CLAIM_SKEW_S = 5
# How long a new claim waits for unverified same-address claimants of its block to be verified
# (the prober's first signed pings take a few seconds) before it ignores them.
UNVERIFIED_WAIT_S = 30.0

ClaimState = Literal["claiming", "confirmed", "exhausted"]


class ClaimView(msgspec.Struct, frozen=True, kw_only=True):
    """One member's block claim as this node sees it (from its tags)."""

    name: str
    addr: str
    status: str
    blk: int = NO_BLOCK
    # Unix seconds the claim was confirmed; 0: not confirmed.
    confirmed_at: int = 0
    # A verified gpud node of this cluster (see the module doc); unverified members never
    # make this node give up or skip a block.
    verified: bool = True
    # Unix seconds this node first saw ``name`` claim ``blk``; 0: unknown (the claim was there
    # before this node had joined), and the announced time is taken as it is.
    first_seen: int = 0


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    """This node's own claim."""

    blk: int
    confirmed_at: int = 0

    @property
    def confirmed(self) -> bool:
        return self.confirmed_at > 0


class ClaimRecord(msgspec.Struct, kw_only=True):
    """The persisted claim, with the geometry it was made under (a config change voids it)."""

    blk: int
    # Unix seconds of the confirmation (announced as tag `bc`; earlier wins a conflict).
    confirmed_at: int = 1
    range_start: int
    range_end: int
    block_size: int


def block_count(ports: PortsConfig) -> int:
    return (ports.range_end - ports.range_start) // ports.block_size


def block_range(ports: PortsConfig, blk: int) -> range:
    start = ports.range_start + blk * ports.block_size
    return range(start, start + ports.block_size)


def score(name: str, blk: int) -> int:
    """Rendezvous (highest-random-weight) score of ``name`` for block ``blk``."""
    digest = hashlib.blake2b(f"{name}\x00{blk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@functools.lru_cache(maxsize=256)
def preference(name: str, n_blocks: int) -> tuple[int, ...]:
    """Blocks in ``name``'s rendezvous order: best first, stable as other nodes come and go."""
    return tuple(sorted(range(n_blocks), key=lambda blk: (-score(name, blk), blk)))


def plausible_confirmed_at(confirmed_at: int, first_seen: int) -> int:
    """The confirmation time this node believes: an announced time more than CLAIM_SKEW_S
    before this node first saw the claim is replaced by that first sighting."""
    if confirmed_at > 0 and first_seen > 0 and confirmed_at < first_seen - CLAIM_SKEW_S:
        return first_seen
    return confirmed_at


def _rank(name: str, blk: int, confirmed_at: int) -> tuple[bool, int, int, str]:
    return (confirmed_at > 0, -confirmed_at, score(name, blk), name)


def _view_rank(v: ClaimView) -> tuple[bool, int, int, str]:
    return _rank(v.name, v.blk, plausible_confirmed_at(v.confirmed_at, v.first_seen))


def rivals(me: str, my_addr: str, views: Iterable[ClaimView], n_blocks: int) -> list[ClaimView]:
    """Other members on my address that hold a valid block (verified or not)."""
    return [
        v
        for v in views
        if v.name != me
        and v.addr == my_addr
        and v.status in HOLDING_STATUSES
        and 0 <= v.blk < n_blocks
    ]


def _own_first_seen(me: str, blk: int, views: Iterable[ClaimView]) -> int:
    return next((v.first_seen for v in views if v.name == me and v.blk == blk), 0)


def _my_rank(me: str, claim: Claim, views: Iterable[ClaimView]) -> tuple[bool, int, int, str]:
    seen = _own_first_seen(me, claim.blk, views)
    return _rank(me, claim.blk, plausible_confirmed_at(claim.confirmed_at, seen))


def wins(
    me: str, claim: Claim, contenders: Sequence[ClaimView], views: Iterable[ClaimView] = ()
) -> bool:
    """Whether my claim outranks every other claimant of the same block (``views`` give my own
    claim's first sighting)."""
    mine = _my_rank(me, claim, views)
    return all(mine > _view_rank(v) for v in contenders)


def decide(
    me: str,
    my_addr: str,
    current: Claim | None,
    views: Iterable[ClaimView],
    n_blocks: int,
) -> int | None:
    """The block this node should claim now, or None when every block is taken.

    ``current`` is this node's present claim (the persisted one after a restart); ``views`` are
    the members as gossip shows them (this node among them or not: it is skipped).
    """
    views = tuple(views)
    others = rivals(me, my_addr, views, n_blocks)
    trusted = [v for v in others if v.verified]
    if current is not None and 0 <= current.blk < n_blocks:
        contenders = [v for v in trusted if v.blk == current.blk]
        if wins(me, current, contenders, views):
            return current.blk
    # A block nobody holds first; failing that, one that only unverified members hold.
    for taken in ({v.blk for v in others}, {v.blk for v in trusted}):
        for blk in preference(me, n_blocks):
            if blk not in taken:
                return blk
    return None


def contested(
    me: str, my_addr: str, claim: Claim, views: Iterable[ClaimView], n_blocks: int, young: bool
) -> bool:
    """Whether another same-address member claims my block too, so it is not settled.

    A verified one always contests. An unverified one contests only a claim never confirmed
    and ``young`` (made less than UNVERIFIED_WAIT_S ago): it may be a gpud that started with us
    and is not verified yet (wait for it rather than confirm a block both would use), but it can
    neither keep a confirmed (or restarted) node from its block nor stall a newcomer for long."""
    on_mine = [v for v in rivals(me, my_addr, views, n_blocks) if v.blk == claim.blk]
    if any(v.verified for v in on_mine):
        return True
    return bool(on_mine) and not claim.confirmed and young


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    """A same-address member claims this node's confirmed block and this node keeps it."""

    name: str
    addr: str
    blk: int
    reason: str


def refusals(
    me: str, my_addr: str, claim: Claim, views: Iterable[ClaimView], n_blocks: int
) -> tuple[Refusal, ...]:
    """Claims of my confirmed block that I do not yield to: from unverified members, or ones
    that would win only by a confirmation time earlier than I first saw them."""
    views = tuple(views)
    mine = _my_rank(me, claim, views)
    found = []
    for v in rivals(me, my_addr, views, n_blocks):
        if v.blk != claim.blk:
            continue
        if not v.verified:
            reason = "it is not a verified gpud node (it did not answer our signed ping as itself)"
        elif _rank(v.name, v.blk, v.confirmed_at) > mine >= _view_rank(v):
            reason = (
                f"it announces confirmation at {v.confirmed_at}, before this node first saw "
                f"its claim at {v.first_seen}"
            )
        else:
            continue
        found.append(Refusal(name=v.name, addr=v.addr, blk=v.blk, reason=reason))
    return tuple(found)


# ---- the claim state machine ------------------------------------------------------------------


class Drop(msgspec.Struct, frozen=True, tag=True):
    """Give up ``blk`` (lost a conflict, or no block left): forget the persisted claim if it
    was confirmed, remove the kernel reservation gpud added for it."""

    blk: int
    was_confirmed: bool


class Confirm(msgspec.Struct, frozen=True, tag=True):
    """Persist the claim of ``blk``, confirmed at ``confirmed_at``; then it may be used."""

    blk: int
    confirmed_at: int


class Announce(msgspec.Struct, frozen=True, tag=True):
    """Gossip tags ``blk`` and ``bc`` (NO_BLOCK and 0: no claim)."""

    blk: int
    bc: int


class Reserve(msgspec.Struct, frozen=True, tag=True):
    """Keep the kernel from using ``blk`` for ephemeral ports."""

    blk: int


Action = Drop | Confirm | Announce | Reserve


class ClaimInput(msgspec.Struct, frozen=True, kw_only=True):
    me: str
    addr: str
    n_blocks: int
    settle_s: float
    # Reserve a confirmed block in the kernel (ports.reserve).
    reserve: bool
    claim: Claim | None
    state: ClaimState
    # Monotonic time since which the claim has been announced and uncontested.
    settled_since: float
    # Monotonic time the present claim was made (see contested).
    claimed_since: float = 0.0
    # What this node announces now (its tags `blk`, `bc`).
    published: tuple[int, int]
    # The members as gossip shows them, this node among them (its view shows what gossip
    # carries of its own claim).
    views: tuple[ClaimView, ...]
    # Monotonic clock (settle timer) and wall clock (Unix seconds, for confirmed_at).
    now: float
    wall_now: int


class ClaimOutput(msgspec.Struct, frozen=True, kw_only=True):
    claim: Claim | None
    state: ClaimState
    settled_since: float
    claimed_since: float = 0.0
    # To carry out in order; each must be done before the next (persist before announce).
    actions: tuple[Action, ...]
    # Claims of this node's confirmed block that it refused (shown as problems).
    refused: tuple[Refusal, ...] = ()


def step(inp: ClaimInput) -> ClaimOutput:
    """One round of the claim state machine (pure)."""
    claim, state, settled_since = inp.claim, inp.state, inp.settled_since
    claimed_since = inp.claimed_since
    actions: list[Action] = []
    confirmed_now: int | None = None
    blk = decide(inp.me, inp.addr, claim, inp.views, inp.n_blocks)
    if blk is None:
        if claim is not None:
            actions.append(Drop(blk=claim.blk, was_confirmed=claim.confirmed))
        claim, state = None, "exhausted"
    elif claim is None or blk != claim.blk:
        if claim is not None:
            actions.append(Drop(blk=claim.blk, was_confirmed=claim.confirmed))
        claim, state, settled_since = Claim(blk=blk), "claiming", inp.now
        claimed_since = inp.now
    elif not _announced(inp.me, blk, inp.views) or contested(
        inp.me,
        inp.addr,
        claim,
        inp.views,
        inp.n_blocks,
        young=inp.now - claimed_since < UNVERIFIED_WAIT_S,
    ):
        # The settle time counts only once gossip carries our claim and nobody else on this
        # address claims the block.
        settled_since = inp.now
    elif state != "confirmed" and inp.now - settled_since >= inp.settle_s:
        # A claim confirmed before a restart keeps its time: it ranks by when it was first
        # confirmed, not by when this process came back.
        confirmed_at = claim.confirmed_at if claim.confirmed else max(1, inp.wall_now)
        claim, state = Claim(blk=blk, confirmed_at=confirmed_at), "confirmed"
        actions.append(Confirm(blk=blk, confirmed_at=confirmed_at))
        confirmed_now = blk
    # Announce whatever differs from what gossip is told: a new claim, a confirmation, a drop,
    # and after a restart the persisted claim with its confirmation time.
    wanted = (claim.blk, claim.confirmed_at) if claim is not None else (NO_BLOCK, 0)
    if wanted != inp.published:
        actions.append(Announce(blk=wanted[0], bc=wanted[1]))
    if inp.reserve and confirmed_now is not None:
        actions.append(Reserve(blk=confirmed_now))
    refused = (
        refusals(inp.me, inp.addr, claim, inp.views, inp.n_blocks)
        if claim is not None and claim.confirmed
        else ()
    )
    return ClaimOutput(
        claim=claim,
        state=state,
        settled_since=settled_since,
        claimed_since=claimed_since,
        actions=tuple(actions),
        refused=refused,
    )


def _announced(me: str, blk: int, views: Iterable[ClaimView]) -> bool:
    """Whether gossip already shows ``me`` claiming ``blk``."""
    return any(v.name == me and v.blk == blk for v in views)
