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

ClaimState = Literal["claiming", "confirmed", "exhausted"]


class ClaimView(msgspec.Struct, frozen=True, kw_only=True):
    """One member's block claim as this node sees it (from its tags)."""

    name: str
    addr: str
    status: str
    blk: int = NO_BLOCK
    # Unix seconds the claim was confirmed; 0: not confirmed.
    confirmed_at: int = 0


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


def _rank(name: str, blk: int, confirmed_at: int) -> tuple[bool, int, int, str]:
    return (confirmed_at > 0, -confirmed_at, score(name, blk), name)


def rivals(me: str, my_addr: str, views: Iterable[ClaimView], n_blocks: int) -> list[ClaimView]:
    """Other members on my address that hold a valid block."""
    return [
        v
        for v in views
        if v.name != me
        and v.addr == my_addr
        and v.status in HOLDING_STATUSES
        and 0 <= v.blk < n_blocks
    ]


def wins(me: str, claim: Claim, contenders: Sequence[ClaimView]) -> bool:
    """Whether my claim outranks every other claimant of the same block."""
    mine = _rank(me, claim.blk, claim.confirmed_at)
    return all(mine > _rank(v.name, v.blk, v.confirmed_at) for v in contenders)


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
    others = rivals(me, my_addr, views, n_blocks)
    if current is not None and 0 <= current.blk < n_blocks:
        contenders = [v for v in others if v.blk == current.blk]
        if wins(me, current, contenders):
            return current.blk
    taken = {v.blk for v in others}
    for blk in preference(me, n_blocks):
        if blk not in taken:
            return blk
    return None


def contested(me: str, my_addr: str, blk: int, views: Iterable[ClaimView], n_blocks: int) -> bool:
    """Whether another same-address member claims ``blk`` too (the claim is not settled)."""
    return any(v.blk == blk for v in rivals(me, my_addr, views, n_blocks))


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
    # To carry out in order; each must be done before the next (persist before announce).
    actions: tuple[Action, ...]


def step(inp: ClaimInput) -> ClaimOutput:
    """One round of the claim state machine (pure)."""
    claim, state, settled_since = inp.claim, inp.state, inp.settled_since
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
    elif not _announced(inp.me, blk, inp.views) or contested(
        inp.me, inp.addr, blk, inp.views, inp.n_blocks
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
    return ClaimOutput(
        claim=claim, state=state, settled_since=settled_since, actions=tuple(actions)
    )


def _announced(me: str, blk: int, views: Iterable[ClaimView]) -> bool:
    """Whether gossip already shows ``me`` claiming ``blk``."""
    return any(v.name == me and v.blk == blk for v in views)
