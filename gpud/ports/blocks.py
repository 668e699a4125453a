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
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence

import msgspec

from gpud.config import PortsConfig

# Member statuses that still hold a block ("failed" ones may come back until Serf reaps them).
HOLDING_STATUSES = frozenset({"alive", "leaving", "failed"})
NO_BLOCK = -1


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
