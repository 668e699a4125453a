"""The ports component over real sockets: HTTP errors, a 10,000-lease storm, kill -9, zombies,
foreign-bound ports, restart, several nodes on one address, and the CLI.

Every test uses its own port range (14000-16000, below the default space other helpers use) and
ports.reserve = false: only the netns test touches ip_local_reserved_ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgspec
import pytest

from gpud import cli, config
from gpud.context import Member, NodeContext
from gpud.ports import blocks
from gpud.ports.leases import LeaseStore
from gpud.ports.service import PortsService
from gpud.standalone import serve_unix
from gpud.state import StateStore
from gpud.tags import Tags
from tests.harness.lease_storm import lease_storm, unix_session
from tests.harness.ports import ADDR, running, write_config
from tests.harness.wait import async_wait_for


@contextlib.contextmanager
def server_process(cfg_path: Path) -> Iterator[subprocess.Popen[str]]:
    """The ports component alone in a child process, serving its routes on the config's socket."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpud.standalone", "ports", str(cfg_path), ADDR],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready and proc.stdout is not None, "ports service did not start in 20 s"
        assert proc.stdout.readline().startswith("ready"), "ports service failed to start"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def test_bad_requests_get_clear_errors_and_change_nothing(workdir: Path) -> None:
    cfg = write_config(workdir, settle_s=0.5)
    async with running(cfg) as service:
        runner = await serve_unix(service, str(workdir / "api.sock"))
        try:
            async with unix_session(workdir / "api.sock") as http:
                url = "http://gpud/v1/ports/leases"
                early = await http.post(url, json={"owner": "x", "count": 1})
                assert early.status == 503
                assert "not confirmed" in (await early.json())["error"]
                await asyncio.wait_for(service.ready(), 10)
                bad_bodies: list[bytes] = [
                    b"not json",
                    b'{"owner": "x"}',
                    b'{"owner": "x", "count": "3"}',
                    b'{"owner": "x", "count": 0}',
                    b'{"owner": "x", "count": 65}',
                    b'{"owner": "", "count": 1}',
                    b'{"owner": "x", "count": 1, "colour": "red"}',
                    b'{"owner": "x", "count": 1, "pid": -4}',
                    b'{"owner": "x", "count": 1, "pid": 2147483000}',
                    b'{"owner": "x", "count": 1, "contiguous": "yes"}',
                ]
                for body in bad_bodies:
                    resp = await http.post(url, data=body)
                    assert resp.status == 400, body
                    assert (await resp.json())["error"], body
                gone = await http.delete(f"{url}/doesnotexist")
                assert gone.status == 404 and "no lease" in (await gone.json())["error"]
                assert await (await http.get(url)).json() == []
                # Exhaust the block, then one more: 409, and the block is unchanged.
                full = await http.post(url, json={"owner": "big", "count": 64})
                assert full.status == 201
                more = await http.post(url, json={"owner": "x", "count": 1})
                assert more.status == 409 and "cannot lease" in (await more.json())["error"]
                summary = await (await http.get("http://gpud/v1/ports")).json()
                assert summary["leased"] == 64 and summary["free"] == 0
                assert summary["lease_count"] == 1 and len(summary["leases"]) == 1
                assert "confirmed, 64 leased, 0 free" in summary["summary"]
        finally:
            await runner.cleanup()


async def _storm_client(
    http: aiohttp.ClientSession,
    rounds: int,
    held: set[int],
    block: range,
    rng: random.Random,
    seen_leases: list[int],
) -> None:
    for _ in range(rounds):
        resp = await http.post(
            "http://gpud/v1/ports/leases",
            json={"owner": "storm", "count": rng.randint(1, 4), "contiguous": rng.random() < 0.3},
        )
        assert resp.status == 201, await resp.text()
        lease = await resp.json()
        ports = lease["ports"]
        assert all(p in block for p in ports), ports
        assert not held.intersection(ports), f"port leased twice: {held.intersection(ports)}"
        held.update(ports)
        seen_leases.append(len(ports))
        # Give the ports up before the release is sent: afterwards they may be re-leased.
        held.difference_update(ports)
        deleted = await http.delete(f"http://gpud/v1/ports/leases/{lease['id']}")
        assert deleted.status == 204


