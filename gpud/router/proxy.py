"""The router's HTTP side: an aiohttp application that checks a request, picks a replica
(`balance`) and relays the response as it arrives.

A request is checked in full before anything is sent: its key, its body (size and time
bounded, read whole: the ``model`` decides where it goes) and its JSON. Then attempts go to
one replica after another only while `balance.may_retry` says the request provably did not
reach an engine. The response is relayed chunk by chunk as the replica writes it (server-sent
events and chunked bodies pass unbuffered); a client that disconnects cancels the handler
(``handler_cancellation``), which closes the upstream connection, so the engine stops
generating for nobody.
"""

from __future__ import annotations

import asyncio
import logging
import random
import select
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from gpud import api, log
from gpud.config import RouterConfig
from gpud.router import balance
from gpud.router.auth import ApiKeys
from gpud.router.stats import NO_DEPLOYMENT, RouterStats

_log = log.get("router")

# Not forwarded in either direction: they describe one hop's connection, not the request.
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
SESSION_HEADER = "x-session-id"
# A replica that refused a connection is left out of choices this long (unless all are).
SHUN_S = 1.0
# Bodies of known length up to this size are relayed whole (see Proxy._relay).
WHOLE_BODY_MAX = 256 * 1024


class RouterError(Exception):
    """An OpenAI-shaped error the router answers itself; ``code`` is stable (and a metric
    label), ``message`` names the cause and the fix."""

    def __init__(self, status: int, kind: str, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.message = status, kind, code, message


def error_body(kind: str, code: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


def error_response(exc: RouterError) -> web.Response:
    return api.json_response(error_body(exc.kind, exc.code, exc.message), status=exc.status)


class _Model(msgspec.Struct):
    model: str


def requested_model(raw: bytes) -> str:
    """The ``model`` of a JSON request body (pure); RouterError 400 for anything else."""
    if (bad := api.invalid_utf8(raw)) is not None:
        raise RouterError(400, "invalid_request_error", "invalid_json", f"body is {bad}")
    try:
        model = msgspec.json.decode(raw, type=_Model).model
    except msgspec.ValidationError as exc:
        raise RouterError(
            400,
            "invalid_request_error",
            "invalid_request",
            f"the body must be a JSON object with a string `model`: {exc}",
        ) from None
    except msgspec.DecodeError as exc:
        raise RouterError(
            400, "invalid_request_error", "invalid_json", f"body is not valid JSON: {exc}"
        ) from None
    if not model:
        raise RouterError(400, "invalid_request_error", "invalid_request", "`model` is empty")
    return model


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Anything readable on a connection with no request outstanding: the peer's FIN or RST, or
# bytes no request asked for.
_READABLE = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | select.POLLRDHUP


class NotWritten(Exception):
    """The replica had closed the connection before the request went out on it."""


class CheckedBody(aiohttp.BytesPayload):
    """A request body written only onto a connection the replica has not closed; ``written``
    tells whether any byte of the request reached the kernel.

    aiohttp writes the request line and headers together with the body, here, so "nothing
    written" is proven here or never. A pooled keep-alive connection whose replica died (or
    timed it out) is closed by aiohttp only once the event loop has read the FIN; a request
    that takes it before that would be written into a dead socket and fail as if the engine
    had taken it. So, as urllib3 does before reusing a connection, the socket is polled right
    before the write: an idle HTTP/1.1 connection has nothing to read, and anything readable
    (FIN, RST, stray bytes) means it must not carry a request. The write itself is one send
    (drain=False: no await before it); a send the kernel refuses (the peer reset the
    connection) closes the transport at once, and then not one byte went out either. Only a
    FIN that arrives between the poll and the send (microseconds) goes unseen."""

    written = False

    async def write_with_length(
        self, writer: aiohttp.abc.AbstractStreamWriter, content_length: int | None
    ) -> None:
        transport = writer.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if transport is None or transport.is_closing() or sock is None or _readable(sock):
            raise NotWritten
        value = self._value if content_length is None else self._value[:content_length]
        # aiohttp's StreamWriter (the abstract writer has no ``drain``).
        await writer.write(value, drain=False)  # type: ignore[call-arg]
        if transport.is_closing():
            raise NotWritten
        self.written = True


def _readable(sock: Any) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), _READABLE)
    return bool(poller.poll(0))


