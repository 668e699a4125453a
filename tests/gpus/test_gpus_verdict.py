"""The pure parts of GPU health: each signal -> its verdict and repair action, the node verdict,
hysteresis (property tests), kmsg XID parsing, the PCI count, and the choice of GPUs to lease."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.config import GpusConfig
from gpud.gpus import kmsg
from gpud.gpus.leases import GpuLease, GpuLeaseTable, StoredGpuLease, choose_gpus
from gpud.gpus.signals import NOT_SUPPORTED, GpuReadings, NodeReadings, XidEvent
from gpud.gpus.verdict import (
    RANK,
    Track,
    Verdict,
    assess,
    combine,
    judge_gpu,
    node_findings,
    step,
)
from gpud.gpus.xid import CATALOGUE, describe
from gpud.state import StateStore

CFG = GpusConfig()
NOW = 1_000_000.0


def healthy(**overrides: Any) -> GpuReadings:
    """A healthy GPU's readings (what an idle H100 reports), with ``overrides``."""
    base = GpuReadings(
        index=0,
        uuid="GPU-0",
        name="NVIDIA H100",
        pci="0000:18:00",
        memory_total_mib=81559,
        memory_used_mib=0,
        persistence_mode=True,
        ecc_mode=True,
        ecc_volatile_uncorrected=0,
        ecc_aggregate_uncorrected=0,
        row_remap_pending=False,
        row_remap_failure=False,
        retired_pages_sbe=0,
        retired_pages_dbe=0,
        retired_pages_pending=False,
        temperature_c=35,
        slowdown_temperature_c=87,
        clock_event_mask=1,
        clock_events=[],
        power_w=70.0,
        power_limit_w=700.0,
        pcie_width=16,
        pcie_max_width=16,
        pcie_gen=5,
        pcie_max_gen=5,
        pcie_replay_count=0,
        nvlink_links=18,
        nvlink_down=[],
        nvlink_errors=0,
    )
    return msgspec.structs.replace(base, **overrides)


def xid(number: int, age_s: float = 1.0) -> XidEvent:
    return XidEvent(xid=number, source="kmsg", at=NOW - age_s, pci="0000:18:00")


SIGNAL_CASES = [
    ({"lost": "gpu_is_lost"}, "unhealthy", "lost", "reboot_host"),
    ({"lost": "reset_required"}, "unhealthy", "reset_required", "reset_gpu"),
    ({"ecc_volatile_uncorrected": 2}, "unhealthy", "ecc_uncorrected", "reset_gpu"),
    ({"ecc_aggregate_uncorrected": 11}, "degraded", "ecc_aggregate", "inspect_hardware"),
    ({"row_remap_pending": True}, "unhealthy", "row_remap_pending", "reset_gpu"),
    ({"row_remap_failure": True}, "unhealthy", "row_remap_failure", "inspect_hardware"),
    ({"retired_pages_pending": True}, "degraded", "retired_pages_pending", "reset_gpu"),
    (
        {"retired_pages_dbe": 40, "retired_pages_sbe": 20},
        "unhealthy",
        "retired_pages",
        "inspect_hardware",
    ),
    ({"temperature_c": 87}, "degraded", "thermal", "inspect_hardware"),
    ({"clock_events": ["HW thermal slowdown"]}, "degraded", "clock_events", "inspect_hardware"),
    ({"power_w": 800.0}, "degraded", "power", "inspect_hardware"),
    ({"pcie_width": 8}, "degraded", "pcie_width", "inspect_hardware"),
    ({"nvlink_down": [3]}, "degraded", "nvlink_down", "reset_gpu"),
    ({"errors": {"temperature_c": "NVMLError: Unknown Error"}}, "unknown", "nvml_error", "none"),
]


