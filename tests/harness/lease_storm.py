"""A lease storm over a gpud Unix socket, shared by the crash-safety tests of the ports and GPU
lease APIs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp


def unix_session(sock: str | Path) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)))


async def lease_storm(
    sock: str | Path,
    *,
    clients: int,
    owner: str,
    kill_after: int,
    kill: Callable[[], None],
    per_client: int = 100,
    timeout_s: float = 120.0,
) -> dict[str, list[int]]:
    """``clients`` concurrent sessions lease one port at a time; once ``kill_after`` leases are
    acknowledged, ``kill()`` runs once while other requests are in flight. Returns every lease
    the server acknowledged (id -> ports); a client stops at its first failed request."""
    acked: dict[str, list[int]] = {}
    killed = False

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal killed
        for _ in range(per_client):
            try:
                resp = await http.post(
                    "http://gpud/v1/ports/leases", json={"owner": owner, "count": 1}
                )
                lease = await resp.json()
            except (aiohttp.ClientError, ConnectionError):
                return
            if resp.status != 201:
                return
            acked[lease["id"]] = lease["ports"]
            if len(acked) >= kill_after and not killed:
                killed = True
                kill()

    sessions = [unix_session(sock) for _ in range(clients)]
    try:
        await asyncio.wait_for(asyncio.gather(*(client(s) for s in sessions)), timeout_s)
    finally:
        for session in sessions:
            await session.close()
    return acked