class Proxy:
    """The router's application. ``table`` gives the current routing table, ``models`` what
    `/v1/models` lists, ``depth`` each upstream's reported queue depth."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        table: Callable[[], balance.Table],
        models: Callable[[], list[str]],
        keys: ApiKeys,
        stats: RouterStats,
        depth: Mapping[str, float],
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._table = table
        self._models = models
        self._keys = keys
        self.stats = stats
        self._depth = depth
        self._rng = rng or random.Random()
        self._clock = clock
        self._shunned: dict[str, float] = {}
        self._errors = api.RateLimitedLog(_log)
        self.session: aiohttp.ClientSession | None = None

    def client_session(self) -> aiohttp.ClientSession:
        """The one session to all replicas (its pool is the router's upstream connections)."""
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.config.max_connections,
                # Below common servers' own keep-alive (uvicorn, hence vLLM: 5 s), so a pooled
                # connection is never one the replica is closing as a request goes out.
                keepalive_timeout=2.0,
            ),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.config.connect_timeout_s,
                sock_read=self.config.read_timeout_s,
            ),
            # Bytes pass as the replica sent them, and the client's own headers decide.
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        )

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors_middleware])
        app.add_routes(
            [
                web.get("/v1/models", self._list_models),
                web.get("/v1/models/{model:.+}", self._get_model),
                web.route("*", "/v1/{tail:.*}", self._forward),
            ]
        )
        return app

    @web.middleware
    async def _errors_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except RouterError as exc:
            return self._refuse(request, exc, NO_DEPLOYMENT)
        except web.HTTPException as exc:
            code = "not_found" if exc.status == 404 else "invalid_request"
            return self._refuse(
                request,
                RouterError(exc.status, "invalid_request_error", code, f"{exc.reason}: "
                            f"{request.method} {request.path} (the router serves /v1/*)"),
                NO_DEPLOYMENT,
            )  # fmt: skip

    def _refuse(self, request: web.Request, exc: RouterError, deployment: str) -> web.Response:
        self.stats.errors[deployment, exc.code] += 1
        self.stats.requests[deployment, exc.status] += 1
        response = error_response(exc)
        if exc.status in (408, 413):
            response.force_close()  # the rest of the body is not read
        return response

    # ---- checks --------------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> None:
        if not self._keys.allows(request.headers.get("Authorization")):
            raise RouterError(
                401,
                "invalid_request_error",
                "invalid_api_key",
                "missing or wrong API key: send `Authorization: Bearer <key>` with a key "
                "listed (hashed) in router.api_keys_file",
            )

    async def _body(self, request: web.Request) -> bytes:
        limit = self.config.max_body_bytes
        too_large = RouterError(
            413,
            "invalid_request_error",
            "body_too_large",
            f"the body is larger than router.max_body_bytes ({limit} bytes)",
        )
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                while chunk := await request.content.readany():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            raise RouterError(
                408,
                "invalid_request_error",
                "body_timeout",
                f"the body did not arrive within router.body_timeout_s "
                f"({self.config.body_timeout_s:g} s)",
            ) from None
        return b"".join(chunks)

    # ---- handlers ------------------------------------------------------------------------

    async def _list_models(self, request: web.Request) -> web.Response:
        self._authorize(request)
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "gpud"} for m in self._models()
        ]
        return api.json_response({"object": "list", "data": data})

    async def _get_model(self, request: web.Request) -> web.Response:
        self._authorize(request)
        model = request.match_info["model"]
        if model not in self._models():
            raise self._unavailable(model, self._table())
        return api.json_response({"id": model, "object": "model", "created": 0, "owned_by": "gpud"})

    def _unavailable(self, model: str, table: balance.Table) -> RouterError:
        if model in table.known:
            return RouterError(
                503,
                "service_unavailable_error",
                "no_ready_replica",
                f"no replica of model {model!r} is ready; see `gpud deploy status`",
            )
        return RouterError(
            404,
            "invalid_request_error",
            "model_not_found",
            f"no deployment serves model {model!r}; see GET /v1/models",
        )

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        started = self._clock()
        self._authorize(request)
        raw = await self._body(request)
        model = requested_model(raw)
        table = self._table()
        upstreams = table.ready.get(model)
        if not upstreams:
            raise self._unavailable(model, table)
        by_url = {u.url: u for u in upstreams}
        deployment = upstreams[0].deployment
        session = request.headers.get(SESSION_HEADER, "")
        tried: set[str] = set()
        outcome: balance.Outcome = "connect_failed"
        while True:
            candidates = balance.usable(list(by_url), self._shunned, self._clock())
            url = balance.choose(
                candidates, session=session, load=self._load, tried=frozenset(tried), rng=self._rng
            )
            if url is None:
                break
            if tried:
                self.stats.retries[by_url[url].deployment] += 1
            tried.add(url)
            deployment = by_url[url].deployment
            result = await self._attempt(request, by_url[url], raw, started, len(tried))
            if isinstance(result, web.StreamResponse):
                return result
            outcome = result
            if not balance.may_retry(outcome, len(tried), self.config.max_attempts):
                break
        if outcome == "failed_after_write":
            error = RouterError(
                502,
                "api_error",
                "upstream_failed",
                "the replica's connection broke before it answered; the request may have "
                "reached it, so it was not sent again",
            )
        else:
            error = RouterError(
                503,
                "service_unavailable_error",
                "no_replica_reachable",
                f"no ready replica of model {model!r} could be reached ({len(tried)} tried)",
            )
        return self._refuse(request, error, deployment)

    def _load(self, url: str) -> float:
        return self.stats.in_flight[url] + self._depth.get(url, 0.0)

    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        if self._keys.required:
            headers.pop("Authorization", None)  # the router's key, not the engine's
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            prior = request.headers.get("X-Forwarded-For")
            headers["X-Forwarded-For"] = f"{prior}, {peer[0]}" if prior else peer[0]
        return headers

    async def _attempt(
        self,
        request: web.Request,
        upstream: balance.Upstream,
        raw: bytes,
        started: float,
        attempts: int,
    ) -> web.StreamResponse | balance.Outcome:
        """One attempt at one replica: the relayed response, or how it failed before one."""
        assert self.session is not None
        url = upstream.url
        body = CheckedBody(raw)
        self.stats.in_flight[url] += 1
        try:
            async with self.session.request(
                request.method,
                url + request.rel_url.raw_path_qs,
                data=body,
                headers=self._upstream_headers(request),
                allow_redirects=False,
            ) as answer:
                ended = balance.attempt_outcome(connected=True, written=True, status=answer.status)
                if ended == "draining" and balance.may_retry(
                    ended, attempts, self.config.max_attempts
                ):
                    return ended
                return await self._relay(request, answer, upstream, started)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            self._shun(url)
            self._errors.event(logging.WARNING, "replica unreachable", upstream=url, error=str(exc))
            return balance.attempt_outcome(connected=False, written=False, status=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Not shunned when not written: a live replica may have timed out an idle
            # connection; a dead one refuses the next, fresh connection and is shunned then.
            ended = balance.attempt_outcome(connected=True, written=body.written, status=None)
            self._errors.event(
                logging.WARNING,
                "replica closed the connection before the request was written"
                if ended == "not_written"
                else "replica failed before answering",
                upstream=url,
                error=repr(exc),
            )
            return ended
        finally:
            left = self.stats.in_flight[url] - 1
            if left:
                self.stats.in_flight[url] = left
            else:
                del self.stats.in_flight[url]

    def _shun(self, url: str) -> None:
        now = self._clock()
        self._shunned = {u: t for u, t in self._shunned.items() if t > now}
        self._shunned[url] = now + SHUN_S

    async def _relay(
        self,
        request: web.Request,
        answer: aiohttp.ClientResponse,
        upstream: balance.Upstream,
        started: float,
    ) -> web.StreamResponse:
        deployment = upstream.deployment
        headers = [(k, v) for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS]
        length = answer.content_length
        if length is not None and length <= WHOLE_BODY_MAX:
            # A complete small body (a non-streaming reply): headers and body go out in one
            # write, where streaming them would cost a system call more per request.
            try:
                body = await answer.read()
            except (aiohttp.ClientError, TimeoutError):
                self.stats.errors[deployment, "upstream_broke"] += 1
                raise RouterError(
                    502, "api_error", "upstream_failed", "the replica broke while answering"
                ) from None
            self.stats.requests[deployment, answer.status] += 1
            now = self._clock()
            self.stats.ttfb.labels(deployment).observe(now - started)
            self.stats.latency.labels(deployment).observe(now - started)
            response = web.Response(status=answer.status, reason=answer.reason, body=body)
            response.headers.extend(headers)
            return response
        response = web.StreamResponse(status=answer.status, reason=answer.reason)
        response.headers.extend(headers)
        if length is not None:
            response.content_length = length
        self.stats.requests[deployment, answer.status] += 1
        try:
            await self._stream(request, response, answer, upstream, started)
        except ConnectionResetError:
            # The client went away mid-response (aiohttp raises its ClientConnectionResetError,
            # a ClientError, on a write to a closed client): the handler ends here, which closes
            # the upstream request; it is no failure of the replica's.
            log.event(_log, logging.DEBUG, "client gone mid-response", upstream=upstream.url)
        return response

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        answer: aiohttp.ClientResponse,
        upstream: balance.Upstream,
        started: float,
    ) -> None:
        deployment = upstream.deployment
        await response.prepare(request)
        first = True
        while True:
            try:
                chunk = await answer.content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The replica broke mid-response: the client must see a broken response, never
                # a complete-looking short one, so its connection is cut without the final
                # chunk.
                self.stats.errors[deployment, "upstream_broke"] += 1
                self._errors.event(
                    logging.WARNING,
                    "replica broke mid-response",
                    upstream=upstream.url,
                    error=repr(exc),
                )
                if request.transport is not None:
                    request.transport.abort()
                return
            if first:
                self.stats.ttfb.labels(deployment).observe(self._clock() - started)
                first = False
            if not chunk:
                break
            await response.write(chunk)
        await response.write_eof()
        self.stats.latency.labels(deployment).observe(self._clock() - started)
