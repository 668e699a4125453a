"""The client side of the local Unix-socket API: the HTTP client and all CLI plumbing.

Every client command (`gpud status`, `gpud ports ...`, ...) registers itself with
``client_command`` and talks to the daemon through ``api_get``/``api_call``; replies are
decoded into typed structs, so a reply of an unexpected shape is one clear line, never a
traceback. Stdlib and msgspec only, and nothing of the agent (aiohttp, pyroute2, NVML, SQLite):
`gpud status` must start fast (tests/core/test_cli_agent.py holds every client command to that).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from gpud.errors import GpudError

EXIT_OK = 0
# The daemon answered: a critical problem, a refused request, a reply this client cannot read.
EXIT_PROBLEM = 1
EXIT_USAGE = 2
# The daemon could not be asked: no socket, nobody listening, no answer within --timeout,
# permission denied. Scripts retry or alert on this one, not on 1.
EXIT_TRANSPORT = 3

SOCKET_ENV = "GPUD_SOCKET"
# Seconds a client command waits for the daemon (--timeout). /v1/status answers in about a
# millisecond; a daemon that takes seconds is hung, and an operator should hear so at once.
DEFAULT_TIMEOUT_S = 5.0

T = TypeVar("T")


class TransportError(GpudError):
    """The daemon could not be asked, or did not answer (exit 3)."""


class ApiRefused(GpudError):
    """The daemon answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Reply(msgspec.Struct, frozen=True):
    """One HTTP reply: status, headers (names lower-cased), body."""

    status: int
    headers: dict[str, str]
    body: bytes


class ProtocolError(GpudError):
    """The bytes that came back are not an HTTP/1.1 reply this client can read."""


# Enough for any reply of the local API (a status of thousands of members is a few MiB); a
# socket that sends more is not gpud's.
MAX_REPLY_BYTES = 64 * 1024 * 1024


def exchange(
    socket_path: str,
    method: str,
    path: str,
    payload: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    timeout: float = 30.0,
    limit: int = MAX_REPLY_BYTES,
) -> Reply:
    """One HTTP/1.1 request on a fresh Unix-socket connection, read to the end of its reply.

    Hand-written rather than http.client: that module pulls in email and ssl, a third of what
    `gpud status` spends importing, for a server that is always our own aiohttp. Raises OSError
    (connect, send, a timeout of any one read) or ProtocolError."""
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if payload is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(payload or b'')}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(socket_path)
        sock.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (payload or b""))
        return _read_reply(sock, limit)
    finally:
        sock.close()


