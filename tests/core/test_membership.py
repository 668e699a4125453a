"""Membership: pure tag decoding, then three SerfAgents and a raw serf with garbage tags
converging on loopback addresses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from gpud.context import NodeContext
from gpud.membership import Membership, MembersResponse, count, member_from_serf
from gpud.serf.agent import SerfAgent
from gpud.serf.rpc import SerfMember
from gpud.tags import Tags, encode
from tests.harness.serf import RawSerf, node_config
from tests.harness.wait import async_wait_for


def serf_member(tags: dict[str, str], status: str = "alive") -> SerfMember:
    return SerfMember(name="n", addr="10.0.0.1", port=7946, tags=tags, status=status)


def test_member_from_serf_decodes_tags() -> None:
    tags = Tags(pp=7948, gpu=4, ray="head", term=3)
    member = member_from_serf(serf_member(encode(tags)))
    assert member.tags == tags and member.tags_error is None and member.alive


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({}, "no tag protocol version"),
        ({"v": "99"}, "unknown tag protocol version"),
        ({"v": "1", "gpu": "many"}, "malformed tags"),
        ({"v": "1", "ray": "emperor"}, "malformed tags"),
    ],
)
def test_bad_tags_are_listed_with_a_reason(raw: dict[str, str], reason: str) -> None:
    member = member_from_serf(serf_member(raw))
    assert member.tags is None and reason in (member.tags_error or "")


@given(
    st.dictionaries(st.text(max_size=8), st.text(max_size=12), max_size=6),
    st.sampled_from(["alive", "failed", "left", "leaving", "none", "weird"]),
)
def test_member_from_serf_never_raises(raw: dict[str, str], status: str) -> None:
    member = member_from_serf(serf_member(raw, status))
    assert (member.tags is None) != (member.tags_error is None)
    assert member.status in {"alive", "failed", "left", "leaving", "none"}


def test_count() -> None:
    members = {
        "a": member_from_serf(serf_member(encode(Tags()))),
        "b": member_from_serf(serf_member({}, "failed")),
    }
    status = count(members)
    assert (status.total, status.alive, status.failed, status.tags_errors) == (2, 1, 1, 1)


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, n: int) -> AsyncIterator[list[tuple[SerfAgent, Membership]]]:
    nodes: list[tuple[SerfAgent, Membership]] = []
    first = None
    for i in range(n):
        ip = f"127.0.0.{i + 1}"
        config = node_config(tmp_path, f"n{i + 1}", ip=ip, retry_join=[first] if first else [])
        first = first or f"{ip}:{config.serf.bind_port}"
        ctx = NodeContext(config, ip)
        serf = SerfAgent(ctx)
        nodes.append((serf, Membership(ctx, serf, refresh_interval_s=2.0)))
    tasks = [asyncio.create_task(c.run()) for node in nodes for c in node]
    try:
        yield nodes
    finally:
        for serf, _ in nodes:
            serf.supervisor.stop_on_cancel()  # a cancelled agent would leave serf running
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def view(membership: Membership) -> dict[str, str]:
    return {name: m.status for name, m in membership.ctx.members.items()}


async def test_cluster_converges_and_survives_garbage_and_restarts(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3) as nodes:
        (serf1, m1), (serf2, m2), (_, m3) = nodes
        await asyncio.wait_for(serf1.ready.wait(), 15)
        changes: list[int] = []
        m1.ctx.on_members_changed(lambda members: changes.append(len(members)))

        # A non-gpud member with garbage tags joins.
        rogue = RawSerf(tmp_path, "rogue", ip="127.0.0.9", tags={"v": "7", "gpu": "lots"})
        await rogue.start()
        try:
            rpc = await rogue.connect()
            await rpc.join([f"127.0.0.1:{serf1.ctx.config.serf.bind_port}"])
            await rpc.close()
            expected = {"n1": "alive", "n2": "alive", "n3": "alive", "rogue": "alive"}
            for m in (m1, m2, m3):
                await async_wait_for(lambda m=m: view(m) == expected, 20)
            rogue_member = m1.ctx.members["rogue"]
            assert rogue_member.tags is None
            assert "unknown tag protocol version '7'" in (rogue_member.tags_error or "")
            assert m1.ctx.members["n2"].tags == serf2.ctx.tags
            assert m1.ctx.members["n3"].addr == "127.0.0.3"
            assert m1.status().tags_errors == 1 and m1.status().alive == 4
            assert changes and changes[-1] == 4

            # Tag changes reach the other members.
            await serf2.ctx.update_tags(gpu=8)
            await async_wait_for(lambda: (m1.ctx.members["n2"].tags or Tags()).gpu == 8, 15)

            # The rogue is killed: everyone sees it failed, nothing crashes.
            assert rogue.child.pid is not None
            os.killpg(rogue.child.pid, signal.SIGKILL)
            for m in (m1, m2, m3):
                await async_wait_for(lambda m=m: view(m).get("rogue") == "failed", 20)
        finally:
            await rogue.stop()

        # n2's serf dies: it restarts, rejoins, and n2's view recovers.
        pid = serf2.supervisor.child.pid
        os.killpg(pid, signal.SIGKILL)
        await async_wait_for(lambda: serf2.ready.is_set() and serf2.supervisor.child.pid != pid, 15)
        await async_wait_for(
            lambda: view(m2).get("n1") == "alive" and view(m2).get("n2") == "alive", 15
        )
        await async_wait_for(lambda: view(m1).get("n2") == "alive", 15)

        # GET /v1/members
        app = web.Application()
        app.add_routes(m1.routes())
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/v1/members") as response:
                    assert response.status == 200
                    assert response.content_type == "application/json"
                    body = msgspec.json.decode(await response.read(), type=MembersResponse)
            by_name = {m.name: m for m in body.members}
            assert {"n1", "n2", "n3", "rogue"} <= set(by_name)
            assert by_name["rogue"].tags_error and by_name["n1"].tags is not None
        finally:
            await runner.cleanup()
