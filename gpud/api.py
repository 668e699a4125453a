"""The local API: JSON over HTTP on a Unix socket (aiohttp), and what both of gpud's HTTP
servers share: connection limits, idle/header timeouts, bounded logging, JSON errors.

Components contribute their own routes; this module adds /v1/status, /v1/gpus and /metrics,
and turns every error into a JSON body: `{"error": "..."}` with a fitting status.

Nobody outside can exhaust the daemon: every listener admits at most ``total`` connections and
``per_source`` from one source (an IP address, or a uid on the Unix socket), keeps ``reserved``
of them for sources it knows (the peer API: members' addresses), closes a connection that sends
no complete request header within ``idle_timeout_s`` and one whose body is not complete within
``body_timeout_s`` of its header, and the listeners' caps together stay well under the process's
descriptor limit, so the local API keeps answering while the peer API is flooded. aiohttp's own
error logging goes through a rate-limited structured log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import grp
import logging
import os
import resource
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from gpud import log
from gpud.errors import ApiError

_log = log.get("api")

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(data), status=status, content_type="application/json"
    )


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(
            405, f"method {request.method} not allowed on {request.path}; use {allowed}"
        )
    except web.HTTPNotFound:
        return error_response(404, f"no such endpoint: {request.path}")
    except web.HTTPException as exc:
        return error_response(exc.status, exc.reason)
    except Exception as exc:
        # A bug, not the caller's fault: log it with its traceback, but never a storm of them.
        _internal_errors.event(logging.ERROR, "request failed", exc=exc, path=request.path)
        return error_response(500, "internal error; see the gpud journal")


async def read_body(
    request: web.Request, schema: type[T], *, what: str = "body", limit: int = 64 * 1024
) -> T:
    """Decode a JSON request body into ``schema``; ApiError(400/413) with the reason otherwise.

    Call it after the caller's right to make the request is checked: the whole body is read
    (bounded by the application's client_max_size, and in time by the server's body deadline)."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"body larger than {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"body larger than {limit} bytes") from None
    if len(raw) > limit:
        raise ApiError(413, f"body larger than {limit} bytes")
    if (bad := invalid_utf8(raw)) is not None:
        raise ApiError(400, f"bad {what}: {bad}")
    try:
        return msgspec.json.decode(raw, type=schema)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"bad {what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"bad {what}: not valid JSON: {exc}") from None


def invalid_utf8(raw: bytes) -> str | None:
    """Why ``raw`` is not UTF-8, or None when it is.

    Checked before msgspec sees the body: msgspec's own report of invalid UTF-8 changed between
    releases (UnicodeDecodeError before 0.23, a DecodeError without the offset since).
    """
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8 at byte {exc.start} (JSON must be UTF-8)"
    return None


# ---- bounded logging ---------------------------------------------------------------------

# Events logged per window by one RateLimitedLog; the rest are counted and the count goes out
# with the next logged one.
LOG_BURST = 5
LOG_WINDOW_S = 60.0


class RateLimitedLog:
    """A structured log that writes at most ``burst`` lines per ``window_s``, counting the rest:
    a flood of bad requests costs a handful of journal lines, not millions."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = LOG_BURST,
        window_s: float = LOG_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._burst = burst
        self._window_s = window_s
        self._clock = clock
        self._window_start = float("-inf")
        self._logged = 0
        self.suppressed = 0

    def event(
        self, level: int, msg: str, *, exc: BaseException | None = None, **fields: Any
    ) -> bool:
        """Log ``msg`` unless this window's burst is spent; returns whether it was logged."""
        now = self._clock()
        if now - self._window_start > self._window_s:
            self._window_start, self._logged = now, 0
        if self._logged >= self._burst:
            self.suppressed += 1
            return False
        self._logged += 1
        fields["suppressed_before"] = self.suppressed
        self.suppressed = 0
        extra = {"gpud_fields": fields}  # gpud.log's structured fields
        if exc is not None:
            self._logger.log(level, msg, exc_info=exc, extra=extra)
        else:
            self._logger.log(level, msg, extra=extra)
        return True


_internal_errors = RateLimitedLog(_log)


