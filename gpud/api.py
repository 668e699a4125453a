"""The local API: JSON over HTTP on a Unix socket (aiohttp).

Components contribute their own routes; this module adds /v1/status, /v1/gpus and /metrics,
and turns every error into a JSON body: `{"error": "..."}` with a fitting status.
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from gpud import log
from gpud.errors import ApiError

_log = log.get("api")

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(data), status=status, content_type="application/json"
    )


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(
            405, f"method {request.method} not allowed on {request.path}; use {allowed}"
        )
    except web.HTTPNotFound:
        return error_response(404, f"no such endpoint: {request.path}")
    except web.HTTPException as exc:
        return error_response(exc.status, exc.reason)
    except Exception:
        _log.exception("request failed", extra={"gpud_fields": {"path": request.path}})
        return error_response(500, "internal error; see the gpud journal")


async def read_body(
    request: web.Request, schema: type[T], *, what: str = "body", limit: int = 64 * 1024
) -> T:
    """Decode a JSON request body into ``schema``; ApiError(400/413) with the reason otherwise."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"body larger than {limit} bytes")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise ApiError(413, f"body larger than {limit} bytes")
    try:
        return msgspec.json.decode(raw, type=schema)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"bad {what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"bad {what}: not valid JSON: {exc}") from None


def make_app(routes: list[web.RouteDef]) -> web.Application:
    app = web.Application(middlewares=[errors_as_json], client_max_size=256 * 1024)
    app.add_routes(routes)
    return app


async def serve_unix(app: web.Application, path: str, *, mode: int, group: str) -> web.AppRunner:
    """Listen on the Unix socket ``path`` (mode, group applied before the first request)."""
    sock_path = Path(path)
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_socket(sock_path)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.UnixSite(runner, path)
    await site.start()
    os.chmod(path, mode)
    try:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    except KeyError:
        log.warning(_log, "socket group does not exist; socket left in root's group", group=group)
    except PermissionError:
        log.warning(_log, "cannot change the socket's group", group=group)
    return runner


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a crashed gpud; refuse if another gpud still answers on it."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    finally:
        probe.close()
    from gpud.errors import GpudError

    raise GpudError(f"another gpud is already listening on {path}")
