"""Spec versions: one winner per name on every node, whatever the delivery order (LWW CRDT)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.deployments import version as v
from gpud.deployments.spec import DeploymentSpec, SpecError, load_spec


def spec(name: str = "web", replicas: int = 1) -> DeploymentSpec:
    return load_spec(
        f'name = "{name}"\nengine = "vllm"\nmodel = "org/m"\n'
        f"replicas = {replicas}\ngpus_per_node = 1\n".encode()
    )


def test_version_orders_by_lamport_then_origin() -> None:
    assert v.SpecVersion(2, "a") > v.SpecVersion(1, "z")
    assert v.SpecVersion(2, "b") > v.SpecVersion(2, "a")
    assert str(v.SpecVersion(3, "n1")) == "3@n1"


def test_later_apply_wins_and_earlier_is_ignored() -> None:
    first = v.applied(spec(replicas=1), v.SpecVersion(1, "a"))
    second = v.applied(spec(replicas=2), v.SpecVersion(2, "b"))
    state, changed = v.merge({}, first)
    assert changed
    state, changed = v.merge(state, second)
    assert changed and state["web"] is second
    state2, changed = v.merge(state, first)
    assert not changed and state2 == state


def test_merge_does_not_change_its_input() -> None:
    local = {"web": v.applied(spec(), v.SpecVersion(1, "a"))}
    before = dict(local)
    v.merge(local, v.applied(spec(replicas=3), v.SpecVersion(5, "b")))
    assert local == before


def test_concurrent_applies_resolve_by_origin() -> None:
    on_a = v.applied(spec(replicas=1), v.SpecVersion(4, "host-a"))
    on_b = v.applied(spec(replicas=2), v.SpecVersion(4, "host-b"))
    assert v.merge_all({}, [on_a, on_b]) == v.merge_all({}, [on_b, on_a]) == {"web": on_b}


def test_same_version_different_bodies_resolve_by_digest() -> None:
    # Only a node that lost its clock can issue this; every node must still agree.
    x = v.applied(spec(replicas=1), v.SpecVersion(4, "a"))
    y = v.applied(spec(replicas=2), v.SpecVersion(4, "a"))
    winner = max(x, y, key=v.Record.order)
    assert v.merge_all({}, [x, y]) == v.merge_all({}, [y, x]) == {"web": winner}


def test_delete_is_a_tombstone_that_a_late_copy_cannot_undo() -> None:
    put = v.applied(spec(), v.SpecVersion(1, "a"))
    gone = v.deleted("web", v.SpecVersion(2, "b"))
    state = v.merge_all({}, [put, gone, put])
    assert state["web"].deleted and v.live(state) == []
    # A newer apply after the delete brings it back.
    again = v.applied(spec(replicas=3), v.next_version(state, "c"))
    state, changed = v.merge(state, again)
    assert changed and [s.replicas for s in v.live(state)] == [3]


def test_next_version_follows_everything_seen_and_the_floor() -> None:
    state = {
        "a": v.applied(spec("a"), v.SpecVersion(7, "x")),
        "b": v.deleted("b", v.SpecVersion(9, "y")),
    }
    assert v.next_version(state, "me") == v.SpecVersion(10, "me")
    assert v.next_version(state, "me", floor=20) == v.SpecVersion(21, "me")
    assert v.next_version({}, "me") == v.SpecVersion(1, "me")


def test_live_is_sorted_and_skips_tombstones() -> None:
    state = v.merge_all(
        {},
        [
            v.applied(spec("zeta"), v.SpecVersion(1, "a")),
            v.applied(spec("alpha"), v.SpecVersion(1, "a")),
            v.deleted("mid", v.SpecVersion(1, "a")),
        ],
    )
    assert [s.name for s in v.live(state)] == ["alpha", "zeta"]


def test_check_rejects_inconsistent_records() -> None:
    good = v.applied(spec(), v.SpecVersion(1, "a"))
    assert v.check(good) is good
    assert v.check(v.deleted("web", v.SpecVersion(1, "a"))).deleted
    with pytest.raises(SpecError, match="digest does not match"):
        v.check(msgspec.structs.replace(good, digest="0" * 32))
    with pytest.raises(SpecError, match="holds the spec of 'web'"):
        v.check(msgspec.structs.replace(good, name="other"))
    with pytest.raises(SpecError, match="tombstone carries no digest"):
        v.check(v.Record(name="web", version=v.SpecVersion(1, "a"), spec=None, digest="ab"))


def test_record_round_trips_through_json() -> None:
    rec = v.applied(spec(), v.SpecVersion(3, "a"))
    back = msgspec.json.decode(msgspec.json.encode(rec), type=v.Record)
    assert back == rec and v.check(back) is back
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            b'{"name":"web","version":{"lamport":0,"origin":"a"},"spec":null,"digest":""}',
            type=v.Record,
        )


# --- properties: merge is a join on a total order -------------------------------------------

NAMES = ["a", "b", "c"]
ORIGINS = ["n1", "n2", "n3"]


@st.composite
def records(draw: st.DrawFn) -> v.Record:
    name = draw(st.sampled_from(NAMES))
    ver = v.SpecVersion(draw(st.integers(1, 5)), draw(st.sampled_from(ORIGINS)))
    if draw(st.booleans()):
        return v.deleted(name, ver)
    return v.applied(spec(name, replicas=draw(st.integers(0, 3))), ver)


def states() -> st.SearchStrategy[dict[str, v.Record]]:
    return st.lists(records(), max_size=8).map(lambda rs: v.merge_all({}, rs))


@settings(max_examples=200, deadline=None)
@given(states(), states())
def test_join_is_commutative(a: dict[str, v.Record], b: dict[str, v.Record]) -> None:
    assert v.join(a, b) == v.join(b, a)


@settings(max_examples=200, deadline=None)
@given(states(), states(), states())
def test_join_is_associative(
    a: dict[str, v.Record], b: dict[str, v.Record], c: dict[str, v.Record]
) -> None:
    assert v.join(v.join(a, b), c) == v.join(a, v.join(b, c))


@settings(max_examples=200, deadline=None)
@given(states(), st.lists(records(), max_size=8))
def test_merge_is_idempotent(a: dict[str, v.Record], rs: list[v.Record]) -> None:
    assert v.join(a, a) == a
    once = v.merge_all(a, rs)
    assert v.merge_all(once, rs) == once
    for r in rs:
        _, changed = v.merge(once, r)
        assert not changed


@settings(max_examples=200, deadline=None)
@given(st.lists(records(), max_size=10), st.randoms(use_true_random=False), st.data())
def test_any_delivery_order_with_repeats_ends_the_same(
    rs: list[v.Record], rnd: object, data: st.DataObject
) -> None:
    expected = v.merge_all({}, rs)
    # Each node gets every record at least once, in its own order, some more than once.
    for _ in range(3):
        delivery = rs + data.draw(st.lists(st.sampled_from(rs), max_size=5)) if rs else []
        rnd.shuffle(delivery)  # type: ignore[attr-defined]
        assert v.merge_all({}, delivery) == expected
    # The winner per name is the greatest record for that name.
    for name, rec in expected.items():
        assert rec.order() == max(r.order() for r in rs if r.name == name)
