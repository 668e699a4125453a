"""The CLI's HTTP/1.1 client over the Unix socket (gpud.client.exchange): replies read whole
whichever way the server frames them, and every malformed or cut-off reply is a one-line
TransportError, never a traceback or a hang."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud import client
from gpud.client import ProtocolError, TransportError, exchange, request_raw


def _serve_once(path: str, reply: bytes, requests: list[bytes]) -> threading.Thread:
    """A real Unix-socket server that reads one request head, sends ``reply`` and closes."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def run() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                requests.append(data)
                conn.sendall(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "api.sock"
    yield str(path)
    path.unlink(missing_ok=True)


def _roundtrip(path: str, reply: bytes) -> tuple[client.Reply, bytes]:
    requests: list[bytes] = []
    thread = _serve_once(path, reply, requests)
    got = exchange(path, "GET", "/v1/status", timeout=5)
    thread.join(5)
    return got, requests[0]


def _chunked(body: bytes, sizes: list[int]) -> bytes:
    out, rest = b"", body
    for size in sizes:
        if not rest:
            break
        piece, rest = rest[:size], rest[size:]
        out += f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n"
    if rest:
        out += f"{len(rest):X}\r\n".encode() + rest + b"\r\n"
    return out + b"0\r\n\r\n"


@settings(max_examples=60, deadline=None)
@given(
    body=st.binary(max_size=3000),
    sizes=st.lists(st.integers(1, 700), max_size=8),
    framing=st.sampled_from(["length", "chunked", "close"]),
)
def test_a_reply_reads_back_whole_however_it_is_framed(
    tmp_path_factory: pytest.TempPathFactory, body: bytes, sizes: list[int], framing: str
) -> None:
    path = str(tmp_path_factory.mktemp("s") / "api.sock")
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    if framing == "length":
        # Bytes after the announced length are not part of the reply.
        reply = head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body + b"junk"
    elif framing == "chunked":
        reply = head + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(body, sizes)
    else:
        reply = head + b"\r\n" + body
    got, request = _roundtrip(path, reply)
    assert (got.status, got.body) == (200, body)
    assert got.headers["content-type"] == "application/json"
    assert request.startswith(b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n")
    assert b"Connection: close\r\n" in request


@pytest.mark.parametrize(
    ("reply", "says"),
    [
        (b"", "before the reply's header ended"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP reply"),
        (b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "ended after 3 of 10 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "inside a chunk"),
    ],
)
def test_a_malformed_or_cut_reply_is_one_transport_error(
    sock_path: str, reply: bytes, says: str
) -> None:
    thread = _serve_once(sock_path, reply, [])
    with pytest.raises(TransportError, match=says) as caught:
        request_raw(sock_path, "GET", "/v1/status", timeout=5)
    thread.join(5)
    assert "\n" not in str(caught.value)


def test_a_reply_larger_than_the_limit_is_refused(sock_path: str) -> None:
    thread = _serve_once(sock_path, b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 5000, [])
    with pytest.raises(ProtocolError, match="larger than 1000 bytes"):
        exchange(sock_path, "GET", "/v1/status", timeout=5, limit=1000)
    thread.join(5)


def test_an_error_status_carries_the_servers_message(sock_path: str) -> None:
    body = b'{"error": "no such lease: x"}'
    reply = b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    thread = _serve_once(sock_path, reply, [])
    with pytest.raises(client.ApiRefused, match="no such lease: x") as caught:
        request_raw(sock_path, "DELETE", "/v1/ports/leases/x", timeout=5)
    thread.join(5)
    assert caught.value.status == 404


def test_a_server_that_never_answers_times_out(sock_path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(1)
    with server, pytest.raises(TransportError, match="did not answer GET /v1/status"):
        request_raw(sock_path, "GET", "/v1/status", timeout=0.3)


def test_a_missing_socket_says_gpud_is_not_running(sock_path: str) -> None:
    with pytest.raises(TransportError, match="gpud is not running"):
        request_raw(sock_path, "GET", "/v1/status", timeout=1)


def test_a_body_is_sent_as_json_with_its_length(sock_path: str) -> None:
    requests: list[bytes] = []
    thread = _serve_once(sock_path, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", requests)
    assert request_raw(sock_path, "POST", "/v1/ports/leases", {"count": 2}, timeout=5) == b"{}"
    thread.join(5)
    assert b"Content-Type: application/json\r\n" in requests[0]
    assert b"Content-Length: 11\r\n" in requests[0]
