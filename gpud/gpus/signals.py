"""What gpud reads about each GPU: plain data, no I/O.

Every reading is a value, ``"not supported"`` (the GPU model or driver does not have it: never
an error) or ``None`` (not read: NVML failed unexpectedly, the reason is in ``errors``).
``SOURCES`` names where each reading comes from; `/v1/gpus` shows both side by side.
"""

from __future__ import annotations

from typing import Literal

import msgspec

NotSupported = Literal["not supported"]
NOT_SUPPORTED: NotSupported = "not supported"

# How a lost GPU shows itself through NVML ("" while it answers).
LostKind = Literal["", "gpu_is_lost", "reset_required"]
XidSource = Literal["nvml-event", "kmsg"]


class GpuReadings(msgspec.Struct, kw_only=True):
    """One poll of one GPU."""

    index: int
    uuid: str
    name: str = ""
    # Normalised PCI address "0000:3b:00" (domain:bus:device), the form NVRM's Xid lines use.
    pci: str = ""
    memory_total_mib: int | NotSupported | None = None
    memory_used_mib: int | NotSupported | None = None
    lost: LostKind = ""
    persistence_mode: bool | NotSupported | None = None
    ecc_mode: bool | NotSupported | None = None
    ecc_volatile_uncorrected: int | NotSupported | None = None
    ecc_aggregate_uncorrected: int | NotSupported | None = None
    row_remap_pending: bool | NotSupported | None = None
    row_remap_failure: bool | NotSupported | None = None
    # Pre-Ampere page retirement: pages retired for single-bit (multiple) and double-bit ECC.
    retired_pages_sbe: int | NotSupported | None = None
    retired_pages_dbe: int | NotSupported | None = None
    retired_pages_pending: bool | NotSupported | None = None
    temperature_c: int | NotSupported | None = None
    slowdown_temperature_c: int | NotSupported | None = None
    # Bit mask of NVML clock-event (throttle) reasons and the names of the active bad ones.
    clock_event_mask: int | NotSupported | None = None
    clock_events: list[str] | NotSupported | None = None
    power_w: float | NotSupported | None = None
    power_limit_w: float | NotSupported | None = None
    pcie_width: int | NotSupported | None = None
    pcie_max_width: int | NotSupported | None = None
    pcie_gen: int | NotSupported | None = None
    pcie_max_gen: int | NotSupported | None = None
    pcie_replay_count: int | NotSupported | None = None
    # NVLink links reported inactive, and the sum of their DL error counters (replay,
    # recovery, CRC). "not supported" on GPUs without NVLink.
    nvlink_links: int | NotSupported | None = None
    nvlink_down: list[int] | NotSupported | None = None
    nvlink_errors: int | NotSupported | None = None
    # Reading name -> why it could not be read (an unexpected NVML error).
    errors: dict[str, str] = {}


class NodeReadings(msgspec.Struct, kw_only=True):
    """One poll of the whole node."""

    # "ok", or why NVML cannot be used ("NVML Shared Library Not Found", ...).
    nvml: str
    nvml_available: bool
    driver_version: str | None = None
    # CUDA driver API version as "12.4".
    cuda_version: str | None = None
    gpus: list[GpuReadings] = []
    # NVIDIA display/3D functions under /sys/bus/pci/devices; None if sysfs could not be read.
    pci_functions: int | None = None
    # Node-wide unexpected errors (device count, driver version): reading -> reason.
    errors: dict[str, str] = {}


class XidEvent(msgspec.Struct, frozen=True, kw_only=True):
    xid: int
    source: XidSource
    # Wall-clock seconds when it happened (kmsg: derived from its boot-relative timestamp).
    at: float
    # GPU UUID when known (NVML events), else the PCI address from the kernel line.
    uuid: str = ""
    pci: str = ""
    message: str = ""


class Signal(msgspec.Struct, frozen=True, kw_only=True):
    """One reading as `/v1/gpus` shows it."""

    name: str
    value: int | float | bool | str | list[int] | list[str] | None
    source: str


SOURCES: dict[str, str] = {
    "lost": "NVML NVML_ERROR_GPU_IS_LOST / NVML_ERROR_RESET_REQUIRED on any call",
    "memory_total_mib": "nvmlDeviceGetMemoryInfo",
    "memory_used_mib": "nvmlDeviceGetMemoryInfo",
    "persistence_mode": "nvmlDeviceGetPersistenceMode",
    "ecc_mode": "nvmlDeviceGetEccMode (current)",
    "ecc_volatile_uncorrected": "nvmlDeviceGetTotalEccErrors(UNCORRECTED, VOLATILE)",
    "ecc_aggregate_uncorrected": "nvmlDeviceGetTotalEccErrors(UNCORRECTED, AGGREGATE)",
    "row_remap_pending": "nvmlDeviceGetRemappedRows",
    "row_remap_failure": "nvmlDeviceGetRemappedRows",
    "retired_pages_sbe": "nvmlDeviceGetRetiredPages(MULTIPLE_SINGLE_BIT_ECC_ERRORS)",
    "retired_pages_dbe": "nvmlDeviceGetRetiredPages(DOUBLE_BIT_ECC_ERROR)",
    "retired_pages_pending": "nvmlDeviceGetRetiredPagesPendingStatus",
    "temperature_c": "nvmlDeviceGetTemperature(GPU)",
    "slowdown_temperature_c": "nvmlDeviceGetTemperatureThreshold(SLOWDOWN)",
    "clock_event_mask": "nvmlDeviceGetCurrentClocksEventReasons",
    "clock_events": "nvmlDeviceGetCurrentClocksEventReasons",
    "power_w": "nvmlDeviceGetPowerUsage",
    "power_limit_w": "nvmlDeviceGetEnforcedPowerLimit",
    "pcie_width": "nvmlDeviceGetCurrPcieLinkWidth",
    "pcie_max_width": "nvmlDeviceGetMaxPcieLinkWidth",
    "pcie_gen": "nvmlDeviceGetCurrPcieLinkGeneration",
    "pcie_max_gen": "nvmlDeviceGetMaxPcieLinkGeneration",
    "pcie_replay_count": "nvmlDeviceGetPcieReplayCounter",
    "nvlink_links": "nvmlDeviceGetNvLinkState",
    "nvlink_down": "nvmlDeviceGetNvLinkState",
    "nvlink_errors": "nvmlDeviceGetNvLinkErrorCounter(DL_REPLAY, DL_RECOVERY, DL_CRC_FLIT, DL_CRC_DATA)",
}


