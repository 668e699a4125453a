"""Before anything starts: is every port gpud needs free, and if not, who holds it?

A port that another daemon holds (Debian's own `serf.service` on 7946/7373, Docker Swarm on
7946) must fail the start at once with the port and the holder named, not leave the unit
`activating` while serf restarts with "address already in use" in its own output.

The holder is found the way `ss -p` does: the socket's inode from /proc/net/{tcp,udp}[6], then
the process whose /proc/PID/fd links to ``socket:[inode]``. An unprivileged gpud cannot read
other users' fd tables, so the holder's uid (also in /proc/net) is reported when its pid is not.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import pwd
import socket
from pathlib import Path
from typing import Literal

import msgspec

from gpud.component import Problem
from gpud.config import Config
from gpud.errors import GpudError

Proto = Literal["tcp", "udp"]
# /proc/net/tcp states: 0A = LISTEN. UDP sockets have no listen state ("07" = unconnected).
_TCP_LISTEN = "0A"
# Bounds on the /proc scan: a host with more processes than this gets "pid unknown".
MAX_PIDS_SCANNED = 65536


class PortNeed(msgspec.Struct, frozen=True, kw_only=True):
    """One port gpud binds: who uses it, the config field that sets it, where it binds."""

    component: str  # "serf" or "peer": the code prefix of its conflict problem
    purpose: str
    field: str
    proto: Proto
    host: str
    port: int


class Holder(msgspec.Struct, frozen=True, kw_only=True):
    uid: int
    pid: int | None = None
    command: str = ""

    def describe(self) -> str:
        user = _user_name(self.uid)
        if self.pid is None:
            return f"a process of user {user} (uid {self.uid}) that gpud may not inspect"
        return f"pid {self.pid} ({self.command or '?'}, user {user})"


class PortConflict(msgspec.Struct, frozen=True, kw_only=True):
    need: PortNeed
    error: str
    holders: list[Holder] = []

    def describe(self) -> str:
        need = self.need
        where = f"{need.purpose} port {need.host}:{need.port}/{need.proto} ({need.field})"
        if not self.holders:
            return f"{where} cannot be bound: {self.error}"
        return f"{where} is in use by {', '.join(h.describe() for h in self.holders)}"

    def problem(self) -> Problem:
        need = self.need
        return Problem(
            code=f"{need.component}.port_conflict",
            severity="critical",
            subject=f"{need.port}/{need.proto}",
            message=self.describe(),
            fix=(
                f"stop the other service (`ss -lntup 'sport = :{need.port}'` names it; Debian's "
                f"stand-alone serf: `systemctl disable --now serf`) or set {need.field} to a "
                "free port on every host"
            ),
        )


class ProcNetSocket(msgspec.Struct, frozen=True, kw_only=True):
    local: str
    port: int
    state: str
    uid: int
    inode: int


def needed_ports(config: Config, advertise_addr: str, advertise_is_local: bool) -> list[PortNeed]:
    """Every port the agent binds, with the address it binds it on (pure).

    Behind NAT the advertised address is not local: serf and the peer API then bind all
    addresses (see serf_config and PeerApi), so that is what must be free.
    """
    host = advertise_addr if advertise_is_local else "0.0.0.0"
    gossip = config.serf.bind_port
    return [
        PortNeed(
            component="serf", purpose="serf gossip", field="serf.bind_port", proto="tcp",
            host=host, port=gossip,
        ),
        PortNeed(
            component="serf", purpose="serf gossip", field="serf.bind_port", proto="udp",
            host=host, port=gossip,
        ),
        PortNeed(
            component="serf", purpose="serf RPC", field="serf.rpc_port", proto="tcp",
            host="127.0.0.1", port=config.serf.rpc_port,
        ),
        PortNeed(
            component="peer", purpose="peer API", field="peer.port", proto="tcp",
            host=host, port=config.peer.port,
        ),
    ]  # fmt: skip


def bind_error(need: PortNeed) -> OSError | None:
    """Try the bind gpud's listener will make; None when it would succeed.

    TCP listeners (Go's and aiohttp's) set SO_REUSEADDR, so sockets in TIME_WAIT do not count.
    """
    family = socket.AF_INET6 if ipaddress.ip_address(need.host).version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if need.proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        if need.proto == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((need.host, need.port))
            if need.proto == "tcp":
                sock.listen(1)
        except OSError as exc:
            return exc
    return None


def parse_proc_net(text: str) -> list[ProcNetSocket]:
    """Rows of /proc/net/{tcp,tcp6,udp,udp6} (pure); malformed rows are skipped."""
    rows: list[ProcNetSocket] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local, _, port_hex = fields[1].rpartition(":")
        try:
            rows.append(
                ProcNetSocket(
                    local=_proc_net_addr(local),
                    port=int(port_hex, 16),
                    state=fields[3],
                    uid=int(fields[7]),
                    inode=int(fields[9]),
                )
            )
        except ValueError:
            continue
    return rows


def _proc_net_addr(hex_addr: str) -> str:
    # The kernel prints each 32-bit word in host byte order (little-endian here).
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def sockets_on(proto: Proto, port: int, proc: Path = Path("/proc")) -> list[ProcNetSocket]:
    """This network namespace's sockets bound to ``port`` (listening ones, for TCP)."""
    found: list[ProcNetSocket] = []
    for table in (proto, f"{proto}6"):
        try:
            text = (proc / "net" / table).read_text()
        except OSError:
            continue
        found += [
            row
            for row in parse_proc_net(text)
            if row.port == port and (proto == "udp" or row.state == _TCP_LISTEN)
        ]
    return found


