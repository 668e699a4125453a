"""Pure decisions of the GPU component: findings per signal, the verdict per GPU and per node with
a repair action, and hysteresis so that one odd reading does not flap a verdict.

No I/O here; the service feeds in readings and XIDs and publishes what comes out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec

from gpud.config import GpusConfig
from gpud.gpus.signals import GpuReadings, NodeReadings, XidEvent, number
from gpud.gpus.xid import ACTION_TEXT, RepairAction, describe

GpuState = Literal["healthy", "degraded", "unhealthy", "unknown"]

# Worse is higher. "unknown" ranks above "degraded": a GPU we cannot read is not handed out,
# but one that is certainly broken outranks it.
RANK: dict[GpuState, int] = {"healthy": 0, "degraded": 1, "unknown": 2, "unhealthy": 3}
# Stronger is higher: the action of a verdict is the strongest of its worst findings.
ACTION_RANK: dict[RepairAction, int] = {
    "none": 0,
    "restart_app": 1,
    "reset_gpu": 2,
    "reboot_host": 3,
    "inspect_hardware": 4,
}


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    """One signal judged: ``code`` is stable (problems are ``gpus.<code>``)."""

    code: str
    state: GpuState
    reason: str
    action: RepairAction
    # Taken at once, without waiting out the hysteresis: the evidence cannot be transient.
    immediate: bool = False
    # Remedy in words when the action's standard text is not specific enough.
    fix: str = ""

    @property
    def fix_text(self) -> str:
        return self.fix or ACTION_TEXT[self.action]


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    state: GpuState
    reason: str
    action: RepairAction
    findings: tuple[Finding, ...] = ()

    @property
    def immediate(self) -> bool:
        return any(f.immediate and f.state == self.state for f in self.findings)


HEALTHY = Verdict(state="healthy", reason="all signals normal", action="none")


def combine(findings: Iterable[Finding]) -> Verdict:
    """The verdict of a set of findings: the worst state, its reasons, its strongest action."""
    found = tuple(findings)
    bad = [f for f in found if f.state != "healthy"]
    if not bad:
        return HEALTHY
    worst = max(RANK[f.state] for f in bad)
    top = [f for f in bad if RANK[f.state] == worst]
    action = max((f.action for f in top), key=ACTION_RANK.__getitem__)
    return Verdict(
        state=top[0].state, reason="; ".join(f.reason for f in top), action=action, findings=found
    )


def _grew(now: object, before: object) -> float | None:
    cur, prev = number(now), number(before)
    return None if cur is None or prev is None else cur - prev


def judge_gpu(
    gpu: GpuReadings,
    previous: GpuReadings | None,
    xids: Sequence[XidEvent],
    now: float,
    cfg: GpusConfig,
) -> list[Finding]:
    """Findings for one poll of one GPU; ``previous`` is the poll before (for counters that
    must not grow), ``xids`` the XIDs seen on this GPU."""
    if gpu.lost == "gpu_is_lost":
        return [
            Finding(
                code="lost",
                state="unhealthy",
                reason="NVML reports the GPU is lost (GPU_IS_LOST)",
                action="reboot_host",
                immediate=True,
            )
        ]
    if gpu.lost == "reset_required":
        return [
            Finding(
                code="reset_required",
                state="unhealthy",
                reason="NVML reports the GPU needs a reset (RESET_REQUIRED)",
                action="reset_gpu",
                immediate=True,
            )
        ]
    found = [
        Finding(
            code="nvml_error",
            state="unknown",
            reason=f"cannot read {name}: {error}",
            action="none",
            fix="check the driver with nvidia-smi; gpud retries every poll",
        )
        for name, error in sorted(gpu.errors.items())
    ]
    found += _memory(gpu, cfg)
    found += _thermal_power(gpu, cfg)
    found += _links(gpu, previous, cfg)
    found += _xids(xids, now, cfg)
    return found


def _memory(gpu: GpuReadings, cfg: GpusConfig) -> list[Finding]:
    found = []
    volatile = number(gpu.ecc_volatile_uncorrected)
    if volatile:
        found.append(
            Finding(
                code="ecc_uncorrected",
                state="unhealthy",
                reason=f"{int(volatile)} uncorrected ECC errors since the last driver load",
                action="reset_gpu",
                immediate=True,
            )
        )
    aggregate = number(gpu.ecc_aggregate_uncorrected)
    if aggregate is not None and aggregate > cfg.ecc_aggregate_uncorrected_max:
        found.append(
            Finding(
                code="ecc_aggregate",
                state="degraded",
                reason=f"{int(aggregate)} uncorrected ECC errors over the GPU's lifetime "
                f"(more than gpus.ecc_aggregate_uncorrected_max = "
                f"{cfg.ecc_aggregate_uncorrected_max})",
                action="inspect_hardware",
            )
        )
    if gpu.row_remap_failure is True:
        found.append(
            Finding(
                code="row_remap_failure",
                state="unhealthy",
                reason="row remapping failed: the GPU has no spare rows left",
                action="inspect_hardware",
                immediate=True,
            )
        )
    if gpu.row_remap_pending is True:
        found.append(
            Finding(
                code="row_remap_pending",
                state="unhealthy",
                reason="a row remap is pending: the bad row stays in use until the GPU is reset",
                action="reset_gpu",
                immediate=True,
            )
        )
    if gpu.retired_pages_pending is True:
        found.append(
            Finding(
                code="retired_pages_pending",
                state="degraded",
                reason="a page retirement is pending until the GPU is reset",
                action="reset_gpu",
            )
        )
    retired = (number(gpu.retired_pages_sbe) or 0) + (number(gpu.retired_pages_dbe) or 0)
    if retired >= cfg.retired_pages_max:
        found.append(
            Finding(
                code="retired_pages",
                state="unhealthy",
                reason=f"{int(retired)} retired pages (NVIDIA's RMA threshold is "
                f"{cfg.retired_pages_max})",
                action="inspect_hardware",
                immediate=True,
            )
        )
    return found


def _thermal_power(gpu: GpuReadings, cfg: GpusConfig) -> list[Finding]:
    found = []
    temp, slowdown = number(gpu.temperature_c), number(gpu.slowdown_temperature_c)
    if temp is not None and slowdown is not None and temp >= slowdown - cfg.temperature_margin_c:
        found.append(
            Finding(
                code="thermal",
                state="degraded",
                reason=f"temperature {int(temp)} C at or above the slowdown threshold "
                f"{int(slowdown)} C",
                action="inspect_hardware",
                fix="check the host's cooling (fans, airflow, inlet temperature)",
            )
        )
    if isinstance(gpu.clock_events, list) and gpu.clock_events:
        found.append(
            Finding(
                code="clock_events",
                state="degraded",
                reason=f"clocks slowed down: {', '.join(gpu.clock_events)}",
                action="inspect_hardware",
                fix="check cooling and power supply; HW slowdown or power brake means the board "
                "or the PSU asked the GPU to slow down",
            )
        )
    power, limit = number(gpu.power_w), number(gpu.power_limit_w)
    if power is not None and limit and power > limit * cfg.power_limit_ratio:
        found.append(
            Finding(
                code="power",
                state="degraded",
                reason=f"power draw {power:.0f} W above the enforced limit {limit:.0f} W",
                action="inspect_hardware",
            )
        )
    return found


def _links(gpu: GpuReadings, previous: GpuReadings | None, cfg: GpusConfig) -> list[Finding]:
    found = []
    width, max_width = number(gpu.pcie_width), number(gpu.pcie_max_width)
    # The generation is reported but not judged: GPUs lower it at idle to save power.
    if width is not None and max_width is not None and width < max_width:
        found.append(
            Finding(
                code="pcie_width",
                state="degraded",
                reason=f"PCIe link x{int(width)} below its maximum x{int(max_width)}",
                action="inspect_hardware",
                fix="reseat the GPU or its riser; check the slot",
            )
        )
    if previous is not None:
        replays = _grew(gpu.pcie_replay_count, previous.pcie_replay_count)
        if replays is not None and replays > cfg.pcie_replay_growth_max:
            found.append(
                Finding(
                    code="pcie_replay",
                    state="degraded",
                    reason=f"PCIe replay counter grew by {int(replays)} in one poll",
                    action="inspect_hardware",
                    fix="reseat the GPU or its riser; check the slot",
                )
            )
        nvlink = _grew(gpu.nvlink_errors, previous.nvlink_errors)
        if nvlink is not None and nvlink > cfg.nvlink_error_growth_max:
            found.append(
                Finding(
                    code="nvlink_errors",
                    state="degraded",
                    reason=f"NVLink error counters grew by {int(nvlink)} in one poll",
                    action="inspect_hardware",
                )
            )
    if isinstance(gpu.nvlink_down, list) and gpu.nvlink_down:
        links = ", ".join(str(link) for link in gpu.nvlink_down)
        found.append(
            Finding(
                code="nvlink_down",
                state="degraded",
                reason=f"NVLink link(s) {links} inactive",
                action="reset_gpu",
                fix="reset the GPU; if the links stay down, inspect the NVLink bridge/baseboard",
            )
        )
    return found


def recent(xids: Iterable[XidEvent], now: float, window_s: float) -> list[XidEvent]:
    """XIDs that still count: seen within the window."""
    return [x for x in xids if now - x.at <= window_s]


def _xids(xids: Sequence[XidEvent], now: float, cfg: GpusConfig) -> list[Finding]:
    latest: dict[int, XidEvent] = {}
    for event in recent(xids, now, cfg.xid_window_s):
        if event.xid not in latest or event.at > latest[event.xid].at:
            latest[event.xid] = event
    found = []
    for number_, event in sorted(latest.items()):
        info = describe(number_)
        if info.action == "none":
            continue
        found.append(
            Finding(
                code="xid",
                state="degraded" if info.action == "restart_app" else "unhealthy",
                reason=f"XID {number_} ({info.name}) from {event.source}"
                + (f": {event.message}" if event.message else ""),
                action=info.action,
                immediate=True,
            )
        )
    return found


def node_findings(
    readings: NodeReadings, orphan_xids: Sequence[XidEvent], now: float, cfg: GpusConfig
) -> list[Finding]:
    """Findings about the node as a whole: NVML itself, GPUs missing from NVML, and XIDs of PCI
    addresses that match no GPU NVML lists (typically one that fell off the bus)."""
    pci = readings.pci_functions or 0
    if not readings.nvml_available:
        if pci == 0:
            return []
        return [
            Finding(
                code="nvml_unavailable",
                state="unknown",
                reason=f"{pci} NVIDIA GPU(s) on the PCI bus but NVML is unavailable "
                f"({readings.nvml})",
                action="none",
                fix="install and load the NVIDIA driver (nvidia-smi must work), then restart gpud",
            )
        ]
    found = [
        Finding(
            code="nvml_error",
            state="unknown",
            reason=f"cannot read {name}: {error}",
            action="none",
            fix="check the driver with nvidia-smi; gpud retries every poll",
        )
        for name, error in sorted(readings.errors.items())
    ]
    if pci > len(readings.gpus) and "device_count" not in readings.errors:
        found.append(
            Finding(
                code="missing",
                state="unhealthy",
                reason=f"{pci} NVIDIA GPUs on the PCI bus but NVML sees {len(readings.gpus)}: "
                "a GPU fell off the bus or failed to initialise",
                action="reboot_host",
                immediate=True,
            )
        )
    found += _xids(orphan_xids, now, cfg)
    return found


class Track(msgspec.Struct, frozen=True, kw_only=True):
    """Hysteresis state of one verdict (a GPU's or the node's own findings)."""

    verdict: Verdict | None = None
    # A different state seen in the last ``streak`` consecutive polls, not taken yet.
    candidate: GpuState | None = None
    streak: int = 0


def step(track: Track, instant: Verdict, cfg: GpusConfig) -> Track:
    """Add one poll's verdict. A new state is taken once it has held for polls_before_worse
    (or polls_before_better) consecutive polls; evidence that cannot be transient (lost GPU,
    uncorrectable ECC, XID) is taken at once. The first verdict is taken as it is."""
    current = track.verdict
    if current is None or instant.state == current.state:
        return Track(verdict=instant)
    worse = RANK[instant.state] > RANK[current.state]
    if worse and instant.immediate:
        return Track(verdict=instant)
    streak = track.streak + 1 if track.candidate == instant.state else 1
    needed = cfg.polls_before_worse if worse else cfg.polls_before_better
    if streak >= needed:
        return Track(verdict=instant)
    return Track(verdict=current, candidate=instant.state, streak=streak)


class NodeVerdict(msgspec.Struct, frozen=True, kw_only=True):
    state: GpuState
    reasons: list[str]
    action: RepairAction
    healthy_gpus: int
    gpus: int


def judge_node(gpu_verdicts: Sequence[Verdict], own: Verdict) -> NodeVerdict:
    """The node's verdict from its GPUs' (hysteresis-filtered) verdicts and its own findings.

    Unhealthy when the node itself is (a GPU gone from NVML, an XID that needs a reboot) or no
    GPU is usable; degraded (or unknown) when some GPUs are not healthy: the rest still work."""
    healthy = sum(v.state == "healthy" for v in gpu_verdicts)
    reasons = [own.reason] if own.state != "healthy" else []
    reasons += [f"GPU {i}: {v.reason}" for i, v in enumerate(gpu_verdicts) if v.state != "healthy"]
    every = [own, *gpu_verdicts]
    action = max((v.action for v in every), key=ACTION_RANK.__getitem__)
    if own.state == "unhealthy" or (
        gpu_verdicts and healthy == 0 and any(v.state == "unhealthy" for v in gpu_verdicts)
    ):
        state: GpuState = "unhealthy"
    elif any(v.state in ("unhealthy", "degraded") for v in every):
        state = "degraded"
    elif any(v.state == "unknown" for v in every):
        state = "unknown"
    else:
        state = "healthy"
    return NodeVerdict(
        state=state,
        reasons=reasons or ["all GPUs healthy" if gpu_verdicts else "no NVIDIA GPU on this host"],
        action=action,
        healthy_gpus=healthy,
        gpus=len(gpu_verdicts),
    )


def split_xids(
    readings: NodeReadings, xids: Iterable[XidEvent]
) -> tuple[dict[str, list[XidEvent]], list[XidEvent]]:
    """XIDs per GPU UUID (matched by UUID, else by PCI address) and those matching no GPU."""
    by_pci = {g.pci: g.uuid for g in readings.gpus if g.pci}
    uuids = {g.uuid for g in readings.gpus}
    mine: dict[str, list[XidEvent]] = {}
    orphans: list[XidEvent] = []
    for event in xids:
        uuid = event.uuid if event.uuid in uuids else by_pci.get(event.pci)
        if uuid is None:
            orphans.append(event)
        else:
            mine.setdefault(uuid, []).append(event)
    return mine, orphans


class Assessment(msgspec.Struct, frozen=True, kw_only=True):
    """Everything judged after one poll: per-GPU tracks (by UUID), the node's own track, and
    the node's verdict."""

    gpus: dict[str, Track]
    node: Track
    verdict: NodeVerdict


def assess(
    readings: NodeReadings,
    previous: NodeReadings | None,
    xids: Iterable[XidEvent],
    before: Assessment | None,
    now: float,
    cfg: GpusConfig,
) -> Assessment:
    """One poll judged against the last (``before``: hysteresis; ``previous``: counters)."""
    earlier = {g.uuid: g for g in previous.gpus} if previous else {}
    mine, orphans = split_xids(readings, xids)
    tracks: dict[str, Track] = {}
    for gpu in readings.gpus:
        instant = combine(judge_gpu(gpu, earlier.get(gpu.uuid), mine.get(gpu.uuid, []), now, cfg))
        last = before.gpus.get(gpu.uuid, Track()) if before else Track()
        tracks[gpu.uuid] = step(last, instant, cfg)
    own = combine(node_findings(readings, orphans, now, cfg))
    node = step(before.node if before else Track(), own, cfg)
    verdict = judge_node(
        [t.verdict for t in tracks.values() if t.verdict is not None], node.verdict or own
    )
    return Assessment(gpus=tracks, node=node, verdict=verdict)
