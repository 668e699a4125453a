"""HealthService instances on loopback: real aiohttp servers, real TCP, real signatures.

Each node has its own NodeContext, a 127.77.0.x address and its own peer port; membership is
filled by hand (no Serf here). Probe rounds are driven by the test, so hysteresis is counted
round by round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp
import msgspec
import pytest

from gpud import netcheck, secret
from gpud.component import Problem
from gpud.context import Member, NodeContext
from gpud.health import peer_api
from gpud.health.auth import sign
from gpud.health.peer_api import PATH_DIAL_BACK, PATH_PING, PATH_VIEW, PeerClient
from gpud.health.prober import VIEW_EVERY_ROUNDS
from gpud.health.service import HealthService
from gpud.netcheck import NetworkStatus
from gpud.tags import Tags
from tests.harness.health_loopback import (
    INBOUND_WINDOW_S,
    TIMEOUT_S,
    cluster,
    make_config,
    raw_post,
    rounds,
)
from tests.harness.serf import free_port


async def test_two_way_passing_and_shared_matrix(key_file: Path):
    async with cluster(key_file, 3) as nodes:
        await rounds(nodes, 1)
        # One round is below successes_before_passing: nothing has passed yet.
        assert all(r.state == "unknown" for r in nodes[0].service.status().peers)
        await rounds(nodes, 1)
        for node in nodes:
            status = node.service.status()
            assert status.state == "passing", status.reasons
            assert not status.behind_nat
            assert {(r.peer, r.direction) for r in status.peers} == {
                (n.name, d) for n in nodes if n is not node for d in ("out", "in")
            }
            assert all(r.state == "passing" for r in status.peers)
            assert all(r.rtt_ms is not None for r in status.peers if r.direction == "out")
            # Round 1 asked for dial-backs; by round 2 the peers' own probes had arrived.
            assert all(r.source == "inbound probes" for r in status.peers if r.direction == "in")
            assert all(p.kind == "ok" for p in status.pairs)
            assert node.ctx.tags.hl == "passing" and node.ctx.tags.nat is False
            assert node.published[-1].hl == "passing"
        # n1's matrix holds its own edges and those n2 and n3 shared through their views,
        # fetched every VIEW_EVERY_ROUNDS rounds (first in round 0, when nothing had passed).
        await rounds(nodes, VIEW_EVERY_ROUNDS - 1)
        edges = {(e.src, e.dst): e.state for e in nodes[0].service.status().matrix}
        assert edges[("n1", "n2")] == edges[("n2", "n3")] == edges[("n3", "n1")] == "passing"


async def test_local_api_route_serves_the_status(key_file: Path):
    async with cluster(key_file, 2) as nodes:
        await rounds(nodes, 2)
        app = aiohttp.web.Application()
        app.add_routes(nodes[0].service.routes())
        runner = aiohttp.web.AppRunner(app)
        await runner.setup()
        port = free_port("127.77.0.1")
        await aiohttp.web.TCPSite(runner, "127.77.0.1", port).start()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.77.0.1:{port}/v1/health") as resp:
                    body = await resp.json()
        finally:
            await runner.cleanup()
        assert body["state"] == "passing" and len(body["peers"]) == 2


async def test_stopped_peer_goes_critical_after_threshold_rounds_not_before(key_file: Path):
    async with cluster(key_file, 2) as nodes:
        a, b = nodes
        await rounds(nodes, 2)
        assert a.pair("n2").state == "passing"
        await b.service.server.stop()
        # Let b's last probes of us age out, as they do while a dead peer's rounds stop.
        await asyncio.sleep(INBOUND_WINDOW_S + 0.1)
        for _ in range(2):
            await a.service.probe_round()
            assert a.row("n2", "out").state == "passing"
            assert a.pair("n2").state == "passing"
        await a.service.probe_round()
        out = a.row("n2", "out")
        assert out.state == "critical" and "connection refused" in out.reason
        pair = a.pair("n2")
        assert (pair.state, pair.kind) == ("critical", "data-path")
        assert "Serf sees n2 alive (its gossip port works) but its peer API" in pair.message
        # A peer alone being down is its problem, not ours.
        assert a.service.status().state == "warning"
        # Serf now declares it failed too: "down".
        a.ctx.set_members(a.ctx.members | {"n2": b.member(status="failed")})
        await a.service.probe_round()
        assert a.pair("n2").kind == "down"
        # It comes back: passing again only after successes_before_passing rounds.
        await b.service.server.start()
        a.ctx.set_members(a.ctx.members | {"n2": b.member()})
        await rounds(nodes, 1)
        assert a.row("n2", "out").state == "critical"
        await rounds(nodes, 1)
        assert a.pair("n2").state == "passing"


async def test_dial_back_only_to_members_in_our_view(key_file: Path):
    async with cluster(key_file, 2) as nodes:
        a, b = nodes
        key = secret.derive(a.ctx.config, "peer-api")
        port = a.ctx.config.peer.port
        # A listener that a port-scanning dial-back would hit.
        accepted: list[object] = []
        bait = await asyncio.start_server(lambda r, w: accepted.append(w), "127.77.0.9", 0)
        bait_port = bait.sockets[0].getsockname()[1]
        try:
            async with PeerClient(key, "mallory", TIMEOUT_S) as intruder:
                with pytest.raises(peer_api.PeerCallError, match=r"403.*not a member"):
                    await intruder.dial_back("127.77.0.1", port)
            # The request cannot name a target: unknown fields are refused.
            status, _ = await raw_post(
                "127.77.0.1",
                port,
                PATH_DIAL_BACK,
                msgspec.json.encode({"addr": "127.77.0.9", "port": bait_port}),
                key,
                "n2",
            )
            assert status == 400
            # n2 itself gets a dial-back to the address and port our view holds for it (asked
            # from that address, as its probe rounds do).
            await b.service.client.set_source_addr(b.ctx.advertise_addr)
            reply = await b.service.client.dial_back("127.77.0.1", port)
            assert (reply.addr, reply.port) == ("127.77.0.2", b.ctx.config.peer.port)
            assert reply.outcome.ok
        finally:
            bait.close()
            await bait.wait_closed()
        assert accepted == []
        assert a.service.server.rejected == 2
        assert "mallory" not in a.service.prober.inbound_at


async def test_bad_requests_are_rejected_and_change_nothing(key_file: Path, tmp_path: Path, caplog):
    async with cluster(key_file, 2) as nodes:
        a = nodes[0]
        await rounds(nodes, 2)
        before = msgspec.json.encode(a.service.status())
        inbound_before = dict(a.service.prober.inbound_at)
        key = secret.derive(a.ctx.config, "peer-api")
        other_cluster = tmp_path / "other.key"
        other_cluster.write_text(secret.keygen())
        wrong = secret.derive(make_config("x", 1234, other_cluster), "peer-api")
        port = a.ctx.config.peer.port
        ping = b'{"echo":"hi"}'
        replayed = sign(key, "n2", "POST", PATH_PING, ping)
        status, _ = await raw_post("127.77.0.1", port, PATH_PING, ping, None, headers=replayed)
        assert status == 200  # the original is fine ...
        inbound_before = dict(a.service.prober.inbound_at)
        cases = {
            "no auth": (PATH_PING, ping, None, None),
            "wrong key": (PATH_PING, ping, wrong, None),
            "replay": (PATH_PING, ping, None, replayed),
            "stale": (
                PATH_PING,
                ping,
                None,
                sign(key, "n2", "POST", PATH_PING, ping, now=time.time() - 600),
            ),
            "garbage": (PATH_PING, b"\x00not json", key, None),
            "wrong type": (PATH_VIEW, b'{"echo": 5}', key, None),
            "huge": (PATH_PING, b'{"echo":"' + b"x" * 20000 + b'"}', key, None),
        }
        expected = {
            "no auth": 401,
            "wrong key": 401,
            "replay": 401,
            "stale": 401,
            "garbage": 400,
            "wrong type": 400,
            "huge": 413,
        }
        with caplog.at_level(logging.WARNING, logger="gpud.health"):
            for case, (path, body, k, headers) in cases.items():
                status, reply = await raw_post("127.77.0.1", port, path, body, k, headers=headers)
                assert status == expected[case], (case, reply)
                assert b"error" in reply
        assert a.service.prober.inbound_at == inbound_before
        assert msgspec.json.encode(a.service.status()) == before
        assert a.service.server.rejected == len(cases)
        # A flood is logged a few times, not once per request.
        with caplog.at_level(logging.WARNING, logger="gpud.health"):
            for _ in range(20):
                await raw_post("127.77.0.1", port, PATH_PING, ping, None)
        logged = [r for r in caplog.records if r.getMessage() == "peer API request rejected"]
        assert len(logged) == peer_api.REJECT_LOG_BURST


def network_status(addr: str, *, local: bool | None, interface: str = "") -> NetworkStatus:
    """NetCheck's status as it reads for an address never local (interface "") or removed."""
    problems = []
    reason = ""
    if local is False and not interface:
        reason = netcheck.not_local_reason(addr)
        problems.append(
            Problem(
                code="network.address_not_local",
                subject="network",
                severity="warning",
                message=reason,
                fix="host networking",
            )
        )
    elif local is False:
        reason = f"advertised address {addr} was removed from {interface}"
        problems.append(
            Problem(
                code="network.address_removed",
                subject="network",
                severity="critical",
                message=reason,
                fix="restore it",
            )
        )
    return NetworkStatus(
        advertise=addr,
        chosen_by="config",
        interface=interface,
        mtu=None,
        address_is_local=local,
        address_reason=reason,
        problems=problems,
    )


