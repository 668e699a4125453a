"""What both HTTP servers share: connection limits, read deadlines, bounded logs, clean 400s."""

from __future__ import annotations

import asyncio
import logging

import msgspec
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from gpud import api

LIMITS = api.ConnectionLimits(
    total=6, per_source=3, idle_timeout_s=0.5, reserved=2, exempt=frozenset({0})
)
# Sources 3 and 4 are privileged (members): only they may take the reserved slots.
PRIVILEGED = frozenset({3, 4})


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 4)), max_size=60))
def test_guard_never_exceeds_its_limits_and_frees_what_closes(ops):
    guard = api.ConnectionGuard(LIMITS)
    open_: list[int] = []
    for connect, source in ops:
        if connect:
            before = guard.open_from(source)
            privileged = source in PRIVILEGED
            reason = guard.admit(source, privileged=privileged)
            cap = LIMITS.total if privileged else LIMITS.total - LIMITS.reserved
            full = len(open_) >= cap or (source != 0 and before >= LIMITS.per_source)
            assert (reason is not None) == full
            if reason is None:
                open_.append(source)
        elif source in open_:
            open_.remove(source)
            guard.release(source)
        assert guard.total == len(open_) <= LIMITS.total
        assert sum(s not in PRIVILEGED for s in open_) <= LIMITS.total - LIMITS.reserved
        for s in set(open_):
            assert guard.open_from(s) == open_.count(s)
            assert s == 0 or open_.count(s) <= LIMITS.per_source


def test_rate_limited_log_writes_a_burst_per_window_and_counts_the_rest(caplog):
    now = [0.0]
    limited = api.RateLimitedLog(
        logging.getLogger("gpud.test"), burst=3, window_s=10, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="gpud.test"):
        logged = [limited.event(logging.WARNING, "x") for _ in range(100)]
        now[0] = 11
        limited.event(logging.WARNING, "x")
    assert sum(logged) == 3 and len(caplog.records) == 4
    assert caplog.records[-1].gpud_fields["suppressed_before"] == 97


class Body(msgspec.Struct):
    owner: str


async def _echo(request: web.Request) -> web.Response:
    body = await api.read_body(request, Body)
    return api.json_response({"owner": body.owner})


async def _raw(path: str, data: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return reply


@pytest.mark.asyncio
async def test_local_api_invalid_utf8_is_400_and_garbage_is_not_a_traceback_storm(tmp_path, caplog):
    server = api.GuardedServer(api.make_app([web.post("/echo", _echo)]), LIMITS, name="test API")
    await server.setup()
    path = str(tmp_path / "s.sock")
    await server.listen_unix(path)
    try:
        body = b'{"owner": "\xff\xfe"}'
        request = (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        )
        reply = await _raw(path, request % len(body) + body)
        assert reply.startswith(b"HTTP/1.1 400"), reply
        assert b"not valid UTF-8" in reply
        with caplog.at_level(logging.DEBUG):
            for _ in range(50):
                await _raw(path, b"\x16\x03\x01 not http at all\r\n\r\n")
                await _raw(path, b"GET /echo HTTP/1.1\r\nHost: x\r\nX: \x00\x01\r\n\r\n")
        assert not any(r.exc_info or r.exc_text for r in caplog.records)
        assert len(caplog.records) <= api.LOG_BURST
    finally:
        await server.cleanup()


@pytest.mark.asyncio
async def test_over_the_limit_closed_at_once_idle_and_half_open_after_the_timeout(tmp_path):
    limits = api.ConnectionLimits(total=6, per_source=3, idle_timeout_s=0.5)
    server = api.GuardedServer(api.make_app([web.post("/echo", _echo)]), limits, name="test API")
    await server.setup()
    path = str(tmp_path / "s.sock")
    await server.listen_unix(path)
    try:
        conns = [await asyncio.open_unix_connection(path) for _ in range(5)]
        conns[0][1].write(b"POST /echo HTTP/1.1\r\nHost: x\r\n")  # never finished
        await asyncio.sleep(0.2)
        assert (server.guard.total, server.guard.refused) == (3, 2)
        for reader, _ in conns:
            assert await asyncio.wait_for(reader.read(), 3) == b""
        assert server.guard.total == 0
    finally:
        await server.cleanup()


SLOW_BODY = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the connection (b"" for a bare reset)."""
    try:
        return await asyncio.wait_for(reader.read(), 3)
    except ConnectionResetError:
        return b""


@pytest.mark.asyncio
async def test_a_body_that_never_finishes_is_dropped_at_the_body_deadline(tmp_path):
    limits = api.ConnectionLimits(total=6, per_source=4, idle_timeout_s=5.0, body_timeout_s=0.5)
    server = api.GuardedServer(api.make_app([web.post("/echo", _echo)]), limits, name="test API")
    await server.setup()
    path = str(tmp_path / "s.sock")
    await server.listen_unix(path)
    try:
        conns = [await asyncio.open_unix_connection(path) for _ in range(4)]
        start = asyncio.get_running_loop().time()
        for _, writer in conns[:3]:
            writer.write(SLOW_BODY)
        # Refused without reading the body: aiohttp would read the rest for 10 s more.
        conns[3][1].write(SLOW_BODY.replace(b"/echo", b"/nope"))
        # Full: the per-source cap counts these connections.
        await asyncio.sleep(0.2)
        assert server.guard.total == 4
        replies = [await _until_closed(reader) for reader, _ in conns]
        assert replies[:3] == [b""] * 3 and replies[3].startswith(b"HTTP/1.1 404")
        # Dropped by the body deadline, well before the idle (header) timeout.
        assert asyncio.get_running_loop().time() - start < 2.0
        assert (server.guard.total, server.guard.body_timeouts) == (0, 4)
        # A complete request is still served on a fresh connection.
        body = b'{"owner": "x"}'
        head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        reply = await _raw(path, head % len(body) + body)
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"owner":"x"}')
    finally:
        await server.cleanup()


@pytest.mark.asyncio
async def test_a_body_sent_slowly_but_in_time_is_read_whole(tmp_path):
    limits = api.ConnectionLimits(total=6, per_source=3, idle_timeout_s=5.0, body_timeout_s=2.0)
    server = api.GuardedServer(api.make_app([web.post("/echo", _echo)]), limits, name="test API")
    await server.setup()
    path = str(tmp_path / "s.sock")
    await server.listen_unix(path)
    try:
        body = b'{"owner": "' + b"y" * 2000 + b'"}'
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(body))
        writer.write(b"Connection: close\r\n\r\n")
        for i in range(0, len(body), 500):
            writer.write(body[i : i + 500])
            await writer.drain()
            await asyncio.sleep(0.1)
        reply = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert b"y" * 2000 in reply
        assert server.guard.body_timeouts == 0
    finally:
        await server.cleanup()
