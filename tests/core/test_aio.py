"""gpud.aio.within: a cancellation that meets a finishing wait is never lost."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gpud.aio import within

Waiter = Callable[[Awaitable[Any], float], Awaitable[Any]]


async def loops_ended_by_cancel(wait: Waiter, tries: int = 200) -> int:
    """How many of ``tries`` event loops like the components' end when cancelled just as
    their event is set (the shutdown of a component whose peer still wakes it)."""
    ended = 0
    for _ in range(tries):
        event = asyncio.Event()

        async def loop(event: asyncio.Event = event) -> None:
            while True:
                event.clear()
                with contextlib.suppress(TimeoutError):
                    await wait(event.wait(), 10.0)

        task = asyncio.create_task(loop())
        for _ in range(3):
            await asyncio.sleep(0)
        event.set()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=0.5)
        if done:
            ended += 1
        else:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return ended


async def test_within_never_drops_a_cancellation() -> None:
    assert await loops_ended_by_cancel(within) == 200


async def test_within_times_out_and_returns_results() -> None:
    with pytest.raises(TimeoutError):
        await within(asyncio.Event().wait(), 0.01)
    assert await within(asyncio.sleep(0, result=7), 1.0) == 7
    assert await within(asyncio.sleep(0, result=8), None) == 8
