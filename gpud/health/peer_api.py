"""The peer API: a small authenticated HTTP server on the advertised address, and its client.

It answers only gpuds of the same cluster and changes nothing: ping (echo and identity),
dial-back (we connect back to the caller's advertised address and peer port as our membership
view knows them, never to an address the caller names, and only where that is the caller's
own: where our probes verified it, or the address its request came from) and view (our latest
probe results).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
import msgspec
from aiohttp import web

from gpud import api, log
from gpud.context import Member, NodeContext
from gpud.health.auth import AuthError, Keys, Verifier, sign, signing_key
from gpud.health.verdict import DirectionState
from gpud.netprobe import (
    ProbeCause,
    ProbeOutcome,
    describe_os_error,
    os_error_cause,
)

MAX_BODY_BYTES = 16 * 1024
# Rejections logged per window; the rest are counted and reported with the next logged one.
REJECT_LOG_BURST = api.LOG_BURST

PATH_PING = "/peer/v1/ping"
PATH_DIAL_BACK = "/peer/v1/dial-back"
PATH_VIEW = "/peer/v1/view"


_log = log.get("health")
_Reply = TypeVar("_Reply")
_PEER_NODE = web.RequestKey("peer_node", str)
_PEER_BODY = web.RequestKey("peer_body", bytes)


class PingRequest(msgspec.Struct, forbid_unknown_fields=True):
    echo: str = ""


class PingReply(msgspec.Struct):
    echo: str
    name: str
    addr: str
    time: float
    # The source address the request came from, as this node saw it.
    seen_from: str


class DialBackRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Empty on purpose: where we dial back comes from our membership view, never the caller."""


class ViewRequest(msgspec.Struct, forbid_unknown_fields=True):
    pass


class DialBackReply(msgspec.Struct):
    # Where we dialled: the caller's address and peer port from our membership view.
    addr: str
    port: int
    outcome: ProbeOutcome


class ViewRow(msgspec.Struct):
    """This node's latest probe of one peer (us -> peer)."""

    peer: str
    addr: str
    port: int
    state: DirectionState
    ok: bool
    rtt_ms: float | None
    error: str
    at: float


class ViewReply(msgspec.Struct):
    name: str
    addr: str
    time: float
    rows: list[ViewRow]


class PeerCallError(Exception):
    """A peer API call failed; the message is an operator-readable cause, ``cause`` its code."""

    def __init__(self, message: str, cause: ProbeCause = "other", *, connect: bool = False) -> None:
        super().__init__(message)
        self.cause: ProbeCause = cause
        # It failed before a connection was made (refused, no route, connect timeout).
        self.connect = connect


def identity_mismatch(name: str, addr: str, reply: PingReply) -> str | None:
    """Why an authenticated ping from ``addr`` does not prove it is gpud node ``name`` (pure)."""
    if reply.name != name:
        return f"{addr} answered as {reply.name!r}, not as {name!r}"
    if reply.addr != addr:
        return f"{name} answered with address {reply.addr}, not {addr} as gossip announces it"
    return None


def _address_class(addr: str) -> str:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return "invalid"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return "not a host"
    return "host"


def dial_back_refusal(
    member: Member | None,
    caller: str,
    self_name: str,
    self_addr: str,
    *,
    source: str,
    verified: bool,
) -> str | None:
    """Why we must not dial ``caller`` back (pure), None if we may.

    We dial only alive members, only at the address gossip has for them and their announced
    peer port, never ourselves, and never a loopback or link-local address unless we are on
    one too (a test cluster on loopback): a member's word must not make us connect to our own
    serf RPC or to arbitrary host:port pairs. And only where the address is the caller's own:
    ``verified`` (our probes found gpud ``caller`` answering at exactly that address and port),
    or ``source``, the address its request came from (the TCP handshake proves the caller is
    there), so a key holder can point a dial-back at no host but its own."""
    if member is None or member.name == self_name:
        return f"{caller!r} is not a member in our view"
    if member.status != "alive":
        return f"{caller!r} is {member.status}; only alive members are dialled"
    if member.tags is None or not member.tags.pp:
        return f"{caller!r} announces no peer port"
    kind = _address_class(member.addr)
    if kind != "host" and kind != _address_class(self_addr):
        return f"{caller!r} announces a {kind} address ({member.addr}); never dialled"
    if member.addr == self_addr:
        return f"{caller!r} announces our own address ({member.addr})"
    if not verified and source != member.addr:
        return (
            f"{caller!r} announces {member.addr}:{member.tags.pp}, where our probes have not "
            f"verified it, and its request came from {source or 'an unknown address'}: a "
            "dial-back goes only to a member's own address"
        )
    return None


