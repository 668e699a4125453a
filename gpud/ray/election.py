"""Ray head election as pure functions over one node's view of the membership.

Nothing here does I/O: the service feeds in the members (with decoded tags), the data-path
health verdicts and the node's persisted term, and acts on the returned Plan.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Literal

import msgspec

from gpud.context import Member
from gpud.health.verdict import DirectionState, majority_verdict
from gpud.ray.votes import VoteCertificate, VoteState, valid_voters

# Verdict of the health component for a node: True/False = healthy/unhealthy as seen by a
# majority of its peers; None = no verdict yet (fall back to the node's own `hl` tag).
DataPathVerdict = Callable[[str], bool | None]

Action = Literal["lead", "stand", "follow", "step_down", "wait"]
# Why a member may not be Ray head, as a code: the ray component picks problems and fixes by
# it, never by the words of the reason.
IneligibleCode = Literal[
    "down",  # not alive (serf, or the health component's down verdict)
    "tags",  # its tags cannot be read
    "never",  # ray.head = "never"
    "ray_unavailable",  # its rv tag: no usable Ray there
    "nat",  # behind NAT or port mapping
    "gpus",  # its GPUs are unhealthy
    "cordoned",  # `gpud drain` took it out of service
    "data_path",  # a majority of its peers cannot reach it
    "critical_health",  # its own health verdict is critical
    "gcs_unreachable",  # head: a majority of its workers cannot reach its GCS
]
# What a plan's reason is about, where the ray component acts on it ("" for the rest).
PlanCode = Literal["", "no_majority", "gcs_unreachable"]


class Plan(msgspec.Struct, kw_only=True, frozen=True):
    """What this node should do now.

    lead: stay head of ``term``. stand: ask for votes as candidate of ``term``.
    follow: run a Ray worker toward ``head``. step_down: stop being head (stop Ray).
    wait: no head to follow and not the candidate; ``reason`` says why.
    """

    action: Action
    term: int
    head: str | None = None
    candidate: str | None = None
    reason: str = ""
    code: PlanCode = ""


class Ineligible(msgspec.Struct, frozen=True):
    code: IneligibleCode
    text: str


def quorum(known: int) -> int:
    return known // 2 + 1


def known_members(members: Mapping[str, Member]) -> list[Member]:
    """Members that count toward the majority: everyone not gracefully left (failed counts)."""
    return [m for m in members.values() if m.status != "left"]


def has_majority(members: Mapping[str, Member]) -> tuple[bool, str]:
    known = known_members(members)
    alive = sum(1 for m in known if m.alive)
    if alive >= quorum(len(known)):
        return True, ""
    return False, f"only {alive} of {len(known)} known members alive, {quorum(len(known))} needed"


def ineligible(member: Member, verdict: DataPathVerdict | None = None) -> Ineligible | None:
    """Why ``member`` may not be Ray head, or None when it may."""
    if not member.alive:
        why = f"down: {member.down_reason}" if member.down else f"{member.status} in serf"
        return Ineligible("down", why)
    tags = member.tags
    if tags is None:
        return Ineligible("tags", f"unreadable tags: {member.tags_error or 'none'}")
    if tags.rh == "never":
        return Ineligible("never", 'ray.head = "never" in its config')
    if not tags.rv:
        return Ineligible("ray_unavailable", "Ray is not available on it")
    if tags.nat:
        return Ineligible("nat", "behind NAT or port mapping (advertised address is not local)")
    if tags.gh == "unhealthy":
        return Ineligible("gpus", "its GPUs are unhealthy (see `gpud gpus` on it)")
    if tags.cd:
        return Ineligible("cordoned", "cordoned by `gpud drain` (`gpud uncordon` on it ends it)")
    if tags.hc:
        return Ineligible(
            "gcs_unreachable",
            f"stepped down as head: {GCS_UNREACHABLE} (tcp/{tags.hc}); out of the election "
            "for a cool-down",
        )
    healthy = verdict(member.name) if verdict is not None else None
    if healthy is False:
        return Ineligible("data_path", "data path not healthy as seen by a majority of its peers")
    if healthy is None and tags.hl == "critical":
        return Ineligible("critical_health", "reports critical health")
    return None


def ineligible_reason(member: Member, verdict: DataPathVerdict | None = None) -> str | None:
    """Why ``member`` may not be Ray head in words, or None when it may."""
    why = ineligible(member, verdict)
    return None if why is None else why.text


def _rendezvous(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(b"gpud-ray-head\0" + name.encode()).digest()[:8])


def rank_key(member: Member) -> tuple[int, int, int, str]:
    """Sort key for candidates: "prefer" first, then higher priority, then rendezvous hash."""
    assert member.tags is not None
    return (
        0 if member.tags.rh == "prefer" else 1,
        -member.tags.pri,
        -_rendezvous(member.name),
        member.name,
    )


def current_head(members: Mapping[str, Member]) -> Member | None:
    """The alive member announcing itself head with the highest term (name breaks ties)."""
    heads = [m for m in members.values() if m.alive and m.tags is not None and m.tags.ray == "head"]
    if not heads:
        return None
    return max(heads, key=lambda m: (m.tags.term if m.tags else 0, m.name))


def highest_term(members: Mapping[str, Member], own_term: int) -> int:
    return max([own_term, *(m.tags.term for m in members.values() if m.tags is not None)])


def choose_candidate(
    members: Mapping[str, Member], verdict: DataPathVerdict | None = None
) -> tuple[Member | None, dict[str, str]]:
    """The best eligible member, and the reason each other member is not eligible."""
    reasons: dict[str, str] = {}
    eligible: list[Member] = []
    for member in members.values():
        reason = ineligible_reason(member, verdict)
        if reason is None:
            eligible.append(member)
        else:
            reasons[member.name] = reason
    return (min(eligible, key=rank_key) if eligible else None), reasons


# ---- Ray health decides the head ----
# Part of the reason a head of a GCS its workers cannot reach steps down (the service keeps
# such a head out of the next election for a while).
GCS_UNREACHABLE = "a majority of its workers cannot reach its GCS"


def workers_reach_gcs(head: Member, members: Mapping[str, Member]) -> bool | None:
    """Do a majority of ``head``'s Ray workers (alive members tagged ray=worker in its term)
    reach its GCS, by their ``hg`` tags? None without a majority either way (or no workers)."""
    term = head.tags.term if head.tags is not None else -1
    views = [
        m.tags.hg
        for m in members.values()
        if m.name != head.name
        and m.alive
        and m.tags is not None
        and m.tags.ray == "worker"
        and m.tags.term == term
    ]
    if not views:
        return None
    states: list[DirectionState] = [
        "passing" if v == "ok" else "critical" for v in views if v != "unknown"
    ]
    return majority_verdict(states, len(views))


def head_ineligible(
    head: Member, members: Mapping[str, Member], verdict: DataPathVerdict | None = None
) -> Ineligible | None:
    """Why the head in office must give up the role, or None to keep it. Its workers' direct
    GCS checks come first: a majority that cannot reach its GCS deposes it (when some other
    member could lead); a majority that reaches it keeps it even while its gpud does not
    answer data-path probes (frozen or slow), since Ray itself works."""
    gcs = workers_reach_gcs(head, members)
    if gcs is False:
        others = {name: m for name, m in members.items() if name != head.name}
        if choose_candidate(others, verdict)[0] is not None:
            return Ineligible("gcs_unreachable", GCS_UNREACHABLE)
    return ineligible(head, None if gcs else verdict)


def head_ray_reason(
    head: Member, members: Mapping[str, Member], verdict: DataPathVerdict | None = None
) -> str | None:
    """head_ineligible in words."""
    why = head_ineligible(head, members, verdict)
    return None if why is None else why.text


# ---- end of the Ray health rule ----


def plan(
    me: str,
    members: Mapping[str, Member],
    own_term: int,
    verdict: DataPathVerdict | None = None,
    *,
    pending: Collection[str] = (),
) -> Plan:
    """Decide this node's next step. ``members`` must include this node with its current tags
    (and only members that count: see `screen`); ``own_term`` is the highest term this node
    has voted or stood in (persisted). ``pending``: alive members not verified yet that may
    still prove to be gpud nodes; this node does not stand while there are any."""
    # Terms announced in tags decide who is in office; the persisted vote term only makes sure
    # a new candidacy uses a term this node has not voted in yet.
    announced = highest_term(members, 0)
    own = members.get(me)
    i_am_head = own is not None and own.tags is not None and own.tags.ray == "head"
    majority, why_not = has_majority(members)
    if not majority:
        if i_am_head:
            return Plan(
                action="step_down",
                term=announced,
                reason=f"lost the majority: {why_not}",
                code="no_majority",
            )
        return Plan(
            action="wait",
            term=announced,
            reason=f"no majority, no head: {why_not}",
            code="no_majority",
        )

    head = current_head(members)
    head_term = head.tags.term if head is not None and head.tags is not None else -1
    if i_am_head and head is not None and head.name != me:
        return Plan(
            action="step_down",
            term=announced,
            head=head.name,
            reason=f"{head.name} is head of the higher term {head_term}",
        )
    if head is not None and head_term >= announced:
        why = head_ineligible(head, members, verdict)
        if why is None:
            action: Action = "lead" if head.name == me else "follow"
            return Plan(action=action, term=head_term, head=head.name)
        if head.name == me:
            return Plan(
                action="step_down",
                term=announced,
                reason=f"no longer eligible: {why.text}",
                code="gcs_unreachable" if why.code == "gcs_unreachable" else "",
            )
    if i_am_head:
        # Heads of a stale term (a newer term was announced while we were cut off) step down.
        if head is not None and head.name == me and head_term < announced:
            return Plan(
                action="step_down", term=announced, reason=f"term {head_term} < {announced}"
            )

    candidate, reasons = choose_candidate(members, verdict)
    if candidate is None:
        summary = "; ".join(f"{name}: {why}" for name, why in sorted(reasons.items()))
        return Plan(action="wait", term=announced, reason=f"no eligible head: {summary}"[:500])
    if candidate.name == me:
        if pending:
            # Standing now would count a majority of only the members verified so far (at
            # start: ourselves alone); let the prober verify the others first.
            waiting = ", ".join(sorted(pending))
            return Plan(
                action="wait",
                term=announced,
                candidate=me,
                reason=f"verifying {waiting} as gpud nodes before standing"[:500],
            )
        return Plan(action="stand", term=max(own_term, announced) + 1, candidate=me)
    return Plan(
        action="wait",
        term=announced,
        candidate=candidate.name,
        reason=f"waiting for {candidate.name} to be elected",
    )


def vote_refusal(
    candidate: str,
    term: int,
    members: Mapping[str, Member],
    verdict: DataPathVerdict | None = None,
) -> str | None:
    """A voter's objection to ``candidate`` standing for ``term`` in its own view, or None."""
    majority, why_not = has_majority(members)
    if not majority:
        return f"voter has no majority: {why_not}"
    member = members.get(candidate)
    if member is None:
        return f"{candidate} is not a known member"
    reason = ineligible_reason(member, verdict)
    if reason is not None:
        return f"{candidate} is not eligible: {reason}"
    head = current_head(members)
    # Stickiness: an eligible head still in office keeps the role; no needless Ray restarts.
    if (
        head is not None
        and head.name != candidate
        and head.tags is not None
        and head.tags.term >= term - 1
        and head_ray_reason(head, members, verdict) is None
    ):
        return f"{head.name} is an eligible head of term {head.tags.term}"
    return None


