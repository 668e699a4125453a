"""Which processes are gpud's: what /proc says of a pid, and the process groups gpud recorded.

A pid names one process only together with its start time (/proc/<pid>/stat): `process_start`
and `owner_alive` read it, for supervised children and lease holders alike. A supervised
child's process group is gpud's across its own crash too: `GroupRecord` persists (pgid, start
time) of the running child. The next gpud checks a recorded group before it adopts it
(`ChildProcess.adopt` in gpud.process): the leader verified by pid, start time and group
(`leader_verified`), its command line what gpud would start (`runs_argv`). A group it cannot
verify or does not adopt it stops (`stop_leftover`), exactly that group (recognised by /proc),
never processes matched by name.

Also the one home of the /proc/<pid>/stat parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import msgspec

from gpud import log
from gpud.state import Key, StateStore

_log = log.get("process")


class ProcStat(msgspec.Struct, frozen=True):
    """The fields gpud reads from /proc/<pid>/stat."""

    # R, S, D, Z (zombie), X (dead), ...
    state: str
    ppid: int
    pgid: int
    # Clock ticks since boot (field 22): with the pid, it names one process across pid reuse.
    start: int


def proc_stat(pid: int) -> ProcStat | None:
    """/proc/<pid>/stat of ``pid``, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields resume after ")".
    fields = stat.rpartition(")")[2].split()
    return ProcStat(
        state=fields[0], ppid=int(fields[1]), pgid=int(fields[2]), start=int(fields[19])
    )


def _live(stat: ProcStat | None) -> bool:
    return stat is not None and stat.state not in ("Z", "X")


def process_start(pid: int) -> int | None:
    """Start time of a running ``pid`` (to recognise a recycled pid later), or None."""
    stat = proc_stat(pid)
    return stat.start if stat is not None and _live(stat) else None


def owner_alive(pid: int, pid_start: int | None) -> bool:
    """Whether the process still runs: same pid, same start time (if known), not a zombie."""
    stat = proc_stat(pid)
    return stat is not None and _live(stat) and (pid_start is None or stat.start == pid_start)


def group_members(pgid: int) -> list[int]:
    """Live pids whose process group is ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat.pgid == pgid and _live(stat):
                found.append(int(entry))
    return found


class ChildGroup(msgspec.Struct, frozen=True):
    """A child's process group as persisted: its leader's pid (= pgid) and start time."""

    pgid: int
    start: int


class GroupStore(Protocol):
    """Where a supervised child's process group is persisted: a `GroupRecord` (one key of the
    store), or a row of a component's own table for children that come and go by name."""

    def load(self) -> ChildGroup | None: ...

    def save(self, group: ChildGroup) -> None: ...

    def clear(self) -> None: ...


class GroupRecord:
    """The process group of one supervised child, persisted so that a restarted gpud finds it.

    Stored under ``key`` (declared by the owning component) right after the child starts,
    removed once it is stopped. A record left behind means gpud died with the child running:
    `stop_leftover` stops that group.
    """

    def __init__(self, store: StateStore, key: Key[ChildGroup]) -> None:
        self._store = store
        self._key = key

    def load(self) -> ChildGroup | None:
        return self._store.get(self._key)

    def save(self, group: ChildGroup) -> None:
        self._store.put(self._key, group)

    def clear(self) -> None:
        self._store.put(self._key, None)


def leader_verified(group: ChildGroup) -> bool:
    """Whether the recorded leader still runs: the same pid and start time, leading its group."""
    leader = proc_stat(group.pgid)
    return (
        _live(leader)
        and leader is not None
        and (leader.start, leader.pgid)
        == (
            group.start,
            group.pgid,
        )
    )


def leftover_members(group: ChildGroup) -> list[int]:
    """Live members of ``group`` if it is still the group gpud started, else [] (pure read).

    The leader alive with the recorded start time proves it. With the leader gone, Linux keeps
    the number allocated while any process still has it as pgid, so members whose group is
    ``pgid`` and that started no earlier than the leader are the ones it left behind."""
    leader = proc_stat(group.pgid)
    if _live(leader):
        assert leader is not None
        if leader.start != group.start or leader.pgid != group.pgid:
            return []  # the pid was reused by another process: not ours
    members = []
    for pid in group_members(group.pgid):
        stat = proc_stat(pid)
        if stat is not None and stat.start >= group.start:
            members.append(pid)
    return members


async def stop_group(pgid: int, grace_s: float, *, alive: Callable[[], bool]) -> None:
    """SIGTERM process group ``pgid``, SIGKILL it if ``alive()`` after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    for _ in range(max(1, int(grace_s / 0.1))):
        if not alive():
            break
        await asyncio.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    for _ in range(50):  # SIGKILLed processes take a moment to be reaped
        if not alive():
            return
        await asyncio.sleep(0.1)


async def stop_leftover(record: GroupStore, grace_s: float) -> ChildGroup | None:
    """Stop the group a crashed gpud left running (only that exact group); clear the record.

    Returns the group it stopped, or None when there was nothing of ours left."""
    group = record.load()
    stopped = None
    if group is not None and leftover_members(group):
        log.warning(_log, "stopping a child left by a previous gpud", pgid=group.pgid)
        await stop_group(group.pgid, grace_s, alive=lambda: bool(leftover_members(group)))
        stopped = group
    await asyncio.to_thread(record.clear)
    return stopped


def argv_matches(cmdline: Sequence[str], argv: Sequence[str]) -> bool:
    """Whether a process's ``cmdline`` runs ``argv``: it ends with ``argv``'s arguments (its
    program may be an interpreter running a script named by argv[0])."""
    args = list(argv[1:])
    return len(cmdline) >= len(argv) and list(cmdline[len(cmdline) - len(args) :]) == args


def cmdline(pid: int) -> list[str] | None:
    """The command line of ``pid`` (None: no such process, or not readable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return None
    return [a.decode(errors="surrogateescape") for a in raw]


def runs_argv(pid: int, argv: Sequence[str]) -> bool:
    """Whether ``pid`` runs ``argv`` now (`argv_matches` on its command line)."""
    found = cmdline(pid)
    return found is not None and argv_matches(found, argv)
