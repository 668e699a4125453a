"""Kernel-side GPU signals: XID lines of the NVIDIA driver in /dev/kmsg, and NVIDIA PCI functions
under sysfs (a GPU that fell off the bus may still be on the PCI bus but gone from NVML).

Parsing is pure; ``follow`` is the one blocking reader (run it in a thread).
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from gpud.gpus.signals import XidEvent

PCI_ROOT = Path("/sys/bus/pci/devices")
NVIDIA_VENDOR = "0x10de"
# PCI class codes: 0x0300 VGA-compatible display controller, 0x0302 3D controller (NVSwitches
# and audio functions have other classes and are not GPUs).
GPU_CLASSES = ("0x0300", "0x0302")

_XID = re.compile(r"NVRM: Xid \(PCI:([0-9a-fA-F]+:[0-9a-fA-F]+:[0-9a-fA-F]+)[^)]*\): (\d+)(.*)")
POLL_S = 0.5


def normalise_pci(address: str) -> str:
    """PCI address as "0000:3b:00": domain of 4 hex digits, bus, device; function dropped.

    NVML says "00000000:3B:00.0", NVRM "0000:3b:00"; both map to the same key."""
    parts = address.strip().lower().split(":")
    if len(parts) < 3:
        return address.strip().lower()
    domain, bus, device = parts[-3], parts[-2], parts[-1].split(".")[0]
    return f"{int(domain, 16):04x}:{bus:0>2}:{device:0>2}"


def parse_xid(record: str, *, boot_time: float) -> XidEvent | None:
    """An XID event from one /dev/kmsg record ("6,812,94521032,-;NVRM: Xid (PCI:...): 79, ...")
    or from a plain log line; None for anything else.

    ``boot_time`` (wall clock at boot) turns the record's microseconds since boot into a time."""
    header, sep, message = record.partition(";")
    if not sep:
        header, message = "", record
    match = _XID.search(message)
    if match is None:
        return None
    at = time.time()
    fields = header.split(",")
    if len(fields) >= 3 and fields[2].isdigit():
        at = boot_time + int(fields[2]) / 1e6
    return XidEvent(
        xid=int(match.group(2)),
        source="kmsg",
        at=at,
        pci=normalise_pci(match.group(1)),
        message=match.group(3).lstrip(", ").strip(),
    )


class Unreadable(msgspec.Struct, frozen=True, kw_only=True):
    reason: str
    fix: str


def unreadable(path: str, exc: OSError) -> Unreadable:
    """Why the kernel log at ``path`` cannot be followed, and the remedy that fits (pure).

    Reading /dev/kmsg needs CAP_SYSLOG where kernel.dmesg_restrict = 1 (Debian's and Ubuntu's
    default); the packaged unit grants it and leaves ProtectKernelLogs= off, which would hide
    the device. A denial under the unit therefore means an override took one of them away."""
    what = exc.strerror or str(exc)
    reason = f"cannot read {path} ({what})"
    if exc.errno in (errno.EACCES, errno.EPERM):
        fix = (
            "give gpud CAP_SYSLOG and the device: the packaged unit has "
            "AmbientCapabilities=CAP_NET_ADMIN CAP_SYSLOG and no ProtectKernelLogs=; "
            "undo a drop-in that changed them (`systemctl cat gpud`, `systemctl revert gpud`), "
            "or run gpud as root outside the unit"
        )
    elif exc.errno == errno.ENOENT:
        fix = (
            f"{path} does not exist: set [gpus] kmsg_path to the kernel log device "
            "(/dev/kmsg) or, in a container, give it the host's /dev/kmsg"
        )
    else:
        fix = f"make {path} readable by the gpud user, or set [gpus] kmsg_path"
    return Unreadable(reason=reason, fix=fix)


def xid_records(on_event: Callable[[XidEvent], None]) -> Callable[[str], None]:
    """A ``follow`` callback that hands each XID of the kernel log to ``on_event``."""
    boot = boot_time()

    def on_record(record: str) -> None:
        event = parse_xid(record, boot_time=boot)
        if event is not None:
            on_event(event)

    return on_record


def boot_time() -> float:
    """Wall-clock time of boot, as the kernel's log timestamps count from it."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


def count_nvidia_pci(root: Path = PCI_ROOT) -> int | None:
    """NVIDIA GPU functions (vendor 0x10de, display or 3D class) under ``root``; None when
    ``root`` cannot be listed."""
    try:
        devices = list(root.iterdir())
    except OSError:
        return None
    count = 0
    for device in devices:
        try:
            vendor = (device / "vendor").read_text().strip().lower()
            klass = (device / "class").read_text().strip().lower()
        except OSError:
            continue
        if vendor == NVIDIA_VENDOR and klass.startswith(GPU_CLASSES):
            count += 1
    return count


def follow(path: str, on_record: Callable[[str], None], stop: threading.Event | None) -> None:
    """Call ``on_record`` for each record of ``path`` until ``stop`` is set (``None``: until
    the records there now are read).

    /dev/kmsg hands out one record per read and EAGAIN when there is none (opened non-blocking,
    so ``stop`` is seen within POLL_S); EPIPE means records were overwritten before we read
    them, and reading goes on. A regular file (tests, a saved log) is read line by line and
    followed as it grows. Raises OSError if ``path`` cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        pending = b""
        while stop is None or not stop.is_set():
            try:
                chunk = os.read(fd, 8192)
            except BlockingIOError:
                chunk = b""
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue
                raise
            if not chunk:
                if stop is None:
                    return
                stop.wait(POLL_S)
                continue
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                # Continuation lines of a kmsg record start with a space: not a new record.
                if line and not line.startswith(b" "):
                    on_record(line.decode(errors="replace"))
    finally:
        os.close(fd)
