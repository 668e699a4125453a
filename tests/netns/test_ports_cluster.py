"""Port blocks and leases against real gpud agents (real serf gossip) in the namespace harness.

- Four agents sharing one address whose rendezvous order all starts with the same block end up
  on four distinct confirmed blocks; an agent on another address takes that same block (blocks
  are unique per address only); each namespace's ip_local_reserved_ports holds its blocks; a
  restarted agent keeps its block and its leases.
- kill -9 of an agent in the middle of a lease storm on its Unix socket: after the restart every
  acknowledged lease is there, none doubled, and leases of dead owner pids are reclaimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from gpud import client
from gpud.config import PortsConfig
from gpud.ports import blocks, reserve
from tests.harness.gpud_node import Cluster, GpudNode, wait_for
from tests.harness.lease_storm import lease_storm
from tests.harness.netns import Host

CLAIM_TIMEOUT_S = 60.0


def names_preferring_one_block(count: int, n_blocks: int) -> tuple[int, list[str]]:
    """``count`` node names whose rendezvous order starts with the same block (worst case)."""
    by_first: dict[int, list[str]] = {}
    for i in range(10_000):
        name = f"p{i}"
        group = by_first.setdefault(blocks.preference(name, n_blocks)[0], [])
        group.append(name)
        if len(group) == count:
            return blocks.preference(name, n_blocks)[0], group
    raise AssertionError("no such names among 10,000")


def node_ports(i: int) -> dict[str, int]:
    """Distinct serf/rpc/peer ports for the i-th node on one address."""
    return {"serf_port": 7946 + 10 * i, "rpc_port": 7373 + 10 * i, "peer_port": 7948 + 10 * i}


def add_node(c: Cluster, host: Host, name: str, i: int, **kwargs: Any) -> GpudNode:
    """A node named ``name`` on ``host`` with the i-th port set, joining every node so far.

    (Built here, not with Cluster.add_node, which gives every node on a host one directory.)"""
    start = kwargs.pop("start", True)
    node = GpudNode(
        host,
        c.workdir / name,
        key=c.key,
        join=[n.join_addr for n in c.nodes],
        name=name,
        **node_ports(i),
        **kwargs,
    )
    c.nodes.append(node)
    if start:
        node.start()
    return node


def confirmed_block(node: GpudNode) -> int | None:
    ports = node.api("/v1/status")["ports"]
    return ports["block"] if ports["state"] == "confirmed" else None


def gossiped_blocks(node: GpudNode) -> dict[str, tuple[int, int]]:
    """(blk, bc) of every alive member as ``node``'s gossip shows them."""
    return {
        m["name"]: (m["tags"]["blk"], m["tags"]["bc"])
        for m in node.members()
        if m["status"] == "alive" and m["tags"] is not None
    }


def reserved_in(host: Host) -> list[reserve.PortRange]:
    text = host.run(["cat", reserve.RESERVED_PORTS]).stdout
    return reserve.parse_ranges(text)


def block_ports(blk: int) -> tuple[int, int]:
    rng = blocks.block_range(PortsConfig(), blk)
    return rng.start, rng.stop - 1


def settled(nodes: list[GpudNode]) -> dict[str, int] | None:
    """Each node's block once all are confirmed and every node's gossip agrees on all of them."""
    held = {node.name: confirmed_block(node) for node in nodes}
    if any(blk is None for blk in held.values()):
        return None
    for node in nodes:
        view = gossiped_blocks(node)
        for name, blk in held.items():
            if view.get(name, (None, 0))[0] != blk or view[name][1] <= 0:
                return None
    return held  # type: ignore[return-value]


def test_blocks_unique_per_address_reserved_and_kept_over_restart(
    bare_cluster: Callable[[int], Cluster],
) -> None:
    c = bare_cluster(2)
    shared, other = c.hosts
    n_blocks = blocks.block_count(PortsConfig())
    first_choice, names = names_preferring_one_block(5, n_blocks)
    on_shared = [add_node(c, shared, name, i) for i, name in enumerate(names[:4])]

    # 1. Four agents on one address, all preferring one block: four distinct confirmed blocks.
    held = wait_for(
        lambda: settled(on_shared),
        CLAIM_TIMEOUT_S,
        0.5,
        what="four confirmed blocks on one address",
        describe=c.describe,
    )
    assert len(set(held.values())) == 4, held
    assert first_choice in held.values()  # somebody got the block all of them wanted first
    for node in on_shared:
        status = node.status()  # through the CLI
        assert status["ports"]["state"] == "confirmed"
        assert status["ports"]["block"] == held[node.name]
        assert status["ports"]["reservation"] == "reserved"
        tags = {m["name"]: m["tags"] for m in status["members"]}
        assert {name: tags[name]["blk"] for name in held} == held

    # An agent on another address that also prefers that block takes it: blocks are unique per
    # address, not per cluster.
    elsewhere = add_node(c, other, names[4], 0)
    everyone = [*on_shared, elsewhere]
    held_all = wait_for(
        lambda: settled(everyone),
        CLAIM_TIMEOUT_S,
        0.5,
        what="the fifth agent's block",
        describe=c.describe,
    )
    assert held_all[elsewhere.name] == first_choice
    assert {n: held_all[n] for n in held} == held  # nobody on the shared address moved

    # 2. Each namespace's reserved ports hold the blocks of the agents in it.
    for host, nodes in ((shared, on_shared), (other, [elsewhere])):
        ranges = reserved_in(host)
        for node in nodes:
            want = block_ports(held_all[node.name])
            assert reserve.uncovered(ranges, want) == [], (host.netns, want, ranges)
    for blk in set(held.values()) - {first_choice}:
        assert reserve.uncovered(reserved_in(other), block_ports(blk)) == [block_ports(blk)]

    # 3. A restarted agent keeps its block and its leases; one that had to move off its first
    # choice, so that a fresh decision would not land there again.
    node = next(n for n in on_shared if held[n.name] != first_choice)
    leases = [
        node_api(node, "POST", "/v1/ports/leases", {"owner": "keep", "count": n}) for n in (1, 3)
    ]
    bc_before = gossiped_blocks(on_shared[0])[node.name][1]
    node.restart()
    assert node.api("/v1/status")["ports"]["block"] == held[node.name]  # before gossip settles
    after = wait_for(
        lambda: settled(everyone), CLAIM_TIMEOUT_S, 0.5, what="claims after the restart"
    )
    assert after == held_all
    assert gossiped_blocks(on_shared[0])[node.name] == (held[node.name], bc_before)
    kept = {lease["id"]: lease["ports"] for lease in node.api("/v1/ports/leases")}
    assert kept == {lease["id"]: lease["ports"] for lease in leases}
    ranges = reserved_in(shared)
    for blk in held.values():
        assert reserve.uncovered(ranges, block_ports(blk)) == []


