"""Fault injection with nftables inside the harness's namespaces.

Every fault lives in the table ``inet gh_faults`` of the namespaces it touches, as base chains
of its own (``f<n>_in`` on prerouting, ``f<n>_out`` on postrouting), so that `Fault.heal()`
removes exactly that fault and `heal(host)` drops the whole table - never anyone else's rules.
Prerouting/postrouting (not input/output) also catch traffic a host forwards, e.g. to a
port-mapped inner namespace. Hosts are matched by `Host.advertise_addr`, the address the rest
of the network sees (for a port-mapped host: its outer host's address).

Semantics:
- `partition(a, b)`: every IPv4 packet between a and b is dropped, both ways.
- `one_way(a, b)` ("a cannot reach b"): packets of connections *originated by a* towards b are
  dropped (conntrack direction "original": new TCP SYNs, UDP/ICMP flows a starts, and flows a
  had already opened); replies to connections b opens still flow. So a cannot open TCP to b,
  and b can open TCP to a. Caveat: a UDP flow with the same address/port pair both ways (Serf
  gossip, 7946<->7946) is one conntrack entry owned by whoever sent first; for "nothing a sends
  arrives at b" use ``stateless=True``, which drops every a->b packet (then b cannot complete a
  TCP handshake to a either, because a's SYN-ACK is dropped).
- `block_port(host, port)`: packets to that TCP (or UDP) port arriving on the host's network
  interface are dropped (before port-mapping DNAT, so for a port-mapped host block the outer
  port on the outer host); loopback traffic inside the host is not affected.
- `loss(host, percent)`: each packet through the host's interface is dropped with probability
  percent/100 (`numgen random mod 100 < percent`), in the chosen direction(s).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tests.harness.netns import HarnessError, Host, Network, sh

TABLE = "gh_faults"
NAT_TABLE = "gh_portmap"
# After conntrack (-200) and before DNAT (-100), so rules see the address a packet was sent to.
PRE_PRIORITY = -150
# After SNAT (100): outbound rules match on daddr, which postrouting never rewrites.
POST_PRIORITY = 150

_fault_ids = itertools.count(1)


def _nft(host: Host, script: str) -> None:
    host.run(["nft", "-f", "-"], input=script)


@dataclass
class Fault:
    """One injected fault: the chains it added, per namespace. `heal()` removes just those."""

    description: str
    chains: list[tuple[Host, str]] = field(default_factory=list)

    def heal(self) -> None:
        for host, chain in self.chains:
            host.run(["nft", "delete", "chain", "inet", TABLE, chain], check=False)
        self.chains.clear()

    def __enter__(self) -> Fault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.heal()


def _install(
    fault: Fault, host: Host, *, inbound: Sequence[str] = (), outbound: Sequence[str] = ()
) -> None:
    n = next(_fault_ids)
    lines = [f"add table inet {TABLE}"]
    for suffix, hook, priority, rules in (
        ("in", "prerouting", PRE_PRIORITY, inbound),
        ("out", "postrouting", POST_PRIORITY, outbound),
    ):
        if not rules:
            continue
        chain = f"f{n}_{suffix}"
        lines.append(
            f"add chain inet {TABLE} {chain} "
            f"{{ type filter hook {hook} priority {priority}; policy accept; }}"
        )
        lines.extend(f"add rule inet {TABLE} {chain} {rule}" for rule in rules)
        fault.chains.append((host, chain))
    _nft(host, "\n".join(lines) + "\n")


def partition(a: Host, b: Host) -> Fault:
    """Drop everything between a and b, both directions."""
    fault = Fault(f"partition {a.name} <-/-> {b.name}")
    # Inbound only, on both sides: a packet dropped on its way out fails the sender's send()
    # with EPERM, which no real partition does, and memberlist then skips the failed probe
    # instead of suspecting the peer, so Serf would never see the partition.
    for x, y in ((a, b), (b, a)):
        _install(fault, x, inbound=[f"ip saddr {y.advertise_addr} drop"])
    return fault


def partition_groups(side_a: Sequence[Host], side_b: Sequence[Host]) -> Fault:
    """Split the network: every host of side_a is partitioned from every host of side_b."""
    fault = Fault(f"partition {[h.name for h in side_a]} | {[h.name for h in side_b]}")
    for a in side_a:
        for b in side_b:
            fault.chains.extend(partition(a, b).chains)
    return fault


def one_way(a: Host, b: Host, *, stateless: bool = False) -> Fault:
    """a cannot reach b; b still reaches a (see the module docstring for the precise rules)."""
    match = "" if stateless else "ct direction original "
    fault = Fault(f"one-way {a.name} -/-> {b.name}{' (stateless)' if stateless else ''}")
    _install(fault, a, outbound=[f"ip daddr {b.advertise_addr} {match}drop"])
    _install(fault, b, inbound=[f"ip saddr {a.advertise_addr} {match}drop"])
    return fault


def block_port(
    host: Host, port: int, *, proto: Literal["tcp", "udp"] = "tcp", source: Host | None = None
) -> Fault:
    """Drop inbound packets to ``proto`` ``port`` on host (from ``source`` only, if given)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535, got {port}")
    src = f"ip saddr {source.advertise_addr} " if source else ""
    fault = Fault(
        f"block {proto}/{port} on {host.name}" + (f" from {source.name}" if source else "")
    )
    _install(fault, host, inbound=[f'iifname != "lo" {src}{proto} dport {port} drop'])
    return fault


