"""The one TCP connect probe: connect to addr:port (optionally from a source address), close.

Used for peers' API ports and for announced service ports (a Ray head's GCS). The outcome
carries the round-trip time or the cause in words an operator can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time

import msgspec


class TcpProbe(msgspec.Struct, frozen=True):
    ok: bool
    rtt_ms: float | None = None
    # Why it failed ("" when ok).
    error: str = ""


def describe_os_error(exc: OSError) -> str:
    """A connect error as its likely cause."""
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return "connection refused (nothing listens, or a firewall rejects)"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"no route ({exc.strerror})"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "source address not available on this host"
    return exc.strerror or str(exc)


async def tcp_connect(
    addr: str, port: int, timeout_s: float, *, source_addr: str | None = None
) -> TcpProbe:
    """TCP connect to ``addr:port`` within ``timeout_s``, then close."""
    start = time.perf_counter()
    local = (source_addr, 0) if source_addr else None
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(addr, port, local_addr=local)
    except TimeoutError:
        return TcpProbe(
            ok=False, error=f"TCP connect timed out after {timeout_s:g} s (packets dropped?)"
        )
    except OSError as exc:
        return TcpProbe(ok=False, error=f"TCP connect: {describe_os_error(exc)}")
    rtt_ms = (time.perf_counter() - start) * 1000
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return TcpProbe(ok=True, rtt_ms=rtt_ms)