@pytest.mark.parametrize(("overrides", "state", "code", "action"), SIGNAL_CASES)
def test_each_signal_gives_its_verdict_and_repair_action(
    overrides: dict[str, Any], state: str, code: str, action: str
) -> None:
    findings = judge_gpu(healthy(**overrides), healthy(), [], NOW, CFG)
    verdict = combine(findings)
    assert (verdict.state, verdict.action) == (state, action), verdict
    assert [f.code for f in findings if f.state != "healthy"] == [code]
    assert verdict.reason


def test_a_healthy_gpu_and_a_gpu_without_optional_signals_are_healthy() -> None:
    assert combine(judge_gpu(healthy(), healthy(), [], NOW, CFG)).state == "healthy"
    bare = GpuReadings(index=0, uuid="GPU-0")
    fields = [
        f
        for f in msgspec.structs.fields(GpuReadings)
        if f.name not in ("index", "uuid", "name", "pci", "lost", "errors")
    ]
    unsupported = msgspec.structs.replace(bare, **{f.name: NOT_SUPPORTED for f in fields})
    assert combine(judge_gpu(unsupported, unsupported, [], NOW, CFG)).state == "healthy"
    # PCIe generation below max is normal at idle: reported, not judged.
    assert combine(judge_gpu(healthy(pcie_gen=1), None, [], NOW, CFG)).state == "healthy"


def test_counters_are_judged_by_their_growth_per_poll() -> None:
    before = healthy(pcie_replay_count=5000, nvlink_errors=10)
    steady = healthy(pcie_replay_count=5050, nvlink_errors=20)
    assert combine(judge_gpu(steady, before, [], NOW, CFG)).state == "healthy"
    jump = healthy(pcie_replay_count=6000, nvlink_errors=500)
    codes = {f.code for f in judge_gpu(jump, before, [], NOW, CFG)}
    assert codes == {"pcie_replay", "nvlink_errors"}
    # The first poll has nothing to compare with.
    assert combine(judge_gpu(jump, None, [], NOW, CFG)).state == "healthy"


@pytest.mark.parametrize(
    ("number", "state", "action"),
    [
        (13, "degraded", "restart_app"),
        (31, "degraded", "restart_app"),
        (43, "degraded", "restart_app"),
        (94, "degraded", "restart_app"),
        (48, "unhealthy", "reset_gpu"),
        (64, "unhealthy", "reset_gpu"),
        (95, "unhealthy", "reset_gpu"),
        (119, "unhealthy", "reset_gpu"),
        (120, "unhealthy", "reset_gpu"),
        (140, "unhealthy", "reset_gpu"),
        (143, "unhealthy", "reset_gpu"),
        (79, "unhealthy", "reboot_host"),
        (63, "healthy", "none"),
        (92, "healthy", "none"),
        (999, "unhealthy", "inspect_hardware"),
    ],
)
def test_xids_follow_nvidias_catalogue(number: int, state: str, action: str) -> None:
    verdict = combine(judge_gpu(healthy(), None, [xid(number)], NOW, CFG))
    assert (verdict.state, verdict.action) == (state, action)
    if state != "healthy":
        assert f"XID {number}" in verdict.reason and verdict.immediate


def test_xids_older_than_the_window_no_longer_count() -> None:
    old = xid(79, age_s=CFG.xid_window_s + 1)
    assert combine(judge_gpu(healthy(), None, [old], NOW, CFG)).state == "healthy"


def test_catalogue_names_every_xid_the_issue_lists() -> None:
    for number in (13, 31, 43, 94, 48, 64, 95, 119, 120, 140, 143, 79, 63, 92):
        assert number in CATALOGUE
    assert describe(4242).action == "inspect_hardware"


def node_readings(gpus: int, pci: int | None, **extra: Any) -> NodeReadings:
    return NodeReadings(
        nvml="ok",
        nvml_available=True,
        gpus=[
            healthy(index=i, uuid=f"GPU-{i}", pci=f"0000:{0x18 + i:02x}:00") for i in range(gpus)
        ],
        pci_functions=pci,
        **extra,
    )


