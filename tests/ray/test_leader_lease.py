"""Leader lease: the pure decisions production runs, driven by properties.

Safety of the lease in time: a head that last confirmed a majority at some moment stops acting
LEASE_S later; every voter that heard from it refuses a successor until LEASE_S + LEASE_MARGIN_S
after it last heard from it, which is never earlier. So for any contact history, the moment a
successor can win is after the moment the old head stops.
"""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from gpud.context import Member
from gpud.ray.election import quorum
from gpud.ray.lease import (
    LEASE_MARGIN_S,
    LEASE_REFUSAL,
    LEASE_S,
    lease_ends_at,
    lease_holds,
    lease_refusal,
)
from gpud.tags import Tags

NAMES = [f"n{i}" for i in range(7)]


def member(name: str, ray: str = "worker") -> Member:
    return Member(name=name, addr="10.0.0.1", port=7946, status="alive", tags=Tags(ray=ray))


@given(
    size=st.integers(min_value=1, max_value=7),
    # When each other member last exchanged a probe with the head (head's send time), and how
    # much later that member saw it (its own clock reading of the same exchange).
    contacts=st.lists(st.floats(min_value=0, max_value=20), min_size=6, max_size=6),
    delays=st.lists(st.floats(min_value=0, max_value=0.5), min_size=6, max_size=6),
)
def test_old_head_stops_before_any_successor_can_win(
    size: int, contacts: list[float], delays: list[float]
) -> None:
    head, others = NAMES[0], NAMES[1:size]
    known = [head, *others]
    sent = dict(zip(others, contacts, strict=False))
    heard = {n: sent[n] + d for n, d in zip(others, delays, strict=False)}
    # The last moment the head still acts: the latest t at which the lease holds.
    ticks = [i / 20 for i in range(0, 40 * 20)]
    acting = [t for t in ticks if lease_holds(head, known, sent, t, LEASE_S) is None]
    stops = max(acting, default=-1.0)
    members = {n: member(n) for n in others} | {head: member(head, "head")}
    # A successor needs a majority; the old head never votes for it, so some voter among the
    # others must grant: the earliest time a majority of the others has no lease objection.
    for t in ticks:
        willing = [
            n
            for n in others
            if lease_refusal(others[0], n, members, {head: heard[n]}, t, LEASE_S + LEASE_MARGIN_S)
            is None
        ]
        if len(willing) >= quorum(len(known)):
            assert t > stops, (t, stops)
            break


@given(contact_age=st.floats(min_value=0, max_value=10), size=st.integers(min_value=1, max_value=7))
def test_lease_holds_exactly_while_a_majority_is_fresh(contact_age: float, size: int) -> None:
    known = NAMES[:size]
    contacts = {n: 100.0 - contact_age for n in known[1:]}
    verdict = lease_holds(known[0], known, contacts, 100.0, LEASE_S)
    assert (verdict is None) == (size == 1 or contact_age <= LEASE_S)
    if verdict is not None:
        assert verdict.startswith("lease expired: only 1 of")


@given(
    size=st.integers(min_value=1, max_value=7),
    contacts=st.lists(st.floats(min_value=0, max_value=20), min_size=0, max_size=6),
    now=st.floats(min_value=0, max_value=30),
)
def test_lease_ends_exactly_when_lease_holds_stops(
    size: int, contacts: list[float], now: float
) -> None:
    """The head's timer (lease_ends_at) and its check (lease_holds) agree at every moment, so
    a head stepping at lease_ends_at stops acting when the lease ends, not a tick later."""
    known = NAMES[:size]
    seen = dict(zip(known[1:], contacts, strict=False))  # members without contact: never
    ends = lease_ends_at(known[0], known, seen, LEASE_S)
    assert (lease_holds(known[0], known, seen, now, LEASE_S) is None) == (now <= ends)


@given(
    size=st.integers(min_value=2, max_value=7),
    contacts=st.lists(st.floats(min_value=0, max_value=20), min_size=6, max_size=6),
    delays=st.lists(st.floats(min_value=0, max_value=0.5), min_size=6, max_size=6),
    restarts=st.lists(st.booleans(), min_size=6, max_size=6),
    gaps=st.lists(st.floats(min_value=0, max_value=5), min_size=6, max_size=6),
)
def test_a_restarted_voter_never_elects_a_successor_while_the_old_head_acts(
    size: int, contacts: list[float], delays: list[float], restarts: list[bool], gaps: list[float]
) -> None:
    """A voter restarted after its last exchange with the head has forgotten it (its new
    process heard nothing yet), while the head's lease still counts that exchange: the
    voter's own start (``since``) stands in for what it forgot."""
    head, others = NAMES[0], NAMES[1:size]
    known = [head, *others]
    sent = dict(zip(others, contacts, strict=False))
    seen = {n: sent[n] + d for n, d in zip(others, delays, strict=False)}
    # A restarted voter started some time after it last saw the head and remembers nothing.
    started = {
        n: seen[n] + gap if again else -math.inf
        for n, again, gap in zip(others, restarts, gaps, strict=False)
    }
    heard = {n: {} if started[n] > -math.inf else {head: seen[n]} for n in others}
    ticks = [i / 20 for i in range(0, 40 * 20)]
    acting = [t for t in ticks if lease_holds(head, known, sent, t, LEASE_S) is None]
    stops = max(acting, default=-1.0)
    members = {n: member(n) for n in others} | {head: member(head, "head")}
    for t in ticks:
        willing = [
            n
            for n in others
            if t >= started[n]
            and lease_refusal(
                others[0], n, members, heard[n], t, LEASE_S + LEASE_MARGIN_S, since=started[n]
            )
            is None
        ]
        if len(willing) >= quorum(len(known)):
            assert t > stops, (t, stops)
            break


def test_lease_refusal_names_the_head_and_ignores_the_candidate_itself() -> None:
    members = {"h": member("h", "head"), "c": member("c"), "v": member("v")}
    blocked = lease_refusal("c", "v", members, {"h": 9.0}, 10.0, 4.0)
    assert blocked is not None and blocked[0].startswith(f"{LEASE_REFUSAL} h announces")
    assert abs(blocked[1] - 3.0) < 1e-9
    assert lease_refusal("c", "v", members, {"h": 5.0}, 10.0, 4.0) is None
    # The head itself standing again is not blocked by its own lease.
    assert lease_refusal("h", "v", members, {"h": 9.0}, 10.0, 4.0) is None
