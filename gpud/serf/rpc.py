"""An asyncio client for Serf's msgpack RPC (cmd/serf/command/agent/ipc.go).

The wire format has no length prefix: each request is a msgpack header ``{Command, Seq}``
optionally followed by a body; each reply is a header ``{Seq, Error}`` optionally followed by
a body. Whether a body follows depends on the command that was sent under that Seq, so the
decoder (``ReplyDemux``, sans I/O) must know what it asked for. Stream records and query
results arrive under the Seq of their request, each as a header plus a body.

One reader task demultiplexes replies by Seq. Anything the server sends that does not fit
the protocol fails the whole connection with ``SerfFramingError``; every pending call and
stream then raises a ``SerfConnectionError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Literal

import msgpack
import msgspec

from gpud import log
from gpud.aio import within
from gpud.errors import GpudError

IPC_VERSION = 1
# Bounds what one reply may make us buffer (Serf's largest replies, members of a big
# cluster, are far below this).
MAX_BUFFER_BYTES = 16 * 1024 * 1024

# Errors Serf sends before it looks at the command: a header with no body follows.
_BODYLESS_ERRORS = frozenset(
    {"Handshake required", "Authentication required", "Unsupported command"}
)

# What the reply to a command looks like: a bare header, a header plus a body, or a bare
# header followed by any number of records (header + body) under the same Seq.
ReplyKind = Literal["bare", "body", "stream"]

_log = log.get("serf.rpc")


class SerfRPCError(GpudError):
    """Serf answered a request with an error; ``message`` is Serf's own text."""

    def __init__(self, command: str, message: str) -> None:
        super().__init__(f"serf {command}: {message.strip()}")
        self.command = command
        self.message = message


class SerfConnectionError(GpudError):
    """The RPC connection is gone (or never came up); pending calls cannot complete."""


class SerfFramingError(SerfConnectionError):
    """The server sent bytes that are not Serf RPC; the connection is unusable."""


class ResponseHeader(msgspec.Struct, frozen=True):
    seq: int
    error: str


class Frame(msgspec.Struct, frozen=True):
    """One decoded reply: a header, its body (None when bodyless), and whether it is a
    stream/query record rather than the direct reply to a request."""

    seq: int
    error: str
    body: Any = None
    record: bool = False


def encode_request(command: str, seq: int, body: Any = None) -> bytes:
    """One request as it goes on the wire."""
    data = msgpack.packb({"Command": command, "Seq": seq})
    if body is not None:
        data += msgpack.packb(body, use_bin_type=True)
    return data


def parse_header(obj: Any) -> ResponseHeader:
    """Validate a decoded object as a reply header; raises SerfFramingError."""
    if not isinstance(obj, dict):
        raise SerfFramingError(f"expected a reply header, got {type(obj).__name__}")
    seq, error = obj.get("Seq"), obj.get("Error")
    if type(seq) is not int or seq < 0 or not isinstance(error, str):
        raise SerfFramingError(f"malformed reply header {_preview(obj)}")
    return ResponseHeader(seq, error)