def socket_inodes(pid: int, proc: Path = Path("/proc")) -> set[int]:
    """Inodes of the sockets process ``pid`` has open (empty if it may not be read)."""
    inodes: set[int] = set()
    try:
        names = os.listdir(proc / str(pid) / "fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(proc / str(pid) / "fd" / name)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def pids_holding(inodes: set[int], proc: Path = Path("/proc")) -> dict[int, int]:
    """inode -> a pid holding it, for the processes whose fd tables we may read."""
    holders: dict[int, int] = {}
    try:
        pids = sorted((int(p) for p in os.listdir(proc) if p.isdigit()), reverse=True)
    except OSError:
        return holders
    for pid in pids[:MAX_PIDS_SCANNED]:
        for inode in socket_inodes(pid, proc) & inodes:
            holders.setdefault(inode, pid)
        if len(holders) == len(inodes):
            break
    return holders


def holders_of(proto: Proto, port: int, proc: Path = Path("/proc")) -> list[Holder]:
    rows = sockets_on(proto, port, proc)
    pids = pids_holding({row.inode for row in rows}, proc)
    result: list[Holder] = []
    for row in rows:
        pid = pids.get(row.inode)
        holder = Holder(uid=row.uid, pid=pid, command=command_of(pid, proc) if pid else "")
        if holder not in result:
            result.append(holder)
    return result


def check(
    config: Config, advertise_addr: str, advertise_is_local: bool, component: str | None = None
) -> list[PortConflict]:
    """The conflicts on every port gpud needs (or ``component``'s only), each with its
    holders; empty when all are free."""
    conflicts: list[PortConflict] = []
    for need in needed_ports(config, advertise_addr, advertise_is_local):
        if component is not None and need.component != component:
            continue
        exc = bind_error(need)
        if exc is None:
            continue
        if exc.errno == errno.EADDRNOTAVAIL:
            continue  # the address is not ours (yet): netcheck reports that, not a conflict
        conflicts.append(
            PortConflict(
                need=need,
                error=exc.strerror or str(exc),
                holders=holders_of(need.proto, need.port) if exc.errno == errno.EADDRINUSE else [],
            )
        )
    return conflicts


def summary(conflicts: list[PortConflict]) -> str:
    """One line for STATUS= and the journal."""
    return "port conflict: " + "; ".join(c.describe() for c in conflicts)


class PortConflictError(GpudError):
    """The agent cannot start: a port it needs is held by another process."""

    def __init__(self, conflicts: list[PortConflict]) -> None:
        super().__init__(summary(conflicts))
        self.conflicts = conflicts


def command_of(pid: int, proc: Path) -> str:
    try:
        return (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
