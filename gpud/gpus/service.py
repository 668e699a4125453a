"""The gpus component: polls NVML, judges every GPU and the node against the XIDs its watchers
follow (``xidwatch``), publishes the healthy GPU count in the tags, and leases healthy GPUs.

Leases are durable before they are answered and never share a GPU (``gpud.leasebook``), behind
the front every kind of lease has (``gpud.leasefront``); what is the GPUs' own is which GPUs a
request gets: whole healthy ones no lease holds, lowest index first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from gpud import api, log
from gpud.aio import within
from gpud.component import ComponentBase, Metric, Problem
from gpud.context import NodeContext
from gpud.errors import ApiError
from gpud.gpus import kmsg
from gpud.gpus import nvml as nvml_io
from gpud.gpus.leases import (
    GpuLease,
    GpuLeaseRequest,
    GpuLeaseTable,
    StoredGpuLease,
    choose_gpus,
)
from gpud.gpus.signals import (
    GPU_METRICS,
    GpuReadings,
    NodeReadings,
    Signal,
    XidEvent,
    carry_identity,
    metric_value,
    signals_of,
)
from gpud.gpus.verdict import (
    Assessment,
    Finding,
    GpuState,
    NodeVerdict,
    Track,
    Verdict,
    assess,
    recent,
    split_xids,
)
from gpud.gpus.xid import ACTION_TEXT, RepairAction
from gpud.gpus.xidwatch import XidWatch
from gpud.leasebook import LeaseBook, new_lease_id
from gpud.leasefront import LeaseFront
from gpud.state import StateStore, open_store

_log = log.get("gpus")

STATES: tuple[GpuState, ...] = ("healthy", "degraded", "unhealthy", "unknown")


class FindingView(msgspec.Struct, kw_only=True):
    code: str
    state: GpuState
    reason: str
    action: RepairAction
    fix: str


class GpuStatus(msgspec.Struct, kw_only=True):
    index: int
    uuid: str
    name: str
    pci: str
    state: GpuState
    reason: str
    action: RepairAction
    fix: str
    findings: list[FindingView]
    # Lease id holding this GPU, if any.
    lease: str | None
    signals: list[Signal]
    xids: list[XidEvent]


class GpusStatus(msgspec.Struct, kw_only=True):
    """The `gpus` section of gpud status."""

    summary: str
    state: GpuState
    reasons: list[str]
    action: RepairAction
    fix: str
    nvml: str
    driver_version: str | None
    cuda_version: str | None
    count: int
    healthy: int
    leased: int
    pci_functions: int | None
    # "watching", or why that source is not used (the other still is).
    nvml_events: str
    kmsg: str
    # Unix seconds of the last finished poll; None before the first.
    polled_at: float | None
    gpus: list[GpuStatus]
    # XIDs whose PCI address matches no GPU NVML lists.
    unmatched_xids: list[XidEvent]


class GpusDetail(GpusStatus, kw_only=True):
    """GET /v1/gpus: the status plus every lease."""

    leases: list[GpuLease]


def _load_nvml(name: str) -> tuple[Any, str]:
    try:
        return nvml_io.load(name), ""
    except Exception as exc:
        return None, f"NVML module {name!r} not importable: {exc}"


class GpuService(ComponentBase):
    name = "gpus"

    def __init__(
        self, ctx: NodeContext, nvml: Any = None, *, store: StateStore | None = None
    ) -> None:
        """``nvml``: the NVML module (tests pass a fake); None imports ``gpus.nvml_module``."""
        self.ctx = ctx
        self.cfg = ctx.config.gpus
        if nvml is None:
            self._nvml, self._nvml_error = _load_nvml(self.cfg.nvml_module)
        else:
            self._nvml, self._nvml_error = nvml, ""
        self._book: LeaseBook[GpuLeaseRequest, StoredGpuLease] = LeaseBook(
            "GPU lease",
            GpuLeaseTable(store or open_store(ctx.config.state_dir)),
            allocate=self._allocate,
            on_release=self._free,
            reindex=self._reindex,
            describe=lambda item: {
                "id": item.lease.id,
                "owner": item.lease.owner,
                "gpus": ",".join(item.lease.gpus),
            },
            grace_s=lambda: self.cfg.zombie_grace_s,
            logger=_log,
        )
        self._front: LeaseFront[GpuLeaseRequest, StoredGpuLease] = LeaseFront(
            self._book, GpuLeaseRequest, not_ready=self._not_polled
        )
        # GPU UUID -> the lease holding it.
        self._used: dict[str, str] = {}
        self._reindex(self._book.leases)
        self._readings: NodeReadings | None = None
        self._polled_at: float | None = None
        self._assessment: Assessment | None = None
        self._xids = XidWatch(
            self._nvml,
            self._nvml_error,
            self.cfg.kmsg_path,
            lambda: self._readings.gpus if self._readings else [],
        )
        self._hung: asyncio.Future[NodeReadings] | None = None
        self._polled = asyncio.Event()

    # ---- in-process API (agent, Ray, deployments) -------------------------------------------

    async def ready(self) -> None:
        """Wait until the first poll has been judged."""
        await self._polled.wait()

    def node_verdict(self) -> NodeVerdict:
        """The node's GPU verdict; an ``unhealthy`` node must not become Ray head."""
        if self._assessment is None:
            return NodeVerdict(
                state="unknown", reasons=["no poll yet"], action="none", healthy_gpus=0, gpus=0
            )
        return self._assessment.verdict

    def healthy_uuids(self) -> list[str]:
        """UUIDs of the GPUs whose verdict is healthy, in index order."""
        gpus = self._readings.gpus if self._readings else []
        return [g.uuid for g in gpus if self._state_of(g.uuid) == "healthy"]

    def unleased_healthy_uuids(self) -> list[str]:
        """Healthy GPUs no lease holds: what the cluster-wide Ray may use, so that no GPU is
        in two Ray clusters (a deployment's replica leases its GPUs)."""
        return [uuid for uuid in self.healthy_uuids() if uuid not in self._used]

    def unleased_healthy_indices(self) -> list[int]:
        """`unleased_healthy_uuids` as NVML indices: the cluster-wide Ray's CUDA_VISIBLE_DEVICES
        and --num-gpus (an engine under Ray parses the entries with int())."""
        return list(self.indices(self.unleased_healthy_uuids()))

    def indices(self, uuids: Sequence[str]) -> tuple[int, ...]:
        """NVML indices of ``uuids`` as the last poll read them (leases stay by UUID, which is
        stable; an index is resolved at each start). ApiError 409 for a GPU NVML no longer
        lists."""
        try:
            return nvml_io.indices_of(self._readings.gpus if self._readings else [], uuids)
        except nvml_io.GpuIndexError as exc:
            raise ApiError(409, str(exc)) from None

    def leases(self) -> list[GpuLease]:
        return self._front.leases()

    async def lease(self, owner: str, count: int, *, pid: int | None = None) -> GpuLease:
        """Lease ``count`` whole healthy GPUs; durable when this returns."""
        return await self._front.lease(owner=owner, count=count, pid=pid)

    async def release(self, lease_id: str) -> None:
        await self._front.release(lease_id)

    async def transfer(self, lease_id: str, pid: int) -> None:
        """Make the running process ``pid`` the lease's owner (a re-adopted child's lease)."""
        await self._front.transfer(lease_id, pid)

    async def poll(self) -> None:
        """Read every signal once and judge it (the poll loop calls this; so can tests)."""
        readings = carry_identity(await self._read(), self._readings)
        await self._judge(readings, time.time())

    # ---- component contract ----------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._book.run())
            tg.create_task(self._xids.run())
            tg.create_task(self._poll_loop())

    def status(self) -> GpusStatus:
        return GpusStatus(**self._status_fields())

    def summary(self) -> str:
        v = self.node_verdict()
        if self._readings is not None and not self._readings.nvml_available:
            text = f"0 GPUs, NVML unavailable ({self._readings.nvml})"
            return text if v.state == "healthy" else f"{text}; {v.state}: {v.reasons[0]}"
        text = f"{v.healthy_gpus}/{v.gpus} GPUs healthy, node {v.state}"
        return text if v.state == "healthy" else f"{text}: {v.reasons[0]}"

    def problems(self) -> list[Problem]:
        found: list[Problem] = []
        seen: set[tuple[str, str]] = set()

        def add(subject: str, verdict: Verdict) -> None:
            for f in verdict.findings:
                if f.state == "healthy" or (f.code, subject) in seen:
                    continue
                seen.add((f.code, subject))
                found.append(
                    Problem(
                        code=f"gpus.{f.code}",
                        severity="critical" if f.state == "unhealthy" else "warning",
                        subject=subject,
                        message=f.reason,
                        fix=f"{f.fix_text} (repair action: {f.action})",
                    )
                )

        if self._xids.kmsg_error is not None and self._has_gpus():
            why = kmsg.unreadable(self.cfg.kmsg_path, self._xids.kmsg_error)
            also = (
                "NVML events still report XIDs"
                if self._xids.events_state == "watching"
                else "and NVML events are not watched either"
            )
            found.append(
                Problem(
                    code="gpus.xid_source_unavailable",
                    severity="warning",
                    subject=self.cfg.kmsg_path,
                    message=f"kernel XIDs are not seen: {why.reason} ({also})",
                    fix=why.fix,
                )
            )
        if self._assessment is not None and self._assessment.node.verdict is not None:
            add("gpus", self._assessment.node.verdict)
        for gpu in self._readings.gpus if self._readings else []:
            track = self._track(gpu.uuid)
            if track is not None and track.verdict is not None:
                add(f"GPU {gpu.index} {gpu.uuid}", track.verdict)
        return found

    def metrics(self) -> list[Metric]:
        families: dict[str, Metric] = {}

        def put(name: str, help_text: str, labels: dict[str, str], value: Any, kind: str) -> None:
            sample = metric_value(value)
            if sample is None:
                return
            family = families.get(name) or families.setdefault(
                name,
                Metric(name=name, help=help_text, samples=[], kind=kind),  # type: ignore[arg-type]
            )
            family.samples.append((labels, sample))

        for gpu in self._readings.gpus if self._readings else []:
            labels = {"gpu": str(gpu.index), "uuid": gpu.uuid, "model": gpu.name}
            for m in GPU_METRICS:
                value = metric_value(getattr(gpu, m.reading))
                put(m.name, m.help, labels, None if value is None else value * m.scale, m.kind)
            put(
                "gpud_gpu_last_xid",
                "Number of the last XID seen on the GPU (0: none).",
                labels,
                self._last_xid(gpu.uuid),
                "gauge",
            )
            put(
                "gpud_gpu_xid_total",
                "XIDs seen on the GPU since gpud started (NVML events and kernel log).",
                labels,
                self._xids.totals.get(gpu.uuid, 0),
                "counter",
            )
            state = self._state_of(gpu.uuid)
            for s in STATES:
                put(
                    "gpud_gpu_health_state",
                    "1 for the GPU's current verdict.",
                    {**labels, "state": s},
                    int(s == state),
                    "gauge",
                )
        v = self.node_verdict()
        put("gpud_gpus", "GPUs NVML reports.", {}, v.gpus, "gauge")
        put("gpud_gpus_healthy", "GPUs whose verdict is healthy.", {}, v.healthy_gpus, "gauge")
        put("gpud_gpus_leased", "GPUs held by leases.", {}, len(self._used), "gauge")
        watch = self._xids
        for source, state in (("kmsg", watch.kmsg_state), ("nvml-event", watch.events_state)):
            put(
                "gpud_gpu_xid_source_up",
                "1 while the source (kmsg: the kernel log, nvml-event: NVML) delivers XIDs.",
                {"source": source},
                state == "watching",
                "gauge",
            )
        for s in STATES:
            put(
                "gpud_gpus_node_state",
                "1 for the node's GPU verdict.",
                {"state": s},
                int(s == v.state),
                "gauge",
            )
        return list(families.values())

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/gpus", self._get_gpus), *self._front.routes("/v1/gpus/leases")]

    # ---- HTTP handlers ---------------------------------------------------------------------

    async def _get_gpus(self, request: web.Request) -> web.Response:
        return api.json_response(GpusDetail(**self._status_fields(), leases=self.leases()))

    # ---- polling and judging ---------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception as exc:
                # A bug or an unforeseen failure must not end GPU monitoring: say so and retry.
                log.error(_log, "GPU poll failed", error=repr(exc))
            await asyncio.sleep(self.cfg.poll_interval_s)

    async def _read(self) -> NodeReadings:
        pci = await asyncio.to_thread(kmsg.count_nvidia_pci, Path(self.cfg.pci_root))
        if self._nvml is None:
            return NodeReadings(nvml=self._nvml_error, nvml_available=False, pci_functions=pci)
        if self._hung is not None and not self._hung.done():
            return self._unanswered("an earlier NVML call has still not returned")
        future = asyncio.ensure_future(asyncio.to_thread(nvml_io.read_node, self._nvml, pci))
        try:
            readings = await within(asyncio.shield(future), self.cfg.nvml_timeout_s)
        except TimeoutError:
            # The thread cannot be stopped; no new NVML call starts until it returns.
            self._hung = future
            future.add_done_callback(lambda f: f.exception())
            return self._unanswered(f"NVML did not answer within {self.cfg.nvml_timeout_s:g} s")
        except Exception as exc:
            return NodeReadings(
                nvml="ok",
                nvml_available=True,
                pci_functions=pci,
                errors={"poll": f"{type(exc).__name__}: {exc}"},
            )
        failure = readings.errors.get("device_count")
        if failure and self._readings is not None and self._readings.gpus:
            # Not "the GPUs are gone": we could not ask. Keep them, each unreadable.
            return self._unanswered(f"cannot count the GPUs: {failure}")
        return readings

    def _unanswered(self, reason: str) -> NodeReadings:
        """Readings for a poll NVML did not answer: the known GPUs, each unreadable."""
        known = self._readings.gpus if self._readings else []
        return NodeReadings(
            nvml="ok",
            nvml_available=True,
            driver_version=self._readings.driver_version if self._readings else None,
            cuda_version=self._readings.cuda_version if self._readings else None,
            gpus=[
                GpuReadings(
                    index=g.index, uuid=g.uuid, name=g.name, pci=g.pci, errors={"nvml": reason}
                )
                for g in known
            ],
            pci_functions=None,
            errors={} if known else {"nvml": reason},
        )

    async def _judge(self, readings: NodeReadings, now: float) -> None:
        before = self._assessment
        after = assess(readings, self._readings, self._xids.events, before, now, self.cfg)
        for gpu in readings.gpus:
            old = before.gpus.get(gpu.uuid) if before else None
            self._log_change(f"GPU {gpu.index} {gpu.uuid}", old, after.gpus[gpu.uuid])
        self._log_change("node", before.node if before else None, after.node)
        self._assessment, self._readings, self._polled_at = after, readings, now
        self._polled.set()
        await self.ctx.update_tags(gpu=after.verdict.healthy_gpus, gh=after.verdict.state)

    @staticmethod
    def _log_change(subject: str, before: Track | None, after: Track) -> None:
        old = before.verdict.state if before is not None and before.verdict else None
        new = after.verdict
        if new is None or old == new.state:
            return
        emit = log.info if new.state == "healthy" else log.warning
        emit(
            _log,
            "GPU verdict changed",
            subject=subject,
            state=new.state,
            was=old,
            reason=new.reason,
            action=new.action,
        )

    def _track(self, uuid: str) -> Track | None:
        return self._assessment.gpus.get(uuid) if self._assessment else None

    def _state_of(self, uuid: str) -> GpuState:
        track = self._track(uuid)
        return track.verdict.state if track is not None and track.verdict else "unknown"

    def _has_gpus(self) -> bool:
        """NVML lists a GPU or sysfs an NVIDIA one: only then do missing XIDs matter."""
        readings = self._readings
        return readings is not None and bool(readings.gpus or readings.pci_functions)

    def _last_xid(self, uuid: str) -> int:
        mine, _ = split_xids(self._readings, self._xids.events) if self._readings else ({}, [])
        events = mine.get(uuid, [])
        return max(events, key=lambda e: e.at).xid if events else 0

    # ---- leases ----------------------------------------------------------------------------

    def _not_polled(self) -> str | None:
        if self._polled.is_set():
            return None
        return "GPU health is not known yet (first poll running); retry shortly"

    def _reindex(self, leases: dict[str, StoredGpuLease]) -> None:
        self._used = {u: s.lease.id for s in leases.values() for u in s.lease.gpus}

    def _free(self, item: StoredGpuLease) -> None:
        for uuid in item.lease.gpus:
            self._used.pop(uuid, None)

    def _allocate(
        self, request: GpuLeaseRequest, pid_start: int | None
    ) -> StoredGpuLease | ApiError:
        """Whole healthy GPUs for one request (the lease book commits it)."""
        healthy = self.healthy_uuids()
        chosen = choose_gpus(healthy, set(self._used), request.count)
        if chosen is None:
            free = len([u for u in healthy if u not in self._used])
            total = len(self._readings.gpus) if self._readings else 0
            return ApiError(
                409,
                f"cannot lease {request.count} GPU(s): {free} of {total} are healthy and "
                f"unleased ({len(healthy)} healthy, {len(self._used)} leased); see `gpud gpus`",
            )
        lease = GpuLease(
            id=new_lease_id(),
            owner=request.owner,
            gpus=chosen,
            pid=request.pid,
            created=time.time(),
        )
        for uuid in chosen:
            self._used[uuid] = lease.id
        return StoredGpuLease(lease=lease, pid_start=pid_start)

    # ---- status ----------------------------------------------------------------------------

    def _status_fields(self) -> dict[str, object]:
        readings = self._readings
        v = self.node_verdict()
        now = time.time()
        events = self._xids.events
        xids, orphans = split_xids(readings, events) if readings else ({}, list(events))
        gpus = []
        for gpu in readings.gpus if readings else []:
            track = self._track(gpu.uuid)
            verdict = track.verdict if track is not None and track.verdict else None
            findings: tuple[Finding, ...] = verdict.findings if verdict else ()
            gpus.append(
                GpuStatus(
                    index=gpu.index,
                    uuid=gpu.uuid,
                    name=gpu.name,
                    pci=gpu.pci,
                    state=verdict.state if verdict else "unknown",
                    reason=verdict.reason if verdict else "no poll yet",
                    action=verdict.action if verdict else "none",
                    fix=ACTION_TEXT[verdict.action] if verdict else "",
                    findings=[
                        FindingView(
                            code=f.code,
                            state=f.state,
                            reason=f.reason,
                            action=f.action,
                            fix=f.fix_text,
                        )
                        for f in findings
                    ],
                    lease=self._used.get(gpu.uuid),
                    signals=signals_of(gpu),
                    xids=recent(xids.get(gpu.uuid, []), now, self.cfg.xid_window_s),
                )
            )
        return {
            "summary": self.summary(),
            "state": v.state,
            "reasons": list(v.reasons),
            "action": v.action,
            "fix": ACTION_TEXT[v.action],
            "nvml": readings.nvml if readings else (self._nvml_error or "not polled yet"),
            "driver_version": readings.driver_version if readings else None,
            "cuda_version": readings.cuda_version if readings else None,
            "count": len(readings.gpus) if readings else 0,
            "healthy": v.healthy_gpus,
            "leased": len(self._used),
            "pci_functions": readings.pci_functions if readings else None,
            "nvml_events": self._xids.events_state,
            "kmsg": self._xids.kmsg_state,
            "polled_at": self._polled_at,
            "gpus": gpus,
            "unmatched_xids": recent(orphans, now, self.cfg.xid_window_s),
        }
