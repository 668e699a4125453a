"""Which apply of a deployment wins: a last-writer-wins register per name, ordered the same way
on every node.

Each apply or delete gets a `SpecVersion(lamport, origin)`: the applying node takes one more
than the highest Lamport time it has seen for any deployment, so an apply made after seeing
another one always orders after it. Two applies made concurrently on different nodes may share
a Lamport time; the origin's name breaks the tie, and the spec's digest breaks the tie that
only a node that lost its clock could produce. A delete is a record too (a tombstone), so a
late copy of the deleted spec cannot bring it back.

`merge` keeps, per name, the record with the greatest `Record.order()`: a join on a total
order, hence commutative, associative and idempotent (a state-based CRDT), so any delivery
order, with repeats, ends in the same state on every node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Annotated, Final

import msgspec

from gpud.deployments.spec import DeploymentSpec, Name, SpecError, encode

# A tombstone has no body; its digest sorts before every spec's.
TOMBSTONE_DIGEST: Final = ""

Origin = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class SpecVersion(msgspec.Struct, frozen=True, order=True):
    """Compared as (lamport, origin): `order=True` compares fields in declaration order."""

    lamport: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
    origin: Origin

    def __str__(self) -> str:
        return f"{self.lamport}@{self.origin}"


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """The latest word on one deployment name: a spec, or a tombstone when `spec` is None."""

    name: Name
    version: SpecVersion
    spec: DeploymentSpec | None
    digest: str

    @property
    def deleted(self) -> bool:
        return self.spec is None

    def order(self) -> tuple[int, str, str]:
        return (self.version.lamport, self.version.origin, self.digest)


def digest(spec: DeploymentSpec) -> str:
    return hashlib.blake2b(encode(spec), digest_size=16).hexdigest()


def applied(spec: DeploymentSpec, version: SpecVersion) -> Record:
    return Record(name=spec.name, version=version, spec=spec, digest=digest(spec))


def deleted(name: str, version: SpecVersion) -> Record:
    return Record(name=name, version=version, spec=None, digest=TOMBSTONE_DIGEST)


def check(record: Record) -> Record:
    """Reject a record whose parts disagree (from a buggy or hostile peer). Raises SpecError."""
    if record.spec is None:
        if record.digest != TOMBSTONE_DIGEST:
            raise SpecError(f"{record.name}: a tombstone carries no digest")
        return record
    if record.spec.name != record.name:
        raise SpecError(f"{record.name}: record holds the spec of {record.spec.name!r}")
    if record.digest != digest(record.spec):
        raise SpecError(f"{record.name}: digest does not match the spec it carries")
    return record


def next_version(state: Mapping[str, Record], origin: str, floor: int = 0) -> SpecVersion:
    """The version for a new apply or delete on `origin`: after everything it has seen.

    `floor` is the node's own persisted clock, so a node whose state lost a name (or that
    restarts before catching up) still never reuses a time it already issued.
    """
    seen = max((r.version.lamport for r in state.values()), default=0)
    return SpecVersion(lamport=max(seen, floor) + 1, origin=origin)


def merge(local: Mapping[str, Record], incoming: Record) -> tuple[dict[str, Record], bool]:
    """`local` with `incoming` applied if it orders after what `local` holds for its name.

    Returns a new dict (the input is not changed) and whether anything changed.
    """
    held = local.get(incoming.name)
    if held is not None and held.order() >= incoming.order():
        return dict(local), False
    new_state = dict(local)
    new_state[incoming.name] = incoming
    return new_state, True


def join(a: Mapping[str, Record], b: Mapping[str, Record]) -> dict[str, Record]:
    """The merge of two whole states (what two nodes hold after exchanging everything)."""
    return merge_all(a, b.values())


def merge_all(local: Mapping[str, Record], incoming: Iterable[Record]) -> dict[str, Record]:
    state = dict(local)
    for record in incoming:
        state, _ = merge(state, record)
    return state


def live(state: Mapping[str, Record]) -> list[DeploymentSpec]:
    """The specs in force (tombstones left out), sorted by name."""
    return [r.spec for _, r in sorted(state.items()) if r.spec is not None]
