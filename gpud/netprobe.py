"""The one TCP connect probe: connect to addr:port (optionally from a source address), close.

Used for peers' API ports and for announced service ports (a Ray head's GCS). The outcome
carries the round-trip time, or the failure in words an operator can act on and its cause
as a code that verdicts read (never the words).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from typing import Literal

import msgspec

# What a failed probe says about the far end: refused means the host answered and nothing
# listens (or a firewall rejects); timeout means nothing answered at all (a stopped process
# or a dropping firewall); other is anything else (no route, the wrong node, a bad reply).
ProbeCause = Literal["refused", "timeout", "other"]


class ProbeOutcome(msgspec.Struct, frozen=True):
    """One data-path probe: a TCP connect, and for a peer the authenticated ping after it."""

    ok: bool
    rtt_ms: float | None = None
    # Why it failed ("" when ok).
    error: str = ""
    # The failure's cause (None when ok, or from a peer that does not send one).
    cause: ProbeCause | None = None


def os_error_cause(exc: OSError) -> ProbeCause:
    refused = isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED
    return "refused" if refused else "other"


def describe_os_error(exc: OSError) -> str:
    """A connect error as its likely cause."""
    if os_error_cause(exc) == "refused":
        return "connection refused (nothing listens, or a firewall rejects)"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"no route ({exc.strerror})"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "source address not available on this host"
    return exc.strerror or str(exc)


async def tcp_connect(
    addr: str, port: int, timeout_s: float, *, source_addr: str | None = None
) -> ProbeOutcome:
    """TCP connect to ``addr:port`` within ``timeout_s``, then close."""
    start = time.perf_counter()
    local = (source_addr, 0) if source_addr else None
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(addr, port, local_addr=local)
    except TimeoutError:
        return ProbeOutcome(
            ok=False,
            error=f"TCP connect timed out after {timeout_s:g} s (packets dropped?)",
            cause="timeout",
        )
    except OSError as exc:
        return ProbeOutcome(
            ok=False, error=f"TCP connect: {describe_os_error(exc)}", cause=os_error_cause(exc)
        )
    rtt_ms = (time.perf_counter() - start) * 1000
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ProbeOutcome(ok=True, rtt_ms=rtt_ms)
