"""Block ownership that cannot be taken: properties of ``blocks.step``, the function
the claim loop runs. A confirmed block is not given up to an unverified member, nor to a claim
that appeared after it and announces an earlier confirmation time; honest claims still resolve
as before, and a restarted node and its peers agree on who keeps a block."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.ports import blocks
from gpud.ports.blocks import Claim, ClaimInput, ClaimView, Drop
from tests.harness.block_model import CLOCK, SimNode, step

ADDR = "10.77.0.1"
N_BLOCKS = 8
names = st.text(alphabet="abcdefgh-", min_size=1, max_size=8).map(lambda s: "r" + s)


def run_step(
    me: str, claim: Claim | None, views: list[ClaimView], *, state: str = "confirmed"
) -> blocks.ClaimOutput:
    published = (claim.blk, claim.confirmed_at) if claim else (blocks.NO_BLOCK, 0)
    return blocks.step(
        ClaimInput(
            me=me,
            addr=ADDR,
            n_blocks=N_BLOCKS,
            settle_s=2,
            reserve=False,
            claim=claim,
            state=state,  # type: ignore[arg-type]
            settled_since=0.0,
            published=published,
            views=tuple(views),
            now=100.0,
            wall_now=10_000,
        )
    )


def me_view(claim: Claim, first_seen: int) -> ClaimView:
    return ClaimView(
        name="victim",
        addr=ADDR,
        status="alive",
        blk=claim.blk,
        confirmed_at=claim.confirmed_at,
        first_seen=first_seen,
    )


@settings(max_examples=300, deadline=None)
@given(
    blk=st.integers(0, N_BLOCKS - 1),
    confirmed_at=st.integers(1_000, 9_000),
    rogue_bc=st.integers(0, 20_000),
    rogue_status=st.sampled_from(["alive", "failed", "leaving"]),
    rogue=names,
    first_seen=st.integers(0, 9_999),
)
def test_an_unverified_member_never_takes_a_confirmed_block(
    blk, confirmed_at, rogue_bc, rogue_status, rogue, first_seen
):
    claim = Claim(blk=blk, confirmed_at=confirmed_at)
    views = [
        me_view(claim, first_seen=confirmed_at - 3),
        ClaimView(
            name=rogue,
            addr=ADDR,
            status=rogue_status,
            blk=blk,
            confirmed_at=rogue_bc,
            verified=False,
            first_seen=first_seen,
        ),
    ]
    out = run_step("victim", claim, views)
    assert out.claim == claim and out.state == "confirmed"
    assert not any(isinstance(a, Drop) for a in out.actions)
    assert [r.name for r in out.refused] == [rogue]
    assert "not a verified gpud node" in out.refused[0].reason


@settings(max_examples=300, deadline=None)
@given(
    blk=st.integers(0, N_BLOCKS - 1),
    confirmed_at=st.integers(1_000, 9_000),
    later=st.integers(blocks.CLAIM_SKEW_S + 1, 5_000),
    rogue_bc=st.integers(1, 999),
    rogue=names,
)
def test_a_later_claim_with_an_earlier_time_does_not_take_a_confirmed_block(
    blk, confirmed_at, later, rogue_bc, rogue
):
    """A verified member (a cluster-key holder running gpud) first seen after this node
    confirmed its block announces an earlier confirmation: this node keeps its block."""
    claim = Claim(blk=blk, confirmed_at=confirmed_at)
    views = [
        me_view(claim, first_seen=confirmed_at - 3),
        ClaimView(
            name=rogue,
            addr=ADDR,
            status="alive",
            blk=blk,
            confirmed_at=rogue_bc,
            first_seen=confirmed_at + later,
        ),
    ]
    out = run_step("victim", claim, views)
    assert out.claim == claim
    assert [r.name for r in out.refused] == [rogue]
    assert "before this node first saw" in out.refused[0].reason


@settings(max_examples=300, deadline=None)
@given(
    blk=st.integers(0, N_BLOCKS - 1),
    confirmed_at=st.integers(1_000, 9_000),
    earlier=st.integers(1, 999),
    first_seen=st.one_of(st.just(0), st.integers(1, 999)),
)
def test_an_honest_earlier_claim_still_wins(blk, confirmed_at, earlier, first_seen):
    """A verified member whose earlier confirmation is plausible (this node saw the claim in
    time, or it was there before this node joined) keeps winning, as before."""
    claim = Claim(blk=blk, confirmed_at=confirmed_at)
    views = [
        me_view(claim, first_seen=confirmed_at - 3),
        ClaimView(
            name="honest",
            addr=ADDR,
            status="alive",
            blk=blk,
            confirmed_at=confirmed_at - earlier,
            first_seen=min(first_seen, confirmed_at - earlier) if first_seen else 0,
        ),
    ]
    out = run_step("victim", claim, views)
    assert out.claim is not None and out.claim.blk != blk
    assert Drop(blk=blk, was_confirmed=True) in out.actions
    assert out.refused == ()


@settings(max_examples=300, deadline=None)
@given(
    held=st.lists(st.tuples(st.integers(0, N_BLOCKS - 1), st.booleans()), max_size=12),
)
def test_a_block_held_only_by_unverified_members_is_free_but_a_free_one_comes_first(held):
    views = [
        ClaimView(name=f"o{i}", addr=ADDR, status="alive", blk=b, confirmed_at=5, verified=ok)
        for i, (b, ok) in enumerate(held)
    ]
    blk = blocks.decide("me", ADDR, None, views, N_BLOCKS)
    every = {b for b, _ in held}
    trusted = {b for b, ok in held if ok}
    order = blocks.preference("me", N_BLOCKS)
    if len(every) < N_BLOCKS:
        assert blk == next(b for b in order if b not in every)
    elif len(trusted) < N_BLOCKS:
        assert blk == next(b for b in order if b not in trusted)
    else:
        assert blk is None


@settings(max_examples=300, deadline=None)
@given(
    blk=st.integers(0, N_BLOCKS - 1),
    t_a=st.integers(1_000, 5_000),
    gap_b=st.integers(1, 5_000),
    gap_r=st.integers(blocks.CLAIM_SKEW_S + 1, 5_000),
    join_delay=st.integers(0, 30),
)
def test_a_returning_node_and_the_holder_agree(blk, t_a, gap_b, gap_r, join_delay):
    """A confirmed `blk` at t_a and left; B confirmed it at t_b while A was away; A comes back
    at r with its persisted claim. A sees B's claim as there before it joined (first_seen 0)
    and its own claim as new; B sees A's claim appear at r. Both decide that B keeps it."""
    t_b = t_a + gap_b
    r = t_b + gap_r
    a_claim = Claim(blk=blk, confirmed_at=t_a)
    b_claim = Claim(blk=blk, confirmed_at=t_b)
    at_a = [
        ClaimView(name="a", addr=ADDR, status="alive", blk=blk, confirmed_at=t_a, first_seen=r),
        ClaimView(name="b", addr=ADDR, status="alive", blk=blk, confirmed_at=t_b, first_seen=0),
    ]
    at_b = [
        ClaimView(
            name="a",
            addr=ADDR,
            status="alive",
            blk=blk,
            confirmed_at=t_a,
            first_seen=r + join_delay,
        ),
        ClaimView(
            name="b", addr=ADDR, status="alive", blk=blk, confirmed_at=t_b, first_seen=t_b - 3
        ),
    ]
    a_out = run_step("a", a_claim, at_a, state="claiming")
    b_out = run_step("b", b_claim, at_b)
    assert a_out.claim is not None and a_out.claim.blk != blk
    assert b_out.claim == b_claim


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(2, 6),
    n_blocks=st.integers(1, 8),
    verify_after=st.integers(0, int(blocks.UNVERIFIED_WAIT_S) - 5),
)
def test_nodes_starting_together_never_share_a_confirmed_block_while_unverified(
    n, n_blocks, verify_after
):
    """Same-address gpuds that start together see each other's claims at once but are verified
    only after ``verify_after`` rounds (1 s each; the prober's first signed pings): a confirmed
    block is never held by two of them at any round, and in the end each has its own."""
    nodes = [SimNode(name=f"g{i}", addr=ADDR) for i in range(n)]
    claimed_since = dict.fromkeys((x.name for x in nodes), 0.0)
    for rnd in range(200):
        verified = rnd >= verify_after
        snapshot = [msgspec.structs.replace(x.view(), verified=verified) for x in nodes]
        before = [x.snapshot() for x in nodes]
        for node in nodes:
            out = blocks.step(
                ClaimInput(
                    me=node.name,
                    addr=ADDR,
                    n_blocks=n_blocks,
                    settle_s=2,
                    reserve=False,
                    claim=node.claim,
                    state=node.state,
                    settled_since=node.settled_since,
                    claimed_since=claimed_since[node.name],
                    published=node.published,
                    views=tuple(snapshot),
                    now=float(rnd),
                    wall_now=CLOCK + rnd,
                )
            )
            for action in out.actions:
                if isinstance(action, blocks.Announce):
                    node.published = (action.blk, action.bc)
            node.claim, node.state = out.claim, out.state
            node.settled_since, claimed_since[node.name] = out.settled_since, out.claimed_since
        held = [x.claim.blk for x in nodes if x.claim is not None and x.state == "confirmed"]
        assert len(held) == len(set(held)), f"round {rnd}: {held}"
        if verified and before == [x.snapshot() for x in nodes] and rnd > verify_after + 5:
            break
    confirmed = sum(x.state == "confirmed" for x in nodes)
    assert confirmed == min(n, n_blocks)


def test_unverified_claims_stall_a_newcomer_only_for_a_while():
    """Every block is claimed by unverified members (rogues, or gpuds not verified yet): a
    newcomer waits UNVERIFIED_WAIT_S for them to be verified, then confirms a block anyway."""
    views = [
        ClaimView(name=f"r{b}", addr=ADDR, status="alive", blk=b, confirmed_at=5, verified=False)
        for b in range(N_BLOCKS)
    ]
    node = SimNode(name="new", addr=ADDR)
    wait = int(blocks.UNVERIFIED_WAIT_S)
    # The model's monotonic clock is the round; the claim is made in round 0.
    for rnd in range(wait):
        step(node, [*views, node.view()], N_BLOCKS, now=CLOCK + rnd)
        assert node.state == "claiming"
    for rnd in range(wait, wait + 5):
        step(node, [*views, node.view()], N_BLOCKS, now=CLOCK + rnd)
    assert node.state == "confirmed" and node.claim is not None