def test_node_missing_gpu_unavailable_nvml_and_unmatched_xids() -> None:
    missing = combine(node_findings(node_readings(7, 8), [], NOW, CFG))
    assert (missing.state, missing.action) == ("unhealthy", "reboot_host")
    assert "8 NVIDIA GPUs on the PCI bus but NVML sees 7" in missing.reason
    no_gpu = NodeReadings(
        nvml="NVML Shared Library Not Found", nvml_available=False, pci_functions=0
    )
    assert combine(node_findings(no_gpu, [], NOW, CFG)).state == "healthy"
    no_driver = msgspec.structs.replace(no_gpu, pci_functions=2)
    verdict = combine(node_findings(no_driver, [], NOW, CFG))
    assert verdict.state == "unknown" and "NVML is unavailable" in verdict.reason
    orphan = XidEvent(xid=79, source="kmsg", at=NOW, pci="0000:99:00")
    result = assess(node_readings(2, 2), None, [orphan], None, NOW, CFG)
    assert result.verdict.state == "unhealthy" and result.verdict.action == "reboot_host"
    assert result.verdict.healthy_gpus == 2


def test_node_verdict_one_bad_gpu_degrades_all_bad_is_unhealthy() -> None:
    readings = node_readings(4, 4)
    readings.gpus[1] = msgspec.structs.replace(readings.gpus[1], row_remap_pending=True)
    result = assess(readings, None, [], None, NOW, CFG)
    assert result.verdict.state == "degraded" and result.verdict.healthy_gpus == 3
    assert result.verdict.action == "reset_gpu"
    assert any("GPU 1" in r for r in result.verdict.reasons)
    every = node_readings(2, 2)
    every.gpus = [msgspec.structs.replace(g, lost="gpu_is_lost") for g in every.gpus]
    assert assess(every, None, [], None, NOW, CFG).verdict.state == "unhealthy"
    # XIDs are matched to GPUs by PCI address.
    result = assess(
        node_readings(2, 2),
        None,
        [XidEvent(xid=48, source="kmsg", at=NOW, pci="0000:19:00")],
        None,
        NOW,
        CFG,
    )
    assert [result.gpus[f"GPU-{i}"].verdict.state for i in range(2)] == ["healthy", "unhealthy"]  # type: ignore[union-attr]


# ---- hysteresis --------------------------------------------------------------------------

STATES = ["healthy", "degraded", "unhealthy", "unknown"]


def verdict_of(state: str, immediate: bool) -> Verdict:
    if state == "healthy":
        return Verdict(state="healthy", reason="ok", action="none")
    return combine([_finding(state, immediate)])


def _finding(state: str, immediate: bool) -> Any:
    from gpud.gpus.verdict import Finding

    return Finding(code="x", state=state, reason=state, action="none", immediate=immediate)  # type: ignore[arg-type]


verdicts = st.builds(verdict_of, st.sampled_from(STATES), st.booleans())
configs = st.builds(
    lambda w, b: GpusConfig(polls_before_worse=w, polls_before_better=b),
    st.integers(1, 5),
    st.integers(1, 5),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(verdicts, min_size=1, max_size=40), configs)
def test_hysteresis_takes_only_states_that_held_long_enough(
    sequence: list[Verdict], cfg: GpusConfig
) -> None:
    track = Track()
    for i, instant in enumerate(sequence):
        before = track.verdict
        track = step(track, instant, cfg)
        assert track.verdict is not None
        if before is None:
            assert track.verdict == instant
            continue
        if track.verdict.state != before.state:
            # A change is to this poll's state, and that state held long enough (or is
            # immediate evidence of something worse).
            assert track.verdict.state == instant.state
            worse = RANK[instant.state] > RANK[before.state]
            needed = cfg.polls_before_worse if worse else cfg.polls_before_better
            run = 0
            for earlier in reversed(sequence[: i + 1]):
                if earlier.state != instant.state:
                    break
                run += 1
            assert run >= needed or (worse and instant.immediate)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(STATES), st.sampled_from(STATES), st.integers(2, 5), st.integers(2, 5))