async def test_advertised_address_not_local_means_behind_nat(key_file: Path):
    async with cluster(
        key_file, 2, network=lambda: network_status("127.77.0.1", local=False)
    ) as nodes:
        await rounds(nodes, 2)
        status = nodes[0].service.status()
        assert status.behind_nat and status.state == "critical"
        assert "127.77.0.1 is not on any local interface" in status.nat_message
        assert "Ray needs host networking" in status.nat_message
        # NetCheck's own not-local warning is not repeated next to the NAT verdict.
        assert status.reasons == [status.nat_message]
        assert nodes[0].ctx.tags.nat is True and nodes[0].ctx.tags.hl == "critical"
        problems = await nodes[0].service.diagnose()
        assert [(p.code, p.severity, p.subject) for p in problems] == [
            ("health.behind_nat", "critical", "network")
        ]
        assert "host networking" in problems[0].fix
        # It explains NetCheck's not-local warning, which the report then leaves out.
        assert problems[0].supersedes == {"network.address_not_local"}


async def test_removed_address_is_critical_but_not_nat(key_file: Path):
    removed = network_status("127.77.0.1", local=False, interface="eth0")
    async with cluster(key_file, 2, network=lambda: removed) as nodes:
        await rounds(nodes, 2)
        status = nodes[0].service.status()
        assert not status.behind_nat and nodes[0].ctx.tags.nat is False
        assert status.state == "critical"
        assert status.reasons == ["advertised address 127.77.0.1 was removed from eth0"]
        # The removed address is NetCheck's problem (it reports it); health adds none.
        assert await nodes[0].service.diagnose() == []