# ---- trust: which members count, which claims are believed ----

# Is this member a verified gpud node of this cluster (it answered our authenticated peer API
# as itself at its gossiped address)? The health component's Prober.verified.
Verified = Callable[[str], bool]

# A term more than this above the highest term the other members and this node vouch for is
# ignored: honest terms grow by one per election round, so a jump this far is a forged claim.
TERM_BOUND = 64


class Screened(msgspec.Struct, kw_only=True, frozen=True):
    """The members the election decides on, and the claims it ignored (name -> why)."""

    members: dict[str, Member]
    ignored: dict[str, str]


def screen(
    me: str, members: Mapping[str, Member], own_term: int, verified: Verified | None
) -> Screened:
    """This node plus the members verified as gpud nodes (``verified`` None: all of them).

    A member that was verified and then failed still counts (a real node that died); one that
    never was is left out entirely: it never counts toward a majority, is never followed and
    never gets a vote. A counted member whose term is more than TERM_BOUND above what the
    others (and ``own_term``) vouch for keeps counting, but its term and head claim are
    ignored. Unverified members alive in serf that announce themselves head are reported in
    ``ignored`` (whatever the data path says of them).
    """
    kept: dict[str, Member] = {}
    ignored: dict[str, str] = {}
    for name, member in members.items():
        if name == me or verified is None or verified(name):
            kept[name] = member
        elif member.status == "alive" and member.tags is not None and member.tags.ray == "head":
            ignored[name] = (
                f"announces itself Ray head of term {member.tags.term} from {member.addr} "
                "but is not a verified gpud node of this cluster"
            )
    terms = {name: m.tags.term for name, m in kept.items() if m.tags is not None}
    # The two highest (term, name): the highest term among the *others* of any member.
    top = sorted(((t, n) for n, t in terms.items()), reverse=True)[:2]
    for name, term in terms.items():
        if name == me:
            continue
        others = [t for t, n in top if n != name][:1]
        vouched = max([own_term, *others])
        if term > vouched + TERM_BOUND:
            member = kept[name]
            assert member.tags is not None
            role = "none" if member.tags.ray == "head" else member.tags.ray
            tags = msgspec.structs.replace(member.tags, term=vouched, ray=role)
            kept[name] = msgspec.structs.replace(member, tags=tags)
            ignored[name] = (
                f"announces term {term}, more than {TERM_BOUND} above the highest term "
                f"{vouched} other members vouch for"
            )
    return Screened(members=kept, ignored=ignored)


