"""The "ray" component: this node's part in the Ray cluster, on the component contract.

RayService wires three parts that know nothing of each other: the head election
(gpud.ray.head_election), the target decision (gpud.ray.target, pure) and the Ray process
(gpud.ray.supervisor). It announces the GCS port once the head's GCS answers, asks the GCS
which Ray nodes are alive (gpud.ray.gcs_monitor), and reports its status and problems
(gpud.ray.problems, pure) and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import msgspec
from aiohttp import web

from gpud import api, log, logfiles, secret
from gpud.aio import within
from gpud.component import ComponentBase, Metric, Problem, gauge
from gpud.config import unkeyed_refusal
from gpud.context import NodeContext
from gpud.health.verdict import WorkloadCheck
from gpud.process_groups import GroupRecord
from gpud.ray.election import Plan, ineligible, workers_reach_gcs
from gpud.ray.gcs_monitor import GcsMonitor
from gpud.ray.head_election import RETRY_S, HeadElection
from gpud.ray.lease import LeaseSource
from gpud.ray.probes import RayInstall, probe_ray
from gpud.ray.problems import (
    CRASH_LOOP_RESTARTS,
    CRASH_WINDOW_S,
    NotEligible,
    RayStatus,
    SteppedDown,
    own_ineligibility,
    ray_problems,
    run_reason,
    status_summary,
    workload_checks,
)
from gpud.ray.reach import path_reopened
from gpud.ray.supervisor import (
    RAY_CHILD,
    RAY_RUN,
    PortLeaser,
    RayAdoption,
    RaySupervisor,
    SupervisorSettings,
)
from gpud.ray.target import ADOPT_SETTLE_S, decide_target, keep_adopted
from gpud.ray.transport import QueryTransport
from gpud.ray.votes import VoteStore
from gpud.state import open_store

_log = log.get("ray")

# Seconds between election steps when nothing else wakes the loop.
TICK_S = 1.0
# How often to look for a missing `ray` executable again.
PROBE_EVERY_S = 60.0
# A head in a crash loop (gpud.ray.problems.CRASH_LOOP_RESTARTS), or deposed by its workers,
# gives up its eligibility for this long. A deposed head runs Ray as a worker meanwhile: only
# its GCS port was unreachable, and the new head needs every Ray node it can get.
CRASH_COOLDOWN_S = 300.0


class RayServiceSettings(msgspec.Struct, kw_only=True, frozen=True):
    """Timings of the ray component; tests and benches pass their own."""

    supervisor: SupervisorSettings = msgspec.field(default_factory=SupervisorSettings)
    # How often to ask the GCS which Ray nodes are alive (one RPC through the long-lived
    # query process). A worker is missing after failures_before_critical polls in a row, so
    # this times 3 must outlast a worker's `ray start` (seconds on a busy host): a shorter
    # interval reported starting workers as missing.
    nodes_every_s: float = 10.0
    # A candidate that lost waits a random time in this range before standing again.
    retry_s: tuple[float, float] = RETRY_S


@runtime_checkable
class LeaseHolder(Protocol):
    """The port service's lease book as adoption needs it (gpud.ports.service)."""

    def leases(self) -> Sequence[object]: ...

    async def transfer(self, lease_id: str, pid: int) -> None: ...


class DataPathHealth(Protocol):
    """The health component's verdict on a node, as seen by a majority of its peers."""

    def healthy_by_majority(self, node: str) -> bool | None: ...


