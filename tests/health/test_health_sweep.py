"""Beyond full mesh, in-process gpud health services on loopback: a peer that only some nodes
probe is still judged down by every node within seconds (the finders' notices), and a notice
about a peer that answers changes nothing; a node asked whether a peer's host answers it (the
silent verdict's indirect check) says so from its own connects."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from gpud.context import Member, NodeContext
from gpud.health.peer_api import PeerCallError
from gpud.health.service import (
    PATH_REACH,
    PATH_SUSPECT,
    HealthService,
    ReachReply,
    ReachRequest,
    SuspectNotice,
    SuspectReply,
)
from gpud.tags import Tags
from tests.harness.health_loopback import make_config
from tests.harness.serf import free_port
from tests.harness.wait import async_wait_for

# One step per second and one swept peer per step: among 9 nodes a peer not on our ring comes
# round in the sweep only every 6 s, so seeing it down sooner needs the notice.
INTERVAL_S = 1.0
NODES = 9
DOWN_WITHIN_S = 3.0


class Node(msgspec.Struct):
    ctx: NodeContext
    service: HealthService
    task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.ctx.node_name

    async def tell(self, to: Node, notice: msgspec.Struct) -> SuspectReply:
        """Send ``notice`` to ``to``'s peer API as this node's signed peer call."""
        return await self.service.client.call(
            to.ctx.advertise_addr, to.ctx.config.peer.port, PATH_SUSPECT, notice, SuspectReply
        )

    async def ask_reach(self, to: Node, request: msgspec.Struct) -> ReachReply:
        return await self.service.client.call(
            to.ctx.advertise_addr, to.ctx.config.peer.port, PATH_REACH, request, ReachReply
        )


@contextlib.asynccontextmanager
async def running(key_file: Path) -> AsyncIterator[list[Node]]:
    nodes = []
    for i in range(NODES):
        addr = f"127.78.0.{i + 1}"
        cfg = make_config(
            f"n{i + 1}",
            free_port(addr),
            key_file,
            interval_s=INTERVAL_S,
            full_mesh_max=3,
            random_peers=1,
        )
        ctx = NodeContext(cfg, addr)
        nodes.append(Node(ctx, HealthService(ctx, seed=i)))
    members = {
        n.name: Member(
            name=n.name,
            addr=n.ctx.advertise_addr,
            port=7946,
            status="alive",
            tags=Tags(pp=n.ctx.config.peer.port),
        )
        for n in nodes
    }
    async with asyncio.TaskGroup() as group:
        for node in nodes:
            node.ctx.set_members(dict(members))
            node.task = group.create_task(node.service.run())
        try:
            yield nodes
        finally:
            for node in nodes:
                assert node.task is not None
                node.task.cancel()


async def all_passing(nodes: list[Node]) -> None:
    await async_wait_for(
        lambda: all(n.service.status().state == "passing" for n in nodes),
        20,
        0.05,
        what="every node passing",
    )


async def test_a_dead_peer_is_down_on_every_node_soon_though_few_probe_it(key_file: Path):
    async with running(key_file) as nodes:
        await all_passing(nodes)
        dead = nodes[4]
        assert dead.task is not None
        dead.task.cancel()  # its peer API closes: connections are refused from now on
        others = [n for n in nodes if n is not dead]
        began = time.monotonic()
        await async_wait_for(
            lambda: all(dead.name in n.service.prober.down() for n in others),
            DOWN_WITHIN_S,
            0.05,
            what=f"{dead.name} down on every other node",
        )
        took = time.monotonic() - began
        assert took < DOWN_WITHIN_S
        # Each node's verdict is its own: confirmed by its own refused probes.
        assert all("refuses connections" in n.service.prober.down()[dead.name] for n in others)


async def test_a_notice_about_a_peer_that_answers_changes_nothing(key_file: Path):
    async with running(key_file) as nodes:
        await all_passing(nodes)
        a, b, c = nodes[0], nodes[1], nodes[5]
        assert (await a.tell(b, SuspectNotice(peer=c.name))).checking
        # A peer it does not track is no reason to probe anything.
        assert not (await a.tell(b, SuspectNotice(peer="nobody"))).checking
        await asyncio.sleep(1.5)
        assert b.service.prober.down() == {}
        assert b.service.status().state == "passing"


class WrongNotice(msgspec.Struct):
    peer: int


async def test_a_malformed_notice_is_refused_and_changes_nothing(key_file: Path):
    async with running(key_file) as nodes:
        await all_passing(nodes)
        a, b = nodes[0], nodes[1]
        with pytest.raises(PeerCallError, match="HTTP 400"):
            await a.tell(b, WrongNotice(peer=5))
        assert b.service.prober.down() == {}


async def test_a_reach_question_is_answered_from_own_connects_and_bad_ones_are_refused(
    key_file: Path,
):
    async with running(key_file) as nodes:
        await all_passing(nodes)
        a, b, c = nodes[0], nodes[1], nodes[5]
        assert (await a.ask_reach(b, ReachRequest(peer=c.name))).answered is True
        # A name it does not track: no opinion, and nothing is dialled.
        assert (await a.ask_reach(b, ReachRequest(peer="nobody"))).answered is None
        with pytest.raises(PeerCallError, match="HTTP 400"):
            await a.ask_reach(b, WrongNotice(peer=5))
        assert c.task is not None
        c.task.cancel()  # its peer API closes: refusals say its host is there
        await asyncio.sleep(0.2)
        assert (await a.ask_reach(b, ReachRequest(peer=c.name))).answered is True
