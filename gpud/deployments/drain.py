"""Cordon and drain (`gpud drain`, `gpud uncordon`): what this node keeps and when its old
copies retire. Pure, but for the state key.

A cordoned node gossips ``cd`` in its tags: placement (rule 6) chooses it for nothing and moves
its replicas make-before-break, the Ray election never makes it head. Each replica here keeps
serving until this node's own probe sees its new copy ready; it stops ``settle_s`` later, the
time every router needs to see the new copy ready too and the requests already sent to the old
one need to finish (bounded by the drain's timeout).
"""

from __future__ import annotations

import msgspec

from gpud.state import Key

# The timeout when `gpud drain` names none; and the bounds of one.
DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 24 * 3600.0


class CordonRecord(msgspec.Struct, frozen=True, kw_only=True):
    # Unix seconds of the `gpud drain` that set it.
    since: float
    # How long an old copy may go on serving requests already sent to it.
    timeout_s: float


class DrainRequest(msgspec.Struct, frozen=True, kw_only=True):
    timeout_s: float = DEFAULT_TIMEOUT_S


class DrainReply(msgspec.Struct, frozen=True, kw_only=True):
    cordoned: bool
    # Replicas still running here (a drain is done when none is left).
    running_here: list[str] = []


CORDON = Key("deployments.cordon", CordonRecord)


def timeout_refusal(timeout_s: float) -> str:
    """Why a drain timeout is refused ("" when it is fine)."""
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        return f"timeout_s must be more than 0 and at most {MAX_TIMEOUT_S:.0f}, not {timeout_s}"
    return ""


def settle_s(timeout_s: float, interval_s: float, router_refresh_s: float) -> float:
    """How long an old copy serves after this node saw its new copy ready: two probe rounds
    (every router's own probe sees it ready), a router refresh, and a second for requests in
    flight, bounded by the drain's timeout."""
    return min(timeout_s, 2 * interval_s + router_refresh_s + 1.0)


def may_retire(new_ready_for_s: float | None, settle: float) -> bool:
    """Whether the old copy of a replica that moved off this node stops now: only once its new
    copy has been ready (this node's probe) for ``settle`` seconds; never before it is ready."""
    return new_ready_for_s is not None and new_ready_for_s >= settle
