"""Port leases inside this node's block: schemas, pure bookkeeping, and the crash-safe store.

A lease is written to SQLite (WAL, synchronous=FULL) before it is returned. The ``port`` column
of ``lease_ports`` is the primary key, so even a bug above cannot make the store hold one port
in two leases.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated

import msgspec

# Re-exported for gpud.ports.service; the /proc parser lives in gpud.process.
from gpud.process import owner_alive as owner_alive
from gpud.process import process_start as process_start

Owner = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Pid = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]


class LeaseRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of POST /v1/ports/leases."""

    owner: Owner
    count: Annotated[int, msgspec.Meta(ge=1)]
    contiguous: bool = False
    pid: Pid | None = None


class Lease(msgspec.Struct, kw_only=True):
    id: str
    owner: str
    ports: list[int]
    pid: int | None
    created: float


class StoredLease(msgspec.Struct, kw_only=True):
    """A lease plus what the zombie scan needs to tell its owner from a recycled pid."""

    lease: Lease
    # Start time of the owner process (clock ticks since boot, /proc/<pid>/stat field 22).
    pid_start: int | None = None


def new_lease_id() -> str:
    return uuid.uuid4().hex[:16]


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


def free_count(block: Sequence[int], used: set[int]) -> int:
    return sum(1 for port in block if port not in used)


class LeaseStore:
    """Leases and this node's block claim in one SQLite file; every write is durable on return."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: commits run in a worker thread, one at a time.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS leases (
                id TEXT PRIMARY KEY, owner TEXT NOT NULL, pid INTEGER, pid_start INTEGER,
                created REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS lease_ports (
                port INTEGER PRIMARY KEY,
                lease_id TEXT NOT NULL REFERENCES leases(id) ON DELETE CASCADE);
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
            """
        )
        self._db.execute("PRAGMA foreign_keys=ON")
        # Writes come from worker threads; one statement sequence at a time.
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def load(self) -> list[StoredLease]:
        with self._lock:
            return self._load()

    def _load(self) -> list[StoredLease]:
        ports: dict[str, list[int]] = {}
        for port, lease_id in self._db.execute(
            "SELECT port, lease_id FROM lease_ports ORDER BY port"
        ):
            ports.setdefault(lease_id, []).append(port)
        return [
            StoredLease(
                lease=Lease(
                    id=lid, owner=owner, ports=ports.get(lid, []), pid=pid, created=created
                ),
                pid_start=pid_start,
            )
            for lid, owner, pid, pid_start, created in self._db.execute(
                "SELECT id, owner, pid, pid_start, created FROM leases ORDER BY created, id"
            )
        ]

    def commit(self, added: Iterable[StoredLease], removed: Iterable[str]) -> None:
        """Add and remove leases in one durable transaction (all or nothing)."""
        with self._lock:
            self._commit(added, removed)

    def _commit(self, added: Iterable[StoredLease], removed: Iterable[str]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for lease_id in removed:
                db.execute("DELETE FROM lease_ports WHERE lease_id = ?", (lease_id,))
                db.execute("DELETE FROM leases WHERE id = ?", (lease_id,))
            for item in added:
                lease = item.lease
                db.execute(
                    "INSERT INTO leases (id, owner, pid, pid_start, created) VALUES (?,?,?,?,?)",
                    (lease.id, lease.owner, lease.pid, item.pid_start, lease.created),
                )
                db.executemany(
                    "INSERT INTO lease_ports (port, lease_id) VALUES (?, ?)",
                    [(port, lease.id) for port in lease.ports],
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def get_meta(self, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes | None) -> None:
        with self._lock:
            if value is None:
                self._db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
