"""GPU leases: schemas, the pure choice of GPUs, and their tables in the state store.

A lease holds whole GPUs by UUID. The ``uuid`` column of ``gpus_lease_gpus`` is the primary
key, so even a bug above cannot make the store hold one GPU in two leases. The owner and pid
fields, and the owner process check, are those of every kind of lease (``gpud.leasebook``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Annotated

import msgspec

from gpud.leasebook import Owner, Pid
from gpud.state import StateStore

TABLE_VERSION = 1


class GpuLeaseRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of POST /v1/gpus/leases."""

    owner: Owner
    count: Annotated[int, msgspec.Meta(ge=1, le=1024)]
    pid: Pid | None = None


class GpuLease(msgspec.Struct, kw_only=True):
    id: str
    owner: str
    # GPU UUIDs, in index order: stable across reboots, unlike indices. Not for
    # CUDA_VISIBLE_DEVICES: engines int() its entries (gpud.gpus.nvml.cuda_env).
    gpus: list[str]
    pid: int | None
    created: float


class StoredGpuLease(msgspec.Struct, kw_only=True):
    lease: GpuLease
    # Start time of the owner process (to tell it from a recycled pid).
    pid_start: int | None = None


def choose_gpus(healthy: Sequence[str], used: set[str], count: int) -> list[str] | None:
    """The first ``count`` GPUs of ``healthy`` (index order) that no lease holds, or None when
    there are not enough. Lowest indices first, so a host's leases pack predictably."""
    free = [uuid for uuid in healthy if uuid not in used]
    return free[:count] if len(free) >= count else None


class GpuLeaseTable:
    """The leases in the shared state store; every commit is durable on return."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        store.ensure_table(
            "gpus_leases",
            TABLE_VERSION,
            "CREATE TABLE gpus_leases (id TEXT PRIMARY KEY, owner TEXT NOT NULL, pid INTEGER, "
            "pid_start INTEGER, created REAL NOT NULL)",
            "CREATE TABLE gpus_lease_gpus (uuid TEXT PRIMARY KEY, lease_id TEXT NOT NULL "
            "REFERENCES gpus_leases(id) ON DELETE CASCADE, position INTEGER NOT NULL)",
        )

    def load(self) -> list[StoredGpuLease]:
        gpus: dict[str, list[str]] = {}
        for uuid, lease_id in self._store.query(
            "SELECT uuid, lease_id FROM gpus_lease_gpus ORDER BY lease_id, position"
        ):
            gpus.setdefault(lease_id, []).append(uuid)
        return [
            StoredGpuLease(
                lease=GpuLease(
                    id=lid, owner=owner, gpus=gpus.get(lid, []), pid=pid, created=created
                ),
                pid_start=pid_start,
            )
            for lid, owner, pid, pid_start, created in self._store.query(
                "SELECT id, owner, pid, pid_start, created FROM gpus_leases ORDER BY created, id"
            )
        ]

    def commit(self, added: Iterable[StoredGpuLease], removed: Iterable[str]) -> None:
        """Add and remove leases in one durable transaction (all or nothing)."""
        with self._store.transaction() as tx:
            for lease_id in removed:
                tx.execute("DELETE FROM gpus_lease_gpus WHERE lease_id = ?", (lease_id,))
                tx.execute("DELETE FROM gpus_leases WHERE id = ?", (lease_id,))
            for item in added:
                lease = item.lease
                tx.execute(
                    "INSERT INTO gpus_leases (id, owner, pid, pid_start, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (lease.id, lease.owner, lease.pid, item.pid_start, lease.created),
                )
                tx.executemany(
                    "INSERT INTO gpus_lease_gpus (uuid, lease_id, position) VALUES (?, ?, ?)",
                    [(uuid, lease.id, i) for i, uuid in enumerate(lease.gpus)],
                )
