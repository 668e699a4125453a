"""One peer's bad input ends no probe round: a probe that raises is contained, logged
(rate-limited) and counted, and the other peers are still probed."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gpud.context import Member
from gpud.health.peer_api import PeerClient
from gpud.health.prober import Prober
from gpud.health.verdict import Thresholds
from gpud.tags import Tags
from tests.harness.serf import free_port

THRESHOLDS = Thresholds(failures_before_critical=2, successes_before_passing=1)


def member(name: str, pp: int) -> Member:
    # Tags built directly, skipping the decoder's bounds: what a decoder bug would let through.
    return Member(name=name, addr="127.0.0.1", port=7946, status="alive", tags=Tags(pp=pp))


async def test_a_probe_that_raises_ends_nothing(caplog: pytest.LogCaptureFixture) -> None:
    async with PeerClient(b"k" * 32, "me", 0.3) as client:
        prober = Prober(client, THRESHOLDS, 4, 1.0)
        members = {
            "bad-low": member("bad-low", -1),
            "bad-high": member("bad-high", 70000),
            "closed": member("closed", free_port()),
        }
        prober.sync(members, "me")
        with caplog.at_level(logging.ERROR, logger="gpud"):
            for _ in range(3):
                await prober.run_round(sorted(members), full_mesh=True)
        assert prober.rounds == 3
        # The honest peer was probed every round and judged on its own result.
        closed = prober.records["closed"]
        assert closed.last_out is not None and not closed.last_out.ok
        assert closed.out.state == "critical"
        assert prober.errors == 6
        logged = [r for r in caplog.records if r.getMessage() == "probe failed"]
        assert logged and all(r.exc_info is None for r in logged)

        # Between rounds too: the quick checks of the bad peers are contained the same way.
        async with asyncio.TaskGroup() as checks:
            prober.quick_tick(sorted(members), checks.create_task)
        assert prober.errors == 8
        assert not any(r.confirming for r in prober.records.values())
