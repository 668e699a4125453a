"""HealthService instances on loopback for in-process tests: real aiohttp servers, real TCP,
real signatures, each node on its own 127.77.0.x address and peer port, membership filled by
hand (no Serf) and probe rounds driven by the test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from gpud import config as config_mod
from gpud.context import Member, NodeContext
from gpud.health import peer_api
from gpud.health.auth import sign
from gpud.health.service import HealthService
from gpud.tags import Tags
from tests.harness.config import parse_config
from tests.harness.serf import free_port

INTERVAL_S = 0.2
TIMEOUT_S = 0.5
# How long a peer's last inbound probe counts as evidence (see Prober._inbound_evidence).
INBOUND_WINDOW_S = 2 * INTERVAL_S + TIMEOUT_S


def make_config(name: str, peer_port: int, key_file: Path, **health: object) -> config_mod.Config:
    """A keyed node's Config with fast probe rounds; ``health`` overrides [health] settings."""
    settings = {
        "interval_s": INTERVAL_S,
        "timeout_s": TIMEOUT_S,
        "failures_before_critical": 3,
        "successes_before_passing": 2,
        **health,
    }
    return parse_config(
        {
            "node": {"name": name},
            "cluster": {"name": "gk-test", "key_file": str(key_file)},
            "peer": {"port": peer_port},
            "health": settings,
        },
        source=f"test config of {name}",
    )


class Node:
    """One in-process HealthService with its context; the tags it published."""

    def __init__(self, service: HealthService, ctx: NodeContext) -> None:
        self.service, self.ctx = service, ctx
        self.published: list[Tags] = []

    @property
    def name(self) -> str:
        return self.ctx.node_name

    def member(self, **changes: object) -> Member:
        fields = {
            "name": self.name,
            "addr": self.ctx.advertise_addr,
            "port": 7946,
            "status": "alive",
            "tags": Tags(pp=self.ctx.config.peer.port),
        } | changes
        return Member(**fields)

    def row(self, peer: str, direction: str) -> peer_api.msgspec.Struct:
        status = self.service.status()
        return next(r for r in status.peers if r.peer == peer and r.direction == direction)

    def pair(self, peer: str):
        return next(p for p in self.service.status().pairs if p.peer == peer)


@contextlib.asynccontextmanager
async def cluster(
    key_file: Path, count: int, *, network: object = None, **health: object
) -> AsyncIterator[list[Node]]:
    """``count`` nodes whose peer API servers listen; each knows all others as alive."""
    nodes = []
    for i in range(count):
        addr = f"127.77.0.{i + 1}"
        cfg = make_config(f"n{i + 1}", free_port(addr), key_file, **health)
        ctx = NodeContext(cfg, addr)
        node = Node(HealthService(ctx, network, seed=i), ctx)

        async def publish(tags: Tags, node: Node = node) -> None:
            node.published.append(tags)

        ctx.set_tag_publisher(publish)
        nodes.append(node)
    members = {n.name: n.member() for n in nodes}
    for n in nodes:
        n.ctx.set_members(dict(members))
        await n.service.server.start()
    try:
        yield nodes
    finally:
        for n in nodes:
            await n.service.server.stop()
            await n.service.client.close()


async def rounds(nodes: list[Node], count: int) -> None:
    """``count`` probe rounds, all nodes at once in each."""
    for _ in range(count):
        await asyncio.gather(*(n.service.probe_round() for n in nodes))


async def raw_post(
    addr: str,
    port: int,
    path: str,
    body: bytes,
    key: bytes | None,
    node: str = "n2",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """POST ``body`` to a peer API, signed as ``node`` with ``key`` (unsigned: None) unless
    ``headers`` are given; (status, reply body)."""
    if headers is None:
        headers = sign(key, node, "POST", path, body) if key is not None else {}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://{addr}:{port}{path}", data=body, headers=headers) as resp:
            return resp.status, await resp.read()
