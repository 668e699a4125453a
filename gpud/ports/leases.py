"""Port leases inside this node's block: schemas, pure bookkeeping, and their tables.

A lease is written to the state store (``gpud.state``) before it is returned. The ``port``
column of ``ports_lease_ports`` is the primary key, so even a bug above cannot make the store
hold one port in two leases.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated

import msgspec

from gpud.leasebook import Owner, Pid
from gpud.ports.blocks import ClaimRecord
from gpud.ports.reserve import PortRange
from gpud.state import Key, StateError, StateStore, Transaction


class LeaseRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of POST /v1/ports/leases."""

    owner: Owner
    count: Annotated[int, msgspec.Meta(ge=1)]
    contiguous: bool = False
    pid: Pid | None = None
    # Set by the API from the caller's SO_PEERCRED (a uid in the body is overwritten), so that
    # only the uid that leased may release.
    uid: int | None = None


class Lease(msgspec.Struct, kw_only=True):
    id: str
    owner: str
    ports: list[int]
    pid: int | None
    created: float
    # The uid that leased it (None: an in-process lease, or one from before uids were recorded).
    uid: int | None = None


class StoredLease(msgspec.Struct, kw_only=True):
    """A lease plus what the zombie scan needs to tell its owner from a recycled pid."""

    lease: Lease
    # Start time of the owner process (clock ticks since boot, /proc/<pid>/stat field 22).
    pid_start: int | None = None


def choose_ports(
    block: Sequence[int],
    used: set[int],
    count: int,
    contiguous: bool,
    usable: Callable[[int], bool],
    start: int = 0,
) -> list[int] | None:
    """Pick ``count`` ports of ``block`` that are not in ``used`` and pass ``usable``.

    The search starts at index ``start`` and wraps, so recently released ports (possibly in
    TIME_WAIT) are reused last. Returns None when the block cannot satisfy the request.
    """
    n = len(block)
    if count > n:
        return None
    if not contiguous:
        chosen: list[int] = []
        for i in range(n):
            port = block[(start + i) % n]
            if port not in used and usable(port):
                chosen.append(port)
                if len(chosen) == count:
                    return chosen
        return None
    # Contiguous: windows that do not wrap; first those starting at `start` or later, then
    # the earlier ones. On a bad port, skip every window that contains it.
    ok: dict[int, bool] = {}

    def good(i: int) -> bool:
        if i not in ok:
            ok[i] = block[i] not in used and usable(block[i])
        return ok[i]

    first = min(start % n, n - count)
    for lo, hi in ((first, n - count), (0, first - 1)):
        s = lo
        while s <= hi:
            bad = next((j for j in range(count) if not good(s + j)), None)
            if bad is None:
                return list(block[s : s + count])
            s += bad + 1
    return None


LEASE_TABLES_VERSION = 1
# `port` is the primary key of ports_lease_ports: the store cannot hold one port in two leases.
LEASE_TABLES = (
    """CREATE TABLE ports_leases (
        id TEXT PRIMARY KEY, owner TEXT NOT NULL, pid INTEGER, pid_start INTEGER,
        created REAL NOT NULL, uid INTEGER)""",
    """CREATE TABLE ports_lease_ports (
        port INTEGER PRIMARY KEY,
        lease_id TEXT NOT NULL REFERENCES ports_leases(id) ON DELETE CASCADE)""",
)
# This node's confirmed block claim, and the ranges gpud itself added to the kernel's reserved
# ports (so that it removes only those when its block moves).
CLAIM = Key("ports.claim", ClaimRecord)
RESERVED = Key("ports.reserved", list[PortRange])
# gpud 0.1.0 kept leases and claim in a file of their own; imported on first start.
LEGACY_DB = "ports.db"


class LeaseStore:
    """The lease tables of the state store; every write is durable on return."""

    def __init__(self, state: StateStore) -> None:
        self._state = state
        state.ensure_table("ports_leases", LEASE_TABLES_VERSION, *LEASE_TABLES)
        state.import_file(state.state_dir / LEGACY_DB, _import_legacy_db)

    def load(self) -> list[StoredLease]:
        return _read(self._state.query)

    def commit(self, added: Iterable[StoredLease], removed: Iterable[str]) -> None:
        """Add and remove leases in one durable transaction (all or nothing)."""
        with self._state.transaction() as tx:
            _write(tx, added, removed, "ports_")


def _read(query: Callable[[str], list[tuple]], prefix: str = "ports_") -> list[StoredLease]:
    ports: dict[str, list[int]] = {}
    for port, lease_id in query(f"SELECT port, lease_id FROM {prefix}lease_ports ORDER BY port"):
        ports.setdefault(lease_id, []).append(port)
    # 0.1.0's table (prefix "") has no uid column: its leases read as uid None.
    uid = "uid" if prefix else "NULL"
    return [
        StoredLease(
            lease=Lease(
                id=lid, owner=owner, ports=ports.get(lid, []), pid=pid, created=created, uid=uid_
            ),
            pid_start=pid_start,
        )
        for lid, owner, pid, pid_start, created, uid_ in query(
            f"SELECT id, owner, pid, pid_start, created, {uid} FROM {prefix}leases "
            "ORDER BY created, id"
        )
    ]


def _write(
    tx: Transaction, added: Iterable[StoredLease], removed: Iterable[str], prefix: str
) -> None:
    for lease_id in removed:
        tx.execute(f"DELETE FROM {prefix}lease_ports WHERE lease_id = ?", (lease_id,))
        tx.execute(f"DELETE FROM {prefix}leases WHERE id = ?", (lease_id,))
    for item in added:
        lease = item.lease
        tx.execute(
            f"INSERT INTO {prefix}leases (id, owner, pid, pid_start, created, uid) "
            "VALUES (?,?,?,?,?,?)",
            (lease.id, lease.owner, lease.pid, item.pid_start, lease.created, lease.uid),
        )
        tx.executemany(
            f"INSERT INTO {prefix}lease_ports (port, lease_id) VALUES (?, ?)",
            [(port, lease.id) for port in lease.ports],
        )


def _import_legacy_db(tx: Transaction, path: Path) -> None:
    """Copy 0.1.0's ports.db (tables leases, lease_ports, meta) into the store."""
    # A normal open (not read-only), so that a WAL left by a crash of 0.1.0 is recovered; the
    # last close checkpoints it into the file that is then renamed.
    old = sqlite3.connect(path)
    try:
        # 0.1.0's tables are ours without the "ports_" prefix.
        leases = _read(lambda sql: old.execute(sql).fetchall(), prefix="")
        meta = {key: bytes(value) for key, value in old.execute("SELECT key, value FROM meta")}
    except sqlite3.Error as exc:
        raise StateError(f"{path}: cannot read gpud 0.1.0's lease store: {exc}") from None
    finally:
        old.close()
    _write(tx, leases, [], "ports_")
    try:
        if "claim" in meta:
            tx.put(CLAIM, msgspec.json.decode(meta["claim"], type=ClaimRecord))
        if "reserved" in meta:
            tx.put(RESERVED, msgspec.json.decode(meta["reserved"], type=list[PortRange]))
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise StateError(f"{path}: gpud 0.1.0's claim does not decode: {exc}") from None
