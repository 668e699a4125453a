"""The leader lease (pure): a head acts only while a majority heard from it lately, and no
voter helps elect a successor while another head's lease may still run, so two heads never act
at once. gpud.ray.head_election applies these rules; gpud.ray.lease_tree carries renewals."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from gpud.context import Member
from gpud.ray.election import quorum

# A head acts only while a majority of the known members (itself included) heard from it
# within LEASE_S; a voter helps elect nobody else until
# LEASE_S + LEASE_MARGIN_S after it last heard from a member announcing itself head. So the
# old head has stopped before a successor can exist. A head runs a step at the moment its
# lease would end (`HeadElection.next_step_in`), so the margin covers only the step-down
# itself on a busy event loop. The head renews its lease every 0.5 s down a tree of its
# members (gpud.ray.lease_tree: FANOUT messages at the head whatever N), and the data-path
# probes count too, so 2.5 s rides out several lost renewals in a row.
LEASE_S = 2.5
LEASE_MARGIN_S = 0.5
# A candidate blocked by its own lease for at most this long waits it out inside the step.
LEASE_WAIT_MAX_S = 2.0
# A voter whose lease ends within this long answers once it has, instead of refusing; shorter
# than any vote timeout a candidate uses (config allows down to ~0.1 s, but Serf answers
# late replies as none: the candidate then just retries).
VOTER_WAIT_MAX_S = 0.75
# A candidate whose votes were refused only for a lease stands again after this long.
LEASE_RETRY_S = (0.3, 0.6)
LEASE_REFUSAL = "lease:"


@runtime_checkable
class LeaseSource(Protocol):
    """Contact times from the data-path probes (gpud.health): monotonic seconds per peer."""

    def lease_contacts(self) -> dict[str, float]:
        """Per peer, a time no later than the peer last heard from us (a head's lease)."""

    def heard_from(self) -> dict[str, float]:
        """Per peer, a time no earlier than we last heard from it (a voter's lease)."""

    async def confirm_now(self) -> None:
        """Probe every peer now (after a freeze)."""


def newest(*times: Mapping[str, float]) -> dict[str, float]:
    """Per name, the newest of its times in ``times``."""
    out: dict[str, float] = {}
    for source in times:
        for name, at in source.items():
            out[name] = max(at, out.get(name, -math.inf))
    return out


def lease_holds(
    me: str, known: list[str], contacts: Mapping[str, float], now: float, lease_s: float
) -> str | None:
    """None while a majority of ``known`` (``me`` included) was in contact within
    ``lease_s``; else why the head must stop acting (pure)."""
    needed = quorum(len(known))
    fresh = 1 + sum(1 for n in known if n != me and now - contacts.get(n, -math.inf) <= lease_s)
    if fresh >= needed:
        return None
    return (
        f"lease expired: only {fresh} of {len(known)} members confirmed within {lease_s:g} s, "
        f"{needed} needed"
    )


def lease_ends_at(
    me: str, known: list[str], contacts: Mapping[str, float], lease_s: float
) -> float:
    """The last moment ``lease_holds`` holds on these contacts (pure): the majority's
    oldest needed contact plus ``lease_s`` (inf when ``me`` alone is a majority)."""
    needed = quorum(len(known))
    if needed <= 1:
        return math.inf
    newest = sorted((contacts.get(n, -math.inf) for n in known if n != me), reverse=True)
    return newest[needed - 2] + lease_s if len(newest) >= needed - 1 else -math.inf


def lease_refusal(
    candidate: str,
    me: str,
    members: Mapping[str, Member],
    heard: Mapping[str, float],
    now: float,
    wait_s: float,
    *,
    since: float = -math.inf,
) -> tuple[str, float] | None:
    """(why, seconds left) while another member that announces itself head was heard from
    within ``wait_s``: its lease may still run, so no successor yet (pure). ``since``: when
    this voter started. It cannot tell whether it heard from a member before that (its
    previous incarnation may have kept a head's lease alive), so it counts that moment as
    heard."""
    for member in members.values():
        if member.name in (candidate, me) or member.tags is None or member.tags.ray != "head":
            continue
        left = wait_s - (now - max(since, heard.get(member.name, -math.inf)))
        if left > 0:
            return (
                f"{LEASE_REFUSAL} {member.name} announces itself head and was heard from "
                f"{wait_s - left:.1f} s ago; its lease may run {left:.1f} s more",
                left,
            )
    return None