def signals_of(gpu: GpuReadings) -> list[Signal]:
    """Every reading of ``gpu`` with its source, in a fixed order."""
    return [
        Signal(name=name, value=getattr(gpu, name), source=source)
        for name, source in SOURCES.items()
    ]


class GpuMetric(msgspec.Struct, frozen=True):
    """One per-GPU Prometheus family drawn from one reading."""

    name: str
    reading: str
    kind: Literal["gauge", "counter"]
    help: str
    # Multiplies the reading into the family's base unit (MiB -> bytes).
    scale: float = 1.0


MIB = 1024 * 1024

# gpud's own names, not dcgm-exporter's DCGM_FI_*: a host that runs both must not count a GPU
# twice. The ECC and retired-page totals only grow while the driver is loaded (the volatile
# ones restart with it, as a counter may), so they are counters; a bool reads as 0 or 1.
GPU_METRICS: tuple[GpuMetric, ...] = (
    GpuMetric("gpud_gpu_temperature_celsius", "temperature_c", "gauge", "GPU temperature."),
    GpuMetric(
        "gpud_gpu_slowdown_temperature_celsius",
        "slowdown_temperature_c",
        "gauge",
        "Temperature at which the GPU slows its clocks.",
    ),
    GpuMetric("gpud_gpu_power_watts", "power_w", "gauge", "Power draw."),
    GpuMetric("gpud_gpu_power_limit_watts", "power_limit_w", "gauge", "Enforced power limit."),
    GpuMetric(
        "gpud_gpu_memory_used_bytes", "memory_used_mib", "gauge", "Frame buffer in use.", MIB
    ),
    GpuMetric(
        "gpud_gpu_memory_total_bytes", "memory_total_mib", "gauge", "Frame buffer size.", MIB
    ),
    GpuMetric(
        "gpud_gpu_ecc_uncorrected_volatile_total",
        "ecc_volatile_uncorrected",
        "counter",
        "Uncorrected ECC errors since the driver loaded.",
    ),
    GpuMetric(
        "gpud_gpu_ecc_uncorrected_aggregate_total",
        "ecc_aggregate_uncorrected",
        "counter",
        "Uncorrected ECC errors over the GPU's lifetime.",
    ),
    GpuMetric(
        "gpud_gpu_row_remap_pending",
        "row_remap_pending",
        "gauge",
        "1 while a row remap waits for a GPU reset.",
    ),
    GpuMetric(
        "gpud_gpu_row_remap_failure", "row_remap_failure", "gauge", "1 when row remapping failed."
    ),
    GpuMetric(
        "gpud_gpu_retired_pages_sbe_total",
        "retired_pages_sbe",
        "counter",
        "Pages retired for multiple single-bit ECC errors.",
    ),
    GpuMetric(
        "gpud_gpu_retired_pages_dbe_total",
        "retired_pages_dbe",
        "counter",
        "Pages retired for double-bit ECC errors.",
    ),
    GpuMetric(
        "gpud_gpu_retired_pages_pending",
        "retired_pages_pending",
        "gauge",
        "1 while a page retirement waits for a GPU reset.",
    ),
    GpuMetric("gpud_gpu_pcie_replays_total", "pcie_replay_count", "counter", "PCIe replays."),
    GpuMetric("gpud_gpu_pcie_link_width", "pcie_width", "gauge", "Current PCIe link width."),
    GpuMetric(
        "gpud_gpu_pcie_link_generation", "pcie_gen", "gauge", "Current PCIe link generation."
    ),
    GpuMetric(
        "gpud_gpu_clock_event_reasons",
        "clock_event_mask",
        "gauge",
        "Bit mask of NVML clock-event (throttle) reasons.",
    ),
    GpuMetric(
        "gpud_gpu_nvlink_errors_total",
        "nvlink_errors",
        "counter",
        "Sum of the NVLink DL error counters (replay, recovery, CRC).",
    ),
)


def metric_value(value: object) -> float | None:
    """A reading as a sample: a number, a bool as 0/1; None when there is none."""
    if isinstance(value, bool):
        return float(value)
    return number(value)


def number(value: object) -> float | None:
    """``value`` if it is a real reading (not "not supported", not missing), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


UNREAD_UUID_PREFIX = "index-"


def carry_identity(readings: NodeReadings, previous: NodeReadings | None) -> NodeReadings:
    """A lost GPU cannot tell NVML its UUID any more: give it the identity (UUID, name, PCI
    address) the same index had in the previous poll, so its verdict and lease stay with it."""
    if previous is None:
        return readings
    before = {g.index: g for g in previous.gpus}
    for gpu in readings.gpus:
        old = before.get(gpu.index)
        if gpu.uuid.startswith(UNREAD_UUID_PREFIX) and old is not None:
            gpu.uuid, gpu.name, gpu.pci = old.uuid, gpu.name or old.name, gpu.pci or old.pci
    return readings