# ---- a majority of the members this node knows exist, not of those serf lists yet ---------

# A remembered member that serf does not list keeps counting (as not alive) until this long
# after it was last alive: serf reaps a failed member after its reconnect_timeout (24 h by
# default), so the view forgets no member sooner than serf itself would have.
FORGET_S = 24 * 3600
# A member serf lists as left counts as failed for this long after it was last alive: a
# graceful stop is what every restart looks like (all gpuds restarted at once leave one after
# the other), and a node counting only itself then would win alone. Removing nodes for good
# makes the rest wait this long before a smaller majority can elect.
LEFT_FORGET_S = 600
# A remembered member's last-alive time is rewritten at most this often (one small write).
REMEMBER_REFRESH_S = 60
MEMBERSHIP_UNKNOWN = "membership not known yet: serf is not connected or not read yet"
REMEMBERED = (
    "not listed alive by serf since this node started, or left (remembered from its persisted view)"
)


def with_remembered(
    counted: Mapping[str, Member],
    listed: Mapping[str, Member],
    remembered: Mapping[str, int],
    now: float,
) -> dict[str, Member]:
    """``counted`` (the screened members) plus, as failed, every member of the persisted view
    not among them that was alive within FORGET_S (LEFT_FORGET_S for one serf lists as left).
    So a restarted node whose serf has not found its peers again (or whose prober has not
    verified them yet) counts its majority against the cluster it knew, never itself alone."""
    out = dict(counted)
    for name, seen in remembered.items():
        left = name in listed and listed[name].status == "left"
        counted_left = name in out and out[name].status == "left"
        if (name not in out or counted_left) and now - seen <= (
            LEFT_FORGET_S if left else FORGET_S
        ):
            out[name] = Member(
                name=name, addr="", port=0, status="failed", tags=None, tags_error=REMEMBERED
            )
    return out


