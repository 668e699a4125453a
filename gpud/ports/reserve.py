"""Keep the kernel from using this node's block for ephemeral ports.

``net.ipv4.ip_local_reserved_ports`` is per network namespace and shared with other software,
so gpud reads it, merges its block in and writes the union back; it remembers which ranges it
added itself and, when its block moves, removes only those. The reservation is kept on shutdown
on purpose: the claim survives restarts, and the block must not be handed out as ephemeral
ports while gpud restarts. (Read-merge-write is not atomic against another writer doing the
same at the same instant; the sysctl offers nothing better. gpud processes sharing a namespace,
e.g. several nodes on one host, serialise their read-merge-writes with an flock on LOCK_FILE.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator

import msgspec

RESERVED_PORTS = "/proc/sys/net/ipv4/ip_local_reserved_ports"
LOCAL_PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
# One lock for every namespace on the host's filesystem: serialising across namespaces costs
# nothing worth keying it by namespace.
LOCK_FILE = "/run/gpud-reserved-ports.lock"

# Inclusive port ranges, as the sysctl writes them ("1000-1010,2000").
PortRange = tuple[int, int]


class Reservation(msgspec.Struct, kw_only=True):
    """Outcome of reserving a block: which ranges gpud added, or why it could not."""

    added: list[PortRange] = []
    error: str | None = None


def parse_ranges(text: str) -> list[PortRange]:
    ranges: list[PortRange] = []
    for part in text.replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        ranges.append((int(lo), int(hi or lo)))
    return merge(ranges)


def merge(ranges: Iterable[PortRange]) -> list[PortRange]:
    """Sorted, non-overlapping, non-adjacent ranges covering the same ports."""
    out: list[PortRange] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def format_ranges(ranges: Iterable[PortRange]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in merge(ranges))


def uncovered(ranges: Iterable[PortRange], want: PortRange) -> list[PortRange]:
    """The parts of ``want`` that ``ranges`` do not cover."""
    lo, hi = want
    gaps: list[PortRange] = []
    cursor = lo
    for r_lo, r_hi in merge(ranges):
        if r_hi < cursor or r_lo > hi:
            continue
        if r_lo > cursor:
            gaps.append((cursor, r_lo - 1))
        cursor = max(cursor, r_hi + 1)
        if cursor > hi:
            break
    if cursor <= hi:
        gaps.append((cursor, hi))
    return gaps


def subtract(ranges: Iterable[PortRange], remove: Iterable[PortRange]) -> list[PortRange]:
    result = merge(ranges)
    for cut_lo, cut_hi in merge(remove):
        kept: list[PortRange] = []
        for lo, hi in result:
            if hi < cut_lo or lo > cut_hi:
                kept.append((lo, hi))
                continue
            if lo < cut_lo:
                kept.append((lo, cut_lo - 1))
            if hi > cut_hi:
                kept.append((cut_hi + 1, hi))
        result = kept
    return result


def _describe(exc: OSError, path: str) -> str:
    if isinstance(exc, PermissionError) or exc.errno == 30:  # EROFS: read-only /proc/sys
        return (
            f"not permitted to write {path} ({exc.strerror}): gpud needs root and a writable "
            "/proc/sys (in a container: CAP_NET_ADMIN in its own network namespace)"
        )
    return f"writing {path} failed: {exc.strerror or exc}"


@contextlib.contextmanager
def _locked(lock_file: str) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_file``; without one (no write access to create it)
    go on unlocked: the sysctl write itself will then say what is wrong."""
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def reserve(
    block: PortRange, path: str = RESERVED_PORTS, lock_file: str = LOCK_FILE
) -> Reservation:
    """Add ``block`` to the reserved ports, keeping every entry already there."""
    with _locked(lock_file):
        return _reserve(block, path)


def _reserve(block: PortRange, path: str) -> Reservation:
    try:
        with open(path) as f:
            current = parse_ranges(f.read())
    except OSError as exc:
        return Reservation(error=f"cannot read {path}: {exc.strerror or exc}")
    added = uncovered(current, block)
    if not added:
        return Reservation()
    try:
        with open(path, "w") as f:
            f.write(format_ranges([*current, *added]) + "\n")
    except OSError as exc:
        return Reservation(error=_describe(exc, path))
    return Reservation(added=added)


def unreserve(
    owned: Iterable[PortRange], path: str = RESERVED_PORTS, lock_file: str = LOCK_FILE
) -> str | None:
    """Remove the ranges gpud added itself; returns an error message or None."""
    owned = list(owned)
    if not owned:
        return None
    with _locked(lock_file):
        return _unreserve(owned, path)


def _unreserve(owned: list[PortRange], path: str) -> str | None:
    try:
        with open(path) as f:
            current = parse_ranges(f.read())
        with open(path, "w") as f:
            # An empty write is rejected; a lone newline clears the list.
            f.write(format_ranges(subtract(current, owned)) + "\n")
    except OSError as exc:
        return _describe(exc, path)
    return None


def ephemeral_range(path: str = LOCAL_PORT_RANGE) -> PortRange | None:
    """The kernel's ephemeral port range (net.ipv4.ip_local_port_range), or None if unreadable."""
    try:
        with open(path) as f:
            lo, hi = f.read().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return None


def overlap(a: PortRange, b: PortRange) -> PortRange | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo <= hi else None
