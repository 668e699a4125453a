"""Serf RPC: framing against bytes recorded from a real agent, then the client against real
`serf agent` processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud.serf.rpc import (
    Frame,
    MemberEvent,
    QueryEvent,
    ReplyDemux,
    ReplyKind,
    SerfConnectionError,
    SerfFramingError,
    SerfRPC,
    SerfRPCError,
    encode_request,
    event_from_wire,
    ip_from_wire,
    member_from_wire,
)
from tests.harness.serf import RawSerf
from tests.harness.wait import async_wait_for

# Recorded from serf 0.8.2-dev: handshake(0) auth(1) members(2) join to a closed port(3)
# stream "user"(4) event(5) query with ack(6); see tests/data/serf_frames/README.
SESSION = (Path(__file__).parents[1] / "data" / "serf_frames" / "session.bin").read_bytes()
SESSION_KINDS: dict[int, ReplyKind] = {
    0: "bare",
    1: "bare",
    2: "body",
    3: "body",
    4: "stream",
    5: "bare",
    6: "stream",
}


def session_demux() -> ReplyDemux:
    demux = ReplyDemux()
    for seq, kind in SESSION_KINDS.items():
        demux.expect(seq, kind)
    return demux


def decode_chunks(chunks: list[bytes]) -> list[Frame]:
    demux = session_demux()
    frames: list[Frame] = []
    for chunk in chunks:
        frames += demux.feed(chunk)
        for frame in frames:
            if frame.record and frame.body.get("Type") == "done":
                demux.end_stream(frame.seq)
    return frames


EXPECTED = decode_chunks([SESSION])


def test_recorded_session_decodes_to_the_documented_shapes() -> None:
    assert [(f.seq, f.record) for f in EXPECTED] == [
        (0, False),
        (1, False),
        (2, False),
        (3, False),
        (4, False),
        (5, False),
        (4, True),
        (6, False),
        (6, True),
        (6, True),
    ]
    members = [member_from_wire(m) for m in EXPECTED[2].body["Members"]]
    assert members[0].name == "a" and members[0].addr == "127.0.0.1"
    assert members[0].tags == {"x": "1"} and members[0].status == "alive"
    assert "connection refused" in EXPECTED[3].error and EXPECTED[3].body == {"Num": 0}
    event = event_from_wire(EXPECTED[6].body)
    assert event.event == "user" and event.payload == b"\x00\x01"
    assert [f.body["Type"] for f in EXPECTED[8:]] == ["ack", "done"]


def test_frames_split_at_every_byte_boundary() -> None:
    for cut in range(len(SESSION) + 1):
        assert decode_chunks([SESSION[:cut], SESSION[cut:]]) == EXPECTED, cut


def test_one_byte_at_a_time() -> None:
    assert decode_chunks([SESSION[i : i + 1] for i in range(len(SESSION))]) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(SESSION)), max_size=12))
def test_any_chunking_gives_the_same_frames(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(SESSION)]
    assert decode_chunks([SESSION[a:b] for a, b in itertools.pairwise(bounds)]) == EXPECTED


def test_truncated_frame_waits_for_more_bytes() -> None:
    demux = session_demux()
    header = msgpack.packb({"Seq": 2, "Error": ""})
    body = msgpack.packb({"Members": []})
    assert demux.feed(header) == []  # header without its body: nothing yet
    assert demux.feed(body[:-1]) == []
    assert demux.feed(body[-1:]) == [Frame(2, "", {"Members": []})]


def test_several_frames_in_one_chunk() -> None:
    demux = ReplyDemux()
    for seq in range(5):
        demux.expect(seq, "bare")
    chunk = b"".join(msgpack.packb({"Seq": s, "Error": ""}) for s in range(5))
    assert [f.seq for f in demux.feed(chunk)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xc1",  # a byte msgpack never uses
        msgpack.packb(42),  # valid msgpack, not a header
        msgpack.packb({"Seq": "x", "Error": ""}),
        msgpack.packb({"Seq": 99, "Error": ""}),  # never requested
        b"\xdd\xff\xff\xff\xff",  # a 4-billion-element array: refused, not awaited
    ],
)
def test_garbage_raises_a_framing_error(garbage: bytes) -> None:
    demux = session_demux()
    with pytest.raises(SerfFramingError):
        demux.feed(garbage)


@given(st.binary(max_size=64), st.integers(min_value=0, max_value=len(SESSION)))
def test_arbitrary_bytes_decode_or_raise_a_framing_error(noise: bytes, cut: int) -> None:
    demux = session_demux()
    try:
        demux.feed(SESSION[:cut] + noise)
    except SerfFramingError:
        pass


def test_bodyless_errors_and_join_error_with_body() -> None:
    demux = ReplyDemux()
    demux.expect(0, "body")
    demux.expect(1, "body")
    data = msgpack.packb({"Seq": 0, "Error": "Authentication required"})
    data += msgpack.packb({"Seq": 1, "Error": "join failed"}) + msgpack.packb({"Num": 0})
    assert demux.feed(data) == [
        Frame(0, "Authentication required"),
        Frame(1, "join failed", {"Num": 0}),
    ]


def test_request_encoding() -> None:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(encode_request("respond", 7, {"ID": 3, "Payload": b"\xff"}))
    assert list(unpacker) == [{"Command": "respond", "Seq": 7}, {"ID": 3, "Payload": b"\xff"}]


def test_ip_from_wire() -> None:
    assert ip_from_wire(bytes([10, 0, 0, 5])) == "10.0.0.5"
    assert ip_from_wire(bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 5])) == "10.0.0.5"
    assert ip_from_wire(bytes(15) + b"\x01") == "::1"
    assert ip_from_wire(b"") == ""
    with pytest.raises(ValueError):
        ip_from_wire(b"\x01\x02")


def test_query_event_from_wire() -> None:
    event = event_from_wire(
        {"Event": "query", "ID": 4, "LTime": 9, "Name": "vote", "Payload": b"x"}
    )
    assert event == QueryEvent(event="query", id=4, ltime=9, name="vote", payload=b"x")
    with pytest.raises(ValueError):
        event_from_wire({"Event": "nonsense"})


# ---- a fake server that misbehaves (the client must fail cleanly, never hang) ------------


async def misbehaving_server(reply: bytes) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)  # handshake request
        writer.write(msgpack.packb({"Seq": 0, "Error": ""}))
        await reader.read(100)  # next request
        writer.write(reply)
        await writer.drain()
        if reply:
            await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"\xc1garbage", SerfFramingError),
        (b"", SerfConnectionError),  # server hangs up mid-call
        # Truncated and then silence: the call times out, it does not hang.
        (msgpack.packb({"Seq": 1, "Error": ""})[:-1], SerfRPCError),
    ],
)
async def test_broken_server_fails_pending_calls_clearly(
    reply: bytes, expected: type[Exception]
) -> None:
    server, port = await misbehaving_server(reply)
    async with server:
        rpc = await SerfRPC.connect("127.0.0.1", port, None, timeout_s=1)
        with pytest.raises(expected):
            await rpc.members()
        if expected is not SerfRPCError:
            assert rpc.closed and rpc.failure is not None
            with pytest.raises(SerfConnectionError):
                await rpc.stats()
        await rpc.close()


async def test_query_ends_at_the_empty_record_serf_sends_at_its_deadline() -> None:
    """At a query's deadline Serf closes its ack and response channels; its RPC loop can read
    their zero value and stream it as an ack or response "from" "" before "done" (seen under
    load). That is the end of the query, not an answer from a member named ""."""

    def record(body: dict[str, object]) -> bytes:
        return msgpack.packb({"Seq": 1, "Error": ""}) + msgpack.packb(body)

    reply = msgpack.packb({"Seq": 1, "Error": ""}) + b"".join(
        record(body)
        for body in (
            {"Type": "ack", "From": "b", "Payload": None},
            {"Type": "response", "From": "b", "Payload": b"pong"},
            {"Type": "response", "From": "", "Payload": None},
            {"Type": "ack", "From": "", "Payload": None},
        )
    )
    server, port = await misbehaving_server(reply)  # then 5 s of silence: no "done"
    async with server:
        rpc = await SerfRPC.connect("127.0.0.1", port, None, timeout_s=1)
        try:
            result = await asyncio.wait_for(
                rpc.query("ping", b"", request_ack=True, timeout_s=30), 3
            )
        finally:
            await rpc.close()
    assert result.responses == {"b": b"pong"} and result.acks == {"b"}


# ---- against real serf agents ------------------------------------------------------------


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[list[RawSerf]]:
    started = [RawSerf(tmp_path, "a", tags={"role": "x"}), RawSerf(tmp_path, "b")]
    try:
        yield started
    finally:
        for agent in started:
            await agent.stop()


async def test_auth_wrong_and_missing_token(agents: list[RawSerf]) -> None:
    a = agents[0]
    await a.start()
    rpc = await a.connect()
    await rpc.close()
    with pytest.raises(SerfRPCError, match="Invalid authentication token"):
        await SerfRPC.connect("127.0.0.1", a.rpc_port, "wrong")
    unauthenticated = await SerfRPC.connect("127.0.0.1", a.rpc_port, None)
    with pytest.raises(SerfRPCError, match="Authentication required"):
        await unauthenticated.members()
    await unauthenticated.close()


async def test_members_tags_stats_coordinate(agents: list[RawSerf]) -> None:
    a = agents[0]
    await a.start()
    rpc = await a.connect()
    try:
        [me] = await rpc.members()
        assert (me.name, me.addr, me.port, me.status) == ("a", "127.0.0.1", a.bind_port, "alive")
        assert me.tags == {"role": "x"}
        await rpc.tags(add={"v": "1", "gpu": "8"}, delete=["role"])
        [me] = await rpc.members()
        assert me.tags == {"v": "1", "gpu": "8"}
        assert [m.name for m in await rpc.members_filtered(tags={"gpu": "8"})] == ["a"]
        assert await rpc.members_filtered(status="failed") == []
        stats = await rpc.stats()
        assert stats["agent"]["name"] == "a"
        assert await rpc.get_coordinate("nobody") is None
        assert (await rpc.get_coordinate("a")) is not None
        with pytest.raises(SerfRPCError, match="No pending queries"):
            await rpc.respond(12345, b"x")
    finally:
        await rpc.close()


async def test_stream_query_join_failure_and_force_leave(agents: list[RawSerf]) -> None:
    a, b = agents
    await a.start()
    await b.start()
    rpc_a, rpc_b = await a.connect(), await b.connect()
    try:
        events = rpc_a.stream("member-join,member-failed,member-leave")
        first = asyncio.ensure_future(anext(events))
        assert await rpc_b.join([a.gossip_addr]) == 1
        joined = await asyncio.wait_for(first, 10)
        assert isinstance(joined, MemberEvent) and joined.event == "member-join"
        assert "b" in {m.name for m in joined.members}

        # Query/respond: b answers queries named "ping" with its own payload.
        async def answer() -> None:
            async for ev in rpc_b.stream("query:ping"):
                assert isinstance(ev, QueryEvent)
                await rpc_b.respond(ev.id, b"pong:" + ev.payload)

        responder = asyncio.create_task(answer())
        await asyncio.sleep(0.3)  # let the stream register
        result = await rpc_a.query("ping", b"42", request_ack=True, timeout_s=2)
        assert result.responses == {"b": b"pong:42"}
        assert result.acks >= {"b"}
        # `enough` ends the query at the first answer that satisfies it, long before Serf's
        # deadline; the records Serf still sends for it (its "done") do not disturb later calls.
        began = time.monotonic()
        early = await rpc_a.query("ping", b"7", timeout_s=6, enough=lambda got: "b" in got)
        took = time.monotonic() - began
        assert early.responses == {"b": b"pong:7"} and took < 5, took  # Serf's deadline: 6 s
        await asyncio.sleep(6.5 - took)  # past the first query's "done"
        again = await rpc_a.query("ping", b"8", timeout_s=3)
        assert again.responses == {"b": b"pong:8"}
        responder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await responder

        # SIGKILL b: a's stream reports member-failed within a bounded time.
        assert b.child.pid is not None
        os.killpg(b.child.pid, signal.SIGKILL)
        async with asyncio.timeout(20):
            async for ev in events:
                if ev.event == "member-failed" and {m.name for m in ev.members} == {"b"}:
                    break
        await events.aclose()

        await rpc_a.force_leave("b")
        await async_wait_for(lambda: _status_of(rpc_a, "b", "left"), timeout=10, interval=0.2)
        # The stream was stopped: the connection still works.
        assert [m.name for m in await rpc_a.members_filtered(status="alive")] == ["a"]
        with pytest.raises(SerfRPCError, match="refused"):
            await rpc_a.join(["127.0.0.1:1"])
        await rpc_a.leave()
        assert await asyncio.wait_for(a.child.wait(), 10) == 0
    finally:
        await rpc_a.close()
        await rpc_b.close()


async def _status_of(rpc: SerfRPC, name: str, status: str) -> bool:
    return any(m.name == name and m.status == status for m in await rpc.members())
