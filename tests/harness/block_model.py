"""A gossip model of the block-claim loop: one node's claim-loop variables (`SimNode`) and one
round of the service's loop on them (`step`: the pure ``blocks.step``, its actions carried out
on the model and checked to be well-formed)."""

from __future__ import annotations

from dataclasses import dataclass

from gpud.ports import blocks
from gpud.ports.blocks import (
    Announce,
    Claim,
    ClaimInput,
    ClaimState,
    ClaimView,
    Confirm,
    Drop,
    Reserve,
)

SETTLE = 2
# Offset of the wall clock over the model's monotonic clock (rounds).
CLOCK = 10_000


@dataclass
class SimNode:
    """One node's claim-loop variables; ``blocks.step`` moves them, as in the service."""

    name: str
    addr: str
    claim: Claim | None = None
    state: ClaimState = "claiming"
    settled_since: float = 0.0
    # Its tags (what gossip carries of its claim): only an Announce action changes them.
    published: tuple[int, int] = (blocks.NO_BLOCK, 0)
    persisted: Claim | None = None
    status: str = "alive"

    def view(self) -> ClaimView:
        blk, bc = self.published
        return ClaimView(
            name=self.name, addr=self.addr, status=self.status, blk=blk, confirmed_at=bc
        )

    def snapshot(self) -> tuple:
        return (self.claim, self.state, self.settled_since, self.published)


def step(node: SimNode, views: list[ClaimView], n_blocks: int, now: int) -> blocks.ClaimOutput:
    """One round of the service's claim loop for ``node``: the same pure step, its actions
    carried out on the model (tags, the persisted claim)."""
    out = blocks.step(
        ClaimInput(
            me=node.name,
            addr=node.addr,
            n_blocks=n_blocks,
            settle_s=SETTLE,
            reserve=True,
            claim=node.claim,
            state=node.state,
            settled_since=node.settled_since,
            published=node.published,
            views=tuple(views),
            # The monotonic clock counts rounds; the wall clock is offset (confirmed_at > 0).
            now=now - CLOCK,
            wall_now=now,
        )
    )
    kinds = [type(a) for a in out.actions]
    for action in out.actions:
        if isinstance(action, Announce):
            node.published = (action.blk, action.bc)
        elif isinstance(action, Confirm):
            node.persisted = Claim(blk=action.blk, confirmed_at=action.confirmed_at)
        elif isinstance(action, Drop):
            assert node.claim is not None and action.blk == node.claim.blk
            if action.was_confirmed:
                node.persisted = None
    # Well-formed: a confirmation is persisted, then announced, then reserved; only on entering
    # "confirmed"; a drop comes first.
    if Confirm in kinds:
        assert out.state == "confirmed" and node.state != "confirmed"
        assert kinds[-3:] == [Confirm, Announce, Reserve] or kinds[-2:] == [Confirm, Reserve]
    assert Reserve not in kinds or Confirm in kinds
    assert Drop not in kinds or kinds.index(Drop) == 0
    node.claim, node.state, node.settled_since = out.claim, out.state, out.settled_since
    # What gossip shows matches the claim once the actions are done.
    assert node.published == (
        (node.claim.blk, node.claim.confirmed_at) if node.claim else (blocks.NO_BLOCK, 0)
    )
    return out
