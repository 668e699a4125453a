"""Children that gpud owns: started in their own process group, stopped by that group only.

gpud never matches processes by name (no pkill, no `ray stop`): it signals the process groups
it created itself, so other people's Ray or serf on the same host are never touched. A group is
gpud's across its own crash too: a `Supervisor` given a record (gpud.process_groups'
`GroupRecord`) persists (pgid, start time) of the running child. A child with an output file
(``log_path``) does not depend on gpud being alive: it writes to that file, never to a pipe
gpud reads, and the next gpud can re-adopt it (`ChildProcess.adopt`: the recorded leader
verified by pid, start time and group, then waited on through a pidfd, as gpud is no longer its
parent). A group the next gpud cannot verify or does not adopt it stops (`stop_leftover`),
exactly that group (recognised by /proc).

Also the one home of short bounded commands (`run_bounded`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import msgspec

from gpud import log
from gpud.aio import within
from gpud.errors import GpudError
from gpud.process_groups import (
    ChildGroup,
    GroupStore,
    leader_verified,
    leftover_members,
    process_start,
    stop_leftover,
)

# A child's output file is copied to "<file>.1" and emptied once it is this large (the child
# writes with O_APPEND, so it carries on at the new end: logrotate's copytruncate).
LOG_ROTATE_BYTES = 16 * 1024 * 1024
# How often gpud reads what a file-logged child wrote (its lines go to gpud's log and on_line).
TAIL_INTERVAL_S = 0.5


class ChildStartError(GpudError):
    """A child factory cannot build its child now; the message says why (shown in status).

    The Supervisor records it and retries with backoff, like a child that exited."""


class CommandResult(msgspec.Struct, frozen=True):
    # None: killed after the timeout.
    code: int | None
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        """The last line of stdout, else of stderr: what a short command has to say."""
        lines = self.stdout.splitlines() or self.stderr.splitlines()
        return lines[-1] if lines else ""


async def run_bounded(
    argv: Sequence[str], timeout_s: float, *, env: Mapping[str, str] | None = None
) -> CommandResult:
    """Run a short command in its own process group; kill the group after ``timeout_s``.

    Raises OSError (FileNotFoundError, PermissionError) when the command cannot start."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # own group: a timeout kills whatever it started too
    )
    timed_out = False
    try:
        out, err = await within(proc.communicate(), timeout_s)
    except TimeoutError:
        timed_out = True
        out, err = b"", f"timed out after {timeout_s:g}s".encode()
    finally:
        if proc.returncode is None or timed_out:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    return CommandResult(
        code=None if timed_out else proc.returncode,
        stdout=out.decode(errors="replace").strip(),
        stderr=err.decode(errors="replace").strip(),
    )


