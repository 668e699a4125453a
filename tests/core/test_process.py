"""gpud.process and gpud.process_groups: bounded commands, the /proc parser, and children kept
across gpud's crash."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpud.process import run_bounded
from gpud.process_groups import (
    ChildGroup,
    GroupRecord,
    group_members,
    leftover_members,
    proc_stat,
    process_start,
    stop_leftover,
)
from gpud.state import Key, StateStore
from tests.harness.wait import wait_for

CHILD = Key("test.child", ChildGroup)

# A "gpud" that supervises `sleep` with a persisted group record, then is kill -9ed; argv:
# its state dir and CHILD's name.
_GPUD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from gpud.process import ChildProcess, Supervisor
    from gpud.process_groups import ChildGroup, GroupRecord
    from gpud.state import Key, StateStore

    async def main():
        record = GroupRecord(StateStore(Path(sys.argv[1])), Key(sys.argv[2], ChildGroup))
        async def make():
            return ChildProcess("sleeper", ["sh", "-c", "sleep 300 & sleep 300"])
        await Supervisor("sleeper", make, record=record).run()

    asyncio.run(main())
    """
)


async def test_run_bounded_kills_its_group_on_timeout() -> None:
    result = await run_bounded(["sh", "-c", "echo $$; sleep 30 & wait"], 1.0)
    assert result.code is None and "timed out" in result.stderr
    ok = await run_bounded(["sh", "-c", "echo out; echo err >&2; exit 3"], 5.0)
    assert (ok.code, ok.stdout, ok.stderr, ok.last_line) == (3, "out", "err", "out")
    with pytest.raises(FileNotFoundError):
        await run_bounded(["/nonexistent/cmd"], 1.0)


def test_proc_stat_reads_own_process() -> None:
    stat = proc_stat(os.getpid())
    assert stat is not None and stat.pgid == os.getpgid(0)
    assert process_start(os.getpid()) == stat.start
    assert proc_stat(2**22 + 1) is None  # above pid_max: never a process


async def test_leftover_group_of_a_killed_gpud_is_stopped(tmp_path: Path) -> None:
    gpud = subprocess.Popen(  # noqa: ASYNC220 -- a stand-in gpud, killed below
        [sys.executable, "-c", _GPUD, str(tmp_path), CHILD.name], cwd=Path(__file__).parents[2]
    )
    try:
        store = StateStore(tmp_path)
        group = wait_for(lambda: store.get(CHILD), 20, 0.1, what="the child's record")
        assert len(wait_for(lambda: group_members(group.pgid), 5, 0.1)) >= 2
        os.kill(gpud.pid, signal.SIGKILL)  # gpud dies; its child group lives on
        gpud.wait(10)
        assert leftover_members(group), "the orphaned group should still run"
        stopped = await stop_leftover(GroupRecord(store, CHILD), grace_s=2.0)
        assert stopped == group
        assert group_members(group.pgid) == [] and store.get(CHILD) is None
    finally:
        if gpud.poll() is None:
            gpud.kill()
        gpud.wait(10)


async def test_a_record_that_names_another_process_kills_nothing(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)  # noqa: ASYNC220
    try:
        start = process_start(sleeper.pid)
        assert start is not None
        # Same pid, other start time: a recycled pid, not the group gpud started.
        store = StateStore(tmp_path)
        record = GroupRecord(store, CHILD)
        record.save(ChildGroup(pgid=sleeper.pid, start=start + 1))
        assert await stop_leftover(record, grace_s=0.5) is None
        await asyncio.sleep(0.2)
        assert sleeper.poll() is None and record.load() is None
    finally:
        sleeper.kill()
        sleeper.wait(10)
