"""In-process Ray test helpers: a port provider and a query transport between gpud services in
one event loop (`cut` partitions it), and `Nodes`, in-process gpud nodes sharing a membership."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec

from gpud.config import RayConfig
from gpud.context import Member, NodeContext
from gpud.ray.service import RayService, RayServiceSettings
from gpud.serf.agent import QueryHandler
from tests.harness.config import config_for


class SimpleLease(msgspec.Struct):
    id: int
    ports: list[int]


class SimplePorts:
    """Hands out ports from [start, end) that bind on 127.0.0.1 right now; never twice."""

    def __init__(self, start: int, end: int) -> None:
        self._next = start
        self._end = end
        self._ids = itertools.count(1)
        self.leases: dict[int, SimpleLease] = {}
        self.released: list[int] = []

    async def ready(self) -> None:
        return None

    def _free(self, port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    async def lease(
        self, owner: str, count: int, *, contiguous: bool = False, pid: int | None = None
    ) -> SimpleLease:
        ports: list[int] = []
        while len(ports) < count:
            if self._next >= self._end:
                raise OSError("test port range exhausted")
            port = self._next
            self._next += 1
            if self._free(port):
                ports.append(port)
            elif contiguous:
                ports.clear()
        lease = SimpleLease(id=next(self._ids), ports=ports)
        self.leases[lease.id] = lease
        return lease

    async def release(self, lease_id: object) -> None:
        assert isinstance(lease_id, int)
        del self.leases[lease_id]
        self.released.append(lease_id)


class LoopbackNetwork:
    """Delivers queries between in-process nodes; ``cut`` partitions it (pure-logic tests)."""

    def __init__(self) -> None:
        self.handlers: dict[str, dict[str, QueryHandler]] = {}
        self.groups: list[set[str]] | None = None

    def transport(self, node: str) -> LoopbackTransport:
        self.handlers.setdefault(node, {})
        return LoopbackTransport(self, node)

    def cut(self, *groups: set[str]) -> None:
        self.groups = list(groups)

    def heal(self) -> None:
        self.groups = None

    def reachable(self, a: str, b: str) -> bool:
        return self.groups is None or any(a in g and b in g for g in self.groups)


class LoopbackTransport:
    def __init__(self, network: LoopbackNetwork, node: str) -> None:
        self._net = network
        self._node = node

    def on_query(self, name: str, handler: QueryHandler) -> None:
        self._net.handlers[self._node][name] = handler

    async def query(
        self,
        name: str,
        payload: bytes,
        *,
        timeout_s: float | None = None,
        enough: Callable[[Mapping[str, bytes]], bool] | None = None,
    ) -> dict[str, bytes]:
        replies: dict[str, bytes] = {}
        for node, handlers in list(self._net.handlers.items()):
            if name in handlers and self._net.reachable(self._node, node):
                response = await handlers[name](self._node, payload)
                if response is not None:
                    replies[node] = response
                    if enough is not None and enough(replies):
                        break
        await asyncio.sleep(0)
        return replies


class Nodes:
    """In-process gpud nodes sharing one membership (computed from each other's tags)."""

    def __init__(
        self,
        root: Path,
        ray: dict[str, RayConfig],
        port_range: tuple[int, int] = (24000, 25000),
        *,
        settings: RayServiceSettings | None = None,
    ) -> None:
        self.net = LoopbackNetwork()
        self.down: set[str] = set()
        self.ports = SimplePorts(*port_range)
        self.services: dict[str, RayService] = {}
        self.temp_root = f"/tmp/gpud-ray-svc-{os.getpid()}"
        for i, (name, ray_config) in enumerate(ray.items()):
            ray_section = msgspec.to_builtins(ray_config) | {"temp_root": self.temp_root}
            config = config_for(name, root / name, {"ray": ray_section})
            ctx = NodeContext(config, advertise_addr=f"127.0.0.{i + 2}")
            ctx.tags = msgspec.structs.replace(ctx.tags, hl="passing")
            self.services[name] = RayService(
                ctx, self.net.transport(name), self.ports, settings=settings
            )
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def refresh(self) -> None:
        for a, service in self.services.items():
            members = {
                b: Member(
                    name=b,
                    addr=other.ctx.advertise_addr,
                    port=7946,
                    status="failed" if b in self.down else "alive",
                    tags=other.ctx.tags,
                )
                for b, other in self.services.items()
            }
            if a not in self.down:
                service.ctx.set_members(members)

    async def gossip(self) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(0.2)

    def start(self) -> None:
        for name, service in self.services.items():
            self.tasks[name] = asyncio.create_task(service.run())
        self.tasks["gossip"] = asyncio.create_task(self.gossip())

    async def stop(self, name: str) -> None:
        task = self.tasks.pop(name)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def stop_all(self) -> None:
        for name in list(self.tasks):
            await self.stop(name)
        shutil.rmtree(self.temp_root, ignore_errors=True)
