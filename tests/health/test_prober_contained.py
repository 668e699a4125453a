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
from gpud.netprobe import ProbeOutcome
from gpud.tags import Tags
from tests.harness.serf import free_port

THRESHOLDS = Thresholds(failures_before_critical=2, successes_before_passing=1)


def member(name: str, pp: int) -> Member:
    # Tags built directly, skipping the decoder's bounds: what a decoder bug would let through.
    return Member(name=name, addr="127.0.0.1", port=7946, status="alive", tags=Tags(pp=pp))


async def test_a_probe_that_raises_ends_nothing(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with PeerClient(b"k" * 32, "me", 0.3) as client:
        # A bug anywhere in one peer's probe (here: the probe itself raises for one port).
        raising = free_port()
        real_probe = client.probe

        async def probe(addr: str, port: int, *, expect: str | None = None) -> ProbeOutcome:
            if port == raising:
                raise RuntimeError("a bug in the probe")
            return await real_probe(addr, port, expect=expect)

        monkeypatch.setattr(client, "probe", probe)
        prober = Prober(client, THRESHOLDS, 4, 1.0)
        members = {
            "bad-low": member("bad-low", -1),
            "bad-high": member("bad-high", 70000),
            "raises": member("raises", raising),
            "closed": member("closed", free_port()),
        }
        prober.sync(members, "me")
        with caplog.at_level(logging.ERROR, logger="gpud"):
            for _ in range(3):
                await prober.run_round(sorted(members), full_mesh=True)
        assert prober.rounds == 3
        # The raising peer's probe was contained each round; every other peer was probed and
        # judged on its own result (an impossible port is a failed probe, not a crash).
        assert prober.errors == 3
        for name in ("bad-low", "bad-high", "closed"):
            record = prober.records[name]
            assert record.last_out is not None and not record.last_out.ok, name
            assert record.out.state == "critical", name
        logged = [r for r in caplog.records if r.getMessage() == "probe failed"]
        assert logged and all(r.exc_info is None for r in logged)

        # Between rounds too: the raising peer's quick check (refused: nothing listens) starts
        # a confirming probe, which raises and is contained the same way.
        async with asyncio.TaskGroup() as checks:
            prober.quick_tick(sorted(members), checks.create_task)
        assert prober.errors == 4
        assert not any(r.confirming for r in prober.records.values())