def remember(
    counted: Mapping[str, Member],
    listed: Mapping[str, Member],
    remembered: Mapping[str, int],
    now: float,
) -> dict[str, int]:
    """The persisted view to keep: every counted member alive now, at ``now``, and the
    remembered rest that `with_remembered` still counts."""
    kept = {
        name: seen
        for name, seen in remembered.items()
        if name in with_remembered({}, listed, {name: seen}, now)
    }
    alive = {name: int(now) for name, m in counted.items() if m.alive}
    return {**kept, **alive}


def remembered_changed(old: Mapping[str, int], new: Mapping[str, int]) -> bool:
    """Worth a write: another set of names, or a last-alive time REMEMBER_REFRESH_S newer."""
    return old.keys() != new.keys() or any(
        new[name] - old[name] >= REMEMBER_REFRESH_S for name in new
    )


def proof_refusal(
    head: str,
    term: int,
    own_vote: VoteState,
    certificate: VoteCertificate | None,
    keys: Sequence[bytes],
) -> str | None:
    """Why this node may not follow ``head`` as head of ``term``, or None when a majority of
    votes it can check backs that term: its own persisted vote for ``head`` in ``term``, or
    ``head``'s certificate with valid signatures from a majority of the members it counted."""
    if own_vote.term == term and own_vote.voted_for == head:
        return None
    if certificate is None:
        return f"{head} showed no vote certificate for term {term}"
    if certificate.head != head or certificate.term != term:
        return (
            f"{head}'s certificate is for {certificate.head} in term {certificate.term}, "
            f"not term {term}"
        )
    voters = valid_voters(certificate, keys)
    needed = quorum(certificate.known)
    if len(voters) < needed:
        return (
            f"{head}'s certificate for term {term} has {len(voters)} valid votes of "
            f"{needed} needed ({certificate.known} members)"
        )
    return None