class ChildProcess:
    """One run of a child command; its output goes to gpud's log, one line per event.

    Without ``log_path`` the output comes through a pipe (the child dies with gpud's end of
    it); with it, the child writes to that file and gpud follows the file, so the child can
    outlive gpud and be adopted by the next one."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        on_line: Callable[[str], bool] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        # Sees every output line first (serf's key mismatches are read from its output); a line
        # it returns False for is not logged (it reported the line its own way).
        self.on_line = on_line
        self.log_path = log_path
        # Its last non-blank output line: a crashing engine's own reason (a traceback's last).
        self.last_line = ""
        self._proc: asyncio.subprocess.Process | None = None
        # The running child's process group (with its leader's start time), once started.
        self.group: ChildGroup | None = None
        # Started by an earlier gpud and adopted by this one (its exit code is not ours to read).
        self.adopted = False
        self._pump: asyncio.Task[None] | None = None
        self._log = log.get(name)
        # A file-logged child: its pid, its Popen when gpud started it, a pidfd that becomes
        # readable when it exits, its exit code, and how far gpud has read its file.
        self._pid: int | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._code: int | None = None
        self._exited = asyncio.Event()
        self._offset = 0
        self._partial = b""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else self._pid

    @property
    def returncode(self) -> int | None:
        """Its exit code once it exited; None while it runs, and for an adopted child."""
        return self._proc.returncode if self._proc else self._code

    @property
    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.returncode is None
        return self._pid is not None and not self._exited.is_set()

    async def start(self) -> None:
        """Start the command; raises FileNotFoundError/PermissionError if it cannot run."""
        if self.log_path is not None:
            await self._start_logged(self.log_path)
        else:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # own process group: we signal only what we started
            )
            self._pump = asyncio.create_task(self._forward_output(self._proc))
        assert self.pid is not None
        start = process_start(self.pid)
        if start is not None:
            self.group = ChildGroup(pgid=self.pid, start=start)
        log.info(self._log, "started", pid=self.pid)

    async def _start_logged(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._offset = await asyncio.to_thread(_rotate, path, 0)
        self._popen = await asyncio.to_thread(self._spawn, path)
        self._watch(self._popen.pid)

    def _spawn(self, path: Path) -> subprocess.Popen[bytes]:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            # Not asyncio's subprocess: its transport kills a still-running child when it is
            # closed (at gpud's exit), and this child is meant to outlive gpud.
            return subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: we signal only what we started
            )
        finally:
            os.close(fd)

    def adopt(self, group: ChildGroup) -> bool:
        """Take over supervision of ``group``, started by an earlier gpud with this child's
        ``log_path``; False (nothing changed) when its leader is not verifiably that process."""
        if self.log_path is None or not leader_verified(group):
            return False
        try:
            pidfd = os.pidfd_open(group.pgid)
        except OSError:
            return False
        # Checked again with the pidfd held: it names the process just verified, not a reuse.
        if not leader_verified(group):
            os.close(pidfd)
            return False
        with contextlib.suppress(OSError):
            self._offset = self.log_path.stat().st_size
        self.group, self.adopted = group, True
        self._watch(group.pgid, pidfd)
        log.info(self._log, "adopted", pid=group.pgid)
        return True

    def _watch(self, pid: int, pidfd: int | None = None) -> None:
        self._pid = pid
        self._pidfd = os.pidfd_open(pid) if pidfd is None else pidfd
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)
        self._pump = asyncio.create_task(self._follow())

    def _on_exit(self) -> None:
        self._close_pidfd()
        if self._popen is not None:
            self._code = self._popen.wait()  # it has exited: this reaps it at once
        self._exited.set()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    async def _follow(self) -> None:
        while not self._exited.is_set():
            with contextlib.suppress(TimeoutError):
                await within(self._exited.wait(), TAIL_INTERVAL_S)
            await self._read_output()

    async def _read_output(self) -> None:
        assert self.log_path is not None
        try:
            data, self._offset = await asyncio.to_thread(_read_from, self.log_path, self._offset)
        except OSError as exc:
            log.warning(
                self._log, "cannot read its output", path=str(self.log_path), error=str(exc)
            )
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._line(line.decode(errors="replace") + "\n")

    async def _forward_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            self._line(line.decode(errors="replace"))

    def _line(self, text: str) -> None:
        if text.strip():
            self.last_line = text.strip()
        if self.on_line is None or self.on_line(text):
            log.child_output(self._log, text)  # at the child's level

    async def wait(self) -> int | None:
        if self._proc is not None:
            code = await self._proc.wait()
        else:
            await self._exited.wait()
            code = self._code
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        return code

    def detach(self) -> None:
        """Stop supervising a file-logged child and leave it running (gpud is exiting)."""
        if self._pump is not None:
            self._pump.cancel()
        self._close_pidfd()

    def signal_group(self, sig: int) -> None:
        # While the leader runs (not yet reaped) its pid is this group's id and nobody else's.
        if not self.running:
            return
        assert self.pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    async def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the child's process group, then SIGKILL it after ``grace_s``."""
        if self.pid is None:
            return None
        if self.running:
            self.signal_group(signal.SIGTERM)
            try:
                await within(asyncio.shield(self.wait()), grace_s)
            except TimeoutError:
                log.warning(self._log, "did not stop in time, killing", grace_s=grace_s)
        # The leader may be gone while others in its group linger: kill the group regardless
        # (an adopted leader was reaped by another parent: only while its members remain).
        if self._proc is not None or (self.group is not None and leftover_members(self.group)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        return await self.wait()


def _rotate(path: Path, limit: int | None = None) -> int:
    """Copy ``path`` to "<path>.1" and empty it once it holds ``limit`` (default
    LOG_ROTATE_BYTES) bytes or more (0: if it holds anything); returns its size after that."""
    limit = LOG_ROTATE_BYTES if limit is None else limit
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size and size >= limit:
        shutil.copyfile(path, path.with_name(path.name + ".1"))
        os.truncate(path, 0)
        return 0
    return size


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    """What ``path`` holds past ``offset`` (at most 1 MiB), rotating it once it is large; the
    new offset. A file emptied by a rotation is read from its start."""
    if offset >= LOG_ROTATE_BYTES:
        _rotate(path)
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < offset:
            offset = 0
        f.seek(offset)
        data = f.read(1 << 20)
    return data, offset + len(data)


SupervisorState = Literal["stopped", "starting", "running", "backoff", "failed"]


class SupervisorStatus(msgspec.Struct, kw_only=True):
    state: SupervisorState = "stopped"
    pid: int | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    last_error: str | None = None
    next_start_in_s: float | None = None


class Supervisor:
    """Keeps a child running: restarts it with exponential backoff when it exits.

    ``make_child`` builds a fresh ChildProcess each start, so a restart picks up a new
    configuration (e.g. a new advertise address). ``ready`` (optional) is awaited after each
    start; the backoff resets once a child has run for ``stable_s``. With ``record``, the
    running child's process group is persisted, and a group a crashed gpud left behind is
    stopped before the first start (never two copies of one child), unless the caller adopted
    it (``adopted``: a `ChildProcess.adopt`-ed child, supervised as if this run had started
    it). With ``keep_on_cancel``, a cancelled run leaves a file-logged child running and its
    record in place for the next gpud, unless `stop_on_cancel` was called.
    """

    def __init__(
        self,
        name: str,
        make_child: Callable[[], Awaitable[ChildProcess]],
        *,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        stable_s: float = 30.0,
        grace_s: float = 10.0,
        record: GroupStore | None = None,
        adopted: ChildProcess | None = None,
        keep_on_cancel: bool = False,
    ) -> None:
        self.name = name
        self._adopted = adopted
        self._keep_on_cancel = keep_on_cancel
        self._make_child = make_child
        self._record = record
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._stable_s = stable_s
        self._grace_s = grace_s
        self._log = log.get(name)
        self.child: ChildProcess | None = None
        # Set once a cancelled run left its child running for the next gpud (keep_on_cancel).
        self.left_running = False
        self.status = SupervisorStatus()
        self._restart_now = asyncio.Event()
        self.started = asyncio.Event()
        # When (monotonic) the child last failed: exited on its own or could not start.
        self.failures: collections.deque[float] = collections.deque(maxlen=64)

    def failures_within(self, window_s: float) -> int:
        """How many times the child failed in the last ``window_s`` seconds."""
        since = time.monotonic() - window_s
        return sum(1 for t in self.failures if t >= since)

    def stop_on_cancel(self) -> None:
        """A later cancel of `run` stops the child (the workload itself is going away)."""
        self._keep_on_cancel = False

    def restart(self) -> None:
        """Stop the running child and start a fresh one at once (no backoff)."""
        self._restart_now.set()

    async def run(self) -> None:
        backoff = self._backoff_initial_s
        try:
            adopted, self._adopted = self._adopted, None
            if self._record is not None and adopted is None:
                await stop_leftover(self._record, self._grace_s)
            while True:
                self.status.state = "starting"
                self.status.next_start_in_s = None
                begun = time.monotonic()
                try:
                    if adopted is not None:
                        self.child, adopted = adopted, None
                    else:
                        self.child = await self._make_child()
                        await self.child.start()
                except (OSError, ChildStartError) as exc:
                    self.status.last_error = f"cannot start: {exc}"
                    self.failures.append(time.monotonic())
                    log.error(self._log, "cannot start", error=str(exc))
                else:
                    if self._record is not None and self.child.group is not None:
                        await asyncio.to_thread(self._record.save, self.child.group)
                    self.status.state = "running"
                    self.status.pid = self.child.pid
                    self.started.set()
                    restart_requested = await self._wait_exit_or_restart(self.child)
                    self.status.pid = None
                    if restart_requested:
                        self.status.restarts += 1
                        backoff = self._backoff_initial_s
                        continue
                    code = self.child.returncode
                    # Its leader exited; what it started may linger in its group: stop that too.
                    await self.child.stop(self._grace_s)
                    await self._forget(self.child)
                    self.failures.append(time.monotonic())
                    self.status.last_exit_code = code
                    said = f": {self.child.last_line}" if self.child.last_line else ""
                    how = (
                        "exited (code unknown: adopted)"
                        if code is None
                        else f"exited with code {code}"
                    )
                    self.status.last_error = f"{how}{said}"
                    log.warning(self._log, "exited", code=code)
                if time.monotonic() - begun >= self._stable_s:
                    backoff = self._backoff_initial_s
                self.status.state = "backoff"
                self.status.next_start_in_s = backoff
                with contextlib.suppress(TimeoutError):
                    await within(self._restart_now.wait(), backoff)
                self._restart_now.clear()
                self.status.restarts += 1
                backoff = min(backoff * 2, self._backoff_max_s)
        finally:
            child = self.child
            if self._keep_on_cancel and child is not None and child.log_path and child.running:
                child.detach()
                self.left_running = True
                log.info(self._log, "left running for the next gpud", pid=child.pid)
                self.status.state = "stopped"
            else:
                await self.stop()

    async def _wait_exit_or_restart(self, child: ChildProcess) -> bool:
        exited = asyncio.ensure_future(child.wait())
        restart = asyncio.ensure_future(self._restart_now.wait())
        try:
            await asyncio.wait({exited, restart}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            restart.cancel()
        if exited.done():
            return False
        self._restart_now.clear()
        log.info(self._log, "restarting on request")
        await child.stop(self._grace_s)
        await self._forget(child)
        return True

    async def _forget(self, child: ChildProcess) -> None:
        """The child's group is gone (it exited and was reaped): drop its record."""
        if self._record is not None and child.group is not None:
            if self._record.load() == child.group:
                await asyncio.to_thread(self._record.clear)  # a disk flush: off the loop

    async def stop(self) -> None:
        if self.child is not None:
            await asyncio.shield(self.child.stop(self._grace_s))
            await self._forget(self.child)
        self.status.state = "stopped"
        self.status.pid = None
