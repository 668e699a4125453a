"""Placement: the same assignment on every node; sticky, spread, never more GPUs than a node has."""

from __future__ import annotations

import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gpud.deployments.placement import (
    Assignment,
    NodeView,
    PlacementError,
    current_from_claims,
    place,
)
from gpud.deployments.spec import DeploymentSpec
from tests.harness.placement import check_invariants, node, spec

# --- examples --------------------------------------------------------------------------------


def test_four_hosts_two_replicas_of_two_nodes() -> None:
    specs = [spec("web", r=2, n=2, g=2)]
    nodes = [node(f"n{i}", gpus=2) for i in range(4)]
    a = place(specs, nodes, {})
    check_invariants(specs, nodes, a)
    assert len(a.placed) == 2 and not a.pending
    assert set(a.placed[0].nodes).isdisjoint(a.placed[1].nodes)


def test_lost_host_moves_one_node_and_the_other_replica_stays() -> None:
    specs = [spec("web", r=2, n=2, g=2)]
    nodes = [node(f"n{i}", gpus=2) for i in range(5)]
    first = place(specs, nodes, {})
    victim = first.placed[0].nodes[1]
    survivors = [n for n in nodes if n.name != victim]
    second = place(specs, survivors, first.current())
    check_invariants(specs, survivors, second)
    assert second.placed[1] == first.placed[1], "the other replica never moves"
    # The surviving node keeps its rank; only the lost one is replaced.
    assert second.placed[0].nodes[0] == first.placed[0].nodes[0]
    assert victim not in second.placed[0].nodes


def test_pending_reason_names_what_is_missing() -> None:
    specs = [spec("web", r=1, n=2, g=2, selector='{ zone = "a" }')]
    nodes = [node("n1", gpus=2, zone="a"), node("n2", gpus=1, zone="a"), node("n3", zone="b")]
    a = place(specs, nodes, {})
    assert not a.placed
    assert [p.reason for p in a.pending] == [
        "needs 2 nodes with 2 free GPUs matching {zone=a}; 1 available"
    ]


def test_pending_reason_counts_nodes_held_by_other_groups() -> None:
    specs = [spec("a", r=1, n=2, g=1), spec("b", r=1, n=2, g=1)]
    nodes = [node(f"n{i}", gpus=8) for i in range(3)]
    a = place(specs, nodes, {})
    assert [p.reason for p in a.pending] == [
        "needs 2 nodes with 1 free GPU; 1 available (2 more are in other multi-node replicas)"
    ]


def test_single_node_replicas_share_a_node_while_gpus_last() -> None:
    specs = [spec("small", r=4, n=1, g=2)]
    nodes = [node("big", gpus=8, host="h1")]
    a = place(specs, nodes, {})
    check_invariants(specs, nodes, a)
    assert [p.nodes for p in a.placed] == [("big",)] * 4
    b = place([spec("small", r=5, n=1, g=2)], nodes, a.current())
    assert len(b.placed) == 4 and b.pending[0].replica == 4
    assert b.pending[0].reason == "needs 1 node with 2 free GPUs; 0 available"


def test_spread_over_hosts_not_over_nodes_of_one_host() -> None:
    # Two gpud nodes on host h1, one on h2: two replicas go to different hosts.
    nodes = [node("a", host="h1"), node("b", host="h1"), node("c", host="h2")]
    specs = [spec("web", r=2, n=1, g=1)]
    a = place(specs, nodes, {})
    hosts = {n.name: n.host for n in nodes}
    assert {hosts[p.nodes[0]] for p in a.placed} == {"h1", "h2"}


def test_conflicting_views_settle_in_replica_order() -> None:
    # Two replicas both announce n1, which has room for one: web/0 keeps it, web/1 moves.
    specs = [spec("web", r=2, n=1, g=2)]
    nodes = [node("n1", gpus=2), node("n2", gpus=2)]
    a = place(specs, nodes, {("web", 0): ("n1",), ("web", 1): ("n1",)})
    check_invariants(specs, nodes, a)
    assert [p.nodes for p in a.placed] == [("n1",), ("n2",)]


def test_shrinking_replicas_and_deleted_specs_free_their_nodes() -> None:
    nodes = [node("n1", gpus=1), node("n2", gpus=1)]
    a = place([spec("old", r=2)], nodes, {})
    b = place([spec("new", r=2)], nodes, a.current())
    assert len(b.placed) == 2 and not b.pending
    c = place([spec("old", r=1)], nodes, a.current())
    assert c.placed == (a.placed[0],)


def test_replicas_zero_places_nothing() -> None:
    assert place([spec("web", r=0)], [node("n1")], {}) == Assignment(placed=(), pending=())


def test_gpu_less_replica_needs_no_gpus() -> None:
    a = place([spec("cpu", r=2, g=0)], [node("n1", gpus=0), node("n2", gpus=0)], {})
    assert len(a.placed) == 2


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(PlacementError, match="'n1' appears twice"):
        place([], [node("n1"), node("n1")], {})
    with pytest.raises(PlacementError, match="two specs with one name"):
        place([spec("a", 1), spec("a", 2)], [node("n1")], {})
    with pytest.raises(PlacementError, match="negative GPU count"):
        place([], [node("n1", gpus=-1)], {})


def test_current_from_claims_groups_nodes() -> None:
    claims = {"n2": [("web", 0)], "n1": [("web", 0), ("db", 0)], "n3": []}
    assert current_from_claims(claims) == {("web", 0): ("n1", "n2"), ("db", 0): ("n1",)}