class RayService(ComponentBase):
    """Component "ray"."""

    name = "ray"

    def __init__(
        self,
        ctx: NodeContext,
        serf: QueryTransport,
        ports: PortLeaser,
        health: DataPathHealth | None = None,
        *,
        ray_gpus: Callable[[], list[int]] | None = None,
        settings: RayServiceSettings | None = None,
        verified: Callable[[str], bool] | None = None,
        keyring_file: Path | None = None,
    ) -> None:
        """``ray_gpus``: NVML indices of the GPUs the cluster-wide Ray may use (the GPU
        component's healthy GPUs that no deployment leases); Ray gets only those
        (CUDA_VISIBLE_DEVICES in PCI bus order, and --num-gpus). None: every GPU the tags count.
        ``verified``: is a member a verified gpud node (the health prober's); only those count
        in the election (None: every member, for tests without a health component).
        ``keyring_file``: serf's keyring; votes are signed with keys derived from it."""
        self.ctx = ctx
        self._ray_gpus = ray_gpus
        self.settings = settings or RayServiceSettings()
        config = ctx.config.ray
        verdict = health.healthy_by_majority if health is not None else None
        self._verdict = verdict
        self.election = HeadElection(
            ctx,
            serf,
            VoteStore(open_store(ctx.config.state_dir)),
            verdict,
            verified=verified,
            vote_keys=secret.PeerApiKeys(ctx.config, keyring_file, purpose="vote"),
            vote_timeout_s=config.vote_timeout_s,
            retry_s=self.settings.retry_s,
            # The leader lease needs the data-path probes' contact times.
            lease=health if isinstance(health, LeaseSource) else None,
        )
        self._wake = asyncio.Event()
        ctx.on_members_changed(lambda _members: self._wake.set())
        self._verified = verified
        store = open_store(ctx.config.state_dir)
        adoption = None
        if isinstance(ports, LeaseHolder):
            # The cluster-wide Ray node outlives gpud (gpud.ray.supervisor): its output goes
            # to a file under the state directory, its leases move to the gpud that adopts it.
            adoption = RayAdoption.under_key(
                store,
                RAY_RUN,
                ctx.config.state_dir / logfiles.LOG_DIR / logfiles.RAY_LOG,
                ports.transfer,
                lambda: {str(getattr(lease, "id", "")) for lease in ports.leases()},
            )
        self.supervisor = RaySupervisor(
            executable=config.executable,
            node_name=ctx.node_name,
            node_ip=ctx.advertise_addr,  # default; each target carries the current address
            ports=ports,
            temp_root=config.temp_root,
            num_cpus=config.num_cpus,
            num_gpus=ctx.tags.gpu,
            env=config.env,
            on_change=self._wake.set,
            settings=self.settings.supervisor,
            record=GroupRecord(store, RAY_CHILD),
            adoption=adoption,
        )
        self.install: RayInstall | None = None
        self._unavailable_until = 0.0
        # Why this node sits out the election until _unavailable_until (None: it does not).
        self._cooldown: NotEligible | None = None
        # Deposed by its workers: the GCS port they could not reach (tag hc) and until when
        # (monotonic) it sits out the election while running Ray as a worker.
        self._deposed_port = 0
        self._deposed_until = 0.0
        # Ray's own ports, judged with the health component's hysteresis.
        self.gcs = GcsMonitor(
            ctx, self.supervisor, lambda: self.election.plan.head, self.settings.nodes_every_s
        )

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.supervisor.run())
                tg.create_task(self._probe_loop())
                tg.create_task(self.gcs.nodes_loop())
                tg.create_task(self._election_loop())
                tg.create_task(self.gcs.reach_loop())
        finally:
            await self._resign()

    async def _resign(self) -> None:
        """Ray has stopped with this component: say so in the tags (a no-op when they say it
        already) before gpud exits. A head that kept announcing itself while stopping would
        be listed as head beside its successor, and peers would wait out a lease that nothing
        holds."""
        if self.supervisor.left_running:
            return  # Ray runs on for the next gpud, and serf with it: nothing changed
        try:
            await self.ctx.update_tags(ray="none", gcs=0)
        except Exception as exc:  # serf gone already: its leave says the same
            log.warning(_log, "cannot announce the stop of Ray", error=str(exc))

    async def _probe_loop(self) -> None:
        if not self.ctx.config.ray.enabled:
            await self.ctx.update_tags(rv=False)
            return
        reported: str | None = None
        while True:
            install = await probe_ray(self.ctx.config.ray.executable)
            self.install = install
            self.supervisor.client_server = install.client
            if install.reason is not None and install.reason != reported:
                # Once per cause (status and doctor keep saying it), not every probe.
                log.warning(_log, "ray not available", reason=install.reason)
                reported = install.reason
            self._wake.set()
            if install.reason is None:
                return
            await asyncio.sleep(PROBE_EVERY_S)

    def _ray_usable(self) -> bool:
        install = self.install
        return (
            self.ctx.config.ray.enabled
            # Never Ray on an unkeyed cluster without consent: anyone could become head.
            and unkeyed_refusal(self.ctx.config) is None
            and install is not None
            and install.reason is None
            and time.monotonic() >= self._unavailable_until
        )

    async def _settle(self) -> None:
        """Before the first step: the predecessor's Ray node adopted or stopped. An adopted
        one runs on the tags the adopted serf still gossips (ray, term, gcs); stepping on a
        view in which the prober has not verified the peers yet would count only this node
        (a head would step down for want of a majority, a worker find no head), so the
        first step waits until every alive peer is verified and Ray's install is probed,
        at most ADOPT_SETTLE_S."""
        await self.supervisor.settled.wait()
        if not self.supervisor.adopted_at:
            return
        deadline = self.supervisor.adopted_at + ADOPT_SETTLE_S
        while time.monotonic() < deadline and self._unsettled():
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await within(self._wake.wait(), 0.2)
        tags = self.ctx.tags
        log.info(
            _log,
            "first election step after adopting ray",
            waited_s=round(time.monotonic() - self.supervisor.adopted_at, 1),
            unsettled=self._unsettled(),
            ray=tags.ray,
            term=tags.term,
            gcs=tags.gcs,
        )

    def _unsettled(self) -> str:
        """What the first step after an adoption still waits for ("" once nothing)."""
        if self.install is None:
            return "Ray's install not probed yet"
        if not self.election.membership_known():
            return "membership not known yet"
        me = self.ctx.node_name
        verified = self._verified or (lambda _name: True)
        pending = sorted(
            m.name
            for m in self.ctx.members.values()
            if m.name != me and m.alive and m.tags is not None and m.tags.pp
            and not verified(m.name)
        )  # fmt: skip
        return f"verifying {', '.join(pending)}" if pending else ""

    async def _election_loop(self) -> None:
        await self._settle()
        while True:
            self._wake.clear()
            self._watch_crash_loop()
            if self._deposed_port and time.monotonic() >= self._deposed_until:
                self._deposed_port = 0
                log.info(_log, "head cool-down over: eligible again")
            elif self._deposed_port and path_reopened(self.ctx.node_name, self.ctx.members):
                # The fault is gone: no reason to sit out the election any longer (the new
                # head keeps the role anyway: an eligible head in office is sticky).
                log.info(_log, "gcs port answers the members again: eligible again")
                self._deposed_port = 0
            await self.ctx.update_tags(rv=self._ray_usable(), hc=self._deposed_port)
            announced_gcs = self.ctx.tags.gcs
            current = await self.election.step()
            await self._note_deposed(current, announced_gcs)
            await self._apply(current)
            with contextlib.suppress(TimeoutError):
                await within(self._wake.wait(), self.election.next_step_in(TICK_S))

    async def _note_deposed(self, current: Plan, gcs: int) -> None:
        """``gcs``: the GCS port this node announced before the step."""
        if current.action == "step_down" and current.code == "gcs_unreachable":
            # Stay out of the next election (its GCS port is still blocked for the workers),
            # announced before the next step so that nobody waits for this node to stand.
            self._deposed_port = gcs or self._deposed_port
            self._deposed_until = time.monotonic() + CRASH_COOLDOWN_S
            await self.ctx.update_tags(hc=self._deposed_port)
            log.warning(_log, "ray head deposed by its workers", reason=current.reason, gcs=gcs)

    def _watch_crash_loop(self) -> None:
        target = self.supervisor.target
        failures = self.supervisor.failures_within(CRASH_WINDOW_S)
        if (
            target is not None
            and target.role == "head"
            and failures >= CRASH_LOOP_RESTARTS
            and self.supervisor.gcs_ready_port == 0
        ):
            # Stop being a candidate for a while instead of holding the head role with no GCS.
            # (A crashing worker keeps retrying with backoff; ray.crash_loop says why.)
            last = self.supervisor.status().process.last_error
            why = f"Ray keeps crashing ({last}); retry later"
            self._cooldown = NotEligible("crash_loop", why)
            self._unavailable_until = time.monotonic() + CRASH_COOLDOWN_S
            log.warning(_log, "ray crash loop", reason=why)
        elif time.monotonic() >= self._unavailable_until:
            self._cooldown = None

    async def _apply(self, current: Plan) -> None:
        gpus = tuple(self._ray_gpus()) if self._ray_gpus is not None else None
        if gpus is None:
            self.supervisor.num_gpus = self.ctx.tags.gpu
        target = decide_target(
            current,
            self.election.view(),
            usable=self._ray_usable(),
            node_ip=self.ctx.advertise_addr,
            running=self.supervisor.target,
            gpus=gpus,
        )
        adopted_for = time.monotonic() - self.supervisor.adopted_at
        if target is None and keep_adopted(current, self.supervisor.adopted_at > 0, adopted_for):
            target = self.supervisor.target  # e.g. a worker proving its head's office first
        self.supervisor.set_target(target)
        target = self.supervisor.target
        ready = self.supervisor.gcs_ready_port if target and target.role == "head" else 0
        if current.action == "lead" and ready != self.ctx.tags.gcs:
            await self.ctx.update_tags(gcs=ready)
            log.info(_log, "head gcs announced", gcs=ready, term=self.ctx.tags.term)

    def status(self) -> RayStatus:
        tags = self.ctx.tags
        current = self.election.plan
        members = self.election.view()
        install = self.install
        own = own_ineligibility(
            enabled=self.ctx.config.ray.enabled,
            unkeyed=unkeyed_refusal(self.ctx.config),
            install=install,
            cooldown=self._cooldown,
            # The deposed head's own tag (hc) makes the election's reason say so.
            election=ineligible(members[self.ctx.node_name], self._verdict),
        )
        head = members.get(current.head) if current.head else None
        head_address = None
        if head is not None and head.tags is not None and head.tags.gcs:
            head_address = f"{head.addr}:{head.tags.gcs}"
        process = self.supervisor.status()
        me = members.get(self.ctx.node_name)
        kept = (
            tags.ray == "head"
            and me is not None
            and workers_reach_gcs(me, members) is False
            and current.action == "lead"
        )
        status = RayStatus(
            enabled=self.ctx.config.ray.enabled,
            role=tags.ray,
            term=tags.term,
            head=current.head,
            candidate=current.candidate,
            head_address=head_address,
            action=current.action,
            election_reason=current.reason,
            election_code=current.code,
            eligible=own is None,
            not_eligible_reason=own.text if own is not None else None,
            not_eligible_code=own.code if own is not None else None,
            ray_available=install is not None and install.reason is None,
            ray_version=install.version if install else "",
            process=process,
            recent_failures=self.supervisor.failures_within(CRASH_WINDOW_S),
            restarts_total=self.supervisor.restarts_total,
            ray_nodes=self.gcs.nodes_seen(),
            gcs_reach=self.gcs.reach,
            workers=sorted(self.gcs.workers.values(), key=lambda w: w.name),
            registration=self.gcs.registration,
            gcs_unreachable_kept=kept,
            stepped_down=self._stepped_down(),
            stepped_down_peers=sorted(self.gcs.stepped_down.values(), key=lambda r: r.head),
            last_election=self.election.last_election,
            reason=run_reason(self._ray_usable(), current, process, own),
            summary="",
        )
        return msgspec.structs.replace(status, summary=status_summary(status))

    def _stepped_down(self) -> SteppedDown | None:
        left = self._deposed_until - time.monotonic()
        if not self._deposed_port or left <= 0:
            return None
        address = f"{self.ctx.advertise_addr}:{self._deposed_port}"
        return SteppedDown(address=address, port=self._deposed_port, left_s=round(left, 1))

    def workload_checks(self) -> list[WorkloadCheck]:
        return workload_checks(self.status(), self.ctx.node_name)

    def summary(self) -> str:
        return self.status().summary

    def problems(self) -> list[Problem]:
        # The election's own findings: claims it refused to believe (rogue heads, wild terms).
        return ray_problems(self.status(), self.ctx.node_name) + self.election.problems()

    async def diagnose(self) -> list[Problem]:
        """The status's problems with Ray's ports checked now (GcsMonitor.checks_now)."""
        status = self.status()
        checks = await self.gcs.checks_now()
        fresh = msgspec.structs.replace(
            status,
            gcs_reach=checks.reach,
            workers=checks.workers,
            registration=checks.registration,
            stepped_down_peers=checks.stepped_down,
        )
        return ray_problems(fresh, self.ctx.node_name) + self.election.problems()

    def metrics(self) -> list[Metric]:
        tags = self.ctx.tags
        reach = self.gcs.reach
        nodes = self.gcs.nodes.nodes
        reachable = []
        if reach is not None and reach.direction.state != "unknown":
            labels = {"head": reach.head, "address": reach.address}
            reachable.append((labels, float(reach.direction.state == "passing")))
        return [
            Metric(
                name="gpud_ray_gcs_reachable",
                help="Worker: 1 while its head's GCS port answers over the data path, 0 when "
                "critical (absent while unknown or not a worker).",
                samples=reachable,
            ),
            Metric(
                name="gpud_ray_nodes_alive",
                help="Ray nodes the GCS reports alive (absent while unknown).",
                samples=[({}, float(len(nodes)))] if nodes is not None else [],
            ),
            gauge(
                "gpud_ray_workers_missing",
                "Head: members tagged as its Ray workers that its GCS does not list alive or "
                "whose node-manager port does not answer.",
                sum(w.direction.state == "critical" for w in self.gcs.workers.values()),
            ),
            gauge("gpud_ray_head", "1 while this node is the Ray head.", tags.ray == "head"),
            gauge("gpud_ray_term", "Ray head election term.", tags.term),
            Metric(
                name="gpud_ray_restarts_total",
                help="Restarts of this node's Ray process since gpud started.",
                samples=[({}, float(self.supervisor.restarts_total))],
                kind="counter",
            ),
        ]

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/ray", self._get_ray), web.get("/v1/ray/logs", self._get_logs)]

    async def _get_logs(self, request: web.Request) -> web.Response:
        """This node's Ray process's output file (gpud.logfiles; `gpud ray logs`)."""
        path = self.ctx.config.state_dir / logfiles.LOG_DIR / logfiles.RAY_LOG
        missing = "this node's Ray process has written no log file (Ray not started here yet)"
        chunk = await asyncio.to_thread(logfiles.answer, request.query, path, missing)
        return api.json_response(chunk)

    async def _get_ray(self, request: web.Request) -> web.Response:
        return web.Response(
            body=msgspec.json.encode(self.status()), content_type="application/json"
        )