async def test_ten_thousand_concurrent_leases_never_duplicate(workdir: Path) -> None:
    cfg = write_config(workdir, block_size=400)
    sock = workdir / "n1.sock"
    with server_process(cfg):
        async with unix_session(sock) as probe:
            info = await (await probe.get("http://gpud/v1/ports")).json()
        block = range(info["first"], info["last"] + 1)
        held: set[int] = set()
        leased: list[int] = []
        clients, per_client = 50, 200
        sessions = [unix_session(sock) for _ in range(clients)]
        try:
            await asyncio.wait_for(
                asyncio.gather(
                    *(
                        _storm_client(s, per_client, held, block, random.Random(i), leased)
                        for i, s in enumerate(sessions)
                    )
                ),
                240,
            )
        finally:
            for s in sessions:
                await s.close()
        assert len(leased) == clients * per_client == 10_000
        async with unix_session(sock) as probe:
            assert await (await probe.get("http://gpud/v1/ports/leases")).json() == []


async def test_kill_9_during_a_lease_storm_loses_and_doubles_nothing(workdir: Path) -> None:
    cfg = write_config(workdir, block_size=2000)
    sock = workdir / "n1.sock"
    with server_process(cfg) as proc:
        acked = await lease_storm(
            sock,
            clients=24,
            owner="crash",
            kill_after=400,
            kill=lambda: os.kill(proc.pid, signal.SIGKILL),
        )
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 400
    state = StateStore(workdir / "n1")
    try:
        stored = {s.lease.id: s.lease.ports for s in LeaseStore(state).load()}
    finally:
        state.close()
    for lease_id, ports in acked.items():
        assert stored.get(lease_id) == ports, f"acknowledged lease {lease_id} lost"
    all_ports = [p for ports in stored.values() for p in ports]
    assert len(all_ports) == len(set(all_ports)), "a port is in two stored leases"
    # Restarting on the same store serves the same leases and keeps the block.
    with server_process(cfg):
        async with unix_session(sock) as http:
            after = await (await http.get("http://gpud/v1/ports/leases")).json()
    assert {lease["id"]: lease["ports"] for lease in after} == stored


async def test_zombie_scan_reclaims_leases_of_dead_owners(workdir: Path) -> None:
    async with running(write_config(workdir)) as service:
        await asyncio.wait_for(service.ready(), 10)
        child = await asyncio.create_subprocess_exec("sleep", "60")
        try:
            doomed = await service.lease("model-a", 3, pid=child.pid)
            kept = await service.lease("me", 2, pid=os.getpid())
        finally:
            child.kill()
            await child.wait()
        await async_wait_for(
            lambda: all(lease.id != doomed.id for lease in service.leases()),
            10,
            0.05,
            what="the zombie lease reclaimed",
        )
        assert [lease.id for lease in service.leases()] == [kept.id]
        # The reclaimed ports are free again.
        again = await service.lease("model-b", 62)
        assert set(doomed.ports) <= set(again.ports)


async def test_ports_bound_by_foreign_processes_are_never_leased(workdir: Path) -> None:
    async with running(write_config(workdir, block_size=8)) as service:
        await asyncio.wait_for(service.ready(), 10)
        block = service.block_range()
        assert block is not None
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # An outbound-style socket bound on loopback only, and a UDP socket on the wildcard.
        tcp.bind(("127.0.0.1", block[2]))
        tcp.listen()
        udp.bind(("0.0.0.0", block[5]))
        try:
            lease = await service.lease("x", 6)
            assert set(lease.ports) == set(block) - {block[2], block[5]}
            with pytest.raises(Exception, match="cannot lease 1"):
                await service.lease("y", 1)
        finally:
            tcp.close()
            udp.close()
        assert len(service.leases()) == 1


