"""The client side of the local Unix-socket API: the HTTP client and all CLI plumbing.

Every client command (`gpud status`, `gpud ports ...`, ...) registers itself with
``client_command`` and talks to the daemon through ``api_get``/``api_call``; replies are
decoded into typed structs, so a reply of an unexpected shape is one clear line, never a
traceback. Stdlib and msgspec only: the CLI must start fast.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from gpud.errors import GpudError

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3

T = TypeVar("T")


class DaemonNotRunning(GpudError):
    """Nothing answers on the socket."""


class ApiRefused(GpudError):
    """The daemon answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def request(
    socket_path: str, method: str, path: str, body: Any = None, *, timeout: float = 30.0
) -> Any:
    """Call the local API; returns the decoded JSON body or raises with a one-line message."""
    conn = _UnixConnection(socket_path, timeout)
    payload = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if payload is not None else {}
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except (FileNotFoundError, ConnectionRefusedError):
        raise DaemonNotRunning(
            f"gpud is not running (no answer on {socket_path}); start it with "
            "`systemctl start gpud` or `gpud agent`"
        ) from None
    except PermissionError:
        raise GpudError(
            f"permission denied on {socket_path}: run as root or as a member of the socket's group"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise GpudError(f"talking to gpud on {socket_path} failed: {exc}") from None
    finally:
        conn.close()
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        raise GpudError(f"gpud answered {response.status} with a body that is not JSON") from None
    if response.status >= 400:
        message = data.get("error") if isinstance(data, dict) else None
        raise ApiRefused(response.status, message or f"HTTP {response.status}")
    return data


# ---- CLI plumbing -------------------------------------------------------------------------

CONFIG_HELP = "config file (default: $GPUD_CONFIG or /etc/gpud/gpud.toml)"


def client_options(parser: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """--config, --socket and --json. ``nested``: on a sub-action (`gpud ports lease`), where
    SUPPRESS keeps values given before the action (`gpud ports --socket S lease`)."""
    default: Any = argparse.SUPPRESS if nested else None
    parser.add_argument("--config", default=default, help=CONFIG_HELP)
    parser.add_argument(
        "--socket", default=default, help="local API socket (default: from the config)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if nested else False,
        help="print JSON as the API returns it",
    )


def client_command(
    sub: Any, name: str, help_text: str, handler: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """Register a client command on the top-level subparsers."""
    cmd = sub.add_parser(name, help=help_text, description=help_text)
    client_options(cmd)
    cmd.set_defaults(func=handler)
    return cmd


def socket_path(args: argparse.Namespace) -> str:
    if getattr(args, "socket", None):
        return args.socket
    from gpud import config

    # A --config that names a missing file is an error; only the default may be absent.
    explicit = getattr(args, "config", None)
    return config.load(config.config_path(explicit), missing_ok=explicit is None).socket_path


def path_part(value: str) -> str:
    """``value`` as one path segment of an API URL: an id like ``x?y=1`` or ``../x`` must
    name that id, not another resource or a query."""
    return urllib.parse.quote(value, safe="")


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
    data = request(socket_path(args), method, path, body)
    try:
        return msgspec.convert(data, type=type)
    except msgspec.ValidationError as exc:
        raise GpudError(
            f"gpud answered {method} {path} with a reply this client does not understand "
            f"({exc}); is the daemon the same version as this command?"
        ) from None


def print_json(data: Any) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(data)).decode() + "\n")
