"""Children that gpud owns: started in their own process group, stopped by that group only.

gpud never matches processes by name (no pkill, no `ray stop`): it signals the process groups
it created itself, so other people's Ray or serf on the same host are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Literal

import msgspec

from gpud import log


class ChildProcess:
    """One run of a child command; its output goes to gpud's log, one line per event."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._log = log.get(name)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    async def start(self) -> None:
        """Start the command; raises FileNotFoundError/PermissionError if it cannot run."""
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
        log.info(self._log, "started", pid=self._proc.pid)

    async def _forward_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            log.info(self._log, line.decode(errors="replace").rstrip())

    async def wait(self) -> int:
        assert self._proc is not None
        code = await self._proc.wait()
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        return code

    def signal_group(self, sig: int) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    async def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the child's process group, then SIGKILL it after ``grace_s``."""
        if self._proc is None:
            return None
        if self._proc.returncode is None:
            self.signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), grace_s)
            except TimeoutError:
                log.warning(self._log, "did not stop in time, killing", grace_s=grace_s)
        # The leader may be gone while others in its group linger: kill the group regardless.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        return await self.wait()


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
    start; the backoff resets once a child has run for ``stable_s``.
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
    ) -> None:
        self.name = name
        self._make_child = make_child
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._stable_s = stable_s
        self._grace_s = grace_s
        self._log = log.get(name)
        self.child: ChildProcess | None = None
        self.status = SupervisorStatus()
        self._restart_now = asyncio.Event()
        self.started = asyncio.Event()

    def restart(self) -> None:
        """Stop the running child and start a fresh one at once (no backoff)."""
        self._restart_now.set()

    async def run(self) -> None:
        backoff = self._backoff_initial_s
        try:
            while True:
                self.status.state = "starting"
                self.status.next_start_in_s = None
                begun = time.monotonic()
                try:
                    self.child = await self._make_child()
                    await self.child.start()
                except (OSError, ValueError) as exc:
                    self.status.last_error = f"cannot start: {exc}"
                    log.error(self._log, "cannot start", error=str(exc))
                else:
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
                    self.status.last_exit_code = code
                    self.status.last_error = f"exited with code {code}"
                    log.warning(self._log, "exited", code=code)
                if time.monotonic() - begun >= self._stable_s:
                    backoff = self._backoff_initial_s
                self.status.state = "backoff"
                self.status.next_start_in_s = backoff
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._restart_now.wait(), backoff)
                self._restart_now.clear()
                self.status.restarts += 1
                backoff = min(backoff * 2, self._backoff_max_s)
        finally:
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
        return True

    async def stop(self) -> None:
        if self.child is not None:
            await asyncio.shield(self.child.stop(self._grace_s))
        self.status.state = "stopped"
        self.status.pid = None
