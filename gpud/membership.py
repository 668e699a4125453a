"""The typed view of the cluster: who is a member, their status and their decoded tags.

ctx.members follows Serf: a full read at every (re)connect, another after every member
event, and a slow periodic read as a safety net against a missed event. Listeners
(ctx.on_members_changed) run only when the view really changed. Tags that do not decode
leave the member listed with ``tags=None`` and the reason in ``tags_error``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import get_args

import msgspec
from aiohttp import web

from gpud import log
from gpud.component import ComponentBase, Metric, Problem
from gpud.context import Member, MemberStatus, NodeContext, with_down
from gpud.serf.agent import SerfAgent
from gpud.serf.rpc import SerfConnectionError, SerfMember, SerfRPC, SerfRPCError
from gpud.tags import TagsError, decode

MEMBER_EVENTS = "member-join,member-leave,member-failed,member-update,member-reap"
# Serf coalesces member events on RPC streams for 1-3 s; a members() read on loopback every
# second is cheap and lets gpud see a failure as soon as memberlist declares it.
REFRESH_INTERVAL_S = 1.0
_STATUSES: frozenset[str] = frozenset(get_args(MemberStatus))


class MembershipStatus(msgspec.Struct, kw_only=True):
    total: int = 0
    alive: int = 0
    leaving: int = 0
    left: int = 0
    failed: int = 0
    # Members whose tags did not decode (not gpud, or another tag protocol version).
    tags_errors: int = 0
    last_error: str | None = None


class MembersResponse(msgspec.Struct, kw_only=True):
    members: list[Member]


def member_from_serf(raw: SerfMember) -> Member:
    """A Serf member as gpud sees it (pure; never raises on bad tags)."""
    status = raw.status if raw.status in _STATUSES else "none"
    try:
        tags, tags_error = decode(raw.tags), None
    except TagsError as exc:
        tags, tags_error = None, str(exc)
    return Member(
        name=raw.name,
        addr=raw.addr,
        port=raw.port,
        status=status,  # type: ignore[arg-type]
        tags=tags,
        tags_error=tags_error,
    )


def members_view(raw: list[SerfMember]) -> dict[str, Member]:
    return {m.name: member_from_serf(m) for m in sorted(raw, key=lambda m: m.name)}


def count(members: dict[str, Member]) -> MembershipStatus:
    by_status = Counter(m.status for m in members.values())
    return MembershipStatus(
        total=len(members),
        alive=by_status["alive"],
        leaving=by_status["leaving"],
        left=by_status["left"],
        failed=by_status["failed"],
        tags_errors=sum(m.tags_error is not None for m in members.values()),
    )


class Membership(ComponentBase):
    """Component "membership": keeps ctx.members current from Serf."""

    name = "membership"

    def __init__(
        self, ctx: NodeContext, serf: SerfAgent, *, refresh_interval_s: float = REFRESH_INTERVAL_S
    ) -> None:
        self.ctx = ctx
        self.serf = serf
        self.refresh_interval_s = refresh_interval_s
        self._last_error: str | None = None
        self._log = log.get("membership")

    async def run(self) -> None:
        while True:
            await self.serf.ready.wait()
            rpc = self.serf.rpc
            if rpc is None:
                await asyncio.sleep(0.2)
                continue
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._follow_events(rpc))
                    tg.create_task(self._refresh_periodically(rpc))
            except* (SerfConnectionError, SerfRPCError) as group:
                self._last_error = str(group.exceptions[0])
                # After our own leave serf goes away by design: not worth a warning then.
                level = logging.INFO if self.serf.leaving else logging.WARNING
                log.event(self._log, level, "lost serf, waiting for it", error=self._last_error)
            # The SerfAgent clears `ready` when it notices; do not spin on a dead connection.
            await asyncio.sleep(0.5)

    async def _follow_events(self, rpc: SerfRPC) -> None:
        events = rpc.stream(MEMBER_EVENTS)
        # Read once the stream is registered, so no change falls between the two.
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)
        await self.refresh(rpc)
        await first
        await self.refresh(rpc)
        async for _event in events:
            await self.refresh(rpc)

    async def _refresh_periodically(self, rpc: SerfRPC) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            await self.refresh(rpc)

    async def refresh(self, rpc: SerfRPC) -> None:
        """Read all members from Serf; notify listeners if anything changed."""
        view = with_down(members_view(await rpc.members()), self.ctx.down)
        self._last_error = None
        if view != self.ctx.members:
            self.ctx.set_members(view)

    def status(self) -> MembershipStatus:
        result = count(self.ctx.members)
        result.last_error = self._last_error
        return result

    def summary(self) -> str:
        counts = self.status()
        by_status = {
            "alive": counts.alive,
            "leaving": counts.leaving,
            "left": counts.left,
            "failed": counts.failed,
        }
        listed = ", ".join(f"{n} {s}" for s, n in by_status.items() if n) or "none"
        return f"{counts.total} ({listed})"

    def problems(self) -> list[Problem]:
        undecodable = [m.name for m in self.ctx.members.values() if m.tags_error is not None]
        if not undecodable:
            return []
        return [
            Problem(
                code="membership.foreign_tags",
                severity="warning",
                subject=", ".join(undecodable),
                message=f"{len(undecodable)} member(s) gossip tags gpud cannot read: not gpud, "
                "or another gpud tag version",
                fix="upgrade every host to the same gpud version, or remove foreign serf agents "
                "holding the cluster key",
            )
        ]

    def metrics(self) -> list[Metric]:
        counts = Counter(m.status for m in self.ctx.members.values())
        return [
            Metric(
                name="gpud_members",
                help="Cluster members by Serf status.",
                samples=[({"status": s}, n) for s, n in sorted(counts.items())],
            )
        ]

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/members", self._get_members)]

    async def _get_members(self, request: web.Request) -> web.Response:
        body = MembersResponse(members=list(self.ctx.members.values()))
        return web.Response(body=msgspec.json.encode(body), content_type="application/json")