def _read_reply(sock: socket.socket, limit: int) -> Reply:
    buffer = bytearray()

    def more() -> bool:
        data = sock.recv(65536)
        buffer.extend(data)
        if len(buffer) > limit:
            raise ProtocolError(f"reply larger than {limit} bytes")
        return bool(data)

    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if not more():
            raise ProtocolError("connection closed before the reply's header ended")
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    del buffer[: end + 4]
    parts = head[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP reply: {head[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in head[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _read_chunked(buffer, more)
    elif (length := headers.get("content-length")) is not None:
        if not length.isdigit():
            raise ProtocolError(f"bad Content-Length {length[:40]!r}")
        while len(buffer) < int(length):
            if not more():
                raise ProtocolError(f"reply body ended after {len(buffer)} of {length} bytes")
        body = bytes(buffer[: int(length)])
    else:
        while more():
            pass
        body = bytes(buffer)
    return Reply(int(parts[1]), headers, body)


def _read_chunked(buffer: bytearray, more: Callable[[], bool]) -> bytes:
    body = bytearray()
    while True:
        while (end := buffer.find(b"\r\n")) < 0:
            if not more():
                raise ProtocolError("connection closed inside a chunked body")
        size_text = bytes(buffer[:end]).split(b";")[0].strip()
        if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):  # int() takes -1, 0x1
            raise ProtocolError(f"bad chunk size {size_text[:20]!r}")
        size = int(size_text, 16)
        del buffer[: end + 2]
        if size == 0:
            return bytes(body)  # trailers, if any, are not read: the connection closes
        while len(buffer) < size + 2:
            if not more():
                raise ProtocolError("connection closed inside a chunk")
        body += buffer[:size]
        del buffer[: size + 2]


def request_raw(
    socket_path: str, method: str, path: str, body: Any = None, *, timeout: float = 30.0
) -> bytes:
    """Call the local API; returns the reply's body, or raises with a one-line message:
    TransportError when the daemon cannot be asked, ApiRefused when it says no."""
    payload = None if body is None else msgspec.json.encode(body)
    headers = {"Content-Type": "application/json"} if payload is not None else {}
    try:
        reply = exchange(socket_path, method, path, payload, headers, timeout=timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        raise TransportError(
            f"gpud is not running (no answer on {socket_path}); start it with "
            "`systemctl start gpud` or `gpud agent`, or name its socket with --socket or "
            f"${SOCKET_ENV}"
        ) from None
    except PermissionError:
        raise TransportError(
            f"permission denied on {socket_path}: run as root or as a member of the socket's group"
        ) from None
    except TimeoutError:
        raise TransportError(
            f"gpud did not answer {method} {path} on {socket_path} within {timeout:g}s: it is "
            "hung or overloaded; see `journalctl -u gpud`, or wait longer with --timeout"
        ) from None
    except (OSError, ProtocolError) as exc:
        raise TransportError(f"talking to gpud on {socket_path} failed: {exc}") from None
    if reply.status >= 400:
        try:
            data = msgspec.json.decode(reply.body)
        except msgspec.DecodeError:
            data = None
        message = data.get("error") if isinstance(data, dict) else None
        if not isinstance(message, str):
            message = f"HTTP {reply.status}"
        raise ApiRefused(reply.status, message)
    return reply.body


def request(
    socket_path: str, method: str, path: str, body: Any = None, *, timeout: float = 30.0
) -> Any:
    """Call the local API; returns the decoded JSON body or raises with a one-line message."""
    raw = request_raw(socket_path, method, path, body, timeout=timeout)
    try:
        return msgspec.json.decode(raw) if raw else None
    except msgspec.DecodeError:
        raise GpudError(f"gpud answered {method} {path} with a body that is not JSON") from None


# ---- CLI plumbing -------------------------------------------------------------------------

CONFIG_HELP = "config file (default: $GPUD_CONFIG or /etc/gpud/gpud.toml)"
CLIENT_EPILOG = (
    f"exit status: 0 ok, 1 the daemon answered with a problem, 2 usage or config error, "
    f"{EXIT_TRANSPORT} the daemon could not be asked (no socket, not listening, no answer "
    f"within --timeout); ${SOCKET_ENV} names the socket"
)


def client_options(
    parser: argparse.ArgumentParser, *, nested: bool = False, timeout: bool = True
) -> None:
    """--config, --socket, --timeout and --json. ``nested``: on a sub-action (`gpud ports
    lease`), where SUPPRESS keeps values given before the action (`gpud ports --socket S
    lease`). ``timeout=False`` where the command's own --timeout means something else."""
    default: Any = argparse.SUPPRESS if nested else None
    parser.add_argument("--config", default=default, help=CONFIG_HELP)
    parser.add_argument(
        "--socket",
        default=default,
        help=f"local API socket (default: ${SOCKET_ENV}, else api.socket of the config)",
    )
    if timeout:
        parser.add_argument(
            "--timeout",
            type=_seconds,
            default=argparse.SUPPRESS if nested else DEFAULT_TIMEOUT_S,
            metavar="S",
            help=f"seconds to wait for the daemon's answer, then exit 3 "
            f"(default {DEFAULT_TIMEOUT_S:g})",
        )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if nested else False,
        help="print the API's reply as JSON, exactly as it answered",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3600 s: {text}")
    return value


def client_command(
    sub: Any,
    name: str,
    help_text: str,
    handler: Callable[[argparse.Namespace], int],
    *,
    timeout: bool = True,
) -> argparse.ArgumentParser:
    """Register a client command on the top-level subparsers."""
    cmd = sub.add_parser(name, help=help_text, description=help_text, epilog=CLIENT_EPILOG)
    client_options(cmd, timeout=timeout)
    cmd.set_defaults(func=handler)
    return cmd


def socket_path(args: argparse.Namespace) -> str:
    """--socket, then $GPUD_SOCKET, then the config's api.socket (or its default)."""
    if getattr(args, "socket", None):
        return args.socket
    if os.environ.get(SOCKET_ENV):
        return os.environ[SOCKET_ENV]
    from gpud import config

    # A --config that names a missing file is an error; only the default may be absent.
    explicit = getattr(args, "config", None)
    return config.load(config.config_path(explicit), missing_ok=explicit is None).socket_path


def path_part(value: str) -> str:
    """``value`` as one path segment of an API URL: an id like ``x?y=1`` or ``../x`` must
    name that id, not another resource or a query."""
    return urllib.parse.quote(value, safe="")


def request_timeout(args: argparse.Namespace) -> float:
    timeout = getattr(args, "timeout", None)
    # `gpud drain --timeout` is how long the drain may take, not one request's deadline.
    drain = getattr(args, "command", None) == "drain"
    return DEFAULT_TIMEOUT_S if drain or timeout is None else timeout


def api_get(args: argparse.Namespace, path: str, type: type[T] = Any) -> T:
    return api_call(args, "GET", path, type=type)


def api_call(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: Any = None,
    type: type[T] = Any,
) -> T:
    """Call the daemon and decode the reply as ``type`` (a msgspec-compatible type)."""
    return api_exchange(args, method, path, body, type)[0]


def api_exchange(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: Any = None,
    type: type[T] = Any,
) -> tuple[T, bytes]:
    """``api_call``, and the reply's bytes too: `--json` prints them as the API gave them."""
    raw = request_raw(socket_path(args), method, path, body, timeout=request_timeout(args))
    return decode(raw, type, f"{method} {path}"), raw


def decode(raw: bytes, type: type[T], what: str) -> T:
    """``raw`` JSON as ``type``; a reply of another shape is one line naming the request."""
    try:
        return msgspec.json.decode(raw or b"null", type=type)
    except msgspec.DecodeError as exc:
        raise GpudError(
            f"gpud answered {what} with a reply this client does not understand "
            f"({exc}); is the daemon the same version as this command?"
        ) from None


def print_api_json(args: argparse.Namespace, path: str) -> None:
    """`--json`: GET ``path`` and print the reply as the API gave it (pretty-printed)."""
    raw = request_raw(socket_path(args), "GET", path, timeout=request_timeout(args))
    decode(raw, Any, f"GET {path}")  # not JSON: one line, as for a typed reply
    print_raw_json(raw)


def print_raw_json(raw: bytes) -> None:
    sys.stdout.write(msgspec.json.format(raw).decode() + "\n")
