"""The CLI against a socket that answers what a broken or hostile daemon might: every reply of an
unexpected shape is one clear line and exit 1, never a traceback; strings from outside are
escaped before they reach the terminal."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.cli import render_members, render_status
from gpud.component import Problem
from gpud.context import Member
from gpud.status import NodeSection, StatusDocument
from gpud.tags import Tags
from gpud.text import escape, table

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
        (["ports", "lease", "--owner", "me", "--count", "1", "--json"], b"[1, 2]"),
        (["members", "--json"], b"not json"),
        (["status"], b"<html>busy</html>"),
        (["gpus"], b"{}"),
        (["gpus"], b'{"summary": "x", "gpus": "all"}'),
        (["gpus", "lease", "--owner", "me", "--count", "1"], b'{"id": "g"}'),
        (["keys"], b'{"nodes": "3"}'),
        (["keys", "install", "k"], b"[]"),
        (["deploy", "list"], b'{"deployments": 1}'),
        (["deploy", "status", "m"], b"{}"),
        (["deploy", "delete", "m"], b'{"name": 1}'),
        (["health"], b'{"state": "passing"}'),
        (["network"], b'{"advertise": 1}'),
        (["ray"], b'{"enabled": true, "role": 3}'),
        (["drain"], b'{"running_here": 2}'),
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


@pytest.mark.parametrize(
    ("argv", "path"),
    [
        (["gpus", "release", "x?y=1"], "DELETE /v1/gpus/leases/x%3Fy%3D1"),
        (["deploy", "status", "../keys"], "GET /v1/deployments/..%2Fkeys"),
        (["deploy", "delete", "m#1"], "DELETE /v1/deployments/m%231"),
    ],
)
def test_names_are_one_quoted_path_segment(tmp_path: Path, argv: list[str], path: str) -> None:
    sock, seen = tmp_path / "gpud.sock", []
    with answering(sock, b"{}", seen=seen):
        gpud(*argv, "--socket", str(sock))
    assert seen == [f"{path} HTTP/1.1"]


def test_a_silent_daemon_is_exit_3_after_the_timeout(tmp_path: Path) -> None:
    """A socket that accepts and never answers: exit 3 after --timeout, not 30 s and exit 1."""
    sock = tmp_path / "gpud.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(sock))
        server.listen(8)
        began = time.monotonic()
        result = gpud("members", "--timeout", "0.5", "--socket", str(sock))
        took = time.monotonic() - began
    assert result.returncode == 3, result
    assert "did not answer GET /v1/members" in result.stderr and "--timeout" in result.stderr
    assert took < 10, took


def test_nobody_listening_and_an_error_reply_have_their_own_codes(tmp_path: Path) -> None:
    sock = tmp_path / "gpud.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(sock))  # a socket file with no listener: a crashed daemon's
        result = gpud("status", "--socket", str(sock))
    assert result.returncode == 3 and "gpud is not running" in result.stderr, result
    sock.unlink()
    with answering(sock, b'{"error": "admin only"}', status=403):
        refused = gpud("keys", "--socket", str(sock))
    assert refused.returncode == 1 and refused.stderr == "gpud: admin only\n", refused


@pytest.mark.parametrize("value", ["0", "-1", "abc", "4000"])
def test_a_bad_timeout_is_a_usage_error(value: str) -> None:
    result = gpud("status", "--timeout", value, "--socket", "/nonexistent")
    assert result.returncode == 2 and "--timeout" in result.stderr, result


def test_help_documents_exit_codes_and_the_environment() -> None:
    text = " ".join(gpud("--help").stdout.split())
    assert "3 the daemon could not be asked" in text and "GPUD_SOCKET" in text
    status = " ".join(gpud("status", "--help").stdout.split())
    assert "--timeout S" in status and "exit 3" in status


names = st.text(st.characters(codec="utf-8"), min_size=0, max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(names, names, names), max_size=6))
def test_table_columns_line_up_whatever_the_data(rows: list[tuple[str, str, str]]) -> None:
    """Every cell starts where its header starts, however long the cells before it."""
    cells = [[escape(c).replace(" ", "_") for c in row] for row in rows]
    lines = table(["NAME", "ADDRESS", "TAGS"], cells).split("\n")
    header = lines[0]
    starts = [header.index("NAME"), header.index("ADDRESS"), header.index("TAGS")]
    assert len(lines) == len(rows) + 1
    for line, row in zip(lines[1:], cells, strict=True):
        line = line.ljust(starts[-1] + 50)  # trailing blanks are not printed
        for start, cell in zip(starts, row, strict=True):
            assert line[start : start + len(cell)] == cell
            assert start == 0 or line[start - 2 : start] == "  "


def test_members_table_keeps_long_names_in_line() -> None:
    long = "gpu-node-with-a-very-long-hostname-042.rack7.example.internal"
    members = [
        Member(name=long, addr="10.0.0.1", port=7946, status="alive", tags=Tags(gpu=8)),
        Member(
            name="h2", addr="10.0.0.22", port=7946, status="failed", tags=None, tags_error="bad"
        ),
    ]
    header, first, second = render_members(members).splitlines()
    column = header.index("ADDRESS")
    assert first[column:].startswith("10.0.0.1:7946") and second[column:].startswith("10.0.0.22")
    assert first.index("alive") == second.index("failed") == header.index("STATUS")


def test_man_page_lists_every_command_and_option() -> None:
    from gpud.cli import build_parser
    from gpud.manpage import _options, _walk

    page = gpud("manpage").stdout
    rendered = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-rHY=0", "-rLL=400n", "-P-cbou"],
        input=page,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr
    text = rendered.stdout
    for words, _, sub in _walk(build_parser()):
        assert f"gpud {' '.join(words)}" in text, words
        for action in _options(sub):
            for flag in action.option_strings:
                assert flag in text, (words, flag)
    assert "gpud ports lease" in text and "--contiguous" in text and "EXIT STATUS" in text


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("gpud po", "ports"),
        ("gpud ports ", "lease release --help --config --socket --timeout --json"),
        ("gpud ports lease --c", "--count --contiguous --config"),
        ("gpud deploy st", "status"),
        ("gpud --socket /tmp/x sta", "status"),
    ],
)
def test_bash_completion_completes_commands_and_options(
    tmp_path: Path, line: str, expected: str
) -> None:
    script = tmp_path / "gpud.bash"
    script.write_text(gpud("completion", "bash").stdout)
    words = line.split() + ([""] if line.endswith(" ") else [])
    probe = (
        f"source {script}; COMP_WORDS=({' '.join(repr(w) for w in words)}); "
        f'COMP_CWORD={len(words) - 1}; _gpud; echo "${{COMPREPLY[*]}}"'
    )
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert result.stdout.split() == expected.split(), result


def test_version_flag() -> None:
    from gpud import __version__

    result = gpud("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"gpud {__version__}"
