"""The CLI against a socket that answers what a broken or hostile daemon might: every reply of an
unexpected shape is one clear line and exit 1, never a traceback; strings from outside are
escaped before they reach the terminal."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gpud.cli import render_status
from gpud.component import Problem
from gpud.context import Member
from gpud.status import NodeSection, StatusDocument
from gpud.tags import Tags

ESC = "\x1b"


@contextmanager
def answering(
    path: Path, body: bytes, status: int = 200, seen: list[str] | None = None
) -> Iterator[None]:
    """A Unix-socket HTTP server that answers every request with ``body`` (bounded: 50
    requests); the request lines it got go to ``seen``."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        served = 0
        while not stop.is_set() and served < 50:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                request = conn.recv(65536)
                # Read the whole request (a POST body may come in a second send).
                head_end = request.find(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in request[:head_end].split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                while head_end >= 0 and len(request) < head_end + 4 + length:
                    request += conn.recv(65536)
                if seen is not None:
                    seen.append(request.split(b"\r\n", 1)[0].decode())
                head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                conn.sendall(head.encode() + body)
            served += 1

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        server.close()


def gpud(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpud", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("command", "body"),
    [
        (["status"], b"[]"),
        (["status"], b'{"node": 1}'),
        (["status"], b'{"node": {"name": "x"}, "members": "many"}'),
        (["members"], b'{"members": [{"name": 3}]}'),
        (["members"], b"null"),
        (["doctor"], b'{"problems": [{"severity": "bad"}]}'),
        (["doctor"], b'"text"'),
        (["ports"], b"{}"),
        (["ports"], b"[]"),
        (["ports"], b'{"summary": "x", "reservation": "ok", "leases": [{"id": 1}]}'),
        (["ports"], b'{"summary": "x", "reservation": "ok", "warnings": "w"}'),
        (["ports", "lease", "--owner", "me", "--count", "1"], b'{"id": "a"}'),
        (["ports", "lease", "--owner", "me", "--count", "1"], b"[1, 2]"),
        (["ports", "lease", "--owner", "me", "--count", "1"], b"null"),
    ],
)
def test_unexpected_reply_is_one_line_not_a_traceback(
    tmp_path: Path, command: list[str], body: bytes
) -> None:
    sock = tmp_path / "gpud.sock"
    with answering(sock, body):
        result = gpud(*command, "--socket", str(sock))
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not understand" in lines[0], result.stderr


def test_missing_config_file_is_an_error_for_client_commands(tmp_path: Path) -> None:
    result = gpud("status", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2, result
    assert "nope.toml" in result.stderr and "Traceback" not in result.stderr


def _document(name: str, problem_text: str) -> StatusDocument:
    return StatusDocument(
        node=NodeSection(name=name, addr="10.0.0.1", version="0", pid=1, uptime_s=1.0, tags=Tags()),
        members=[Member(name=name, addr="10.0.0.1", port=7946, status="alive", tags=Tags())],
        summaries={"health": f"passing {ESC}[2J"},
        problems=[
            Problem(
                code="health.data-path",
                severity="critical",
                subject=name,
                message=problem_text,
                fix="check it",
            )
        ],
    )


def test_status_escapes_strings_from_outside() -> None:
    evil = f"h1{ESC}]0;owned\a\nroot$ "
    text = render_status(_document(evil, f"peer {evil} unreachable"))
    assert ESC not in text and "\a" not in text
    assert "h1\\x1b]0;owned\\x07\\nroot$ " in text
    assert "(health.data-path)" in text and "[critical]" in text


def test_status_over_the_socket_renders_the_typed_document(tmp_path: Path) -> None:
    import msgspec

    body = msgspec.json.encode(_document("h0", "peer h9 unreachable"))
    sock = tmp_path / "gpud.sock"
    with answering(sock, body):
        result = gpud("status", "--socket", str(sock))
        as_json = gpud("status", "--json", "--socket", str(sock))
    assert result.returncode == 0, result.stderr
    assert "1 problem(s):" in result.stdout and "peer h9 unreachable" in result.stdout
    assert json.loads(as_json.stdout)["node"]["name"] == "h0"


@pytest.mark.parametrize(
    ("lease_id", "path"),
    [
        ("x?y=1", "/v1/ports/leases/x%3Fy%3D1"),
        ("../status", "/v1/ports/leases/..%2Fstatus"),
        ("a b#c", "/v1/ports/leases/a%20b%23c"),
    ],
)
def test_release_quotes_the_id(tmp_path: Path, lease_id: str, path: str) -> None:
    sock, seen = tmp_path / "gpud.sock", []
    with answering(sock, b"{}", seen=seen):
        result = gpud("ports", "release", lease_id, "--socket", str(sock))
    assert result.returncode == 0, result.stderr
    assert seen == [f"DELETE {path} HTTP/1.1"]


def test_version_flag() -> None:
    from gpud import __version__

    result = gpud("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"gpud {__version__}"
