"""The state store: typed keys, atomic transactions, component tables, one-time file imports."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from gpud.state import Key, StateError, StateStore, open_store


class Thing(msgspec.Struct, kw_only=True):
    a: int
    b: str = ""


THING = Key("test.thing", Thing)
PAIRS = Key("test.pairs", list[tuple[int, int]])


def test_keys_round_trip_and_survive_reopen(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.get(THING) is None
    store.put(THING, Thing(a=1, b="x"))
    store.put(PAIRS, [(1, 2), (5, 9)])
    store.close()
    store = StateStore(tmp_path)
    assert store.get(THING) == Thing(a=1, b="x")
    assert store.get(PAIRS) == [(1, 2), (5, 9)]
    store.put(THING, None)
    assert store.get(THING) is None
    store.close()


def test_a_key_name_is_declared_once() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        Key("test.thing", int)


def test_a_failed_transaction_changes_nothing(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.put(THING, Thing(a=1))
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.put(THING, Thing(a=2))
        tx.put(PAIRS, [(1, 1)])
        raise RuntimeError("boom")
    assert store.get(THING) == Thing(a=1)
    assert store.get(PAIRS) is None
    store.close()


def test_a_value_that_no_longer_decodes_is_an_error(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with store.transaction() as tx:
        tx.execute("INSERT INTO kv (key, value) VALUES (?, ?)", (THING.name, b'{"a": "x"}'))
    with pytest.raises(StateError, match=r"test\.thing"):
        store.get(THING)
    store.close()


def test_component_tables_are_versioned(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    ddl = "CREATE TABLE test_rows (id INTEGER PRIMARY KEY)"
    store.ensure_table("test_rows", 1, ddl)
    store.ensure_table("test_rows", 1, ddl)  # idempotent
    with store.transaction() as tx:
        tx.execute("INSERT INTO test_rows (id) VALUES (7)")
    assert store.query("SELECT id FROM test_rows") == [(7,)]
    with pytest.raises(StateError, match="schema version 1"):
        store.ensure_table("test_rows", 2, ddl)
    store.close()


def test_import_file_runs_once_and_renames_after_commit(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    old = tmp_path / "old.json"
    old.write_bytes(msgspec.json.encode(Thing(a=5)))

    def failing(tx, path):  # a crash mid-import: nothing committed, the file stays
        tx.put(THING, msgspec.json.decode(path.read_bytes(), type=Thing))
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        store.import_file(old, failing)
    assert old.exists() and store.get(THING) is None

    calls = []

    def importer(tx, path):
        calls.append(path)
        tx.put(THING, msgspec.json.decode(path.read_bytes(), type=Thing))

    assert store.import_file(old, importer)
    assert store.get(THING) == Thing(a=5)
    assert not old.exists() and (tmp_path / "old.json.migrated").exists()
    # A crash after the commit but before the rename: the next start only renames.
    (tmp_path / "old.json.migrated").rename(old)
    store.put(THING, Thing(a=6))
    assert not store.import_file(old, importer)
    assert store.get(THING) == Thing(a=6) and len(calls) == 1 and not old.exists()
    store.close()


def test_open_store_shares_one_store_per_directory(tmp_path: Path) -> None:
    assert open_store(tmp_path / "a") is open_store(tmp_path / "a")
    assert open_store(tmp_path / "a") is not open_store(tmp_path / "b")