async def test_restart_keeps_block_and_leases(workdir: Path) -> None:
    cfg = write_config(workdir, settle_s=0.3)
    async with running(cfg) as first:
        await asyncio.wait_for(first.ready(), 10)
        blk, index, first_bc = first.block_range(), first.ctx.tags.blk, first.ctx.tags.bc
        lease = await first.lease("ray", 4, contiguous=True)
    service = PortsService(NodeContext(config.load(str(cfg)), ADDR))
    assert service.block_range() == blk
    assert service.leases() == [lease]
    async with running(cfg) as again:
        await asyncio.wait_for(again.ready(), 10)
        assert again.block_range() == blk
        assert again.ctx.tags.blk == index
        assert again.ctx.tags.bc == first_bc > 0
        assert again.leases() == [lease]


class GossipBus:
    """In-process stand-in for gossip between NodeContexts (the real agent uses Serf)."""

    def __init__(self) -> None:
        self.contexts: list[NodeContext] = []

    def join(self, ctx: NodeContext) -> None:
        self.contexts.append(ctx)

        async def publish(tags: Tags) -> None:
            ctx.tags = tags
            self.spread()

        ctx.set_tag_publisher(publish)
        self.spread()

    def spread(self) -> None:
        members = {
            c.node_name: Member(
                name=c.node_name, addr=c.advertise_addr, port=7946, status="alive", tags=c.tags
            )
            for c in self.contexts
        }
        for c in self.contexts:
            c.set_members(dict(members))


async def test_nodes_sharing_an_address_claim_distinct_blocks(workdir: Path) -> None:
    bus = GossipBus()
    services: list[PortsService] = []
    plan = [("a", ADDR), ("b", ADDR), ("c", ADDR), ("d", ADDR), ("e", "127.0.0.2")]
    for name, addr in plan:
        ctx = NodeContext(config.load(str(write_config(workdir, name, settle_s=0.3))), addr)
        bus.join(ctx)
        services.append(PortsService(ctx))
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(s.run()) for s in services]
        await asyncio.wait_for(asyncio.gather(*(s.ready() for s in services)), 20)
        same_addr = [s.block_range() for s in services[:4]]
        assert len(set(map(tuple, same_addr))) == 4  # type: ignore[arg-type]
        for s in services:
            assert s.ctx.tags.bc > 0
            assert s.block_range() == blocks.block_range(s.cfg, s.ctx.tags.blk)
        for task in tasks:
            task.cancel()


def test_cli_lease_list_release(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(workdir)
    sock = str(workdir / "n1.sock")
    with server_process(cfg):
        assert (
            cli.main(["ports", "lease", "--owner", "vllm", "--count", "3", "--socket", sock]) == 0
        )
        ports = [int(p) for p in capsys.readouterr().out.split()]
        assert len(ports) == 3
        assert cli.main(["ports", "--socket", sock, "--json"]) == 0
        data = msgspec.json.decode(capsys.readouterr().out)
        assert data["leases"][0]["ports"] == ports
        lease_id = data["leases"][0]["id"]
        assert cli.main(["ports", "--socket", sock]) == 0
        text = capsys.readouterr().out
        assert "confirmed, 3 leased" in text and lease_id in text
        assert cli.main(["ports", "release", lease_id, "--socket", sock]) == 0
        assert cli.main(["ports", "release", lease_id, "--socket", sock]) == 1
        assert "no lease" in capsys.readouterr().err
        assert cli.main(["ports", "lease", "--owner", "x", "--count", "0", "--socket", sock]) == 1


def test_overlap_with_the_ephemeral_range_is_reported(workdir: Path) -> None:
    from gpud.ports import reserve

    ephemeral = reserve.ephemeral_range()
    assert ephemeral is not None
    cfg = write_config(workdir, range_start=ephemeral[0] - 100, range_end=ephemeral[0] + 300)
    service = PortsService(NodeContext(config.load(str(cfg)), ADDR))
    [warning] = service.status().warnings
    assert "net.ipv4.ip_local_port_range" in warning
    assert f"at {ephemeral[0]}-{ephemeral[0] + 299}" in warning
    assert any("ephemeral" in p.message for p in service.problems())
    clean = PortsService(NodeContext(config.load(str(write_config(workdir, "n2"))), ADDR))
    assert clean.status().warnings == [] and clean.problems() == []
