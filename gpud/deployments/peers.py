"""What deployments need of the peer network: signed calls to a peer's route, routes of its own
on this node's peer API, and whether a member's identity at its address was verified.

The service is given this narrow protocol, not the health component, so it depends on three
calls and nothing of how probes, the server or the client work; the agent builds a `PeerLinks`
from the health component's parts in the one place it constructs the service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import msgspec

from gpud.context import Member

_Reply = TypeVar("_Reply")

RouteHandler = Callable[[bytes], Awaitable[bytes]]


class PeerCaller(Protocol):
    async def call(
        self, addr: str, port: int, path: str, body: msgspec.Struct, reply: type[_Reply]
    ) -> _Reply: ...


class PeerNetwork(Protocol):
    async def call(
        self, addr: str, port: int, path: str, body: msgspec.Struct, reply: type[_Reply]
    ) -> _Reply:
        """A signed call to ``path`` on the peer API at ``addr:port``; raises on failure."""
        ...

    def add_route(self, path: str, handler: RouteHandler) -> None:
        """Serve POST ``path`` on this node's peer API (authenticated like every peer route)."""
        ...

    def verified(self, name: str) -> bool:
        """Whether member ``name`` answered as itself at its advertised address."""
        ...


class PeerLinks:
    """A `PeerNetwork` from its three parts: the peer client, the peer API server's route
    registration and the prober's verified check."""

    def __init__(
        self,
        client: PeerCaller,
        add_route: Callable[[str, RouteHandler], None],
        verified: Callable[[str], bool],
    ) -> None:
        self._client = client
        self._add_route = add_route
        self._verified = verified

    async def call(
        self, addr: str, port: int, path: str, body: msgspec.Struct, reply: type[_Reply]
    ) -> _Reply:
        return await self._client.call(addr, port, path, body, reply)

    def add_route(self, path: str, handler: RouteHandler) -> None:
        self._add_route(path, handler)

    def verified(self, name: str) -> bool:
        return self._verified(name)


def verified_peers(network: PeerNetwork, peers: Sequence[Member]) -> list[Member]:
    """Peers with a peer API port announced whose identity was verified."""
    return [m for m in peers if m.tags is not None and m.tags.pp and network.verified(m.name)]


async def ask_peers(
    network: PeerNetwork, peers: Sequence[Member], path: str, request: Any, reply: type[_Reply]
) -> list[_Reply | BaseException]:
    """Call ``path`` on every peer's API at once (peers have tags); one result or exception
    per peer, in order."""
    return await asyncio.gather(
        *(
            network.call(m.addr, m.tags.pp, path, request, reply)
            for m in peers
            if m.tags is not None
        ),
        return_exceptions=True,
    )
