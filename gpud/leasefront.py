"""The front of a lease book, the same for every kind of lease (ports, GPUs): what in-process
callers and the local API meet before a request reaches the book's writer.

A request passes, in order: the kind's own check (ports: no more than a block), the owner
process (a pid must name a running process; its start time is kept so that a recycled pid is
not taken for the owner later), the kind's readiness gate (503 with its reason until it can
allocate), then the book, which answers once the lease is durable.

Over HTTP, a kind given an ``admin_group`` is guarded: only root or that group leases or
releases, a pid must run as the caller, the caller's uid (from SO_PEERCRED, never from the
body) is recorded in the lease, and only that uid or root releases it. The request type of
such a kind has a ``uid`` field and its leases a ``uid``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import msgspec
from aiohttp import web

from gpud import api
from gpud.errors import ApiError
from gpud.leasebook import LeaseBook, StoredLike
from gpud.process_groups import process_start


class RequestLike(Protocol):
    @property
    def pid(self) -> int | None: ...


Q = TypeVar("Q", bound=RequestLike)
S = TypeVar("S", bound=StoredLike)


class LeaseFront(Generic[Q, S]):
    def __init__(
        self,
        book: LeaseBook[Q, S],
        request_type: type[Q],
        *,
        not_ready: Callable[[], str | None],
        check: Callable[[Q], None] | None = None,
        admin_group: Callable[[], str] | None = None,
    ) -> None:
        """``not_ready()``: why no lease can be allocated yet (503), or None; ``check``
        raises ApiError for a request this kind refuses whatever its state; ``admin_group()``:
        the group that may change leases (read per request: the config reloads)."""
        self.book = book
        self._type = request_type
        self._what = f"{book.what} request"
        self._not_ready = not_ready
        self._check = check
        self._admin_group = admin_group

    def leases(self) -> list[Any]:
        return [s.lease for s in self.book.leases.values()]

    async def lease(self, **fields: object) -> Any:
        """A lease for a request with the body's ``fields``; durable when this returns."""
        try:
            request = msgspec.convert(fields, self._type)
        except msgspec.ValidationError as exc:
            raise ApiError(400, f"bad {self._what}: {exc}") from None
        return await self.grant(request)

    async def grant(self, request: Q) -> Any:
        """The lease for a decoded request; ApiError when it is refused."""
        if self._check is not None:
            self._check(request)
        pid_start = None if request.pid is None else _running(request.pid)
        why = self._not_ready()
        if why is not None:
            raise ApiError(503, why)
        return await self.book.lease(request, pid_start)

    async def release(self, lease_id: str) -> None:
        await self.book.release(lease_id)

    async def transfer(self, lease_id: str, pid: int) -> None:
        """Make the running process ``pid`` the lease's owner (a re-adopted child's lease)."""
        await self.book.transfer(lease_id, pid, _running(pid))

    def routes(self, path: str) -> list[web.RouteDef]:
        """GET and POST ``path``, DELETE ``path``/{id}."""
        return [
            web.get(path, self._get),
            web.post(path, self._post),
            web.delete(path + "/{id}", self._delete),
        ]

    async def _get(self, request: web.Request) -> web.Response:
        return api.json_response(self.leases())

    async def _post(self, request: web.Request) -> web.Response:
        if self._admin_group is None:
            body = await api.read_body(request, self._type, what=self._what)
        else:
            caller = api.require_admin(request, self._admin_group())
            body = await api.read_body(request, self._type, what=self._what)
            if body.pid is not None:
                api.require_pid_of(caller, body.pid)
            body = msgspec.structs.replace(body, uid=caller.uid)  # type: ignore[type-var]
        return api.json_response(await self.grant(body), status=201)

    async def _delete(self, request: web.Request) -> web.Response:
        lease_id = request.match_info["id"]
        if self._admin_group is not None:
            caller = api.require_admin(request, self._admin_group())
            item = self.book.leases.get(lease_id)
            if item is not None:
                api.require_owner(caller, item.lease.uid, f"lease {lease_id}")
        await self.release(lease_id)
        return web.Response(status=204)


def _running(pid: int) -> int:
    """The start time of the running process ``pid``; ApiError 400 when none runs."""
    start = process_start(pid)
    if start is None:
        raise ApiError(400, f"pid {pid} is not a running process")
    return start
