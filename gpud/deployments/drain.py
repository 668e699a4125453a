"""Cordon and drain (`gpud drain`, `gpud uncordon`): what this node keeps and when its old
copies retire. Pure, but for the state key and one read of a replica's own /metrics.

A cordoned node gossips ``cd`` in its tags: placement (rule 6) chooses it for nothing and moves
its replicas make-before-break, the Ray election never makes it head. Each replica here keeps
serving until this node's own probe sees its new copy ready; ``follow_s`` later every router
sends its new requests to the new copy, and the old one stops as soon as it reports no request
of its own (vLLM's ``vllm:num_requests_running`` and ``..._waiting``: the requests of every
router, not only this node's), at the latest at the drain's timeout. An engine that reports
neither gets a fixed second for what is in flight.
"""

from __future__ import annotations

import contextlib

import aiohttp
import msgspec

from gpud.router.balance import QUEUE_METRIC, queue_depth
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


# What an engine reports of the requests it holds: generating, and queued.
BUSY_METRICS = ("vllm:num_requests_running", QUEUE_METRIC)
# The grace for requests in flight to an old copy whose engine reports neither.
UNREPORTED_GRACE_S = 1.0
BUSY_READ_TIMEOUT_S = 1.0


def follow_s(interval_s: float, router_refresh_s: float) -> float:
    """How long after this node saw a new copy ready every router sends to it: two probe
    rounds (every router's own probe sees it ready) and a router refresh."""
    return 2 * interval_s + router_refresh_s


def busy(metrics_text: str) -> float | None:
    """Requests an engine holds, from its Prometheus text (pure); None when it reports none
    of `BUSY_METRICS`."""
    found = [d for m in BUSY_METRICS if (d := queue_depth(metrics_text, m)) is not None]
    return sum(found) if found else None


async def read_busy(addr: str, port: int) -> float | None:
    """`busy` of the server at addr:port; None when it cannot be read in time."""
    host = f"[{addr}]" if ":" in addr else addr
    timeout = aiohttp.ClientTimeout(total=BUSY_READ_TIMEOUT_S)
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"http://{host}:{port}/metrics") as r,
        ):
            if r.status == 200:
                return busy(await r.text())
    return None


def may_retire(
    new_ready_for_s: float | None, *, follow: float, timeout_s: float, busy: float | None
) -> bool:
    """Whether the old copy of a replica that moved off this node stops now (pure): never
    before its new copy is ready (this node's probe, ``new_ready_for_s`` ago); at the drain's
    timeout whatever it still holds; before that not until every router follows (``follow``),
    then once its engine holds no request (``busy``, read after ``follow``), or, when it
    reports none (None), `UNREPORTED_GRACE_S` later."""
    if new_ready_for_s is None:
        return False
    if new_ready_for_s >= timeout_s:
        return True
    if new_ready_for_s < follow:
        return False
    if busy is None:
        return new_ready_for_s >= follow + UNREPORTED_GRACE_S
    return busy == 0