def node_api(node: GpudNode, method: str, path: str, body: Any = None) -> Any:
    return client.request(node.socket, method, path, body, timeout=10)


async def test_kill_9_during_a_lease_storm_against_the_agent(
    bare_cluster: Callable[[int], Cluster],
) -> None:
    c = bare_cluster(1)
    node = add_node(
        c,
        c.hosts[0],
        "storm",
        0,
        overrides={"ports": {"block_size": 2000, "zombie_grace_s": 1.0}},
        start=False,
    )
    await asyncio.to_thread(node.start)
    await asyncio.to_thread(
        wait_for, lambda: confirmed_block(node) is not None, CLAIM_TIMEOUT_S, 0.3, what="block"
    )

    # Owners that will be dead by the restart: short-lived children, leased for before the storm.
    doomed = [await asyncio.create_subprocess_exec("sleep", "30") for _ in range(3)]
    try:
        doomed_leases = [
            node_api(node, "POST", "/v1/ports/leases", {"owner": "dies", "count": 2, "pid": p.pid})
            for p in doomed
        ]
        alive_lease = node_api(
            node, "POST", "/v1/ports/leases", {"owner": "lives", "count": 1, "pid": os.getpid()}
        )
    finally:
        for p in doomed:
            p.kill()
            await p.wait()

    # SIGKILL gpud and serf while other requests are in flight.
    acked = await lease_storm(
        node.socket, clients=16, owner="storm", kill_after=300, kill=node.kill9
    )
    assert not node.running()
    assert node.proc is not None and node.proc.returncode == -9
    assert len(acked) >= 300

    await asyncio.to_thread(node.start)
    after = {lease["id"]: lease for lease in node_api(node, "GET", "/v1/ports/leases")}
    for lease_id, ports in acked.items():
        assert lease_id in after, f"acknowledged lease {lease_id} lost"
        assert after[lease_id]["ports"] == ports
    all_ports = [p for lease in after.values() for p in lease["ports"]]
    assert len(all_ports) == len(set(all_ports)), "a port is in two leases"
    assert alive_lease["id"] in after

    # The zombie scan reclaims the dead owners' leases (grace 1 s), and only those.
    def reclaimed() -> dict[str, Any] | None:
        now = {lease["id"]: lease for lease in node_api(node, "GET", "/v1/ports/leases")}
        return now if not any(lease["id"] in now for lease in doomed_leases) else None

    final = await asyncio.to_thread(wait_for, reclaimed, 20, 0.3, what="zombie reclaim")
    assert set(acked) | {alive_lease["id"]} <= set(final)
    # Beyond those, only storm leases whose answer the kill cut off.
    assert {final[i]["owner"] for i in set(final) - set(acked) - {alive_lease["id"]}} <= {"storm"}
    with contextlib.suppress(Exception):
        await asyncio.to_thread(node.terminate)


def test_concurrent_reservations_in_one_namespace_all_stick(network: Callable[..., Any]) -> None:
    """Agents sharing a namespace reserve their blocks at about the same moment: the sysctl's
    read-merge-write must not lose any of them."""
    host = network(1)[0]
    writers = 12
    start_at = time.time() + 2.0  # every writer sleeps until then, so their writes overlap
    script = (
        "import sys, time\n"
        "from gpud.ports import reserve\n"
        "lo = int(sys.argv[1])\n"
        f"time.sleep(max(0.0, {start_at} - time.time()))\n"
        "for k in range(20):\n"
        "    r = reserve.reserve((lo + 2 * k, lo + 2 * k))\n"
        "    assert r.error is None, r.error\n"
    )
    procs = [
        host.popen([sys.executable, "-c", script, str(21000 + 100 * w)]) for w in range(writers)
    ]
    for proc in procs:
        assert proc.wait(timeout=30) == 0
    ranges = reserved_in(host)
    missing = [
        21000 + 100 * w + 2 * k
        for w in range(writers)
        for k in range(20)
        if reserve.uncovered(ranges, (21000 + 100 * w + 2 * k,) * 2)
    ]
    assert missing == [], f"{len(missing)} reservations lost: {missing[:10]}"
