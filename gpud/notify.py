"""The systemd notify protocol: READY, STATUS, RELOADING, WATCHDOG, STOPPING (a no-op outside
systemd)."""

from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self.ready_sent = False
        self._notifier = sdnotify.SystemdNotifier()
        self.watchdog_interval_s = _watchdog_interval()
        # Children (serf, Ray) must not inherit the socket: only gpud speaks for the unit.
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)

    def _send(self, message: str) -> None:
        if self.enabled:
            self._notifier.notify(message)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")
        self.ready_sent = True

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def reloading(self) -> None:
        """Before re-reading the config; READY=1 (``ready``) ends the reload."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the configuration")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping: leaving the cluster")


def _watchdog_interval() -> float | None:
    """Half of WatchdogSec (systemd's advice), or None when no watchdog is configured."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
