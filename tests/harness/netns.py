"""A multi-host test network in Linux network namespaces.

Layout of one `Network` with id ``k`` (prefix ``gh``):

    netns gh<k>-sw        the "switch": bridge gh<k>br, one port gh<k>v<i> per host, no address
    netns gh<k>-h<i>      host i: eth0 = 10.77.<k>.<10+i>/24 (veth to gh<k>v<i>), lo up

The bridge lives in its own namespace on purpose: bridged traffic then never meets the root
namespace's firewall. With br_netfilter loaded, the kernel would pass bridged IPv4 frames
through the iptables/nftables FORWARD hooks of the namespace that owns the bridge; a fresh
namespace has no rules there (policy accept), and we also set bridge-nf-call-iptables=0
inside the switch namespace (the sysctl is per namespace) - the root namespace is never
touched. The bridge is connected to nothing but the hosts' veths.

The id ``k`` is reserved atomically by creating a state file ``/run/gpud-harness/gh<k>.json``
(O_EXCL) that names the owner pid; `cleanup_leftovers()` removes the namespaces of ids whose
owner is gone. ``k`` is also the third octet of the subnet, and ids whose 10.77.<k>.0/24
appears on any interface of any namespace are skipped.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

from gpud.process_groups import proc_stat

PREFIX = "gh"
STATE_DIR = Path("/run/gpud-harness")
NETNS_DIR = Path("/run/netns")
SUPERNET = ipaddress.ip_network("10.77.0.0/16")
FIRST_HOST_OCTET = 10
HOST_IFACE = "eth0"
TERM_GRACE_S = 3.0
_NETNS_RE = re.compile(rf"^{PREFIX}(\d{{1,3}})-")


class HarnessError(RuntimeError):
    pass


def sh(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output; on failure raise with its stderr."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, input=input
    )
    if check and proc.returncode != 0:
        raise HarnessError(
            f"{' '.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc


def _proc_start_time(pid: int) -> int | None:
    stat = proc_stat(pid)
    return None if stat is None else stat.start


def _pgid_of(pid: int) -> int | None:
    stat = proc_stat(pid)
    return None if stat is None else stat.pgid


def _netns_inode(pid_or_name: int | str) -> int | None:
    path = (
        f"/proc/{pid_or_name}/ns/net" if isinstance(pid_or_name, int) else NETNS_DIR / pid_or_name
    )
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def kill_process_tree(pid: int) -> None:
    """SIGKILL the process group of ``pid`` and of every descendant: gpud's children (serf,
    replicas) run in groups of their own, so killing gpud's group alone leaves them behind."""
    groups = {pid}
    for child in children_of(pid):
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(child))
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def children_of(pid: int) -> list[int]:
    """All descendants of ``pid`` (from /proc parent links)."""
    parent: dict[int, list[int]] = {}
    for p in _all_pids():
        stat = proc_stat(p)
        if stat is not None:
            parent.setdefault(stat.ppid, []).append(p)
    found: list[int] = []
    todo = list(parent.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(parent.get(child, []))
    return found


def _owner_alive(state: dict[str, Any]) -> bool:
    pid, start = state.get("pid"), state.get("start")
    return isinstance(pid, int) and _proc_start_time(pid) == start


def _netns_pids(netns: str) -> list[int]:
    proc = sh(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _kill_pids(pids: Sequence[int], grace_s: float) -> None:
    """SIGTERM, wait up to grace_s for them to go, SIGKILL the rest (by pid)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in pids if _proc_start_time(p) is not None]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in alive if _proc_start_time(p) is not None and not _is_zombie(p)]
        if not alive:
            return


def _is_zombie(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is None or stat.state == "Z"


def _delete_netns(names: Sequence[str], grace_s: float) -> None:
    """Stop every process inside these namespaces (they were created by the harness, so all
    of them are ours), then delete the namespaces; veths and bridges inside go with them."""
    pids = [p for name in names for p in _netns_pids(name)]
    _kill_pids([p for p in pids if p != os.getpid()], grace_s)
    for name in names:
        if (NETNS_DIR / name).exists():
            sh(["ip", "netns", "del", name], check=False)


def _prefixed_netns() -> dict[int, list[str]]:
    by_id: dict[int, list[str]] = {}
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(NETNS_DIR)):
            if m := _NETNS_RE.match(name):
                by_id.setdefault(int(m.group(1)), []).append(name)
    return by_id


def _read_state(net_id: int) -> dict[str, Any] | None:
    try:
        return json.loads((STATE_DIR / f"{PREFIX}{net_id}.json").read_text())
    except (OSError, ValueError):
        return None


def cleanup_leftovers(grace_s: float = 1.0) -> list[str]:
    """Remove namespaces (and the processes inside) of earlier harness runs whose owner process
    is gone. Only names with this harness's prefix are considered; live runs are left alone.
    Returns the deleted namespace names."""
    removed: list[str] = []
    ids = set(_prefixed_netns())
    with contextlib.suppress(FileNotFoundError):
        ids |= {
            int(m.group(1))
            for f in os.listdir(STATE_DIR)
            if (m := re.match(rf"^{PREFIX}(\d+)\.json$", f))
        }
    for net_id in sorted(ids):
        state = _read_state(net_id)
        if state is not None and _owner_alive(state):
            continue
        names = _prefixed_netns().get(net_id, [])
        _delete_netns(names, grace_s)
        removed.extend(names)
        (STATE_DIR / f"{PREFIX}{net_id}.json").unlink(missing_ok=True)
    return removed


def _used_third_octets() -> set[int]:
    """Third octets of 10.77.x.y addresses on any interface of the root and named namespaces."""
    outputs = [sh(["ip", "-br", "-4", "addr"], check=False).stdout]
    outputs.append(
        sh(
            ["ip", "-all", "netns", "exec", "ip", "-br", "-4", "addr"], check=False, timeout=60
        ).stdout
    )
    used: set[int] = set()
    for m in re.finditer(r"\b10\.77\.(\d{1,3})\.\d{1,3}/", "\n".join(outputs)):
        used.add(int(m.group(1)))
    return used


def _reserve_id() -> int:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    used = _used_third_octets()
    # The state file appears complete or not at all (hard link of a written temp file), so a
    # concurrent cleanup_leftovers never sees an empty one and mistakes it for a dead run.
    draft = STATE_DIR / f".{PREFIX}-draft-{os.getpid()}"
    draft.write_text(json.dumps({"pid": os.getpid(), "start": _proc_start_time(os.getpid())}))
    candidates = [k for k in range(1, 255) if k not in used]
    random.shuffle(candidates)
    try:
        for k in candidates:
            state = STATE_DIR / f"{PREFIX}{k}.json"
            try:
                os.link(draft, state)
            except FileExistsError:
                continue
            if _prefixed_netns().get(k):  # a crashed run's leftovers without a state file
                state.unlink()
                continue
            return k
    finally:
        draft.unlink(missing_ok=True)
    raise HarnessError("no free 10.77.x.0/24 subnet for a harness network")


class Host:
    """One simulated host: a network namespace with an address on the shared bridge.

    `run` and `popen` execute inside the namespace via `ip netns exec`. Processes started with
    `popen` get their own process group and are stopped by `Network.close()`."""

    def __init__(
        self, network: Network, name: str, netns: str, addr: str, iface: str, cable: tuple[str, str]
    ) -> None:
        self.network = network
        self.name = name
        self.netns = netns
        self.addr = addr
        self.iface = iface
        # (namespace, interface) of the veth end on the other side: this host's "cable".
        self.cable = cable

    @property
    def advertise_addr(self) -> str:
        """The address the rest of the network knows this host by."""
        return self.addr

    def __repr__(self) -> str:
        return f"Host({self.name!r}, netns={self.netns!r}, addr={self.addr!r})"

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return sh(self.argv(argv), check=check, timeout=timeout, input=input)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in this namespace in a new session (own process group)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(argv), start_new_session=True, **kwargs)
        self.network._started.append(proc)
        return proc

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(["ip", "-n", self.netns, *args], check=check)

    def link_down(self) -> None:
        """Unplug the cable: the far veth end goes down, our iface loses carrier, address stays."""
        sh(["ip", "-n", self.cable[0], "link", "set", self.cable[1], "down"])

    def link_up(self) -> None:
        sh(["ip", "-n", self.cable[0], "link", "set", self.cable[1], "up"])

    def add_addr(self, addr: str, prefixlen: int = 24) -> None:
        self.ip("addr", "add", f"{addr}/{prefixlen}", "dev", self.iface)

    def del_addr(self, addr: str, prefixlen: int = 24) -> None:
        self.ip("addr", "del", f"{addr}/{prefixlen}", "dev", self.iface)

    def set_addr(self, addr: str, prefixlen: int = 24) -> None:
        """Replace the primary address (imitates a DHCP change); `addr` becomes `self.addr`."""
        self.add_addr(addr, prefixlen)
        self.del_addr(self.addr, self.network.subnet.prefixlen)
        self.addr = addr


class Network:
    """A bridge and ``hosts`` namespaces. Use as a context manager; `close()` is idempotent and
    runs on any exception, including KeyboardInterrupt inside the `with` block."""

    def __init__(self, hosts: int = 3, *, term_grace_s: float = TERM_GRACE_S) -> None:
        if not 1 <= hosts <= 240:
            raise ValueError(f"hosts must be 1..240, got {hosts}")
        self.size = hosts
        self.term_grace_s = term_grace_s
        self.id: int | None = None
        self.hosts: list[Host] = []
        self.extra_netns: list[str] = []  # namespaces added later (e.g. port-mapped inner hosts)
        self.inner_hosts: list[Any] = []  # faults.PortMappedHost objects
        self._started: list[subprocess.Popen[Any]] = []
        self._closed = False

    @property
    def switch_netns(self) -> str:
        return f"{PREFIX}{self.id}-sw"

    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.id}br"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.77.{self.id}.0/24")

    @property
    def prefix(self) -> str:
        """Every namespace name of this network starts with this."""
        return f"{PREFIX}{self.id}-"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def start(self) -> Self:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        self.id = _reserve_id()
        sw = self.switch_netns
        sh(["ip", "netns", "add", sw])
        if Path("/proc/sys/net/bridge").exists():
            # Only our fresh switch namespace: bridged frames skip its (empty) netfilter hooks.
            sh(
                [
                    "ip",
                    "netns",
                    "exec",
                    sw,
                    "sysctl",
                    "-qw",
                    "net.bridge.bridge-nf-call-iptables=0",
                    "net.bridge.bridge-nf-call-ip6tables=0",
                    "net.bridge.bridge-nf-call-arptables=0",
                ],
                check=False,
            )
        sh(["ip", "-n", sw, "link", "add", self.bridge, "type", "bridge"])
        sh(["ip", "-n", sw, "link", "set", self.bridge, "up"])
        for i in range(self.size):
            self.hosts.append(self._add_host(i))

    def _add_host(self, i: int) -> Host:
        name = f"h{i}"
        netns = f"{self.prefix}{name}"
        port = f"{PREFIX}{self.id}v{i}"
        addr = str(self.subnet.network_address + FIRST_HOST_OCTET + i)
        sw = self.switch_netns
        sh(["ip", "netns", "add", netns])
        self.extra_netns.append(netns)  # registered at once so a failure below still cleans it
        # set_addr deletes the old primary address: keep the new one (a secondary) alive.
        sh(
            [
                "ip",
                "netns",
                "exec",
                netns,
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.promote_secondaries=1",
                "net.ipv4.conf.default.promote_secondaries=1",
            ]
        )
        sh(
            [
                "ip",
                "-n",
                sw,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                HOST_IFACE,
                "netns",
                netns,
            ]
        )
        sh(["ip", "-n", sw, "link", "set", port, "master", self.bridge, "up"])
        sh(["ip", "-n", netns, "link", "set", "lo", "up"])
        sh(["ip", "-n", netns, "addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", HOST_IFACE])
        sh(["ip", "-n", netns, "link", "set", HOST_IFACE, "up"])
        self.extra_netns.remove(netns)
        return Host(self, name, netns, addr, HOST_IFACE, (sw, port))

    def add_netns(self, suffix: str) -> str:
        """Create an extra namespace named ``<prefix><suffix>`` that `close()` will delete."""
        if self.id is None:
            raise HarnessError("network not started")
        name = f"{self.prefix}{suffix}"
        sh(["ip", "netns", "add", name])
        self.extra_netns.append(name)
        sh(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def all_netns(self) -> list[str]:
        if self.id is None:
            return []
        return _prefixed_netns().get(self.id, [])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Ctrl-C during teardown must not leave namespaces behind: finish it first.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            self._stop_started()
            if self.id is not None:
                _delete_netns(self.all_netns(), self.term_grace_s)
                (STATE_DIR / f"{PREFIX}{self.id}.json").unlink(missing_ok=True)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _stop_started(self) -> None:
        """SIGTERM the process groups started by `Host.popen`, grace, then SIGKILL."""
        ours = {_netns_inode(n) for n in self.all_netns()} - {None}
        for sig, wait in ((signal.SIGTERM, self.term_grace_s), (signal.SIGKILL, 1.0)):
            groups = [p.pid for p in self._started if group_alive(p.pid, ours)]
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, sig)
            deadline = time.monotonic() + wait
            for proc in self._started:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            while any(group_alive(g, ours) for g in groups) and time.monotonic() < deadline:
                time.sleep(0.05)
        for proc in self._started:
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()


def group_alive(pgid: int, netns_inodes: set[int | None]) -> bool:
    """Is there a live (non-zombie) process in group ``pgid`` inside one of these namespaces?
    Checking the namespace keeps us from signalling a recycled id that is not ours."""
    for p in _all_pids():
        if _pgid_of(p) == pgid and not _is_zombie(p) and _netns_inode(p) in netns_inodes:
            return True
    return False


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
