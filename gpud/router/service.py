"""Component "router": the OpenAI-compatible router of this host (gpud/component.py).

It listens on ``router.listen``:``router.port`` behind the same connection limits as the peer
API (`api.GuardedServer`), rebuilds its routing table from the deployments' views a few times
a second, and reads each ready replica's queue depth from its ``/metrics`` at a bounded rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
from collections.abc import Callable

import aiohttp
import msgspec

from gpud import api, log
from gpud.component import Component, ComponentBase, Disabled, Metric, Problem, gauge
from gpud.config import Config
from gpud.deployments.model import DeploymentsList
from gpud.errors import ConfigError
from gpud.router import balance, tls
from gpud.router.auth import ApiKeys
from gpud.router.proxy import Proxy
from gpud.router.stats import RouterStats

_log = log.get("router")

# How often the routing table follows the deployments' views (their probes run every
# deployments.interval_s; this only bounds the lag behind them).
REFRESH_S = 0.25
# Binding again after the port was taken, and the bound on one queue-depth read.
LISTEN_RETRY_S = 5.0
QUEUE_READ_TIMEOUT_S = 1.0
QUEUE_READS_AT_ONCE = 16


class RouterSection(msgspec.Struct, kw_only=True):
    state: str  # "serving" or "not listening"
    listen: str
    tls: bool
    models: list[str]
    upstreams: int
    in_flight: int
    auth: bool
    error: str = ""


class RouterService(ComponentBase):
    name = "router"

    def __init__(
        self,
        config: Config,
        listing: Callable[[], DeploymentsList],
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config.router
        self._listing = listing
        self.keys = ApiKeys(self.config.api_keys_file)
        self._keys_error = ""
        self._listen_error = ""
        self._tls_error = ""
        self.table = balance.Table()
        self._models: list[str] = []
        self.depth: dict[str, float] = {}
        self.stats = RouterStats()
        self.proxy = Proxy(
            self.config,
            table=lambda: self.table,
            models=lambda: self._models,
            keys=self.keys,
            stats=self.stats,
            depth=self.depth,
            rng=rng,
        )
        self.listening = asyncio.Event()
        self.port = 0  # the bound port (router.port, or the kernel's pick for port 0 in tests)
        self._refresh()

    # ---- work ----------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        limits = api.ConnectionLimits(
            total=cfg.max_connections,
            per_source=cfg.max_connections_per_source,
            idle_timeout_s=cfg.idle_timeout_s,
        )
        server = api.GuardedServer(self.proxy.app(), limits, name="router", logger=_log)
        await server.setup()
        # A client that goes away cancels its handler, which closes the upstream request.
        assert server.runner.server is not None
        server.runner.server.handler_cancellation = True
        try:
            async with self.proxy.client_session() as session:
                self.proxy.session = session
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._listen(server))
                    tg.create_task(self._refresh_loop())
                    tg.create_task(self._queue_loop(session))
        finally:
            self.listening.clear()
            await server.cleanup()

    async def _listen(self, server: api.GuardedServer) -> None:
        cfg = self.config
        while True:
            try:
                # Read again at each attempt: a fixed certificate or key needs no restart.
                context = tls.server_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
                self._tls_error = ""
            except ConfigError as exc:
                if exc.args[0] != self._tls_error:
                    log.error(_log, "TLS refused; not listening", error=exc.args[0])
                self._tls_error = exc.args[0]
                await asyncio.sleep(LISTEN_RETRY_S)
                continue
            try:
                await server.listen_tcp(cfg.listen, cfg.port, context)
            except OSError as exc:
                if not self._listen_error:
                    log.error(_log, "cannot listen", port=cfg.port, error=str(exc))
                self._listen_error = f"{exc.strerror or exc}"
                await asyncio.sleep(LISTEN_RETRY_S)
                continue
            self._listen_error = ""
            self.port = server.runner.addresses[0][1]
            log.info(_log, "listening", addr=cfg.listen, port=self.port, tls=context is not None)
            self.listening.set()
            return

    def _refresh(self) -> None:
        listing = self._listing()
        self.table = balance.table(listing)
        self._models = balance.models(listing)
        if self.keys.required:
            try:
                self.keys.load()
                self._keys_error = ""
            except ConfigError as exc:
                if exc.args[0] != self._keys_error:
                    log.error(
                        _log, "API keys not (re)loaded; keys in use unchanged", error=str(exc)
                    )
                self._keys_error = exc.args[0]

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            self._refresh()

    async def _queue_loop(self, session: aiohttp.ClientSession) -> None:
        gate = asyncio.Semaphore(QUEUE_READS_AT_ONCE)
        timeout = aiohttp.ClientTimeout(total=QUEUE_READ_TIMEOUT_S)

        async def read(url: str) -> float | None:
            async with gate:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
                    async with session.get(f"{url}/metrics", timeout=timeout) as r:
                        if r.status == 200:
                            return balance.queue_depth(await r.text())
                return None

        while True:
            urls = sorted({u.url for ups in self.table.ready.values() for u in ups})
            depths = await asyncio.gather(*(read(u) for u in urls))
            self.depth.clear()
            self.depth.update({u: d for u, d in zip(urls, depths, strict=True) if d is not None})
            await asyncio.sleep(self.config.queue_poll_s)

    # ---- component contract --------------------------------------------------------------

    def status(self) -> RouterSection:
        error = self._tls_error or self._listen_error or self._keys_error
        return RouterSection(
            state="serving" if self.listening.is_set() else "not listening",
            listen=f"{self.config.listen}:{self.port or self.config.port}",
            tls=bool(self.config.tls_cert),
            models=list(self._models),
            upstreams=len({u.url for ups in self.table.ready.values() for u in ups}),
            in_flight=sum(self.stats.in_flight.values()),
            auth=self.keys.required,
            error=error,
        )

    def summary(self) -> str:
        s = self.status()
        if s.state != "serving":
            return f"not listening on {s.listen}: {s.error or 'starting'}"
        tls_note = " (TLS)" if s.tls else ""
        return f"{s.listen}{tls_note}, {len(s.models)} models, {s.upstreams} replicas ready"

    def problems(self) -> list[Problem]:
        cfg = self.config
        found = []
        if self._listen_error:
            found.append(
                Problem(
                    code="router.listen_failed",
                    severity="critical",
                    subject=f"{cfg.listen}:{cfg.port}",
                    message=f"the router cannot listen on {cfg.listen}:{cfg.port}: "
                    f"{self._listen_error}; clients of this host get no answer",
                    fix="free the port (`ss -ltnp`) or set router.port, then restart gpud",
                )
            )
        if self._tls_error:
            found.append(
                Problem(
                    code="router.tls_refused",
                    severity="critical",
                    subject=cfg.tls_key,
                    message=f"{self._tls_error}; the router does not listen (never plain HTTP "
                    "in its place), so clients of this host get no answer",
                    fix="fix router.tls_cert / router.tls_key (PEM, the key mode 0600 or 0640); "
                    f"it is read again every {LISTEN_RETRY_S:g} s",
                )
            )
        if self._keys_error:
            found.append(
                Problem(
                    code="router.keys_refused",
                    severity="critical",
                    subject=cfg.api_keys_file,
                    message=f"{self._keys_error}; "
                    + (
                        "the keys loaded before stay in use"
                        if self.keys.loaded
                        else "every request is refused with 401 until it loads"
                    ),
                    fix="fix the file (owner root or gpud, mode 0600, lines `sha256:<hex>`)",
                )
            )
        if self.keys.warning:
            found.append(
                Problem(
                    code="router.keys_file_mode",
                    severity="warning",
                    subject=cfg.api_keys_file,
                    message=self.keys.warning,
                    fix=f"chmod 0600 {cfg.api_keys_file}",
                )
            )
        if not self.keys.required and not ipaddress.ip_address(cfg.listen).is_loopback:
            found.append(
                Problem(
                    code="router.unauthenticated",
                    severity="warning",
                    subject=f"{cfg.listen}:{cfg.port}",
                    message="the router needs no API key: anyone who reaches port "
                    f"{cfg.port} can use every model on the cluster",
                    fix="set router.api_keys_file (hashed bearer keys), or router.listen to "
                    "127.0.0.1",
                )
            )
        return found

    def metrics(self) -> list[Metric]:
        return [
            gauge(
                "gpud_router_ready_upstreams",
                "Ready replicas this router can send requests to.",
                self.status().upstreams,
            ),
            *self.stats.families(
                {u.url: u.deployment for ups in self.table.ready.values() for u in ups}
            ),
        ]


def router_component(config: Config, listing: Callable[[], DeploymentsList]) -> Component:
    """The router, or its disabled stand-in (router.enabled = false, the default)."""
    if not config.router.enabled:
        return Disabled("router", "router.enabled = false")
    return RouterService(config, listing)