def test_one_transient_reading_never_flaps_the_verdict(
    steady: str, blip: str, worse: int, better: int
) -> None:
    cfg = GpusConfig(polls_before_worse=worse, polls_before_better=better)
    track = Track()
    for _ in range(3):
        track = step(track, verdict_of(steady, False), cfg)
    track = step(track, verdict_of(blip, False), cfg)
    assert track.verdict is not None and track.verdict.state == steady
    track = step(track, verdict_of(steady, False), cfg)
    assert track.verdict is not None and track.verdict.state == steady


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(STATES), st.sampled_from(STATES), configs)
def test_a_persistent_reading_is_taken_within_its_threshold(
    first: str, then: str, cfg: GpusConfig
) -> None:
    track = step(Track(), verdict_of(first, False), cfg)
    for _ in range(max(cfg.polls_before_worse, cfg.polls_before_better)):
        track = step(track, verdict_of(then, False), cfg)
    assert track.verdict is not None and track.verdict.state == then


def test_immediate_evidence_skips_the_wait() -> None:
    cfg = GpusConfig(polls_before_worse=5)
    track = step(Track(), verdict_of("healthy", False), cfg)
    track = step(track, combine(judge_gpu(healthy(lost="gpu_is_lost"), None, [], NOW, cfg)), cfg)
    assert track.verdict is not None and track.verdict.state == "unhealthy"


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "temperature_c": st.one_of(st.integers(0, 120), st.just(NOT_SUPPORTED), st.none()),
            "ecc_volatile_uncorrected": st.one_of(st.integers(0, 5), st.just(NOT_SUPPORTED)),
            "row_remap_pending": st.one_of(st.booleans(), st.just(NOT_SUPPORTED)),
            "pcie_width": st.one_of(st.integers(1, 16), st.just(NOT_SUPPORTED)),
            "power_w": st.one_of(st.floats(0, 2000), st.just(NOT_SUPPORTED)),
            "lost": st.sampled_from(["", "gpu_is_lost", "reset_required"]),
        },
    ),
    st.lists(st.sampled_from([13, 48, 63, 79, 94, 5000]), max_size=3),
)
def test_verdict_is_the_worst_finding_and_adding_a_fault_never_improves_it(
    overrides: dict[str, Any], xids: list[int]
) -> None:
    gpu = healthy(**overrides)
    events = [xid(n) for n in xids]
    findings = judge_gpu(gpu, None, events, NOW, CFG)
    verdict = combine(findings)
    assert RANK[verdict.state] == max((RANK[f.state] for f in findings), default=0)
    worse = combine(judge_gpu(gpu, None, [*events, xid(79)], NOW, CFG))
    assert RANK[worse.state] >= RANK[verdict.state] and worse.state == "unhealthy"


# ---- kernel log and PCI ------------------------------------------------------------------


def test_kmsg_xid_lines_are_parsed_and_others_ignored() -> None:
    record = (
        "3,1047,5000000,-;NVRM: Xid (PCI:0000:3b:00): 79, pid=2301, name=python3, "
        "GPU has fallen off the bus."
    )
    event = kmsg.parse_xid(record, boot_time=100.0)
    assert event is not None
    assert (event.xid, event.pci, event.at, event.source) == (79, "0000:3b:00", 105.0, "kmsg")
    assert "fallen off the bus" in event.message
    plain = kmsg.parse_xid("NVRM: Xid (PCI:0001:B1:00): 13, Graphics Exception", boot_time=0)
    assert plain is not None and plain.pci == "0001:b1:00" and plain.xid == 13
    assert kmsg.parse_xid("6,1,2,-;eth0: link up", boot_time=0) is None
    assert kmsg.parse_xid("NVRM: loading NVIDIA UNIX x86_64 Kernel Module", boot_time=0) is None
    assert kmsg.normalise_pci("00000000:3B:00.0") == "0000:3b:00"