class PeerClient:
    """Signed calls to other gpuds' peer APIs over one aiohttp session.

    It also remembers which members proved who they are: a member is a verified gpud node once
    it answered our authenticated ping as the name gossip gives it, at the address gossip gives
    it (`verified`). Election, port blocks and dial-backs consult that, never a member's tags.
    """

    def __init__(
        self, key: Keys, node_name: str, timeout_s: float, *, source_addr: str | None = None
    ) -> None:
        # bytes, or the keyring's keys (signing uses the primary, the first).
        self._key = key
        self._node = node_name
        self.timeout_s = timeout_s
        self.source_addr = source_addr
        self._session: aiohttp.ClientSession | None = None
        # name -> (addr, port, wall time) of the last ping that proved the name there.
        self._verified: dict[str, tuple[str, int, float]] = {}

    def verified(self, name: str, addr: str, port: int | None = None) -> bool:
        """Has ``name`` answered our authenticated ping as itself at ``addr`` (and ``port``)?"""
        proof = self._verified.get(name)
        return proof is not None and proof[0] == addr and (port is None or proof[1] == port)

    def forget(self, name: str) -> None:
        """Drop ``name``'s proof (it left the cluster)."""
        self._verified.pop(name, None)

    async def set_source_addr(self, addr: str | None) -> None:
        """Bind future probes' sockets to ``addr`` (None: let the kernel choose)."""
        if addr != self.source_addr:
            await self.close()
            self.source_addr = addr

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            local = (self.source_addr, 0) if self.source_addr else None
            # A fresh connection per call: a probe must exercise TCP setup, not a pooled socket.
            connector = aiohttp.TCPConnector(force_close=True, local_addr=local)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        return self._session

    async def _call(
        self,
        addr: str,
        port: int,
        path: str,
        body: msgspec.Struct,
        reply: type[_Reply],
        *,
        timeout_s: float | None = None,
        connect_s: float | None = None,
    ) -> _Reply:
        """``timeout_s``: for the whole call; ``connect_s``: for its TCP connect alone."""
        timeout_s = timeout_s or self.timeout_s
        raw = msgspec.json.encode(body)
        headers = sign(signing_key(self._key), self._node, "POST", path, raw)
        headers["Content-Type"] = "application/json"
        host = f"[{addr}]" if ":" in addr else addr
        try:
            async with self._client().post(
                f"http://{host}:{port}{path}",
                data=raw,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_s),
            ) as resp:
                data = await resp.read()
                if resp.status != 200:
                    reason = data[:200].decode(errors="replace")
                    raise PeerCallError(f"HTTP {resp.status} from {addr}:{port}: {reason}")
        except aiohttp.ConnectionTimeoutError:
            raise PeerCallError(
                f"TCP connect timed out after {connect_s or timeout_s:g} s (packets dropped?)",
                "timeout",
                connect=True,
            ) from None
        except TimeoutError:
            raise PeerCallError(f"no answer within {timeout_s:g} s", "timeout") from None
        except aiohttp.ClientConnectorError as exc:
            error = exc.os_error
            raise PeerCallError(
                f"TCP connect: {describe_os_error(error)}", os_error_cause(error), connect=True
            ) from None
        except aiohttp.ClientError as exc:
            raise PeerCallError(f"HTTP error: {exc}") from None
        try:
            return msgspec.json.decode(data, type=reply)
        except msgspec.DecodeError as exc:
            raise PeerCallError(f"malformed reply from {addr}:{port}: {exc}") from None

    # -- deployments (gpud/deployments/service.py): other components' signed peer calls
    async def call(
        self,
        addr: str,
        port: int,
        path: str,
        body: msgspec.Struct,
        reply: type[_Reply],
        *,
        timeout_s: float | None = None,
    ) -> _Reply:
        """A signed call to a route another component added with `PeerApiServer.add_route`."""
        return await self._call(addr, port, path, body, reply, timeout_s=timeout_s)

    # -- end deployments

    async def ping(self, addr: str, port: int, echo: str = "") -> PingReply:
        return await self._call(addr, port, PATH_PING, PingRequest(echo=echo), PingReply)

    async def _probe_ping(self, addr: str, port: int) -> PingReply:
        # The connect and the exchange each get timeout_s, as a separate connect and ping did.
        return await self._call(
            addr,
            port,
            PATH_PING,
            PingRequest(),
            PingReply,
            timeout_s=2 * self.timeout_s,
            connect_s=self.timeout_s,
        )

    async def dial_back(self, addr: str, port: int) -> DialBackReply:
        # The peer runs a whole probe (TCP connect + ping, each up to timeout_s) before it
        # answers: wait for that, or a failed dial-back would look like no answer at all.
        return await self._call(
            addr,
            port,
            PATH_DIAL_BACK,
            DialBackRequest(),
            DialBackReply,
            timeout_s=3 * self.timeout_s,
        )

    async def view(self, addr: str, port: int) -> ViewReply:
        return await self._call(addr, port, PATH_VIEW, ViewRequest(), ViewReply)

    async def probe(self, addr: str, port: int, *, expect: str | None = None) -> ProbeOutcome:
        """The data-path probe: an authenticated ping over a fresh TCP connection (one
        connection: its connect is the TCP check, and a failed connect says why, as
        `gpud.netprobe.tcp_connect` would); RTT of the ping, connect included.

        With ``expect`` (the member's name) the ping must also answer as that node at ``addr``;
        then the member counts as verified (`verified`)."""
        start = time.perf_counter()
        try:
            reply = await self._probe_ping(addr, port)
        except PeerCallError as exc:
            error = str(exc) if exc.connect else f"ping: {exc}"
            return ProbeOutcome(ok=False, error=error, cause=exc.cause)
        rtt_ms = (time.perf_counter() - start) * 1000
        if expect is not None:
            mismatch = identity_mismatch(expect, addr, reply)
            if mismatch is not None:
                self.forget(expect)
                return ProbeOutcome(
                    ok=False, rtt_ms=rtt_ms, error=f"not that node: {mismatch}", cause="other"
                )
            self._verified[expect] = (addr, port, time.time())
        return ProbeOutcome(ok=True, rtt_ms=rtt_ms)


