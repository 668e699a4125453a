"""Block claims: hypothesis properties of the claim state machine, driven by a gossip model.

Every node runs ``blocks.step``, the function the service's claim loop runs, and its actions
are carried out on the model. The model: rounds; in each round every live node steps on the
claims gossip showed at the end of the previous round. Nodes join in a random order at random rounds; for the first rounds each
node sees only a random subset of the others (views disagree), afterwards everyone sees the
same claims. A node confirms a block once gossip has carried its claim, uncontested, for
SETTLE rounds.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.config import PortsConfig
from gpud.ports import blocks
from gpud.ports.blocks import (
    Announce,
    Claim,
    ClaimView,
)
from tests.harness.block_model import CLOCK, SETTLE, SimNode, step


def simulate(
    nodes: list[SimNode],
    join_round: dict[str, int],
    partial_rounds: int,
    seen: dict[tuple[str, str], bool],
    n_blocks: int,
    max_rounds: int,
    clock: int = 100,
) -> int:
    """Run until nothing changes with agreeing views; returns the last round."""
    for rnd in range(max_rounds):
        live = [n for n in nodes if join_round[n.name] <= rnd and n.status == "alive"]
        snapshot = [n.view() for n in nodes if join_round[n.name] <= rnd]
        before = [n.snapshot() for n in nodes]
        for node in live:
            if rnd < partial_rounds:
                views = [v for v in snapshot if seen.get((node.name, v.name), True)]
            else:
                views = snapshot
            step(node, views, n_blocks, now=CLOCK + clock + rnd)
        all_joined = all(join_round[n.name] <= rnd for n in nodes)
        settled = all(n.claim is None or n.state == "confirmed" for n in live)
        if (
            all_joined
            and rnd >= partial_rounds
            and settled
            and before == [n.snapshot() for n in nodes]
        ):
            return rnd
    raise AssertionError(f"claims did not settle in {max_rounds} rounds")


def assert_unique_per_addr(nodes: list[SimNode], n_blocks: int) -> None:
    by_addr: dict[str, list[SimNode]] = {}
    for node in nodes:
        by_addr.setdefault(node.addr, []).append(node)
    for addr, group in by_addr.items():
        held = [n.claim.blk for n in group if n.claim is not None]
        assert len(held) == len(set(held)), f"duplicate block on {addr}: {held}"
        assert all(0 <= b < n_blocks for b in held)
        # Enough blocks: everyone gets one.
        if len(group) <= n_blocks:
            assert len(held) == len(group)


cluster = st.integers(min_value=1, max_value=12).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(st.sampled_from(["10.77.0.1", "10.77.0.2", "10.77.0.3"]), min_size=n, max_size=n),
        st.lists(st.integers(0, 6), min_size=n, max_size=n),
        st.integers(1, 14),
        st.integers(0, 4),
        st.dictionaries(
            st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), st.booleans(), max_size=40
        ),
        # Persisted claims from an earlier life: may collide with each other.
        st.lists(
            st.one_of(st.none(), st.tuples(st.integers(0, 13), st.integers(1, 99))),
            min_size=n,
            max_size=n,
        ),
    )
)


def build(params: tuple) -> tuple[list[SimNode], dict[str, int], dict, int, int]:
    n, addrs, joins, n_blocks, partial, seen_idx, persisted = params
    nodes = [
        SimNode(
            name=f"node-{i}",
            addr=addrs[i],
            claim=Claim(blk=p[0], confirmed_at=p[1]) if p is not None and p[0] < n_blocks else None,
        )
        for i, p in enumerate(persisted)
    ]
    join_round = {f"node-{i}": joins[i] for i in range(n)}
    seen = {(f"node-{a}", f"node-{b}"): v for (a, b), v in seen_idx.items()}
    return nodes, join_round, seen, n_blocks, partial


@settings(max_examples=300, deadline=None)
@given(cluster)
def test_views_agree_then_no_shared_block_per_address(params: tuple) -> None:
    nodes, join_round, seen, n_blocks, partial = build(params)
    simulate(nodes, join_round, partial, seen, n_blocks, max_rounds=200)
    assert_unique_per_addr(nodes, n_blocks)


@settings(max_examples=200, deadline=None)
@given(cluster)
def test_restart_keeps_block(params: tuple) -> None:
    nodes, join_round, seen, n_blocks, partial = build(params)
    rounds = simulate(nodes, join_round, partial, seen, n_blocks, max_rounds=200)
    views = [n.view() for n in nodes]
    for node in nodes:
        if node.claim is None:
            continue
        # What it persisted is what it holds.
        assert node.persisted == node.claim
        # Restart: the node comes back with only its persisted claim and fresh tags.
        again = SimNode(
            name=node.name, addr=node.addr, claim=node.persisted, settled_since=rounds + 1
        )
        out = step(again, views, n_blocks, now=CLOCK + rounds + 1)
        assert out.claim == node.claim and out.state == "claiming"
        # It announces its claim with its first confirmation time at once ...
        assert Announce(blk=node.claim.blk, bc=node.claim.confirmed_at) in out.actions
        # ... and re-confirms it after the settle time with that same time.
        for t in range(2, SETTLE + 3):
            step(
                again,
                [*[v for v in views if v.name != node.name], again.view()],
                n_blocks,
                now=CLOCK + rounds + t,
            )
        assert again.state == "confirmed" and again.persisted == node.claim
        # Its announcement survives the others' next decisions: nobody else moves onto it.
        for other in nodes:
            if other is not node and other.claim is not None and other.addr == node.addr:
                assert (
                    blocks.decide(other.name, other.addr, other.claim, views, n_blocks)
                    == other.claim.blk
                )


@settings(max_examples=200, deadline=None)
@given(cluster, st.integers(1, 5), st.booleans())
def test_newcomers_do_not_move_settled_nodes(params: tuple, newcomers: int, blind: bool) -> None:
    nodes, join_round, seen, n_blocks, partial = build(params)
    rounds = simulate(nodes, join_round, partial, seen, n_blocks, max_rounds=200)
    settled = {n.name: n.claim.blk for n in nodes if n.claim is not None}
    addrs = sorted({n.addr for n in nodes})
    # The settled nodes are all there and see each other; only the newcomers may be blind.
    join_round = dict.fromkeys(join_round, 0)
    seen = {}
    for i in range(newcomers):
        new = SimNode(name=f"new-{i}", addr=addrs[i % len(addrs)])
        nodes.append(new)
        join_round[new.name] = rounds + 1
        # "blind": newcomers first see nobody, longer than the settle time, so they confirm a
        # block alone (gossip slower than ports.settle_s): their later confirmation loses.
        for other in nodes:
            seen[(new.name, other.name)] = not blind
    blind_until = rounds + 1 + 3 * SETTLE
    simulate(nodes, join_round, blind_until, seen, n_blocks, max_rounds=rounds + 300, clock=1000)
    assert_unique_per_addr(nodes, n_blocks)
    for name, blk in settled.items():
        node = next(n for n in nodes if n.name == name)
        assert node.claim is not None and node.claim.blk == blk, f"{name} moved"


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 20),
    st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["alive", "failed", "left", "none"]))),
)
def test_failed_members_hold_their_block_left_ones_do_not(n_blocks: int, others: list) -> None:
    views = [
        ClaimView(name=f"o{i}", addr="10.77.0.1", status=status, blk=blk, confirmed_at=5)
        for i, (blk, status) in enumerate(others)
    ]
    blk = blocks.decide("me", "10.77.0.1", None, views, n_blocks)
    held = {v.blk for v in views if v.status in ("alive", "failed") and v.blk < n_blocks}
    if len(held) >= n_blocks:
        assert blk is None
    else:
        assert blk is not None and blk not in held
        # The first free block of my own rendezvous order: no needless spread.
        assert blk == next(b for b in blocks.preference("me", n_blocks) if b not in held)


@given(st.integers(1, 60), st.text(min_size=1, max_size=20))
def test_preference_is_a_permutation(n_blocks: int, name: str) -> None:
    order = blocks.preference(name, n_blocks)
    assert sorted(order) == list(range(n_blocks))


def test_other_addresses_may_share_a_block() -> None:
    views = [ClaimView(name="b", addr="10.77.0.2", status="alive", blk=0, confirmed_at=5)]
    mine = blocks.decide("a", "10.77.0.1", Claim(blk=0, confirmed_at=9), views, 4)
    assert mine == 0


def test_block_geometry() -> None:
    cfg = PortsConfig()
    assert blocks.block_count(cfg) == 30
    assert blocks.block_range(cfg, 3) == range(21200, 21600)