def test_kmsg_follow_reads_records_and_skips_continuations(tmp_path: Path) -> None:
    log = tmp_path / "kmsg"
    log.write_text("6,1,10,-;first\n SUBSYSTEM=pci\n6,2,20,-;second\n")
    seen: list[str] = []
    kmsg.follow(str(log), seen.append, None)
    assert seen == ["6,1,10,-;first", "6,2,20,-;second"]
    with pytest.raises(OSError):
        kmsg.follow(str(tmp_path / "absent"), seen.append, None)


def test_pci_count_takes_nvidia_display_and_3d_functions_only(tmp_path: Path) -> None:
    def dev(name: str, vendor: str, klass: str) -> None:
        d = tmp_path / name
        d.mkdir()
        (d / "vendor").write_text(vendor + "\n")
        (d / "class").write_text(klass + "\n")

    dev("0000:18:00.0", "0x10de", "0x030200")  # 3D controller (H100)
    dev("0000:19:00.0", "0x10de", "0x030000")  # VGA
    dev("0000:19:00.1", "0x10de", "0x040300")  # its HDMI audio
    dev("0000:a0:00.0", "0x10de", "0x068000")  # NVSwitch
    dev("0000:00:02.0", "0x8086", "0x030000")  # Intel iGPU
    assert kmsg.count_nvidia_pci(tmp_path) == 2
    assert kmsg.count_nvidia_pci(tmp_path / "absent") is None


# ---- GPU leases ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([f"GPU-{i}" for i in range(8)]), unique=True),
    st.sets(st.sampled_from([f"GPU-{i}" for i in range(8)])),
    st.integers(1, 9),
)
def test_choose_gpus_gives_only_healthy_unleased_gpus(
    healthy_uuids: list[str], used: set[str], count: int
) -> None:
    chosen = choose_gpus(healthy_uuids, used, count)
    available = [u for u in healthy_uuids if u not in used]
    if len(available) < count:
        assert chosen is None
    else:
        assert chosen is not None and len(chosen) == len(set(chosen)) == count
        assert set(chosen) <= set(available)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3)), max_size=25))
def test_lease_bookkeeping_survives_reload_and_never_doubles(ops: list[tuple[bool, int]]) -> None:
    """Random lease/release sequences through the real table: what is loaded back equals what
    was committed, and no GPU is in two leases."""
    gpus = [f"GPU-{i}" for i in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        store = StateStore(Path(tmp))
        try:
            table = GpuLeaseTable(store)
            held: dict[str, list[str]] = {}
            for n, (release, count) in enumerate(ops):
                if release and held:
                    victim = sorted(held)[0]
                    table.commit([], [victim])
                    del held[victim]
                    continue
                used = {u for us in held.values() for u in us}
                chosen = choose_gpus(gpus, used, count)
                if chosen is None:
                    continue
                lease = GpuLease(id=f"l{n}", owner="t", gpus=chosen, pid=None, created=float(n))
                table.commit([StoredGpuLease(lease=lease)], [])
                held[lease.id] = chosen
            loaded = {s.lease.id: s.lease.gpus for s in GpuLeaseTable(store).load()}
            assert loaded == held
            every = [u for us in loaded.values() for u in us]
            assert len(every) == len(set(every))
            if every:
                lid = next(iter(loaded))
                dup = GpuLease(id="dup", owner="t", gpus=[loaded[lid][0]], pid=None, created=0)
                with pytest.raises(Exception, match="UNIQUE"):
                    table.commit([StoredGpuLease(lease=dup)], [])
                assert {s.lease.id for s in table.load()} == set(held)
        finally:
            store.close()
