"""Durable leases with group commit, shared by every kind of lease (ports, GPUs).

Lease and release requests go through one queue; a writer task applies a whole batch to the
owner's in-memory bookkeeping and commits it in one durable transaction, then answers every
request of the batch. So a lease is on disk before anyone sees it, and concurrent requests
cannot get the same resource (one writer decides, and the table's primary key on the resource
would refuse a duplicate anyway). Leases whose owner process is gone (pid and start time) are
reclaimed after a grace period.

What differs per kind stays with its component: how a request is allocated and how its index
of used resources is kept (the ``allocate``, ``on_release`` and ``reindex`` callbacks). The
fields every kind's request shares (``Owner``, ``Pid``) and its lease ids are defined here;
``gpud.leasefront`` is what the API and the in-process callers meet in front of a book.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, Protocol, TypeVar

import msgspec

from gpud import log
from gpud.errors import ApiError
from gpud.process_groups import owner_alive

# Who holds a lease (free text, shown to operators escaped) and the process it ends with.
Owner = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Pid = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]


def new_lease_id() -> str:
    return uuid.uuid4().hex[:16]


class StoredLike(Protocol):
    @property
    def lease(self) -> Any: ...

    @property
    def pid_start(self) -> int | None: ...


S = TypeVar("S", bound=StoredLike)
Q = TypeVar("Q")


class LeaseTable(Protocol[S]):
    def load(self) -> list[S]: ...

    def commit(self, added: Iterable[S], removed: Iterable[str]) -> None: ...


@dataclass
class Op(Generic[Q]):
    """A queued lease (``request`` set) or release (``lease_id`` set)."""

    future: asyncio.Future[Any]
    request: Q | None = None
    pid_start: int | None = None
    lease_id: str | None = None
    reason: str = "released"
    # A transfer (``lease_id`` set): the lease's new owner process (pid, start time).
    new_owner: tuple[int, int] | None = None


@dataclass
class Batch(Generic[S]):
    added: list[S] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


class LeaseBook(Generic[Q, S]):
    """The leases of one kind: ``leases`` (id -> stored lease) is the committed state."""

    def __init__(
        self,
        what: str,
        table: LeaseTable[S],
        *,
        allocate: Callable[[Q, int | None], S | ApiError],
        on_release: Callable[[S], None],
        reindex: Callable[[dict[str, S]], None],
        describe: Callable[[S], dict[str, object]],
        grace_s: Callable[[], float],
        logger: logging.Logger,
    ) -> None:
        """``allocate(request, pid_start)`` picks resources for a request against the
        bookkeeping and marks them used (the batch's commit makes that real, or ``reindex``
        undoes it);
        ``on_release`` frees a lease's resources in the index; ``reindex`` rebuilds the index
        from the leases (after a failed commit); ``describe`` gives log fields of a lease."""
        self.what = what
        self._table = table
        self._allocate = allocate
        self._on_release = on_release
        self._reindex = reindex
        self._describe = describe
        self._grace_s = grace_s
        self._log = logger
        self.leases: dict[str, S] = {s.lease.id: s for s in table.load()}
        self._pending: list[Op[Q]] = []
        self._wake = asyncio.Event()
        self._dead_since: dict[str, float] = {}

    async def lease(self, request: Q, pid_start: int | None) -> Any:
        """The lease, durable when this returns; raises ApiError when refused."""
        return await self._submit(Op(future=self._future(), request=request, pid_start=pid_start))

    async def release(self, lease_id: str) -> None:
        if lease_id not in self.leases:
            raise ApiError(404, f"no {self.what} with id {lease_id!r}")
        await self._submit(Op(future=self._future(), lease_id=lease_id))

    async def transfer(self, lease_id: str, pid: int, pid_start: int) -> None:
        """Make process ``pid`` (started at ``pid_start``) the lease's owner, in one durable
        write: the lease is never without a live owner for the zombie scan to reclaim."""
        if lease_id not in self.leases:
            raise ApiError(404, f"no {self.what} with id {lease_id!r}")
        await self._submit(Op(future=self._future(), lease_id=lease_id, new_owner=(pid, pid_start)))

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._writer())
            tasks.create_task(self._reclaim_loop())

    @staticmethod
    def _future() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, op: Op[Q]) -> Any:
        self._pending.append(op)
        self._wake.set()
        return await op.future

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            ops, self._pending = self._pending, []
            batch: Batch[S] = Batch()
            results = [(op, self._apply(op, batch)) for op in ops]
            try:
                if batch.added or batch.removed:
                    await asyncio.to_thread(self._table.commit, batch.added, batch.removed)
            except Exception as exc:
                log.error(self._log, f"{self.what} store commit failed", error=repr(exc))
                # Back to what is on disk; nothing of this batch happened.
                self.leases = {s.lease.id: s for s in self._table.load()}
                self._reindex(self.leases)
                failure = ApiError(500, f"{self.what} store write failed: {exc}")
                results = [(op, failure) for op, _ in results]
            else:
                for lease_id in batch.removed:
                    self.leases.pop(lease_id, None)
                    self._dead_since.pop(lease_id, None)
                for item in batch.added:
                    self.leases[item.lease.id] = item
            for op, result in results:
                if op.future.done():
                    continue
                if isinstance(result, ApiError):
                    op.future.set_exception(result)
                else:
                    op.future.set_result(result)

    def _apply(self, op: Op[Q], batch: Batch[S]) -> Any:
        """One op against the bookkeeping; the batch's commit makes it real."""
        if op.request is None:
            item = self.leases.get(op.lease_id or "")
            if item is None or op.lease_id in batch.removed:
                return ApiError(404, f"no {self.what} with id {op.lease_id!r}")
            if op.new_owner is not None:
                # Same id and resources: the index of used resources is unchanged.
                pid, pid_start = op.new_owner
                moved = msgspec.structs.replace(
                    item, lease=msgspec.structs.replace(item.lease, pid=pid), pid_start=pid_start
                )
                batch.removed.append(item.lease.id)
                batch.added.append(moved)
                log.info(self._log, f"{self.what} transferred", **self._describe(moved))
                return None
            self._on_release(item)
            batch.removed.append(item.lease.id)
            log.info(self._log, f"{self.what} {op.reason}", **self._describe(item))
            return None
        allocated = self._allocate(op.request, op.pid_start)
        if isinstance(allocated, ApiError):
            return allocated
        batch.added.append(allocated)
        return allocated.lease

    async def _reclaim_loop(self) -> None:
        """Release leases whose owner process has been gone for the grace period."""
        while True:
            grace = self._grace_s()
            now = time.monotonic()
            for item in list(self.leases.values()):
                lease = item.lease
                if lease.pid is None or owner_alive(lease.pid, item.pid_start):
                    self._dead_since.pop(lease.id, None)
                    continue
                since = self._dead_since.setdefault(lease.id, now)
                if now - since >= grace:
                    self._dead_since.pop(lease.id, None)
                    op: Op[Q] = Op(
                        future=self._future(),
                        lease_id=lease.id,
                        reason=f"reclaimed (owner pid {lease.pid} is gone)",
                    )
                    self._pending.append(op)
                    self._wake.set()
                    # Its outcome is logged by the writer; a concurrent release is fine too.
                    op.future.add_done_callback(lambda f: f.exception())
            await asyncio.sleep(min(max(grace / 2, 0.2), 5.0))
