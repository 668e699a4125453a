"""Before anything starts: can this host run the agent (state dir, socket path, cluster key
and who may read it), is every port gpud needs free, and if not, who holds it?

A port that another daemon holds (Debian's own `serf.service` on 7946/7373, Docker Swarm on
7946) must fail the start at once with the port and the holder named, not leave the unit
`activating` while serf restarts with "address already in use" in its own output.

The holder is found the way `ss -p` does: the socket's inode from /proc/net/{tcp,udp}[6], then
the process whose /proc/PID/fd links to ``socket:[inode]``. An unprivileged gpud cannot read
other users' fd tables, so the holder's uid (also in /proc/net) is reported when its pid is not.
"""

from __future__ import annotations

import errno
import grp
import ipaddress
import json
import os
import pwd
import shlex
import shutil
import socket
from pathlib import Path
from typing import Literal

import msgspec

from gpud.component import Problem
from gpud.config import ApiConfig, Config, PortsConfig, RayConfig, vllm_executable_check
from gpud.errors import ConfigError, GpudError
from gpud.router import tls
from gpud.secret import cluster_key
from gpud.serf.config import PACKAGED_SERF, serf_binary


def check_host(config: Config) -> Config:
    """What only this host can tell (``gpud agent`` and ``--check-config``, not client
    commands): the state dir can be a directory, the cluster key is readable and valid."""
    state = config.state_dir
    for parent in (state, *state.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"paths.state_dir: {parent} exists and is not a directory")
            break
    sock = Path(config.socket_path)
    if (sock.exists() or sock.is_symlink()) and (sock.is_symlink() or not sock.is_socket()):
        raise ConfigError(
            f"{'api.socket' if config.api.socket else 'paths.runtime_dir'}: {sock} exists and is "
            "not a socket; gpud will not replace it"
        )
    try:
        cluster_key(config)
    except UnicodeDecodeError:
        raise ConfigError(
            f"cluster.key_file {config.cluster.key_file}: not base64 text (`gpud keygen`)"
        ) from None
    return config


def key_file_mode_warning(
    path: str,
    mode: int,
    group: str,
    group_members: list[str],
    operator_groups: set[str],
    service_users: set[str],
) -> str | None:
    """Why the cluster key file is readable by more than root and the service (pure): by
    every user, or by a group that operators are in (the socket or admin group, or one with
    members besides the service). None: only root and the service can read it."""
    if mode & 0o004:
        return f"cluster.key_file {path} is readable by every user (mode {mode & 0o777:04o})"
    if not mode & 0o040:
        return None
    others = sorted(set(group_members) - service_users)
    if group in operator_groups or others:
        who = f"members {', '.join(others)}" if others else "the operators of the local API"
        return (
            f"cluster.key_file {path} is readable by group {group} (mode {mode & 0o777:04o}), "
            f"which holds {who}: they can join the cluster and become Ray head"
        )
    return None


def host_warnings(config: Config) -> list[str]:
    """What this host's setup risks without being wrong (``--check-config`` prints them, the
    agent reports them as problems): a cluster key readable beyond root and the service."""
    path = config.cluster.key_file
    if not path:
        return []
    try:
        st = os.stat(path)
    except OSError:
        return []  # check_host reports an unreadable key
    try:
        entry = grp.getgrgid(st.st_gid)
        group, members = entry.gr_name, list(entry.gr_mem)
    except KeyError:
        group, members = str(st.st_gid), []
    try:
        running = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        running = ""
    warning = key_file_mode_warning(
        path,
        st.st_mode,
        group,
        members,
        operator_groups={config.api.socket_group, config.api.admin_group},
        service_users={"root", "gpud", running},
    )
    return [warning] if warning else []


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def check_config(config: Config, ephemeral_file: Path = EPHEMERAL_RANGE) -> list[str]:
    """``--check-config``: everything this host can tell about ``config``, what the agent
    refuses at start (`check_host`) and what it would run with but badly. Raises ConfigError
    naming the key for what is wrong; returns warnings for a default this host lacks that the
    agent runs without (a group, ray, vllm) and for a key file readable beyond the service."""
    check_host(config)
    ephemeral = read_ephemeral_range(ephemeral_file)
    if ephemeral is not None:
        overlap = ephemeral_overlap(config.ports, *ephemeral)
        if overlap is not None:
            raise ConfigError(overlap)
    _check_serf_binary(config.serf.binary)
    _check_interface(config.node.interface)
    if config.router.enabled and config.router.tls_cert:
        # What the router would refuse at its first listen: a missing, malformed or
        # mismatched pair, or a key file others may read.
        tls.server_context(config.router.tls_cert, config.router.tls_key)
    found = [
        _group_missing("api.socket_group", config.api.socket_group, "operators cannot read it"),
        _group_missing(
            "api.admin_group",
            config.api.admin_group,
            "only root may lease ports or GPUs, deploy and rotate keys",
        ),
        _ray_missing(config.ray) if config.ray.enabled else None,
        vllm_executable_check(config),
    ]
    return [*host_warnings(config), *(w for w in found if w)]


