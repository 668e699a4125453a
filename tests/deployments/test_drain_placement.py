"""The cordon's pure rules (`gpud drain`): placement, driven through `placement.place` itself,
the Ray election's eligibility, the tag, and when an old copy retires.

A cordoned node is never chosen; a replica on one moves make-before-break (its new nodes, the
cordoned ones as ``leaving``) or, when it fits nowhere else, stays where it is.
"""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud import tags
from gpud.context import Member
from gpud.deployments import drain
from gpud.deployments.placement import NodeView, place
from gpud.ray import election
from gpud.tags import Tags
from tests.harness.placement import check_invariants, node, spec


def cordon(nodes: list[NodeView], names: set[str]) -> list[NodeView]:
    return [msgspec.structs.replace(n, cordoned=n.name in names) for n in nodes]


def test_drained_replica_moves_make_before_break_and_uncordon_makes_the_node_placeable() -> None:
    specs = [spec("web", r=2)]
    nodes = [node(f"n{i}", gpus=1) for i in range(3)]
    first = place(specs, nodes, {})
    drained = first.placed[0].nodes[0]
    other = first.placed[1]
    free = next(n.name for n in nodes if n.name not in {drained, *other.nodes})
    cordoned = cordon(nodes, {drained})
    moved = place(specs, cordoned, first.current())
    check_invariants(specs, cordoned, moved)
    assert moved.placed[0].nodes == (free,) and moved.placed[0].leaving == (drained,)
    assert moved.placed[1] == other, "the other replica never moves"
    # While both copies run (both claim the replica), the new one stays and the old is leaving.
    both = place(
        specs, cordoned, {("web", 0): tuple(sorted((drained, free))), other.key: other.nodes}
    )
    assert both.placed[0].nodes == (free,) and both.placed[0].leaving == (drained,)
    # Once the old copy stopped, nothing is leaving; a new replica never lands on the cordon.
    done = place([spec("web", r=3)], cordoned, moved.current())
    assert done.placed[0].leaving == () and done.placed[:2] == (
        msgspec.structs.replace(moved.placed[0], leaving=()),
        other,
    )
    assert done.pending and done.pending[0].reason == "needs 1 node with 1 free GPU; 0 available"
    # Uncordoned, it is placeable again (and nothing moves back).
    back = place([spec("web", r=3)], nodes, moved.current())
    assert back.placed[2].nodes == (drained,) and back.placed[:2] == done.placed[:2]


def test_a_replica_that_fits_nowhere_else_stays_on_the_cordoned_node() -> None:
    specs = [spec("web", r=1, g=2)]
    nodes = [node("n0", gpus=2), node("n1", gpus=1)]
    first = place(specs, nodes, {})
    assert first.placed[0].nodes == ("n0",)
    stay = place(specs, cordon(nodes, {"n0"}), first.current())
    assert stay.placed[0].nodes == ("n0",) and stay.placed[0].leaving == () and not stay.pending


@settings(max_examples=200, deadline=None)
@given(
    layout=st.lists(
        st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 2)), min_size=1, max_size=3
    ),
    gpus=st.lists(st.integers(0, 4), min_size=2, max_size=6),
    cordoned=st.sets(st.integers(0, 5), max_size=3),
)
def test_cordon_rule(
    layout: list[tuple[int, int, int]], gpus: list[int], cordoned: set[int]
) -> None:
    specs = [spec(f"d{i}", r=r, n=n, g=g) for i, (r, n, g) in enumerate(layout)]
    nodes = [node(f"n{i}", gpus=g) for i, g in enumerate(gpus)]
    names = {f"n{i}" for i in cordoned if i < len(nodes)}
    first = place(specs, nodes, {})
    drained = cordon(nodes, names)
    second = place(specs, drained, first.current())
    check_invariants(specs, drained, second)
    before = first.current()
    for p in second.placed:
        old = before.get(p.key, ())
        # A cordoned node is never new to a replica; leaving ones are its old cordoned nodes.
        assert all(n in old for n in p.nodes if n in names), (p, old)
        assert set(p.leaving) <= set(old) & names and not set(p.leaving) & set(p.nodes)
        # A replica still on a cordoned node did not move at all (it fits nowhere else).
        if set(p.nodes) & names:
            assert p.nodes == old and not p.leaving
        # Off the cordon, a replica placed before keeps its nodes.
        if old and not set(old) & names:
            assert p.nodes == old
    # Moving never loses a replica that was placed.
    assert {p.key for p in first.placed} <= {p.key for p in second.placed}
    # Same inputs, same answer (every node computes it alone).
    assert place(specs, list(reversed(drained)), first.current()) == second


def test_a_cordoned_node_is_never_ray_head_and_the_cordon_is_gossiped() -> None:
    eligible = Member(
        name="n0",
        addr="10.0.0.1",
        port=7946,
        status="alive",
        tags=Tags(rv=True, hl="passing", gh="healthy"),
    )
    assert election.ineligible(eligible) is None
    cordoned = msgspec.structs.replace(eligible, tags=Tags(rv=True, hl="passing", cd=True))
    why = election.ineligible(cordoned)
    assert why is not None and why.code == "cordoned" and "gpud uncordon" in why.text
    # One short tag, restored on decode; absent (the default) when not cordoned.
    assert tags.encode(Tags(cd=True))["cd"] == "1" and "cd" not in tags.encode(Tags())
    assert tags.decode(tags.encode(Tags(cd=True))).cd


@given(
    ready_for=st.none() | st.floats(0, 100),
    timeout=st.floats(0.1, 100),
    busy=st.none() | st.floats(0, 50),
)
def test_an_old_copy_retires_once_routers_follow_and_it_holds_no_request(
    ready_for: float | None, timeout: float, busy: float | None
) -> None:
    follow = drain.follow_s(interval_s=2.0, router_refresh_s=0.25)
    retire = drain.may_retire(ready_for, follow=follow, timeout_s=timeout, busy=busy)
    if ready_for is None:
        assert not retire  # never before the new copy is ready
    elif ready_for >= timeout:
        assert retire  # the drain's timeout bounds the wait, whatever is in flight
    elif ready_for < follow:
        assert not retire  # some router may still send it new requests
    elif busy is None:
        assert retire == (ready_for >= follow + drain.UNREPORTED_GRACE_S)
    else:
        assert retire == (busy == 0)  # its own requests finish first


def test_busy_counts_an_engines_running_and_waiting_requests() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="m"} 2.0\n'
        'vllm:num_requests_waiting{model_name="m"} 1.0\n'
        "vllm:num_requests_running_total 40\n"
    )
    assert drain.busy(text) == 3.0
    assert drain.busy('vllm:num_requests_running{model_name="m"} 0.0\n') == 0.0
    assert drain.busy("process_open_fds 9\n") is None


def test_a_drain_timeout_out_of_bounds_is_refused() -> None:
    assert drain.timeout_refusal(60.0) == ""
    for bad in (0.0, -1.0, drain.MAX_TIMEOUT_S + 1):
        assert "timeout_s" in drain.timeout_refusal(bad)
