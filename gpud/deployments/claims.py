"""What nodes announce about the replicas they run (the `dp` tag), and what every node derives
from those announcements: pure functions, evaluated on the same gossiped inputs everywhere.

The `dp` tag lists one claim per replica a node runs, ";"-separated:
``name.index:port:digest[:gcs[:flags[:nm]]]``, e.g.
``web.0:20001:3fa2;big.1:20005:3fa2:20010:r;big.0:20007:3fa2:::20040``. ``gcs`` is the Ray GCS
port a multi-node replica's head announces once GCS answers (empty or absent: none); ``flags``
holds ``r`` when the replica's head announces it ready; ``nm`` is the node-manager port of the
Ray node a multi-node replica's other nodes run for it, which, like the head's GCS, answers
while only gpud restarts (`gpud.health.prober.workload_ports`). Claims from older nodes (no
flags field) parse as not announced ready; unknown flag letters are ignored, and an older
parser reads an ``nm`` field as part of the flags (digits: no flag).

A node that refuses a deployment (it lacks the spec's local model path) lists it too, in the
same shape, as ``name.0:0:digest::n`` (port 0, flag ``n``, the spec it refused), so placement on
every node prefers other nodes for that spec (`placement.NodeView.refuses`). It is no claim:
`parse_claims` leaves it out (an older parser reads a claim of port 0 that never answers, so
such a node keeps the replica where it is, failed, as before refusals were announced).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from gpud.context import Member
from gpud.deployments.placement import ReplicaKey
from gpud.ray.election import ineligible_reason, rank_key

READY_FLAG = "r"
REFUSED_FLAG = "n"
# Hex digits of a spec's digest announced per replica (enough to tell old from new).
DIGEST_CHARS = 4


class Claim(NamedTuple):
    """What a node announces about a replica it runs."""

    port: int
    # The first hex digits of the digest of the spec it runs (rolling updates).
    spec: str
    # N > 1, on the replica's head: its Ray GCS port once it answers (the others join it).
    gcs: int = 0
    # On the replica's head: its health path answered over the data path.
    ready: bool = False
    # N > 1, on its other nodes: the node-manager port of this node's Ray node of it.
    nm: int = 0


def parse_claims(raw: str) -> dict[ReplicaKey, Claim]:
    """The claims in a `dp` tag; malformed parts are skipped."""
    claims: dict[ReplicaKey, Claim] = {}
    for part in raw.split(";"):
        name, _, rest = part.partition(".")
        index, _, rest = rest.partition(":")
        port, _, rest = rest.partition(":")
        digest, _, rest = rest.partition(":")
        gcs, _, rest = rest.partition(":")
        flags, _, nm = rest.partition(":")
        if REFUSED_FLAG in flags:
            continue
        numbers = all(field.isdigit() or not field for field in (gcs, nm))
        if name and index.isdigit() and port.isdigit() and numbers:
            claims[(name, int(index))] = Claim(
                int(port), digest, int(gcs or 0), READY_FLAG in flags, int(nm or 0)
            )
    return claims


def parse_refusals(raw: str) -> dict[str, str]:
    """The refusals in a `dp` tag: deployment name -> the digest prefix of the spec refused."""
    refusals = {}
    for part in raw.split(";"):
        name, _, rest = part.partition(".")
        digest, _, flags = rest.removeprefix("0:0:").partition("::")
        if name and rest.startswith("0:0:") and REFUSED_FLAG in flags and digest:
            refusals[name] = digest
    return refusals


def format_claim(key: ReplicaKey, claim: Claim) -> str:
    optional = [str(claim.gcs or ""), READY_FLAG if claim.ready else "", str(claim.nm or "")]
    while optional and not optional[-1]:
        optional.pop()
    return ":".join([f"{key[0]}.{key[1]}", str(claim.port), claim.spec, *optional])


def format_claims(claims: Mapping[ReplicaKey, Claim], refusals: Mapping[str, str] = {}) -> str:
    """A `dp` tag: ``claims``, then ``refusals`` (deployment name -> digest prefix)."""
    parts = [format_claim(key, c) for key, c in sorted(claims.items())]
    parts += [f"{name}.0:0:{digest}::{REFUSED_FLAG}" for name, digest in sorted(refusals.items())]
    return ";".join(parts)


def replica_head(
    key: ReplicaKey,
    nodes: Iterable[str],
    members: Mapping[str, Member],
    claims: Mapping[str, Mapping[ReplicaKey, Claim]],
) -> str:
    """The node of replica ``key`` that runs its Ray head and its server. Pure: every node
    evaluates it on the same gossiped inputs, in any order, and gets the same node.

    Sticky first: a node of the replica that announces a GCS port for it stays head while it
    is in the replica (no Ray restart while its head lives). Otherwise the best node by the
    Ray election's rank (`rank_key`) among those it does not rule out (`ineligible_reason`),
    or among all of them when it rules out every one. ``members``: this node's view (its own
    entry with its current tags); ``claims``: node -> what it announces.
    """
    group = sorted(set(nodes))
    if not group:
        raise ValueError(f"replica {key[0]}.{key[1]} has no nodes")

    def order(name: str) -> tuple[int, tuple[int, int, int, str]]:
        member = members.get(name)
        if member is None or member.tags is None:
            return (2, (0, 0, 0, name))
        return (1 if ineligible_reason(member) else 0, rank_key(member))

    announcing = [n for n in group if (c := claims.get(n, {}).get(key)) is not None and c.gcs]
    return min(announcing or group, key=order)
