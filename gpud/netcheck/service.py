"""The network component: watches the advertised address over netlink and checks the route to
every peer."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from gpud import log
from gpud.aio import within
from gpud.component import ComponentBase, Metric, Problem, gauge
from gpud.context import NodeContext
from gpud.netcheck.assess import assess, chosen_by_config, initial_state, reconcile
from gpud.netcheck.lean_pyroute2 import AsyncIPRoute, NetlinkError
from gpud.netcheck.model import AdvertiseState, HostNetwork, NetworkStatus, RouteInfo
from gpud.netcheck.netlink import (
    WATCH_EVENTS,
    WATCH_GROUPS,
    check_now,
    open_ipr,
    peer_addrs,
    read_host,
    read_host_network,
    route_to,
)

_log = log.get("netcheck")


class NetCheck(ComponentBase):
    """Watches the advertised address over netlink and checks the route to every peer."""

    name = "network"

    def __init__(
        self,
        ctx: NodeContext,
        on_address_change: Callable[[str | None, str | None], Awaitable[None]],
        *,
        refresh_s: float = 30.0,
        netns: str | None = None,
    ) -> None:
        self._ctx = ctx
        self._on_address_change = on_address_change
        self._refresh_s = refresh_s
        self._netns = netns
        self._auto = ctx.config.node.advertise == "auto"
        self._state: AdvertiseState | None = None
        self._host = HostNetwork()
        self._routes: list[RouteInfo] = []
        self._status = NetworkStatus(
            advertise=ctx.advertise_addr,
            chosen_by=chosen_by_config(ctx.config.node, self._host),
            interface="",
            mtu=None,
            address_is_local=None,
        )
        self._refresh_wanted = asyncio.Event()
        # Set after every completed check; tests and `doctor`-style callers may wait on it.
        self.checked = asyncio.Event()
        ctx.on_members_changed(lambda _members: self._refresh_wanted.set())

    def status(self) -> NetworkStatus:
        return self._status

    def summary(self) -> str:
        status = self._status
        if status.address_is_local is None:
            return f"{status.advertise}: not checked yet"
        where = status.interface or "no local interface"
        return f"{status.advertise} on {where} (mtu {status.mtu}, chosen by {status.chosen_by})"

    def problems(self) -> list[Problem]:
        return list(self._status.problems)

    async def diagnose(self) -> list[Problem]:
        """A fresh check of the address, the link and the route to every alive peer."""
        return (await check_now(self._ctx, self._netns)).problems

    def metrics(self) -> list[Metric]:
        local = self._status.address_is_local
        return [
            gauge(
                "gpud_advertise_address_local",
                "1 while the advertised address is on a local interface.",
                float(bool(local)),
            )
        ]

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/network", self._handle_status)]

    async def _handle_status(self, _request: web.Request) -> web.Response:
        return web.Response(body=msgspec.json.encode(self._status), content_type="application/json")

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._watch_forever())
            tasks.create_task(self._refresh_forever())

    async def _watch_forever(self) -> None:
        backoff = 0.5
        while True:
            started = time.monotonic()
            try:
                await self._watch()
            except (OSError, NetlinkError) as exc:
                # ENOBUFS: events overflowed the socket; a fresh socket and snapshot recover.
                log.warning(_log, "netlink watch failed, reopening", error=str(exc))
                # Back off only while failures come in quick succession.
                backoff = 0.5 if time.monotonic() - started > 60 else min(backoff * 2, 10.0)
                await asyncio.sleep(backoff)

    async def _watch(self) -> None:
        # Subscribe before the first snapshot so that no change slips in between.
        async with open_ipr(self._netns, WATCH_GROUPS) as events, open_ipr(self._netns) as query:
            await events.bind()
            await self._reconcile(query)
            while True:
                batch = [msg async for msg in events.get()]
                if not batch:
                    raise OSError(errno.ECONNRESET, "netlink event socket closed")
                if any(msg.get("event") in WATCH_EVENTS for msg in batch):
                    await self._reconcile(query)

    async def _reconcile(self, query: AsyncIPRoute) -> None:
        host = await read_host(query)
        first = self._state is None
        if first:
            self._state = initial_state(self._ctx.advertise_addr, self._auto, host)
            change = None
        else:
            self._state, change = reconcile(self._state, host)
        self._host = host
        if first or change is not None:
            self._routes = await self._read_routes(query, host)
        self._publish()
        if change is None:
            return
        if change.severity == "critical":
            log.error(_log, f"critical: {change.message}", old=change.old, new=change.new)
        else:
            log.warning(_log, change.message, old=change.old, new=change.new)
        try:
            await self._on_address_change(change.old, change.new)
        except Exception as exc:  # the agent's handler failing must not stop the watch
            log.error(_log, "address-change handler failed", error=repr(exc))

    async def _read_routes(self, ipr: AsyncIPRoute, host: HostNetwork) -> list[RouteInfo]:
        return [await route_to(ipr, name, addr, host) for name, addr in peer_addrs(self._ctx)]

    async def _refresh_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await within(self._refresh_wanted.wait(), self._refresh_s)
            self._refresh_wanted.clear()
            if self._state is None:
                continue
            try:
                host = await read_host_network(self._netns)
                async with open_ipr(self._netns) as ipr:
                    self._routes = await self._read_routes(ipr, host)
            except (OSError, NetlinkError) as exc:
                log.warning(_log, "route check failed", error=str(exc))
                continue
            self._host = host
            self._publish()

    def _publish(self) -> None:
        assert self._state is not None
        self._status = assess(
            self._state,
            chosen_by_config(self._ctx.config.node, self._host),
            self._host,
            self._routes,
            time.time(),
        )
        self.checked.set()