async def test_peers_reached_but_no_way_back_means_behind_nat(key_file: Path):
    async with cluster(key_file, 3) as nodes:
        x, *others = nodes
        # The others know x at a port that does not lead to it, as with a port mapping.
        closed = free_port("127.77.0.1")
        for n in others:
            n.ctx.set_members(n.ctx.members | {"n1": x.member(tags=Tags(pp=closed))})
        await rounds(nodes, 3)
        status = x.service.status()
        assert status.behind_nat, status
        assert "none of them can connect back to 127.77.0.1" in status.nat_message
        assert x.ctx.tags.nat is True
        assert all(p.kind == "in-failing" for p in status.pairs)
        assert f"dialled back to 127.77.0.1:{closed}" in x.row("n2", "in").reason


async def test_doctor_reports_problems_with_fixes(key_file: Path):
    async with cluster(key_file, 3) as nodes:
        a, _, c = nodes
        await rounds(nodes, 2)
        assert await a.service.diagnose() == []
        await c.service.server.stop()
        await asyncio.sleep(INBOUND_WINDOW_S + 0.1)
        problems = await a.service.diagnose()
        assert [(p.subject, p.severity, p.code) for p in problems] == [
            ("n3", "critical", "health.data-path")
        ]
        assert "127.77.0.3" in problems[0].message and problems[0].fix
        # The doctor's one-shot verdicts leave the hysteresis of the probe loop alone.
        assert a.row("n3", "out").state == "passing"