def loss(host: Host, percent: int, *, direction: Literal["in", "out", "both"] = "both") -> Fault:
    """Drop ``percent``% of the packets through the host's interface at random."""
    if not 0 <= percent <= 100:
        raise ValueError(f"percent must be 0..100, got {percent}")
    fault = Fault(f"{percent}% loss on {host.name} ({direction})")
    if percent == 0:
        return fault
    # nft compares `mod 100` against 0..99 only, so 100% is a plain drop.
    rule = "drop" if percent == 100 else f"numgen random mod 100 < {percent} drop"
    _install(
        fault,
        host,
        inbound=[f'iifname "{host.iface}" {rule}'] if direction in ("in", "both") else [],
        outbound=[f'oifname "{host.iface}" {rule}'] if direction in ("out", "both") else [],
    )
    return fault


def heal(*hosts: Host) -> None:
    """Remove every fault the harness put on these hosts (only the harness's own table)."""
    for host in hosts:
        host.run(["nft", "delete", "table", "inet", TABLE], check=False)


def heal_all(network: Network) -> None:
    heal(*network.hosts)


class PortMappedHost(Host):
    """A service namespace behind Docker-style port mapping on ``outer``.

    Its own address (``addr``, 172.31.n.2) is private; peers reach it at
    ``outer.addr:outer_port`` (DNAT) and its outbound traffic leaves as ``outer.addr`` (masquerade),
    so a process inside sees an advertised address that is on none of its interfaces."""

    def __init__(
        self,
        outer: Host,
        name: str,
        netns: str,
        addr: str,
        cable: tuple[str, str],
        ports: dict[int, int],
    ) -> None:
        super().__init__(outer.network, name, netns, addr, "eth0", cable)
        self.outer = outer
        self.ports = ports

    @property
    def advertise_addr(self) -> str:
        return self.outer.addr


def port_mapped_host(outer: Host, ports: Mapping[int, int] | Sequence[int]) -> PortMappedHost:
    """Create an inner namespace on ``outer`` and map ``outer_port -> inner_port`` (TCP and UDP).
    ``ports`` may be a list, meaning the same port number outside and inside."""
    mapping = dict(ports) if isinstance(ports, Mapping) else {p: p for p in ports}
    for outer_port, inner_port in mapping.items():
        if not (1 <= outer_port <= 65535 and 1 <= inner_port <= 65535):
            raise ValueError(f"bad port mapping {outer_port} -> {inner_port}")
    network = outer.network
    n = sum(1 for h in network.inner_hosts if h.outer is outer)
    subnet = f"172.31.{n}"
    gateway, inner_addr = f"{subnet}.1", f"{subnet}.2"
    name = f"{outer.name}i{n}"
    netns = network.add_netns(name)
    cable = f"dk{n}"
    sh(
        [
            "ip",
            "-n",
            outer.netns,
            "link",
            "add",
            cable,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns,
        ]
    )
    sh(["ip", "-n", outer.netns, "addr", "add", f"{gateway}/24", "dev", cable])
    sh(["ip", "-n", outer.netns, "link", "set", cable, "up"])
    sh(["ip", "-n", netns, "addr", "add", f"{inner_addr}/24", "dev", "eth0"])
    sh(["ip", "-n", netns, "link", "set", "eth0", "up"])
    sh(["ip", "-n", netns, "route", "add", "default", "via", gateway])
    outer.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    lines = [
        f"add table ip {NAT_TABLE}",
        f"add chain ip {NAT_TABLE} pre {{ type nat hook prerouting priority -100; }}",
        f"add chain ip {NAT_TABLE} out {{ type nat hook output priority -100; }}",
        f"add chain ip {NAT_TABLE} post {{ type nat hook postrouting priority 100; }}",
        f'add rule ip {NAT_TABLE} post ip saddr {subnet}.0/24 oifname != "{cable}" masquerade',
    ]
    for outer_port, inner_port in mapping.items():
        for proto in ("tcp", "udp"):
            for chain in ("pre", "out"):
                lines.append(
                    f"add rule ip {NAT_TABLE} {chain} ip daddr {outer.addr} {proto} dport {outer_port} "
                    f"dnat to {inner_addr}:{inner_port}"
                )
    try:
        _nft(outer, "\n".join(lines) + "\n")
    except HarnessError as exc:
        raise HarnessError(f"port mapping on {outer.name}: {exc}") from None
    inner = PortMappedHost(outer, name, netns, inner_addr, (outer.netns, cable), mapping)
    network.inner_hosts.append(inner)
    return inner