class _AiohttpLog:
    """Stands in for aiohttp's server logger (the ``logger`` of its request handler): what it
    reports about malformed requests and dropped connections becomes one rate-limited line with
    the exception's type and message, never a multi-line traceback per request."""

    def __init__(self, limited: RateLimitedLog, server: str) -> None:
        self._limited = limited
        self._server = server

    def _event(self, level: int, msg: str, *args: Any, exc_info: Any = None, **_: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        fields: dict[str, Any] = {"server": self._server}
        if exc is not None:
            fields["error"] = f"{type(exc).__name__}: {exc}"
        text = msg % args if args else msg
        self._limited.event(level, text, **fields)

    def exception(self, msg: str, *args: Any, **kw: Any) -> None:
        self._event(logging.WARNING, msg, *args, **kw)

    def error(self, msg: str, *args: Any, **kw: Any) -> None:
        self._event(logging.WARNING, msg, *args, **kw)

    def warning(self, msg: str, *args: Any, **kw: Any) -> None:
        self._event(logging.WARNING, msg, *args, **kw)

    def info(self, msg: str, *args: Any, **kw: Any) -> None:
        pass

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        pass


# ---- connection limits -----------------------------------------------------------------


class ConnectionLimits(msgspec.Struct, frozen=True, kw_only=True):
    # Connections open at once on one listener, and from one source (IP address or uid).
    total: int
    per_source: int
    # A connection that sends no complete request header for this long (from accept, or since
    # its last response) is closed: covers idle, half-open and slow-header (slowloris) clients.
    idle_timeout_s: float
    # A request whose body is not complete this long after its header is dropped with its
    # connection (slow-body clients); below idle_timeout_s, so header + body fit in it. None:
    # the application bounds its own body reads (the router streams large bodies).
    body_timeout_s: float | None = None
    # Of ``total``, slots only privileged sources may take (the peer API: members' addresses),
    # so a flood from elsewhere cannot lock the cluster's own nodes out.
    reserved: int = 0
    # Sources not held to per_source (root on the local socket: root owns the host anyway).
    exempt: frozenset[int | str] = frozenset()


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one (call once at start); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def local_limits(nofile: int) -> ConnectionLimits:
    """The local socket: an eighth of the descriptors; root is never locked out by a user."""
    return ConnectionLimits(
        total=max(16, min(256, nofile // 8)),
        per_source=32,
        idle_timeout_s=30.0,
        body_timeout_s=10.0,
        exempt=frozenset({0}),
    )


def peer_limits(nofile: int) -> ConnectionLimits:
    """The peer API: at most a quarter of the descriptors, so a flood of it leaves the local
    API, serf's RPC and the children their share. Peers use a handful of connections each; an
    eighth of the slots stays free for them whatever other sources do. A peer's body is a
    few KiB sent at once, so 5 s for it is generous."""
    total = max(16, min(1024, nofile // 4))
    return ConnectionLimits(
        total=total, per_source=32, idle_timeout_s=10.0, body_timeout_s=5.0, reserved=total // 8
    )


class ConnectionGuard:
    """Counts open connections per source and refuses those over the limits (no I/O)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._open: dict[Hashable, int] = {}
        self.total = 0
        self.refused = 0
        # Requests dropped because their body did not arrive within body_timeout_s.
        self.body_timeouts = 0

    def admit(self, source: Hashable, *, privileged: bool = False) -> str | None:
        """None if the connection may proceed (and is now counted), else why it may not.
        Only a ``privileged`` source may take the ``reserved`` slots."""
        limits = self.limits
        cap = limits.total if privileged else limits.total - limits.reserved
        reason = None
        if self.total >= cap:
            reason = f"{self.total} connections open (limit {cap} for this source)"
        elif source not in limits.exempt and self._open.get(source, 0) >= limits.per_source:
            reason = f"{limits.per_source} connections open from this source (the limit)"
        if reason is not None:
            self.refused += 1
            return reason
        self.total += 1
        self._open[source] = self._open.get(source, 0) + 1
        return None

    def release(self, source: Hashable) -> None:
        self.total -= 1
        left = self._open[source] - 1
        if left:
            self._open[source] = left
        else:
            del self._open[source]

    def open_from(self, source: Hashable) -> int:
        return self._open.get(source, 0)


class PeerCredentials(msgspec.Struct, frozen=True):
    """The process on the other end of a Unix socket, as the kernel reports it (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


_UCRED = struct.Struct("3i")


def _socket_credentials(sock: Any) -> PeerCredentials | None:
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCredentials(*_UCRED.unpack(raw))


# Linux's SO_PEERGROUPS (4.13+): the peer's supplementary groups at connect time. Python's
# socket module does not name it.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GID = struct.Struct("I")


def peer_credentials(request: web.Request) -> PeerCredentials:
    """Who is on the other end of a local-API request (the kernel's word, not the caller's)."""
    transport = request.transport
    creds = _socket_credentials(transport.get_extra_info("socket")) if transport else None
    if creds is None:
        raise ApiError(403, "the caller's credentials are unknown (not a Unix-socket request)")
    return creds


def _peer_groups(request: web.Request, creds: PeerCredentials) -> set[int]:
    groups = {creds.gid}
    sock = request.transport.get_extra_info("socket") if request.transport else None
    with contextlib.suppress(OSError):
        # Python caps the buffer at 1024 bytes: the first 256 groups.
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
        groups.update(g for (g,) in _GID.iter_unpack(raw[: len(raw) // 4 * 4]))
    return groups


def may_change_state(creds: PeerCredentials, groups: set[int], admin_gid: int | None) -> bool:
    """Root, or a member of the admin group (pure; ``admin_gid`` None: the group does not exist)."""
    return creds.uid == 0 or (admin_gid is not None and admin_gid in groups)


def require_admin(request: web.Request, admin_group: str) -> PeerCredentials:
    """The caller, if it may change state (root or a member of ``admin_group``); else 403."""
    creds = peer_credentials(request)
    try:
        admin_gid: int | None = grp.getgrnam(admin_group).gr_gid
    except KeyError:
        admin_gid = None
    if not may_change_state(creds, _peer_groups(request, creds), admin_gid):
        raise ApiError(
            403,
            f"uid {creds.uid} may only read: changing state needs root or membership in group "
            f"{admin_group!r} (api.admin_group)",
        )
    return creds


def require_owner(creds: PeerCredentials, owner_uid: int | None, what: str) -> None:
    """403 unless the caller is root or the uid that created ``what``."""
    if creds.uid != 0 and owner_uid != creds.uid:
        owner = "root" if owner_uid is None else f"uid {owner_uid}"
        raise ApiError(403, f"{what} belongs to {owner}; only its owner or root may change it")


def require_pid_of(creds: PeerCredentials, pid: int) -> None:
    """400/403 unless ``pid`` runs as the caller's uid (root may name any process)."""
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        raise ApiError(400, f"pid {pid} is not a running process") from None
    if creds.uid != 0 and uid != creds.uid:
        raise ApiError(403, f"pid {pid} runs as uid {uid}, not as you (uid {creds.uid})")


def _tcp_source(transport: asyncio.BaseTransport) -> Hashable:
    peer = transport.get_extra_info("peername")
    return peer[0] if peer else "?"


def _uid_source(transport: asyncio.BaseTransport) -> Hashable:
    creds = _socket_credentials(transport.get_extra_info("socket"))
    return creds.uid if creds is not None else "?"


class _GuardedProtocol(asyncio.Protocol):
    """Admits a connection through the guard, then hands it to aiohttp's request handler."""

    def __init__(
        self,
        guard: ConnectionGuard,
        source_of: Callable[[asyncio.BaseTransport], Hashable],
        privileged: Callable[[Hashable], bool],
        refused: Callable[[Hashable, str], None],
        handler_factory: Callable[[], asyncio.Protocol],
    ) -> None:
        self._guard = guard
        self._source_of = source_of
        self._privileged = privileged
        self._refused = refused
        self._factory = handler_factory
        self._inner: asyncio.Protocol | None = None
        self._source: Hashable = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        source = self._source_of(transport)
        reason = self._guard.admit(source, privileged=self._privileged(source))
        if reason is not None:
            # abort(): no lingering, the descriptor is free again at once.
            transport.abort()  # type: ignore[attr-defined]
            self._refused(source, reason)
            return
        self._source = source
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._guard.release(self._source)
            self._inner.connection_lost(exc)
            self._inner = None

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class _GuardedSite(web.BaseSite):
    def __init__(
        self,
        server: GuardedServer,
        name: str,
        source_of: Callable[[asyncio.BaseTransport], Hashable],
        listen: Callable[[Callable[[], asyncio.Protocol]], Awaitable[asyncio.Server]],
    ) -> None:
        super().__init__(server.runner)
        self._gs = server
        self._name = name
        self._source_of = source_of
        self._listen = listen

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        handler_factory = self._runner.server
        assert handler_factory is not None
        factory = functools.partial(
            _GuardedProtocol,
            self._gs.guard,
            self._source_of,
            self._gs.privileged,
            self._gs.refused,
            handler_factory,
        )
        self._server = await self._listen(factory)


class BodyTimeout(ApiError):
    """The request's body did not arrive in time; its connection is dropped."""


def _expire_body(
    request: web.Request, server: GuardedServer, timeout_s: float, *, handled: bool
) -> None:
    """The body deadline ran out: unless the whole body is here by now, fail its reader (while
    the handler runs) and drop the connection (no response: the client is not listening)."""
    if request.content.is_eof():
        return
    server.guard.body_timeouts += 1
    if not handled:
        # Set first, so the handler waiting on the body sees this cause, not a bare reset.
        request.content.set_exception(
            BodyTimeout(408, f"request body not complete within {timeout_s:g} s of its header")
        )
    if request.transport is not None:
        request.transport.abort()
    server.log.event(
        logging.WARNING,
        "request body timed out; connection closed",
        server=server.name,
        source=request.remote,
        path=request.path,
        timeout_s=timeout_s,
    )


class GuardedServer:
    """One aiohttp application behind connection limits and read deadlines, with aiohttp's
    logging bounded.

    Used by both servers (local socket, peer API): what an outsider can cost is the same.
    ``privileged`` says which sources may take the limits' reserved slots."""

    def __init__(
        self,
        app: web.Application,
        limits: ConnectionLimits,
        *,
        name: str,
        logger: logging.Logger = _log,
        privileged: Callable[[Hashable], bool] = lambda source: False,
    ) -> None:
        self.name = name
        self.guard = ConnectionGuard(limits)
        self.privileged = privileged
        self.log = RateLimitedLog(logger)
        # Outermost, so the deadline runs whichever handler or middleware reads the body.
        app.middlewares.insert(0, self._body_deadline)
        self.runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            # aiohttp arms this at accept and after each response: it is both the idle and
            # the header timeout (a client trickling a request is closed when it runs out).
            keepalive_timeout=limits.idle_timeout_s,
            logger=_AiohttpLog(self.log, name),
        )

    @web.middleware
    async def _body_deadline(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp's timer covers the header only: once a handler runs, a body that never
        finishes would hold the connection (and its slot) forever."""
        timeout_s = self.guard.limits.body_timeout_s
        if timeout_s is None or request.content.is_eof():  # no body, or all of it here
            return await handler(request)
        loop = asyncio.get_running_loop()
        expire = functools.partial(_expire_body, request, self, timeout_s)
        timer = loop.call_later(timeout_s, functools.partial(expire, handled=False))
        try:
            return await handler(request)
        finally:
            timer.cancel()
            # A handler that answered without reading the body (a refusal) leaves aiohttp to
            # read and discard the rest: the same deadline covers that too.
            if not request.content.is_eof() and loop.time() < timer.when():
                loop.call_at(timer.when(), functools.partial(expire, handled=True))

    def refused(self, source: Hashable, reason: str) -> None:
        self.log.event(
            logging.WARNING, "connection refused", server=self.name, source=source, reason=reason
        )

    async def setup(self) -> None:
        await self.runner.setup()

    async def listen_tcp(
        self, host: str, port: int, tls: ssl.SSLContext | None = None
    ) -> web.BaseSite:
        """Listen on host:port, with ``tls`` when given (a handshake is bounded by the idle
        timeout, so a client that never finishes one holds no slot longer than an idle one)."""
        loop = asyncio.get_running_loop()
        handshake = self.guard.limits.idle_timeout_s if tls is not None else None

        async def listen(factory: Callable[[], asyncio.Protocol]) -> asyncio.Server:
            return await loop.create_server(
                factory,
                host,
                port,
                reuse_address=True,
                backlog=512,
                ssl=tls,
                ssl_handshake_timeout=handshake,
            )

        scheme = "https" if tls is not None else "http"
        site = _GuardedSite(self, f"{scheme}://{host}:{port}", _tcp_source, listen)
        await site.start()
        return site

    async def listen_unix(self, path: str) -> web.BaseSite:
        loop = asyncio.get_running_loop()

        async def listen(factory: Callable[[], asyncio.Protocol]) -> asyncio.Server:
            return await loop.create_unix_server(factory, path, backlog=512)

        site = _GuardedSite(self, f"http://unix:{path}:", _uid_source, listen)
        await site.start()
        return site

    async def cleanup(self) -> None:
        await self.runner.cleanup()


def make_app(routes: list[web.RouteDef]) -> web.Application:
    app = web.Application(middlewares=[errors_as_json], client_max_size=256 * 1024)
    app.add_routes(routes)
    return app


async def serve_unix(app: web.Application, path: str, *, mode: int, group: str) -> web.AppRunner:
    """Listen on the Unix socket ``path`` (mode, group applied before the first request)."""
    sock_path = Path(path)
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_socket(sock_path)
    server = GuardedServer(app, local_limits(fd_limit()), name="local API")
    await server.setup()
    await server.listen_unix(path)
    runner = server.runner
    os.chmod(path, mode)
    try:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    except KeyError:
        log.warning(_log, "socket group does not exist; socket left in root's group", group=group)
    except PermissionError:
        log.warning(_log, "cannot change the socket's group", group=group)
    return runner


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a crashed gpud; refuse if another gpud still answers on it."""
    if not path.exists() and not path.is_symlink():
        return
    from gpud.errors import GpudError

    # Never delete what gpud did not create: only a socket is ours to replace.
    if path.is_symlink() or not path.is_socket():
        raise GpudError(f"api.socket: {path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    finally:
        probe.close()
    raise GpudError(f"another gpud is already listening on {path}")