async def test_run_serves_and_probes_until_cancelled(key_file: Path):
    async with cluster(key_file, 1) as nodes:
        lone = nodes[0]
    addr = "127.77.0.2"
    cfg = make_config("n2", free_port(addr), key_file)
    ctx = NodeContext(cfg, addr)
    ctx.set_members(
        {
            "n1": lone.member(),
            "n2": Member(
                name="n2", addr=addr, port=7946, status="alive", tags=Tags(pp=cfg.peer.port)
            ),
        }
    )
    lone.ctx.set_members(dict(ctx.members))
    services = [HealthService(lone.ctx), HealthService(ctx)]
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(s.run()) for s in services]
        for _ in range(100):
            await asyncio.sleep(0.1)
            if all(s.status().state == "passing" for s in services):
                break
        for task in tasks:
            task.cancel()
    assert [s.status().state for s in services] == ["passing", "passing"]
    assert services[0].status().rounds >= 2


async def test_above_full_mesh_max_each_round_probes_head_neighbours_and_k_random(key_file: Path):
    async with cluster(
        key_file, 6, full_mesh_max=3, random_peers=1, successes_before_passing=1
    ) as nodes:
        a = nodes[0]
        a.ctx.set_members(
            a.ctx.members
            | {"n4": nodes[3].member(tags=Tags(pp=nodes[3].ctx.config.peer.port, ray="head"))}
        )
        await a.service.probe_round()
        probed = {
            r.peer
            for r in a.service.status().peers
            if r.direction == "out" and r.state != "unknown"
        }
        # Ring neighbours of n1 among n1..n6 are n6 and n2; n4 is the Ray head; one random.
        assert {"n2", "n4", "n6"} < probed and len(probed) == 4


async def test_above_full_mesh_max_a_stopped_neighbour_still_goes_critical(key_file: Path):
    # Beyond full mesh, silence from a peer is no evidence: the in-direction becomes unknown
    # rather than vouching from old results, so a dead peer is not mistaken for one-way.
    async with cluster(key_file, 5, full_mesh_max=3, random_peers=1) as nodes:
        a, b = nodes[0], nodes[1]
        await rounds(nodes, 2)
        assert a.pair("n2").state == "passing"
        await b.service.server.stop()
        await asyncio.sleep(INBOUND_WINDOW_S + 0.1)
        for _ in range(3):
            await a.service.probe_round()
        pair = a.pair("n2")
        assert (pair.state, pair.kind) == ("critical", "data-path"), pair
        assert a.row("n2", "in").source.startswith("no evidence")


async def test_reload_changes_the_thresholds_live(key_file: Path):
    """A reload's failures_before_critical takes effect on the next probe, not on a restart."""
    async with cluster(key_file, 2, failures_before_critical=5) as nodes:
        a, b = nodes
        await rounds(nodes, 2)
        await b.service.server.stop()
        await rounds([a], 2)
        assert a.row("n2", "out").state == "passing"  # 2 failures of 5
        a.service.reconfigure(make_config("n1", 1, key_file, failures_before_critical=1))
        assert a.service.client.timeout_s == TIMEOUT_S
        await rounds([a], 1)
        assert a.row("n2", "out").state == "critical"


async def test_a_dead_peer_has_one_code_in_status_and_doctor(key_file: Path):
    async with cluster(key_file, 3) as nodes:
        a, _, c = nodes
        await rounds(nodes, 2)
        await c.service.server.stop()  # gpud gone from n3, its host (and Serf) still up
        await rounds([a], 1)
        # Between rounds the quick loop re-probes the failed peer and judges it down.
        async with asyncio.TaskGroup() as checks:
            a.service.prober.quick_tick(["n3"], checks.create_task)
        status = [(p.subject, p.code) for p in a.service.problems()]
        doctor = [(p.subject, p.code) for p in await a.service.diagnose()]
        assert status == doctor == [("n3", "health.down")]
