"""`gpud agent`: wires the components together and runs them in one TaskGroup.

Decisions live in the components; this module only builds them, serves the local API, speaks
the systemd notify protocol and shuts everything down in order on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gpud import __version__, api, log, metrics, preflight, status
from gpud.aio import within
from gpud.component import Component, Disabled, Metric, gauge
from gpud.config import Config
from gpud.context import NodeContext
from gpud.errors import GpudError
from gpud.notify import Notifier
from gpud.status import NodeSection, StatusDocument, collect, doctor_report

if TYPE_CHECKING:
    from gpud.serf.adoption import AdoptedSerf

_log = log.get("agent")

STATUS_INTERVAL_S = 5.0
# How long serf may be down before the watchdog stops being fed (systemd then restarts gpud).
SERF_DOWN_WATCHDOG_S = 60.0
MEMBERS_READY_TIMEOUT_S = 10.0


class Agent:
    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path  # re-read on reload (SIGHUP); None: reload refused
        self._reload_requested = asyncio.Event()
        self.notifier = Notifier()
        self.started = time.monotonic()
        self._stop = asyncio.Event()
        self._serf_down_since: float | None = None

    def _build(self, advertise_addr: str, interface: str, serf: AdoptedSerf | None = None) -> None:
        """The one place that names the components: each is built here, in start order.
        ``serf``: the predecessor's serf, verified, to adopt instead of starting one."""
        from gpud.deployments.peers import PeerLinks
        from gpud.deployments.service import DeploymentService
        from gpud.gpus.service import GpuService
        from gpud.health.service import HealthService
        from gpud.membership import Membership
        from gpud.netcheck import NetCheck
        from gpud.ports.service import PortsService
        from gpud.router.service import router_component
        from gpud.serf.agent import SerfAgent

        ctx = NodeContext(self.config, advertise_addr)
        ctx.advertise_is_local = bool(interface)
        self.ctx = ctx
        self.serf = SerfAgent(ctx, serf)
        self.network = NetCheck(ctx, self._address_changed)
        self.health = HealthService(ctx, self.network, keyring_file=self.serf.keyring_file)
        ports = PortsService(ctx, verified=self.health.prober.verified)
        gpus = GpuService(ctx)
        self.components: list[Component] = [
            self.serf,
            Membership(ctx, self.serf),
            self.network,
            self.health,
            ports,
            self._ray(ctx, ports, gpus),
            gpus,
            deployments := DeploymentService(
                ctx,
                ports=ports,
                gpus=gpus,
                peers=PeerLinks(
                    self.health.client, self.health.server.add_route, self.health.prober.verified
                ),
                network=self.network,
            ),
            router_component(self.config, deployments.listing),
        ]
        self.registry = metrics.registry(self._metrics)
        self.components.append(metrics.MetricsEndpoint(self.config, self.registry))

    def _ray(self, ctx: NodeContext, ports: Any, gpus: Any) -> Component:
        if not self.config.ray.enabled:
            return Disabled("ray", "ray.enabled = false")
        from gpud.ray.service import RayService

        ray = RayService(
            ctx,
            self.serf,
            ports,
            self.health,
            ray_gpus=gpus.unleased_healthy_indices,
            verified=self.health.prober.verified,
            keyring_file=self.serf.keyring_file,
        )
        self.health.add_workload(ray.workload_checks)  # Ray's ports beside gpud's in /v1/health
        return ray

    async def _address_changed(self, old: str | None, new: str | None) -> None:
        """NetCheck saw the advertised address go (new None) or change: serf gossips the new
        address (restart), the peer API moves to it, and health re-judges at once."""
        if new is None:
            log.error(_log, "advertised address disappeared", addr=old)
        elif new != self.ctx.advertise_addr:
            log.warning(_log, "re-advertising a new address", old=old, new=new)
            self.serf.readvertise(new)
        await self.health.readvertise()

    # -- local API -------------------------------------------------------------------------

    def document(self) -> StatusDocument:
        return StatusDocument(
            node=NodeSection(
                name=self.ctx.node_name,
                addr=self.ctx.advertise_addr,
                version=__version__,
                pid=os.getpid(),
                uptime_s=round(time.monotonic() - self.started, 1),
                tags=self.ctx.tags,
            ),
            members=sorted(self.ctx.members.values(), key=lambda m: m.name),
            summaries={c.name: c.summary() for c in self.components},
            problems=collect(p for c in self.components for p in c.problems()),
        )

    async def _get_status(self, request: web.Request) -> web.Response:
        return api.json_response(status.encode(self.document(), self.components))

    async def _get_doctor(self, request: web.Request) -> web.Response:
        found = await asyncio.gather(*(c.diagnose() for c in self.components))
        report = doctor_report(
            self.ctx.node_name, len(self.ctx.peers()), (p for ps in found for p in ps)
        )
        return api.json_response(report)

    def _metrics(self) -> list[Metric]:
        """Every family a scrape shows (the socket's and the TCP listener's /metrics)."""
        problems = self.document().problems
        families = [
            gauge("gpud_up", "1 while the agent runs.", 1),
            gauge(
                "gpud_build_info", "Always 1; the labels name gpud's build.", 1, version=__version__
            ),
            Metric(
                name="gpud_problems",
                help="Current problems by severity.",
                samples=[
                    ({"severity": s}, sum(p.severity == s for p in problems))
                    for s in ("warning", "critical")
                ],
            ),
            Metric(
                name="gpud_problem",
                help="1 for each current problem (what `gpud status` lists), by code, "
                "severity and subject.",
                samples=[
                    ({"code": c, "severity": s, "subject": j}, 1)
                    for c, s, j in dict.fromkeys((p.code, p.severity, p.subject) for p in problems)
                ],
            ),
        ]
        for component in self.components:
            families += component.metrics()
        return families

    def _routes(self) -> list[web.RouteDef]:
        routes = [
            web.get("/v1/status", self._get_status),
            web.get("/v1/doctor", self._get_doctor),
            web.get("/metrics", metrics.handler(self.registry)),
        ]
        for component in self.components:
            routes += component.routes()
        return routes

    # -- lifecycle -------------------------------------------------------------------------

    def _summary(self) -> str:
        return status.one_line(self.document())

    def _serf_healthy(self) -> bool:
        if self.serf.ready.is_set():
            self._serf_down_since = None
            return True
        now = time.monotonic()
        self._serf_down_since = self._serf_down_since or now
        return now - self._serf_down_since < SERF_DOWN_WATCHDOG_S

    async def _notify_loop(self) -> None:
        await self.serf.ready.wait()
        # Ready once the member view holds this node, so a first `gpud status` is not empty.
        seen_self = asyncio.Event()
        self.ctx.on_members_changed(lambda m: seen_self.set() if self.ctx.node_name in m else None)
        if self.ctx.node_name not in self.ctx.members:
            with contextlib.suppress(TimeoutError):
                await within(seen_self.wait(), MEMBERS_READY_TIMEOUT_S)
        self.notifier.ready(self._summary())
        log.info(_log, "ready", addr=self.ctx.advertise_addr, socket=self.config.socket_path)
        interval = min(STATUS_INTERVAL_S, self.notifier.watchdog_interval_s or STATUS_INTERVAL_S)
        while True:
            self.notifier.status(self._summary())
            if self.notifier.watchdog_interval_s and self._serf_healthy():
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def run(self) -> int:
        from gpud.netcheck import resolve_advertise
        from gpud.serf.adoption import adopt_leftover_serf, stop_leftover_serf
        from gpud.serf.rpc_port import split_squat

        advertise_addr, interface = resolve_advertise(self.config)
        # The serf a previous gpud left running (a restart, an upgrade, a kill -9) is adopted
        # when it verifies; else it is stopped first: it is not a port conflict either way.
        serf = await adopt_leftover_serf(self.config, advertise_addr, bool(interface))
        if serf is None:
            await stop_leftover_serf(self.config)
        # -- preflight (operations issue): a port another process holds fails the start at once,
        # naming the port and its holder (STATUS=, journal at error, exit 1), instead of serf
        # failing quietly while the unit hangs in `activating`.
        # A squatted serf RPC port is not one: serf's RPC moves (gpud/serf/rpc_port.py).
        conflicts = split_squat(preflight.check(self.config, advertise_addr, bool(interface)))[1]
        if serf is not None:  # the adopted serf holds its own ports
            conflicts = [c for c in conflicts if c.need.component != "serf"]
        if conflicts:
            self.notifier.status(f"failed: {preflight.summary(conflicts)}")
            raise preflight.PortConflictError(conflicts)
        # -- end preflight
        self._build(advertise_addr, interface, serf)
        log.info(
            _log,
            "starting",
            node=self.ctx.node_name,
            addr=advertise_addr,
            interface=interface,
            version=__version__,
        )
        if not self.config.cluster.key_file:
            # Loud (a critical serf.unencrypted problem) unless cluster.insecure says it is meant.
            log.event(
                _log,
                logging.INFO if self.config.cluster.insecure else logging.WARNING,
                "no cluster.key_file: gossip is unencrypted and peers unauthenticated",
            )
        api.raise_fd_limit()
        runner = await api.serve_unix(
            api.make_app(self._routes()),
            self.config.socket_path,
            mode=self.config.api.socket_mode,
            group=self.config.api.socket_group,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(c.run(), name=c.name) for c in self.components]
                tasks.append(tg.create_task(self._notify_loop(), name="notify"))
                tasks.append(tg.create_task(self._reload_loop(), name="reload"))
                stop = tg.create_task(self._stop.wait())
                await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
                await self._shutdown(tasks)
                stop.cancel()
        finally:
            await runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.socket_path)
        log.info(_log, "stopped")
        return 0

    # -- reload (operations issue): `systemctl reload gpud` sends SIGHUP ---------------------

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            if self.notifier.ready_sent:
                self.notifier.reloading()
            await self._reload()
            if self.notifier.ready_sent:
                self.notifier.ready(self._summary())

    async def _reload(self) -> None:
        """Re-read the config; apply what can change live (config_reload.LIVE_FIELDS), name the
        rest."""
        from gpud import config as config_module
        from gpud.config_reload import reload_plan

        if self.config_path is None:
            log.error(_log, "reload refused: the agent was not started from a config file")
            return
        try:
            new = preflight.check_host(config_module.load(self.config_path))
        except GpudError as exc:
            log.error(_log, "reload refused, configuration unchanged", error=str(exc))
            return
        plan = reload_plan(self.config, new)
        self.config = self.ctx.config = plan.config
        log.set_level(plan.config.log_level)
        if "serf.retry_join" in plan.live:
            await self.serf.join(plan.config.serf.retry_join)
        await self.ctx.update_tags(pri=plan.config.ray.priority)
        for component in self.components:
            component.reconfigure(plan.config)
        log.info(_log, "reloaded", applied=",".join(plan.live) or "nothing changed")
        if plan.restart:
            log.warning(
                _log,
                "changed settings need `systemctl restart gpud`",
                fields=",".join(plan.restart),
            )

    # -- end reload

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        """STOPPING=1, then every component cancelled in reverse start order. The workload
        outlives gpud: serf (no leave: peers never see this node left or failed), the
        cluster-wide Ray node and the servers of replicas of one node are left running for
        the next gpud to adopt (`serf.adoption`, `ray.supervisor`, `deployments.replicas`);
        every other child is stopped by its component."""
        self.notifier.stopping()
        log.info(_log, "stopping; serf, Ray and servers left running for the next gpud")
        for task in reversed(tasks):
            await _cancelled(task)


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main(config: Config, config_path: str | None = None) -> int:
    log.setup(config.log_level)
    try:
        return asyncio.run(Agent(config, config_path).run())
    except GpudError as exc:
        log.error(_log, str(exc))
        return 1
    except Exception:
        # A component failed in a way it could not handle: exit non-zero so systemd restarts us.
        _log.exception("agent failed")
        return 1