def read_ephemeral_range(path: Path = EPHEMERAL_RANGE) -> tuple[int, int] | None:
    """The kernel's ephemeral port range (inclusive); None when it cannot be read."""
    try:
        low, high = (int(word) for word in path.read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


def ephemeral_overlap(ports: PortsConfig, low: int, high: int) -> str | None:
    """Why the ports range [range_start, range_end) must not meet the kernel's ephemeral range
    [low, high] (pure): any outgoing connection may take a port of it, and a replica leased
    that port then fails to bind. None: they are apart."""
    start, end = ports.range_start, ports.range_end
    if max(start, low) > min(end - 1, high):
        return None
    key, value = ("ports.range_start", start) if low <= start <= high else ("ports.range_end", end)
    return (
        f"{key} = {value}: the ports range {start}-{end} overlaps the kernel's ephemeral port "
        f"range {low}-{high} (net.ipv4.ip_local_port_range), from which outgoing connections "
        f"take ports; keep ports.range_end <= {low} or ports.range_start > {high}, or move the "
        "ephemeral range (sysctl net.ipv4.ip_local_port_range)"
    )


def _check_serf_binary(configured: str) -> None:
    if serf_binary(configured) is not None:
        return
    if configured:
        raise ConfigError(
            f"serf.binary = {json.dumps(configured)}: not an executable (on PATH, or a file); "
            f"name the serf executable, or leave it empty for the packaged {PACKAGED_SERF}"
        )
    raise ConfigError(
        f"serf.binary: empty, and neither {PACKAGED_SERF} nor `serf` on PATH exists; install "
        "gpud's package (it bundles serf) or set serf.binary to a serf executable"
    )


def _check_interface(name: str) -> None:
    if not name:
        return
    try:
        socket.if_nametoindex(name)
    except OSError:
        have = ", ".join(sorted(n for _, n in socket.if_nameindex()))
        raise ConfigError(
            f"node.interface = {json.dumps(name)}: no such interface on this host (it has: "
            f'{have}); name one of them, or "" for the default-route interface'
        ) from None


def _group_missing(key: str, name: str, effect: str) -> str | None:
    """None when group ``name`` exists. A group set in the config that does not is an error;
    the default missing is a warning (the agent runs, but ``effect``)."""
    try:
        grp.getgrnam(name)
        return None
    except KeyError:
        pass
    create = f"groupadd --system {shlex.quote(name)}"
    text = f"{key} = {json.dumps(name)}: no such group; create it: {create}"
    if name != getattr(ApiConfig(), key.removeprefix("api.")):
        raise ConfigError(text)
    return f"{text} (until then {effect})"


def _ray_missing(ray: RayConfig) -> str | None:
    if shutil.which(ray.executable) is not None:
        return None
    where = "not on PATH" if os.sep not in ray.executable else "not an executable file"
    text = (
        f"ray.executable = {json.dumps(ray.executable)}: {where}; set it to the ray of the CUDA "
        "stack's Python environment, or ray.enabled = false"
    )
    if ray.executable != RayConfig().executable:
        raise ConfigError(text)
    return f"{text} (until then this node cannot run Ray)"


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


def rpc_listener(
    port: int, child_pid: int, proc: Path = Path("/proc")
) -> Literal["nobody", "ours"] | PortConflict:
    """Who listens on serf's RPC port 127.0.0.1:``port``: nobody yet, only our serf child (``child_pid``), or
    someone else (the conflict naming the other holders)."""
    listeners = [
        row
        for row in sockets_on("tcp", port, proc)
        if row.local in ("127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1")
    ]
    if not listeners:
        return "nobody"
    own = socket_inodes(child_pid, proc)
    foreign = {row.inode for row in listeners if row.inode not in own}
    if not foreign:
        return "ours"
    pids = pids_holding(foreign, proc)
    holders = [
        Holder(
            uid=row.uid,
            pid=pids.get(row.inode),
            command=command_of(pids[row.inode], proc) if row.inode in pids else "",
        )
        for row in listeners
        if row.inode in foreign
    ]
    need = PortNeed(
        component="serf", purpose="serf RPC", field="serf.rpc_port", proto="tcp",
        host="127.0.0.1", port=port,
    )  # fmt: skip
    return PortConflict(need=need, error="not our serf", holders=holders)


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
