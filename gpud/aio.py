"""asyncio helpers.

`within` is `asyncio.wait_for` without its Python 3.11 flaw: when the awaited thing finishes
in the same loop iteration as the caller is cancelled, 3.11's wait_for returns the result and
drops the cancellation (CPython gh-86296, fixed in 3.12). A component loop waiting on an event
then never ends, and gpud hangs on SIGTERM. `asyncio.timeout` has no such window.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout_s: float | None) -> T:
    """``await awaitable``, raising TimeoutError after ``timeout_s`` (None: no limit)."""
    async with asyncio.timeout(timeout_s):
        return await awaitable
