"""A small synchronous client for the local Unix-socket API (stdlib only: the CLI starts fast)."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from gpud.errors import GpudError

EXIT_NOT_RUNNING = 3


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