class PeerApiServer:
    """Serves the peer API for one node; records which peers reached us (inbound evidence)."""

    def __init__(
        self,
        ctx: NodeContext,
        key: Keys,
        client: PeerClient,
        view: Callable[[], list[ViewRow]],
        *,
        on_inbound: Callable[[str], None] | None = None,
    ) -> None:
        self._ctx = ctx
        self._verifier = Verifier(key, member_at=self._member_at)
        # Addresses of the members in our view, rebuilt when the view is replaced.
        self._member_addrs: tuple[dict[str, Member], frozenset[str]] = ({}, frozenset())
        self._client = client
        self._view = view
        self._on_inbound = on_inbound
        self._rejects = api.RateLimitedLog(_log, burst=REJECT_LOG_BURST)
        self.rejected = 0
        # Dial-backs make outbound connections: cap them so the API cannot amplify a flood.
        self._dial_backs = asyncio.Semaphore(8)
        self._server: api.GuardedServer | None = None
        self._site: web.BaseSite | None = None
        self.bound_host: str | None = None
        self._extra: list[tuple[str, Callable[[bytes], Awaitable[bytes]]]] = []

    # -- deployments (gpud/deployments/service.py): routes of other components, before start
    def add_route(self, path: str, handler: Callable[[bytes], Awaitable[bytes]]) -> None:
        """Serve POST ``path`` (authenticated like every peer route): ``handler`` gets the
        request body and returns the JSON reply; msgspec errors become a 400."""
        self._extra.append((path, handler))

    @staticmethod
    def _wrap(
        handler: Callable[[bytes], Awaitable[bytes]],
    ) -> Callable[..., Awaitable[web.Response]]:
        async def serve(request: web.Request) -> web.Response:
            body = await handler(request[_PEER_BODY])
            return web.Response(body=body, content_type="application/json")

        return serve

    # -- end deployments

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._authenticate])
        app.router.add_post(PATH_PING, self._ping)
        app.router.add_post(PATH_DIAL_BACK, self._dial_back)
        app.router.add_post(PATH_VIEW, self._view_handler)
        for path, handler in self._extra:
            app.router.add_post(path, self._wrap(handler))
        return app

    async def start(self) -> None:
        """Listen on the advertised address and peer port.

        Behind NAT / port mapping the advertised address is not local; then listen on all
        addresses so a 1:1 port mapping still reaches us (the NAT verdict reports the problem).
        """
        limits = api.peer_limits(api.fd_limit())
        self._server = api.GuardedServer(
            self.app(), limits, name="peer API", logger=_log, privileged=self._is_member_addr
        )
        await self._server.setup()
        try:
            await self._listen()
        except OSError:
            await self._server.cleanup()
            self._server = None
            raise

    async def _listen(self) -> None:
        assert self._server is not None
        port = self._ctx.config.peer.port
        host = self._ctx.advertise_addr
        try:
            site = await self._server.listen_tcp(host, port)
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
            log.warning(
                _log,
                "advertised address is not local; peer API listens on all addresses",
                addr=host,
                port=port,
            )
            host = "0.0.0.0"
            site = await self._server.listen_tcp(host, port)
        self._site, self.bound_host = site, host
        log.info(_log, "peer API listening", addr=host, port=port)

    async def follow_advertise(self) -> bool:
        """Listen on the advertised address again after a re-advertise. Returns whether it
        moved. A wildcard listener (NAT) already covers any address and stays."""
        if self._site is None or self.bound_host in (self._ctx.advertise_addr, "0.0.0.0"):
            return False
        log.info(_log, "peer API moves", old=self.bound_host, new=self._ctx.advertise_addr)
        await self._site.stop()
        self._site = None
        await self._listen()
        return True

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.cleanup()
            self._server = None
            self._site = None

    @property
    def guard(self) -> api.ConnectionGuard | None:
        """Open and refused connections (None before start)."""
        return self._server.guard if self._server is not None else None

    def _member_at(self, node: str, source: str) -> bool:
        """Is ``node`` a member whose gossip address is ``source`` (our replay quota per member)?"""
        member = self._ctx.members.get(node)
        return member is not None and member.addr == source

    def _is_member_addr(self, source: object) -> bool:
        """A connection from a member's address may take the peer API's reserved slots."""
        members = self._ctx.members
        if self._member_addrs[0] is not members:
            self._member_addrs = (members, frozenset(m.addr for m in members.values()))
        return source in self._member_addrs[1]

    def _reject(self, request: web.Request, status: int, reason: str) -> web.Response:
        self.rejected += 1
        self._rejects.event(
            logging.WARNING,
            "peer API request rejected",
            remote=request.remote,
            path=request.path,
            reason=reason,
        )
        return web.json_response({"error": reason}, status=status)

    @web.middleware
    async def _authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return self._reject(request, 413, f"body over {MAX_BODY_BYTES} bytes")
        # The signature covers the body, so only what needs no body is checked before it is
        # read; the read is bounded in size (client_max_size) and time (the body deadline).
        try:
            self._verifier.precheck(request.headers)
        except AuthError as exc:
            return self._reject(request, 401, str(exc))
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._reject(request, 413, f"body over {MAX_BODY_BYTES} bytes")
        except api.BodyTimeout as exc:
            return self._reject(request, exc.status, exc.message)
        try:
            node = self._verifier.verify(
                request.method, request.path, request.headers, body, source=request.remote or ""
            )
        except AuthError as exc:
            return self._reject(request, 401, str(exc))
        if (bad := api.invalid_utf8(body)) is not None:
            return self._reject(request, 400, f"malformed JSON body: {bad}")
        request[_PEER_NODE] = node
        request[_PEER_BODY] = body
        try:
            response = await handler(request)
        except msgspec.DecodeError as exc:
            return self._reject(request, 400, f"malformed JSON body: {exc}")
        except msgspec.ValidationError as exc:
            return self._reject(request, 400, f"invalid body: {exc}")
        # Any request we answered proves the sender reaches our advertised address and port;
        # rejected ones change nothing.
        if response.status == 200 and self._on_inbound is not None:
            self._on_inbound(node)
        return response

    async def _ping(self, request: web.Request) -> web.Response:
        body = msgspec.json.decode(request[_PEER_BODY] or b"{}", type=PingRequest)
        reply = PingReply(
            echo=body.echo[:256],
            name=self._ctx.node_name,
            addr=self._ctx.advertise_addr,
            time=time.time(),
            seen_from=request.remote or "",
        )
        return web.Response(body=msgspec.json.encode(reply), content_type="application/json")

    async def _dial_back(self, request: web.Request) -> web.Response:
        msgspec.json.decode(request[_PEER_BODY] or b"{}", type=DialBackRequest)
        caller = request[_PEER_NODE]
        member = self._ctx.members.get(caller)
        target = (member.addr, member.tags.pp) if member and member.tags else ("", 0)
        refusal = dial_back_refusal(
            member,
            caller,
            self._ctx.node_name,
            self._ctx.advertise_addr,
            source=request.remote or "",
            verified=self._client.verified(caller, *target),
        )
        if refusal is not None:
            return self._reject(request, 403, refusal)
        addr, port = target
        # The target is the caller's own host (or a gpud we verified there), so the details
        # of a failure tell it nothing about anyone else's ports.
        async with self._dial_backs:
            outcome = await self._client.probe(addr, port, expect=caller)
        reply = DialBackReply(addr=addr, port=port, outcome=outcome)
        return web.Response(body=msgspec.json.encode(reply), content_type="application/json")

    async def _view_handler(self, request: web.Request) -> web.Response:
        msgspec.json.decode(request[_PEER_BODY] or b"{}", type=ViewRequest)
        reply = ViewReply(
            name=self._ctx.node_name,
            addr=self._ctx.advertise_addr,
            time=time.time(),
            rows=self._view(),
        )
        return web.Response(body=msgspec.json.encode(reply), content_type="application/json")
