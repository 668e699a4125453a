"""Children that outlive gpud: a file-logged child survives gpud's kill -9 and graceful stop,
the next gpud adopts it (pidfd, not its parent), supervises and restarts it; what it cannot
verify it leaves alone; a lease moves to its new owner without a window for the zombie scan."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud import process
from gpud.deployments.replicas import ADOPT_SETTLE_S, Replica, keep_unplaced
from gpud.process import ChildProcess, Supervisor
from gpud.process_groups import ChildGroup, GroupRecord, process_start, runs_argv
from gpud.state import Key, StateStore
from tests.harness.ports import running, write_config
from tests.harness.wait import wait_for

CHILD = Key("test.adopt.child", ChildGroup)
# Writes a line every 50 ms: with its output in a pipe whose reader died it would get SIGPIPE.
TICKER = ["sh", "-c", "while :; do echo tick; sleep 0.05; done"]

# A "gpud" that supervises the ticker, leaving it running when it stops (SIGTERM) or dies;
# argv: its state dir, CHILD's name, TICKER as JSON.
_GPUD = textwrap.dedent(
    """
    import asyncio, contextlib, json, signal, sys
    from pathlib import Path
    from gpud.process import ChildProcess, Supervisor
    from gpud.process_groups import ChildGroup, GroupRecord
    from gpud.state import Key, StateStore

    async def main():
        state = Path(sys.argv[1])
        record = GroupRecord(StateStore(state), Key(sys.argv[2], ChildGroup))
        async def make():
            return ChildProcess("ticker", json.loads(sys.argv[3]), log_path=state / "ticker.log")
        task = asyncio.current_task()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        sup = Supervisor("ticker", make, record=record, keep_on_cancel=True)
        with contextlib.suppress(asyncio.CancelledError):
            await sup.run()

    asyncio.run(main())
    """
)


@contextlib.contextmanager
def stand_in_gpud(state: Path) -> Iterator[subprocess.Popen[bytes]]:
    gpud = subprocess.Popen(
        [sys.executable, "-c", _GPUD, str(state), CHILD.name, json.dumps(TICKER)],
        cwd=Path(__file__).parents[2],
    )
    try:
        yield gpud
    finally:
        if gpud.poll() is None:
            gpud.kill()
        gpud.wait(10)


def _kill_group(group: ChildGroup | None) -> None:
    if group is not None and process_start(group.pgid) == group.start:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group.pgid, signal.SIGKILL)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
async def test_a_child_outlives_gpud_and_is_adopted(tmp_path: Path, how: int) -> None:
    store = StateStore(tmp_path)
    record = GroupRecord(store, CHILD)
    log_path = tmp_path / "ticker.log"
    group = None
    try:
        with stand_in_gpud(tmp_path) as gpud:
            group = wait_for(lambda: store.get(CHILD), 20, 0.1, what="the child's record")
            wait_for(lambda: log_path.exists() and log_path.stat().st_size > 0, 5, 0.05)
            os.kill(gpud.pid, how)
            gpud.wait(10)
        size = log_path.stat().st_size
        await asyncio.sleep(0.5)
        # It runs on, writing (no pipe to break), and its record is there for the next gpud.
        assert process_start(group.pgid) == group.start
        assert log_path.stat().st_size > size
        assert record.load() == group

        lines: list[str] = []
        starts = 0

        async def make() -> ChildProcess:
            nonlocal starts
            starts += 1
            return ChildProcess("ticker", TICKER, log_path=log_path, on_line=lines.append)

        adopted = await make()
        assert adopted.adopt(group) and adopted.adopted and adopted.running
        sup = Supervisor("ticker", make, record=record, adopted=adopted, backoff_initial_s=0.1)
        task = asyncio.create_task(sup.run())
        try:
            await asyncio.wait_for(sup.started.wait(), 5)
            assert sup.status.pid == group.pgid and record.load() == group
            await asyncio.to_thread(wait_for, lambda: "tick\n" in lines, 5, 0.05)
            # It dies: the pidfd says so (it is not gpud's child), and a fresh one is started.
            os.killpg(group.pgid, signal.SIGKILL)
            fresh = await asyncio.to_thread(
                wait_for,
                lambda: sup.status.pid not in (None, group.pgid) and sup.status.pid,
                10,
                0.05,
                what="a fresh child",
            )
            assert starts == 2 and "code unknown" in (sup.status.last_error or "")
            assert record.load() is not None and record.load().pgid == fresh
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Without keep_on_cancel a cancelled run stops what it supervises and drops its record.
        assert record.load() is None and process_start(fresh) is None
    finally:
        _kill_group(group)


async def test_what_is_not_verifiably_ours_is_not_adopted(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)  # noqa: ASYNC220
    try:
        start = process_start(sleeper.pid)
        assert start is not None
        child = ChildProcess("s", ["sleep", "60"], log_path=tmp_path / "s.log")
        # A recycled pid (other start time), and a process that is not a group's leader.
        assert not child.adopt(ChildGroup(pgid=sleeper.pid, start=start + 1))
        assert not child.adopt(ChildGroup(pgid=os.getpid(), start=process_start(os.getpid()) or 0))
        # A pipe-fed child cannot be adopted: its output would have nowhere to go.
        assert not ChildProcess("s", ["sleep", "60"]).adopt(ChildGroup(sleeper.pid, start))
        assert not child.running and sleeper.poll() is None
        # The command line is part of the proof: another program, or other arguments, is not it.
        assert runs_argv(sleeper.pid, ["sleep", "60"])
        assert not runs_argv(sleeper.pid, ["sleep", "61"])
        assert not runs_argv(sleeper.pid, ["vllm", "serve", "60"])
    finally:
        sleeper.kill()
        sleeper.wait(10)


async def test_a_transferred_lease_survives_its_first_owner(workdir: Path) -> None:
    async with running(write_config(workdir)) as service:
        await asyncio.wait_for(service.ready(), 10)
        first = await asyncio.create_subprocess_exec("sleep", "60")
        second = await asyncio.create_subprocess_exec("sleep", "60")
        try:
            lease = await service.lease("deploy:x.0", 1, pid=first.pid)
            await service.transfer(lease.id, second.pid)
            first.kill()
            await first.wait()
            await asyncio.sleep(1.0)  # five zombie-scan graces
            (kept,) = [ls for ls in service.leases() if ls.id == lease.id]
            assert kept.pid == second.pid and kept.ports == lease.ports
            with pytest.raises(Exception, match="not a running process"):
                await service.transfer(lease.id, first.pid)
        finally:
            second.kill()
            await second.wait()
        # Its new owner gone, it is reclaimed as any other.
        await asyncio.to_thread(
            wait_for, lambda: all(ls.id != lease.id for ls in service.leases()), 10, 0.05
        )


async def test_output_file_is_rotated_and_still_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "LOG_ROTATE_BYTES", 4096)
    monkeypatch.setattr(process, "TAIL_INTERVAL_S", 0.05)
    log_path = tmp_path / "t.log"
    log_path.write_text("the previous run\n")
    lines: list[str] = []
    child = ChildProcess(
        "t",
        ["sh", "-c", "i=0; while [ $i -lt 4000 ]; do echo line$i; i=$((i+1)); done; sleep 60"],
        log_path=log_path,
        on_line=lines.append,
    )
    await child.start()
    try:
        # The previous run's output went to .1 at the start; the big output was rotated too.
        await asyncio.to_thread(wait_for, lambda: "line3999\n" in lines, 20, 0.05)
        assert "the previous run\n" not in lines
        await asyncio.to_thread(wait_for, lambda: log_path.stat().st_size == 0, 5, 0.05)
        assert log_path.with_name("t.log.1").stat().st_size > 0
        assert child.last_line == "line3999"
    finally:
        await child.stop(2.0)
    assert not child.running and child.returncode is not None


@given(
    adopted_at=st.floats(0, 1e6),
    age=st.floats(-1.0, 3 * ADOPT_SETTLE_S),
    assigned=st.booleans(),
)
def test_only_a_freshly_adopted_assigned_replica_is_kept_unplaced(
    adopted_at: float, age: float, assigned: bool
) -> None:
    spec_less = Replica(("d", 0), entry=None)  # type: ignore[arg-type]
    spec_less.adopted_at = adopted_at
    kept = keep_unplaced(spec_less, assigned, adopted_at + age)
    if kept:
        assert adopted_at > 0 and assigned and age < ADOPT_SETTLE_S
    # A replica this gpud started itself is never kept where placement does not want it.
    spec_less.adopted_at = 0.0
    assert not keep_unplaced(spec_less, assigned, age)