def test_on_node_lists_the_replicas_of_a_node() -> None:
    a = place([spec("web", r=1, n=2, g=1)], [node("n1"), node("n2")], {})
    assert [p.key for p in a.on_node("n1")] == [("web", 0)]
    assert a.on_node("n9") == []


# --- properties ------------------------------------------------------------------------------


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[DeploymentSpec], list[NodeView]]:
    n_nodes = draw(st.integers(0, 10))
    hosts = draw(st.integers(1, max(1, n_nodes)))
    nodes = [
        NodeView(
            name=f"n{i}",
            host=f"h{draw(st.integers(0, hosts - 1))}",
            gpus=draw(st.integers(0, 8)),
            labels={"zone": draw(st.sampled_from(["a", "b"]))},
        )
        for i in range(n_nodes)
    ]
    specs = []
    for i in range(draw(st.integers(0, 4))):
        selector = draw(st.sampled_from(["", '{ zone = "a" }', '{ zone = "b" }']))
        specs.append(
            spec(
                f"d{i}",
                r=draw(st.integers(0, 4)),
                n=draw(st.integers(1, 3)),
                g=draw(st.integers(0, 4)),
                selector=selector,
            )
        )
    return specs, nodes


@st.composite
def views(draw: st.DrawFn, specs: list[DeploymentSpec], nodes: list[NodeView]) -> dict:
    """Arbitrary announced assignments: stale, conflicting, naming dead nodes, wrong sizes."""
    names = [n.name for n in nodes] + ["dead1", "dead2"]
    keys = [(s.name, i) for s in specs for i in range(s.replicas + 1)] + [("gone", 0)]
    return draw(
        st.dictionaries(
            st.sampled_from(keys),
            st.lists(st.sampled_from(names), min_size=1, max_size=3).map(tuple),
            max_size=8,
        )
    )


@settings(max_examples=300, deadline=None)
@given(clusters(), st.data())
def test_invariants_hold_for_any_view(cluster: tuple, data: st.DataObject) -> None:
    specs, nodes = cluster
    current = data.draw(views(specs, nodes))
    check_invariants(specs, nodes, place(specs, nodes, current))


@settings(max_examples=300, deadline=None)
@given(clusters(), st.data(), st.randoms(use_true_random=False))
def test_same_inputs_in_any_order_give_the_same_assignment(
    cluster: tuple, data: st.DataObject, rnd: random.Random
) -> None:
    specs, nodes = cluster
    current = data.draw(views(specs, nodes))
    expected = place(specs, nodes, current)
    specs2, nodes2, items = list(specs), list(nodes), list(current.items())
    rnd.shuffle(specs2)
    rnd.shuffle(nodes2)
    rnd.shuffle(items)
    # Labels in another insertion order too.
    nodes2 = [
        NodeView(name=n.name, host=n.host, gpus=n.gpus, labels=dict(reversed(n.labels.items())))
        for n in nodes2
    ]
    assert place(specs2, nodes2, dict(items)) == expected


@settings(max_examples=300, deadline=None)
@given(clusters(), st.data())
def test_a_placed_replica_whose_nodes_stay_never_moves(cluster: tuple, data: st.DataObject) -> None:
    specs, nodes = cluster
    before = place(specs, nodes, data.draw(views(specs, nodes)))
    # Some nodes die, new ones join; the survivors keep their GPUs and labels.
    survivors = [n for n in nodes if data.draw(st.booleans())]
    joined = [
        NodeView(name=f"new{i}", host=f"hn{i}", gpus=data.draw(st.integers(0, 8)))
        for i in range(data.draw(st.integers(0, 3)))
    ]
    after = place(specs, survivors + joined, before.current())
    check_invariants(specs, survivors + joined, after)
    alive = {n.name for n in survivors}
    after_by_key = {p.key: p for p in after.placed}
    for p in before.placed:
        if set(p.nodes) <= alive:
            assert after_by_key[p.key] == p, f"{p.key} moved though all its nodes are alive"
    # And with nothing changed the assignment is a fixed point.
    assert place(specs, nodes, before.current()).placed == before.placed


@settings(max_examples=300, deadline=None)
@given(
    r=st.integers(1, 4),
    n=st.integers(1, 3),
    g=st.integers(0, 4),
    extra_hosts=st.integers(0, 3),
    per_host=st.integers(1, 3),
    spare=st.integers(0, 4),
)
def test_replicas_spread_over_hosts_when_capacity_allows(
    r: int, n: int, g: int, extra_hosts: int, per_host: int, spare: int
) -> None:
    hosts = r * n + extra_hosts
    nodes = [
        NodeView(name=f"n{h}-{k}", host=f"h{h}", gpus=g + spare)
        for h in range(hosts)
        for k in range(per_host)
    ]
    specs = [spec("web", r=r, n=n, g=g)]
    a = place(specs, nodes, {})
    assert not a.pending
    host_of = {x.name: x.host for x in nodes}
    used_hosts = [host_of[name] for p in a.placed for name in p.nodes]
    assert len(used_hosts) == len(set(used_hosts)) == r * n, "one node of ours per host"


@settings(max_examples=200, deadline=None)
@given(clusters())
def test_enough_room_means_nothing_pending(cluster: tuple) -> None:
    specs, _ = cluster
    specs = [s for s in specs if not s.selector]
    assume(specs)
    # One host per node, and every replica could take fresh nodes of its own.
    total = sum(s.replicas * s.nodes_per_replica for s in specs)
    nodes = [node(f"n{i}", gpus=4) for i in range(total)]
    a = place(specs, nodes, {})
    assert not a.pending
