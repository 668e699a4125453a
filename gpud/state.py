"""The one store under ``paths.state_dir``: what must survive a crash, in one SQLite file.

``<state_dir>/gpud.db`` (WAL, ``synchronous=FULL``): a write is on disk when the call returns,
and a transaction is all or nothing, so a component can decide, persist, then act.

API (every call is synchronous and thread-safe; from asyncio run writes in
``asyncio.to_thread`` so a disk flush never stalls the event loop):

- ``Key(name, type)``: a typed key, declared once, at module level, in the module that owns
  it (``Key("ports.claim", ClaimRecord)``). Names are ``<component>.<what>``; declaring one
  name twice raises at import, so a name appears once in the code. ``type`` is anything
  msgspec decodes (a Struct, ``list[tuple[int, int]]``, ...).
- ``store = open_store(state_dir)``: the process's store for that directory (one per
  directory, shared by every component; nobody closes it but the process exit, or tests).
  ``StateStore(state_dir)`` opens a private one (tests, tools).
- ``store.get(key) -> T | None`` and ``store.put(key, value)``; ``put(key, None)`` deletes.
- ``with store.transaction() as tx:`` for several writes that must land together:
  ``tx.get``, ``tx.put``, ``tx.execute(sql, params)``, ``tx.executemany``. Committed on a
  normal exit, rolled back on an exception (which propagates).
- ``store.ensure_table(name, version, *statements)``: a component's own tables (e.g. the
  ports leases). The first call runs the ``CREATE`` statements and records ``version``; a
  store recorded with another version raises ``StateError`` (a schema change ships its
  upgrade with it). Table names start with the component's name (``ports_leases``).
- ``store.query(sql, params) -> list[tuple]`` reads a component's tables.
- ``store.import_file(path, importer)``: moves a file of an older gpud into the store once:
  ``importer(tx, path)`` runs inside one transaction together with a record that ``path`` was
  imported; only after that commit is ``path`` renamed to ``<path>.migrated``. A crash before
  the commit leaves the file to be imported again, a crash after it leaves a file that the next
  start only renames: nothing is lost and nothing is imported twice.

Errors reading the store (an unreadable file, a value that no longer decodes) raise
``StateError`` naming the file and the key: refusing to start beats acting on lost state.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from gpud.errors import GpudError

T = TypeVar("T")

DB_NAME = "gpud.db"
# How long a write waits for another connection's transaction (another gpud tool on the same
# directory) before it fails.
BUSY_TIMEOUT_MS = 10_000
MIGRATED_SUFFIX = ".migrated"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS tables (name TEXT PRIMARY KEY, version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS imported (file TEXT PRIMARY KEY, at REAL NOT NULL)",
)


class StateError(GpudError):
    """The state store cannot be read or written, or holds what this gpud cannot use."""


_declared: dict[str, Key[Any]] = {}


class Key(Generic[T]):
    """A typed key of the store. Declare each once, at module level."""

    __slots__ = ("name", "type")

    def __init__(self, name: str, type_: Any) -> None:
        if name in _declared:
            raise ValueError(f"state key {name!r} declared twice")
        self.name = name
        self.type = type_
        _declared[name] = self

    def __repr__(self) -> str:
        return f"Key({self.name!r})"


class Transaction:
    """Writes of one ``StateStore.transaction()``; valid only inside its ``with`` block."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._db = store._db

    def get(self, key: Key[T]) -> T | None:
        return self._store._get(key)

    def put(self, key: Key[T], value: T | None) -> None:
        if value is None:
            self._db.execute("DELETE FROM kv WHERE key = ?", (key.name,))
            return
        self._db.execute(
            "INSERT INTO kv (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key.name, msgspec.json.encode(value)),
        )

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        return self._db.executemany(sql, rows)


class StateStore:
    """``<state_dir>/gpud.db``; see the module docstring."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            # check_same_thread=False: writes run in worker threads, one at a time (the lock).
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            for statement in _SCHEMA:
                self._db.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"{self.path}: cannot open the state store: {exc}") from None
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- keys ------------------------------------------------------------------------------

    def get(self, key: Key[T]) -> T | None:
        with self._lock:
            return self._get(key)

    def _get(self, key: Key[T]) -> T | None:
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key.name,)).fetchone()
        if row is None:
            return None
        try:
            return msgspec.json.decode(row[0], type=key.type)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise StateError(f"{self.path}: key {key.name!r} does not decode: {exc}") from None

    def put(self, key: Key[T], value: T | None) -> None:
        with self.transaction() as tx:
            tx.put(key, value)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---- a component's own tables ----------------------------------------------------------

    def ensure_table(self, name: str, version: int, *statements: str) -> None:
        with self.transaction() as tx:
            row = tx.execute("SELECT version FROM tables WHERE name = ?", (name,)).fetchone()
            if row is None:
                for statement in statements:
                    tx.execute(statement)
                tx.execute("INSERT INTO tables (name, version) VALUES (?, ?)", (name, version))
            elif row[0] != version:
                raise StateError(
                    f"{self.path}: table {name!r} has schema version {row[0]}, this gpud "
                    f"uses {version}: run the gpud version that wrote it, or move the state "
                    "directory aside"
                )

    def query(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # ---- files of older gpud versions ------------------------------------------------------

    def import_file(self, path: Path, importer: Callable[[Transaction, Path], None]) -> bool:
        """Import ``path`` once (see the module docstring); True when it was imported now."""
        if not path.exists():
            return False
        with self.transaction() as tx:
            done = tx.execute("SELECT 1 FROM imported WHERE file = ?", (path.name,)).fetchone()
            if done is None:
                importer(tx, path)
                tx.execute(
                    "INSERT INTO imported (file, at) VALUES (?, ?)", (path.name, time.time())
                )
        os.replace(path, path.with_name(path.name + MIGRATED_SUFFIX))
        _fsync_dir(path.parent)
        return done is None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_shared: dict[Path, StateStore] = {}
_shared_lock = threading.Lock()


def open_store(state_dir: Path) -> StateStore:
    """The process's one store for ``state_dir`` (opened on first use)."""
    resolved = Path(state_dir).resolve()
    with _shared_lock:
        store = _shared.get(resolved)
        if store is None:
            store = _shared[resolved] = StateStore(resolved)
        return store
