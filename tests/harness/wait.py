"""The one way to wait in tests: poll a predicate until it holds, bounded in time.

`wait_for` blocks (namespace tests drive real processes from the test thread);
`async_wait_for` is the same loop for tests that run inside an event loop (in-process gpud
services). Both treat a predicate's exception as "not yet", stop at once on WaitAbort, and
time out with a message naming what was awaited and the last value seen.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tests.harness.netns import HarnessError

T = TypeVar("T")


class WaitTimeout(HarnessError):
    pass


class WaitAbort(HarnessError):
    """Raised by a wait_for predicate to stop waiting at once (e.g. the process died)."""


def _timeout_message(
    what: str,
    timeout: float,
    attempts: int,
    last: Any,
    describe: Callable[[], str] | None,
) -> str:
    detail = f"{type(last).__name__}: {last}" if isinstance(last, Exception) else repr(last)
    message = (
        f"timed out after {timeout:.1f}s ({attempts} tries) waiting for {what}; last: {detail}"
    )
    if describe is not None:
        try:
            message += "\n" + describe()
        except Exception as exc:
            message += f"\n(describe failed: {exc})"
    return message


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.5,
    *,
    what: str = "condition",
    describe: Callable[[], str] | None = None,
) -> T:
    """Call ``predicate`` until it returns something truthy (returned) or ``timeout`` passes;
    then raise WaitTimeout naming ``what``, the last value or exception and ``describe()``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    attempts = 0
    while True:
        attempts += 1
        try:
            last = predicate()
        except WaitAbort:
            raise
        except Exception as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise WaitTimeout(_timeout_message(what, timeout, attempts, last, describe))
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


async def async_wait_for(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float,  # noqa: ASYNC109 -- the same signature as wait_for; the loop is bounded
    interval: float = 0.3,
    *,
    what: str = "condition",
    describe: Callable[[], str] | None = None,
) -> T:
    """`wait_for` inside an event loop; ``predicate`` may be a plain or an async function."""
    deadline = time.monotonic() + timeout
    last: Any = None
    attempts = 0
    while True:
        attempts += 1
        try:
            value = predicate()
            last = await value if inspect.isawaitable(value) else value
        except WaitAbort:
            raise
        except Exception as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise WaitTimeout(_timeout_message(what, timeout, attempts, last, describe))
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def seconds_until(
    predicate: Callable[[], object],
    timeout: float,
    interval: float = 0.5,
    *,
    since: float | None = None,
    what: str = "condition",
    describe: Callable[[], str] | None = None,
) -> float:
    """What benches measure: seconds from ``since`` (a time.monotonic() reading, default now)
    until ``predicate`` holds, by `wait_for`; the wait gives up ``timeout`` s after ``since``."""
    began = time.monotonic() if since is None else since
    left = max(0.0, began + timeout - time.monotonic())
    wait_for(predicate, left, interval, what=what, describe=describe)
    return time.monotonic() - began


async def async_seconds_until(
    predicate: Callable[[], object],
    timeout: float,  # noqa: ASYNC109 -- as seconds_until; the loop is bounded
    interval: float = 0.3,
    *,
    since: float | None = None,
    what: str = "condition",
    describe: Callable[[], str] | None = None,
) -> float:
    """`seconds_until` inside an event loop, by `async_wait_for`."""
    began = time.monotonic() if since is None else since
    left = max(0.0, began + timeout - time.monotonic())
    await async_wait_for(predicate, left, interval, what=what, describe=describe)
    return time.monotonic() - began
