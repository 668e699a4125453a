"""The router's decisions, pure: which replicas serve a model, which one takes a request, and
whether a failed attempt may go to another.

Every router decides alone. Without a session, "two random choices" over the load this
router sees (its own requests in flight to a replica plus the queue the replica reports):
near-best balance with no shared counts and no herd onto one replica. With a session id,
rendezvous hashing over the ready replicas' addresses: every router picks the same replica
for a session with no coordination, and a replica that leaves moves only its own sessions.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import msgspec

from gpud.deployments.model import DeploymentsList


class Upstream(msgspec.Struct, frozen=True, kw_only=True):
    """A ready replica's server, as this node has seen it over the data path."""

    deployment: str
    replica: int
    node: str
    url: str  # http://addr:port, also its identity for balancing and affinity


class Table(msgspec.Struct, frozen=True, kw_only=True):
    # Model name -> the ready replicas serving it (several deployments may serve one model).
    ready: dict[str, tuple[Upstream, ...]] = {}
    # Every model some deployment serves, ready or not (tells 503 from 404).
    known: frozenset[str] = frozenset()


def model_of(name: str, model: str) -> str:
    """The model a deployment serves: its spec's ``model``, else its name (a `command`
    engine may leave ``model`` empty)."""
    return model or name


def table(listing: DeploymentsList) -> Table:
    """The routing table from the deployments' views (pure). A deployment answers to its model
    and to its own name; only replicas in state "ready" (this node's probe of the data path
    passed) are listed."""
    ready: dict[str, list[Upstream]] = {}
    known: set[str] = set()
    for view in listing.deployments:
        names = {model_of(view.name, view.model), view.name}
        known |= names
        upstreams = [
            Upstream(
                deployment=view.name,
                replica=r.index,
                node=r.node,
                url=f"http://[{r.addr}]:{r.port}" if ":" in r.addr else f"http://{r.addr}:{r.port}",
            )
            for r in view.replica_views
            if r.state == "ready" and r.addr and r.port
        ]
        for name in names:
            ready.setdefault(name, []).extend(upstreams)
    return Table(
        ready={m: tuple(sorted(u, key=lambda x: x.url)) for m, u in ready.items() if u},
        known=frozenset(known),
    )


def models(listing: DeploymentsList) -> list[str]:
    """What `/v1/models` lists: the model of each deployment with a ready replica (pure)."""
    return sorted(
        {
            model_of(v.name, v.model)
            for v in listing.deployments
            if any(r.state == "ready" for r in v.replica_views)
        }
    )


def rendezvous_score(session: str, url: str) -> int:
    """Stable across processes and hosts (Python's own hash is salted per process)."""
    digest = hashlib.blake2b(f"{session}\0{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def affinity(session: str, candidates: Iterable[str]) -> str:
    """The replica a session belongs to: the highest rendezvous score (ties: smaller url)."""
    return max(candidates, key=lambda url: (rendezvous_score(session, url), url))


def two_choices(candidates: Sequence[str], load: Callable[[str], float], rng: random.Random) -> str:
    """The less loaded of two distinct random candidates (the first on a tie)."""
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(list(candidates), 2)
    return a if load(a) <= load(b) else b


def usable(candidates: Sequence[str], shunned_until: Mapping[str, float], now: float) -> list[str]:
    """Candidates not shunned at ``now`` (a replica that just refused a connection is left
    alone for a moment instead of costing every request a retry); all of them when every
    one is shunned: trying beats refusing."""
    fresh = [c for c in candidates if shunned_until.get(c, 0.0) <= now]
    return fresh or list(candidates)


def choose(
    candidates: Sequence[str],
    *,
    session: str,
    load: Callable[[str], float],
    tried: frozenset[str],
    rng: random.Random,
) -> str | None:
    """The replica for the next attempt: never one already tried for this request; by
    rendezvous when there is a session id, else the less loaded of two random ones. None:
    every candidate was tried."""
    left = [c for c in candidates if c not in tried]
    if not left:
        return None
    if session:
        return affinity(session, left)
    return two_choices(left, load, rng)


# How an attempt ended, as far as the router can prove:
# - "connect_failed": no connection was made (refused, unreachable, connect timeout), so no
#   byte of the request left this host;
# - "not_written": a connection was had (a pooled one) but the replica had closed it before
#   the request went out, so not one byte of the request was written;
# - "draining": the replica answered 503 before any byte went to the client (a draining or
#   overloaded server refuses work it has not started);
# - "failed_after_write": the connection broke after the request was (or may have been)
#   written: the engine may be generating, a retry could run the work twice;
# - "answered": any other response, passed on as it is.
Outcome = Literal["connect_failed", "not_written", "draining", "failed_after_write", "answered"]
NOT_DELIVERED: frozenset[Outcome] = frozenset({"connect_failed", "not_written", "draining"})


def attempt_outcome(*, connected: bool, written: bool, status: int | None) -> Outcome:
    """How one attempt ended (pure): ``connected``, a connection was had; ``written``, some
    byte of the request was handed to it; ``status``, the replica's response status (None:
    no response came)."""
    if status is not None:
        return "draining" if status == 503 else "answered"
    if not connected:
        return "connect_failed"
    return "failed_after_write" if written else "not_written"


def may_retry(outcome: Outcome, attempts: int, max_attempts: int) -> bool:
    """Whether to try another replica after ``attempts`` attempts (pure): only when the
    request provably did not reach an engine, and within the bound."""
    return outcome in NOT_DELIVERED and attempts < max_attempts


QUEUE_METRIC = "vllm:num_requests_waiting"


def queue_depth(metrics_text: str, metric: str = QUEUE_METRIC) -> float | None:
    """Requests waiting in a replica, from its Prometheus text (summed over label sets);
    None when the replica does not report it (then only this router's own count counts)."""
    total = None
    for line in metrics_text.splitlines():
        if not line.startswith(metric):
            continue
        rest = line[len(metric) :]
        if rest[:1] not in ("{", " "):
            continue  # another metric with this prefix
        try:
            value = float(rest.rsplit("}", 1)[-1].split()[0])
        except (IndexError, ValueError):
            continue
        if value == value and value >= 0:  # not NaN
            total = (total or 0.0) + value
    return total
