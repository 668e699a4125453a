"""Deployment records on disk: one row per name (spec or tombstone) and the Lamport clock.

Rows live in the node's one state store (`gpud/state.py`), table ``deployments_records``; the
clock is the highest Lamport time this node has issued or seen, so a restart never reuses one.
Merges are written in one transaction: a crash keeps either the old or the new set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import msgspec

from gpud.deployments.model import Entry
from gpud.state import Key, StateError, StateStore

TABLE = "deployments_records"
SCHEMA_VERSION = 1
CLOCK = Key("deployments.clock", int)


def set_digest(entries: Mapping[str, Entry]) -> str:
    """Short digest of a record set (gossiped in the `dv` tag): equal sets, equal digests."""
    h = hashlib.blake2b(digest_size=6)
    for name, entry in sorted(entries.items()):
        v = entry.record.version
        h.update(f"{name}\x00{v.lamport}\x00{v.origin}\x00{entry.record.digest}\x01".encode())
    return h.hexdigest() if entries else ""


class SpecStore:
    def __init__(self, store: StateStore) -> None:
        self._store = store
        store.ensure_table(
            TABLE,
            SCHEMA_VERSION,
            f"CREATE TABLE {TABLE} (name TEXT PRIMARY KEY, entry BLOB NOT NULL)",
        )

    def load(self) -> tuple[dict[str, Entry], int]:
        entries = {}
        for name, raw in self._store.query(f"SELECT name, entry FROM {TABLE}"):
            try:
                entries[name] = msgspec.json.decode(raw, type=Entry)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise StateError(
                    f"{self._store.path}: deployment record {name!r} does not decode: {exc}"
                ) from None
        return entries, self._store.get(CLOCK) or 0

    def save(self, entries: Iterable[Entry], clock: int) -> None:
        """Write ``entries`` (replacing their names' rows) and the clock, all or nothing."""
        with self._store.transaction() as tx:
            tx.executemany(
                f"INSERT INTO {TABLE} (name, entry) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET entry = excluded.entry",
                [(e.record.name, msgspec.json.encode(e)) for e in entries],
            )
            tx.put(CLOCK, clock)