def _preview(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


class ReplyDemux:
    """Turns the server's byte stream into Frames, given what was requested under each Seq.

    Pure: feed it bytes, get frames. A truncated frame waits for more bytes; bytes that are
    not msgpack, or msgpack that is not a reply, raise SerfFramingError.
    """

    def __init__(self, max_buffer_bytes: int = MAX_BUFFER_BYTES) -> None:
        self._unpacker = msgpack.Unpacker(
            raw=False, unicode_errors="replace", max_buffer_size=max_buffer_bytes
        )
        self._expected: dict[int, ReplyKind] = {}
        # Seqs whose every further header carries a record body (open streams and queries,
        # and streams we stopped: records already in flight still arrive).
        self._streaming: set[int] = set()
        self._header: ResponseHeader | None = None

    def expect(self, seq: int, kind: ReplyKind) -> None:
        self._expected[seq] = kind

    def end_stream(self, seq: int) -> None:
        """A query finished ("done"): its Seq carries no more records."""
        self._streaming.discard(seq)

    def feed(self, data: bytes) -> list[Frame]:
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            raise SerfFramingError("reply larger than the buffer limit") from None
        frames: list[Frame] = []
        while True:
            try:
                obj = next(self._unpacker)
            except StopIteration:
                return frames
            except (ValueError, msgpack.UnpackException) as exc:
                raise SerfFramingError(f"not msgpack: {exc}") from None
            frame = self._take(obj)
            if frame is not None:
                frames.append(frame)

    def _take(self, obj: Any) -> Frame | None:
        if self._header is not None:
            header, self._header = self._header, None
            return Frame(header.seq, header.error, obj, record=header.seq in self._streaming)
        header = parse_header(obj)
        if header.seq in self._streaming:
            self._header = header
            return None
        kind = self._expected.pop(header.seq, None)
        if kind is None:
            raise SerfFramingError(f"reply for seq {header.seq}, which was never requested")
        if kind == "stream" and not header.error:
            self._streaming.add(header.seq)
        if kind == "body" and header.error not in _BODYLESS_ERRORS:
            self._header = header
            return None
        return Frame(header.seq, header.error)


# ---- typed results -------------------------------------------------------------------


class SerfMember(msgspec.Struct, kw_only=True, rename="pascal"):
    name: str
    addr: str
    port: int
    tags: dict[str, str]
    status: str
    protocol_min: int = 0
    protocol_max: int = 0
    protocol_cur: int = 0
    delegate_min: int = 0
    delegate_max: int = 0
    delegate_cur: int = 0


class MemberEvent(msgspec.Struct, kw_only=True, rename="pascal"):
    # member-join, member-leave, member-failed, member-update, member-reap
    event: str
    members: list[SerfMember]


class UserEvent(msgspec.Struct, kw_only=True):
    event: str
    ltime: int
    name: str
    payload: bytes
    coalesce: bool


class QueryEvent(msgspec.Struct, kw_only=True):
    event: str
    id: int
    ltime: int
    name: str
    payload: bytes


SerfEvent = MemberEvent | UserEvent | QueryEvent


class QueryResult(msgspec.Struct, kw_only=True):
    acks: set[str] = msgspec.field(default_factory=set)
    responses: dict[str, bytes] = msgspec.field(default_factory=dict)


class Coordinate(msgspec.Struct, kw_only=True, rename="pascal"):
    vec: list[float]
    error: float
    adjustment: float
    height: float


class KeyringReply(msgspec.Struct, kw_only=True, rename="pascal"):
    """Serf's keyResponse: how many nodes answered and what failed where."""

    messages: dict[str, str] | None = None
    # list-keys: each installed key (base64) -> how many nodes hold it.
    keys: dict[str, int] | None = None
    num_nodes: int = 0
    num_err: int = 0
    num_resp: int = 0
    # The header's error ("2/3 nodes reported failure"), empty when every node succeeded.
    error: str = ""


class SerfProtocolError(SerfRPCError):
    """A reply body that does not have the documented shape."""


def ip_from_wire(raw: Any) -> str:
    """Serf sends net.IP as 4 or 16 raw bytes; IPv4-mapped addresses print as IPv4."""
    if not raw:
        return ""
    if not isinstance(raw, bytes) or len(raw) not in (4, 16):
        raise ValueError(f"not an IP address: {_preview(raw)}")
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def member_from_wire(raw: Any) -> SerfMember:
    if not isinstance(raw, dict):
        raise ValueError(f"member is not a map: {_preview(raw)}")
    fields = dict(raw, Addr=ip_from_wire(raw.get("Addr")), Tags=raw.get("Tags") or {})
    return msgspec.convert(fields, SerfMember)


def event_from_wire(raw: Any) -> SerfEvent:
    """Decode one stream record; raises ValueError (msgspec.ValidationError) if malformed."""
    if not isinstance(raw, dict):
        raise ValueError(f"event is not a map: {_preview(raw)}")
    kind = raw.get("Event")
    if kind == "user":
        return msgspec.convert(
            {
                "event": kind,
                "ltime": raw.get("LTime"),
                "name": raw.get("Name"),
                "payload": raw.get("Payload") or b"",
                "coalesce": raw.get("Coalesce"),
            },
            UserEvent,
        )
    if kind == "query":
        return msgspec.convert(
            {
                "event": kind,
                "id": raw.get("ID"),
                "ltime": raw.get("LTime"),
                "name": raw.get("Name"),
                "payload": raw.get("Payload") or b"",
            },
            QueryEvent,
        )
    if isinstance(kind, str) and kind.startswith("member-"):
        return MemberEvent(
            event=kind, members=[member_from_wire(m) for m in raw.get("Members") or []]
        )
    raise ValueError(f"unknown event {_preview(kind)}")


def _convert(command: str, body: Any, type_: type[Any]) -> Any:
    try:
        return msgspec.convert(body, type_)
    except msgspec.ValidationError as exc:
        raise SerfProtocolError(command, f"unexpected reply: {exc}") from None


# ---- the client ----------------------------------------------------------------------


class SerfRPC:
    """One authenticated RPC connection to a local ``serf agent``."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.timeout_s = timeout_s
        self._demux = ReplyDemux()
        self._seq = 0
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._records: dict[int, asyncio.Queue[Any]] = {}
        self._failure: SerfConnectionError | None = None
        self._closed = asyncio.Event()
        self._read_task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(
        cls, host: str, port: int, auth_key: str | None, timeout_s: float = 5.0
    ) -> SerfRPC:
        """Connect, handshake and authenticate; raises SerfConnectionError/SerfRPCError."""
        try:
            reader, writer = await within(asyncio.open_connection(host, port), timeout_s)
        except (OSError, TimeoutError) as exc:
            raise SerfConnectionError(
                f"cannot connect to serf RPC at {host}:{port}: {exc or 'timed out'}"
            ) from None
        rpc = cls(reader, writer, timeout_s)
        try:
            await rpc._call("handshake", {"Version": IPC_VERSION})
            if auth_key is not None:
                await rpc._call("auth", {"AuthKey": auth_key})
        except BaseException:
            await rpc.close()
            raise
        return rpc

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def failure(self) -> SerfConnectionError | None:
        return self._failure

    async def wait_closed(self) -> SerfConnectionError | None:
        """Wait until the connection ends; returns why."""
        await self._closed.wait()
        return self._failure

    async def close(self) -> None:
        self._fail(SerfConnectionError("serf RPC connection closed by gpud"))
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._read_task

    # -- plumbing

    def _fail(self, error: SerfConnectionError) -> None:
        if self._closed.is_set():
            return
        self._failure = error
        self._closed.set()
        self._writer.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        for queue in self._records.values():
            queue.put_nowait(error)

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    raise SerfConnectionError("serf closed the RPC connection")
                for frame in self._demux.feed(data):
                    self._dispatch(frame)
        except SerfConnectionError as exc:
            if not self.closed:
                log.warning(_log, "connection failed", error=str(exc))
            self._fail(exc)
        except OSError as exc:
            self._fail(SerfConnectionError(f"serf RPC connection broken: {exc}"))
        except Exception as exc:  # never leave callers waiting on a dead reader
            log.error(_log, "RPC reader failed", error=repr(exc))
            self._fail(SerfFramingError(f"cannot handle serf's reply: {exc!r}"))

    def _dispatch(self, frame: Frame) -> None:
        if frame.record:
            queue = self._records.get(frame.seq)
            if queue is not None:
                queue.put_nowait(frame)
            if isinstance(frame.body, dict) and frame.body.get("Type") == "done":
                self._demux.end_stream(frame.seq)
            return
        future = self._pending.pop(frame.seq, None)
        if future is not None and not future.done():
            future.set_result(frame)

    def _send(self, command: str, body: Any, kind: ReplyKind) -> int:
        if self._failure is not None:
            raise SerfConnectionError(f"serf {command}: {self._failure}")
        seq = self._seq
        self._seq += 1
        self._demux.expect(seq, kind)
        self._writer.write(encode_request(command, seq, body))
        return seq

    async def _call(
        self,
        command: str,
        body: Any = None,
        *,
        kind: ReplyKind = "bare",
        timeout_s: float | None = None,
        records: asyncio.Queue[Any] | None = None,
        raise_error: bool = True,
    ) -> Frame:
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        seq = self._send(command, body, kind)
        self._pending[seq] = future
        if records is not None:
            self._records[seq] = records
        try:
            await self._writer.drain()
            frame = await within(future, timeout_s or self.timeout_s)
        except TimeoutError:
            self._pending.pop(seq, None)
            self._records.pop(seq, None)
            raise SerfRPCError(command, "no reply in time") from None
        except (OSError, SerfConnectionError):
            self._records.pop(seq, None)
            failure = self._failure or SerfConnectionError("connection lost")
            raise type(failure)(f"serf {command}: {failure}") from None
        if frame.error and raise_error:
            self._records.pop(seq, None)
            raise SerfRPCError(command, frame.error)
        return frame

    # -- commands

    async def members(self) -> list[SerfMember]:
        frame = await self._call("members", kind="body")
        return self._members(frame.body)

    async def members_filtered(
        self,
        tags: dict[str, str] | None = None,
        status: str | None = None,
        name: str | None = None,
    ) -> list[SerfMember]:
        """Members matching all given filters (Serf treats each as an anchored regexp)."""
        body = {"Tags": tags or {}, "Status": status or "", "Name": name or ""}
        frame = await self._call("members-filtered", body, kind="body")
        return self._members(frame.body)

    @staticmethod
    def _members(body: Any) -> list[SerfMember]:
        try:
            return [member_from_wire(m) for m in body["Members"] or []]
        except (TypeError, KeyError, ValueError) as exc:
            raise SerfProtocolError("members", f"unexpected reply: {exc}") from None

    async def join(self, addrs: list[str], replay: bool = False, timeout_s: float = 30.0) -> int:
        """Join the cluster through any of ``addrs``; returns how many answered."""
        body = {"Existing": list(addrs), "Replay": replay}
        # Join reports its error in the header and still sends the body; the demux reads both.
        frame = await self._call("join", body, kind="body", timeout_s=timeout_s)
        return int(_convert("join", frame.body, dict[str, int])["Num"])

    async def leave(self, timeout_s: float | None = None) -> None:
        """Gracefully leave the cluster; Serf then shuts itself down."""
        await self._call("leave", timeout_s=timeout_s)

    async def force_leave(self, node: str) -> None:
        await self._call("force-leave", {"Node": node, "Prune": False})

    async def tags(
        self, add: dict[str, str] | None = None, delete: list[str] | None = None
    ) -> None:
        await self._call("tags", {"Tags": add or {}, "DeleteTags": delete or []})

    async def respond(self, query_id: int, payload: bytes) -> None:
        await self._call("respond", {"ID": query_id, "Payload": payload})

    async def get_coordinate(self, node: str) -> Coordinate | None:
        frame = await self._call("get-coordinate", {"Node": node}, kind="body")
        body = _convert("get-coordinate", frame.body, dict[str, Any])
        return _convert("get-coordinate", body.get("Coord"), Coordinate) if body.get("Ok") else None

    # Keyring: each runs a cluster-wide query; Serf reports per-node failures in the body
    # (Messages) next to the header's error, so both come back in a KeyringReply.

    async def install_key(self, key: str, timeout_s: float = 30.0) -> KeyringReply:
        return await self._keyring("install-key", {"Key": key}, timeout_s)

    async def use_key(self, key: str, timeout_s: float = 30.0) -> KeyringReply:
        return await self._keyring("use-key", {"Key": key}, timeout_s)

    async def remove_key(self, key: str, timeout_s: float = 30.0) -> KeyringReply:
        return await self._keyring("remove-key", {"Key": key}, timeout_s)

    async def list_keys(self, timeout_s: float = 30.0) -> KeyringReply:
        return await self._keyring("list-keys", None, timeout_s)

    async def _keyring(self, command: str, body: Any, timeout_s: float) -> KeyringReply:
        frame = await self._call(command, body, kind="body", timeout_s=timeout_s, raise_error=False)
        reply = _convert(command, frame.body, KeyringReply)
        reply.error = frame.error
        return reply

    async def stats(self) -> dict[str, dict[str, str]]:
        frame = await self._call("stats", kind="body")
        return _convert("stats", frame.body, dict[str, dict[str, str]])

    async def stream(self, event_filter: str) -> AsyncIterator[SerfEvent]:
        """Events matching ``event_filter`` (e.g. "member-join,member-failed", "query:x").

        Ends with SerfConnectionError when the connection breaks. Leaving the iteration
        (break, cancel, aclose) sends ``stop`` for this stream. Malformed records are logged
        and skipped.
        """
        records: asyncio.Queue[Any] = asyncio.Queue()
        frame = await self._call("stream", {"Type": event_filter}, kind="stream", records=records)
        try:
            while True:
                item = await records.get()
                if isinstance(item, SerfConnectionError):
                    raise SerfConnectionError(f"serf stream: {item}")
                try:
                    yield event_from_wire(item.body)
                except ValueError as exc:
                    log.warning(_log, "skipping malformed event", error=str(exc))
        finally:
            self._records.pop(frame.seq, None)
            if not self.closed:
                # Fire and forget: a finally of an async generator may not be able to await.
                with contextlib.suppress(SerfConnectionError):
                    self._send("stop", {"Stop": frame.seq}, "bare")

    async def query(
        self,
        name: str,
        payload: bytes,
        *,
        filter_nodes: list[str] | None = None,
        filter_tags: dict[str, str] | None = None,
        request_ack: bool = False,
        timeout_s: float | None = None,
        enough: Callable[[Mapping[str, bytes]], bool] | None = None,
    ) -> QueryResult:
        """Send a query and collect acks and responses until Serf says "done", or until
        ``enough(responses)`` is true after a response (a caller that needs only a majority
        need not wait for members that will never answer).

        ``timeout_s`` None: Serf's default (GossipInterval * 16 * ceil(log10(n+1))). Records
        Serf sends after an early return are dropped; the stream still ends at "done".
        """
        body = {
            "FilterNodes": filter_nodes or [],
            "FilterTags": filter_tags or {},
            "RequestAck": request_ack,
            "RelayFactor": 0,
            "Timeout": int((timeout_s or 0) * 1e9),
            "Name": name,
            "Payload": payload,
        }
        records: asyncio.Queue[Any] = asyncio.Queue()
        frame = await self._call("query", body, kind="stream", records=records)
        result = QueryResult()
        # Serf ends every query with "done" at its deadline; the margin covers a slow loop.
        deadline = (timeout_s or 60.0) + 5.0
        try:
            async with asyncio.timeout(deadline):
                while True:
                    item = await records.get()
                    if isinstance(item, SerfConnectionError):
                        raise SerfConnectionError(f"serf query: {item}")
                    record = _convert("query", item.body, dict[str, Any])
                    kind, sender = record.get("Type"), record.get("From")
                    if kind == "done":
                        return result
                    if not isinstance(sender, str):
                        raise SerfProtocolError("query", f"record without sender: {record}")
                    if not sender:
                        # Serf closes the query's channels at its deadline, and its RPC loop
                        # may read their zero value (an ack or response from "") before it
                        # sends "done": nothing more can arrive.
                        return result
                    if kind == "ack":
                        result.acks.add(sender)
                    elif kind == "response":
                        result.responses[sender] = bytes(record.get("Payload") or b"")
                        if enough is not None and enough(result.responses):
                            return result
        except TimeoutError:
            raise SerfRPCError("query", f"no 'done' within {deadline:.0f} s") from None
        finally:
            self._records.pop(frame.seq, None)
