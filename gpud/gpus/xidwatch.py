"""The two XID sources of the gpus component, followed for as long as it runs: NVML's XID events
and the kernel log. Either may be unusable (no NVML, no access to /dev/kmsg); the other goes
on, and the unusable one is retried every WATCH_RETRY_S.

Both readers block, so each runs in a thread; events come back to the event loop, where they
are kept (the last MAX_XIDS) and counted per GPU.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from gpud import log
from gpud.gpus import kmsg
from gpud.gpus import nvml as nvml_io
from gpud.gpus.signals import GpuReadings, XidEvent
from gpud.gpus.xid import describe

_log = log.get("gpus")

# XIDs kept in memory (status shows them; the verdict counts those inside xid_window_s).
MAX_XIDS = 1000
# How long a failed watcher (no NVML, no /dev/kmsg access) waits before it tries again.
WATCH_RETRY_S = 30.0


class XidWatch:
    """``events``: the XIDs seen, oldest first; ``totals``: GPU UUID -> XIDs seen since start;
    ``events_state`` and ``kmsg_state``: "watching", or why that source is not used."""

    def __init__(
        self,
        nvml: Any,
        nvml_error: str,
        kmsg_path: str,
        gpus: Callable[[], Sequence[GpuReadings]],
    ) -> None:
        """``nvml``: the NVML module, or None (``nvml_error`` says why); ``gpus()``: the GPUs
        of the last poll, to count a kernel XID (known by its PCI address) against its GPU."""
        self._nvml = nvml
        self._nvml_error = nvml_error
        self._kmsg_path = kmsg_path
        self._gpus = gpus
        self.events: collections.deque[XidEvent] = collections.deque(maxlen=MAX_XIDS)
        self.totals: dict[str, int] = {}
        self.events_state = "starting"
        self.kmsg_state = "starting"
        # Why the kernel log cannot be read (None while it is, or before the first try).
        self.kmsg_error: OSError | None = None
        self._stop = threading.Event()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch_events())
                tg.create_task(self._watch_kmsg())
        finally:
            # The reader threads cannot be cancelled: they stop when they see this.
            self._stop.set()

    def add(self, event: XidEvent) -> None:
        self.events.append(event)
        uuid = event.uuid or next(
            (g.uuid for g in self._gpus() if g.pci and g.pci == event.pci), ""
        )
        if uuid:
            self.totals[uuid] = self.totals.get(uuid, 0) + 1
        info = describe(event.xid)
        log.warning(
            _log,
            "XID",
            xid=event.xid,
            meaning=info.name,
            action=info.action,
            source=event.source,
            uuid=event.uuid,
            pci=event.pci,
            message=event.message,
        )

    async def _watch_events(self) -> None:
        loop = asyncio.get_running_loop()

        def deliver(event: XidEvent) -> None:
            loop.call_soon_threadsafe(self.add, event)

        while not self._stop.is_set():
            if self._nvml is None:
                self.events_state = self._nvml_error
                return
            self.events_state = "watching"
            reason = await asyncio.to_thread(
                nvml_io.watch_xid_events, self._nvml, deliver, self._stop, time.time
            )
            if not reason:
                return
            self.events_state = f"not used: {reason}; XIDs come from the kernel log only"
            await asyncio.sleep(WATCH_RETRY_S)

    async def _watch_kmsg(self) -> None:
        loop = asyncio.get_running_loop()
        on_record = kmsg.xid_records(lambda event: loop.call_soon_threadsafe(self.add, event))
        while not self._stop.is_set():
            self.kmsg_state, self.kmsg_error = "watching", None
            try:
                await asyncio.to_thread(kmsg.follow, self._kmsg_path, on_record, self._stop)
                return
            except OSError as exc:
                self.kmsg_error = exc
                self.kmsg_state = f"not used: {kmsg.unreadable(self._kmsg_path, exc).reason}"
            await asyncio.sleep(WATCH_RETRY_S)
