"""The NVML boundary: the only module that touches nvidia-ml-py (``pynvml``).

The module is passed in (``load`` imports the one the config names), so tests put a fake NVML
here and everything above runs unchanged. Every call is blocking: run them in a thread.

Errors are sorted once, here: NOT_SUPPORTED becomes the value "not supported"; GPU_IS_LOST and
RESET_REQUIRED mark the GPU lost; LIBRARY_NOT_FOUND / DRIVER_NOT_LOADED make NVML unavailable
with the reason; anything else is recorded against the reading (the verdict turns it into
"unknown") and the poll goes on.
"""

from __future__ import annotations

import ctypes
import importlib
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from gpud.gpus.kmsg import normalise_pci
from gpud.gpus.signals import (
    NOT_SUPPORTED,
    UNREAD_UUID_PREFIX,
    GpuReadings,
    LostKind,
    NodeReadings,
    XidEvent,
)

# A module or any object with pynvml's functions and constants.
Nvml = ModuleType | Any

# Clock-event reasons that mean the GPU is being slowed down against its will (the others,
# idle, application clocks, SW power cap, sync boost, are normal operation).
BAD_CLOCK_EVENTS = {
    "nvmlClocksEventReasonHwSlowdown": "HW slowdown",
    "nvmlClocksEventReasonSwThermalSlowdown": "SW thermal slowdown",
    "nvmlClocksEventReasonHwThermalSlowdown": "HW thermal slowdown",
    "nvmlClocksEventReasonHwPowerBrakeSlowdown": "HW power brake",
}
NVLINK_COUNTERS = (
    "NVML_NVLINK_ERROR_DL_REPLAY",
    "NVML_NVLINK_ERROR_DL_RECOVERY",
    "NVML_NVLINK_ERROR_DL_CRC_FLIT",
    "NVML_NVLINK_ERROR_DL_CRC_DATA",
)
EVENT_WAIT_MS = 1000


class GpuIndexError(ValueError):
    """A GPU cannot be named by index: NVML does not list it (gone, or another host's)."""


def indices_of(gpus: Sequence[GpuReadings], uuids: Sequence[str]) -> tuple[int, ...]:
    """NVML's index of each of ``uuids``, in their order, from a poll's readings.

    Engines get indices, never UUIDs: vLLM does ``int()`` of every CUDA_VISIBLE_DEVICES entry
    and opens that number with ``nvmlDeviceGetHandleByIndex``, so the number must be NVML's
    own index; `cuda_env` adds CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA counts the same way."""
    by_uuid = {g.uuid: g.index for g in gpus if not g.uuid.startswith(UNREAD_UUID_PREFIX)}
    missing = [u for u in uuids if u not in by_uuid]
    if missing:
        raise GpuIndexError(
            f"NVML does not list GPU {', '.join(missing)} now; see `gpud gpus` on this host"
        )
    return tuple(by_uuid[u] for u in uuids)


def cuda_env(indices: Sequence[int]) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for an engine or a Ray node: NVML indices in PCI bus order.

    Empty ``indices``: the process sees no GPU (rather than all of them). CUDA's default order
    is fastest first, NVML's is by PCI bus; PCI_BUS_ID makes index N the same GPU for both."""
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise GpuIndexError(f"{index!r} is not an NVML index (a GPU UUID must be resolved)")
    if len(set(indices)) != len(indices):
        raise GpuIndexError(f"GPU indices {list(indices)} name one GPU twice")
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in indices),
    }


def load(name: str) -> Nvml:
    """Import the NVML module named in the config (``gpus.nvml_module``)."""
    return importlib.import_module(name)


class _Lost(Exception):
    def __init__(self, kind: LostKind) -> None:
        super().__init__(kind)
        self.kind = kind


def _code(nvml: Nvml, exc: BaseException) -> int | None:
    return getattr(exc, "value", None) if isinstance(exc, nvml.NVMLError) else None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Reader:
    """Reads one device; collects unexpected errors by reading name."""

    def __init__(self, nvml: Nvml, handle: Any) -> None:
        self.nvml = nvml
        self.handle = handle
        self.errors: dict[str, str] = {}

    def get(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(handle, *args)``, "not supported", or None with the error recorded."""
        nvml = self.nvml
        try:
            return fn(self.handle, *args)
        except Exception as exc:
            code = _code(nvml, exc)
            if code == nvml.NVML_ERROR_NOT_SUPPORTED:
                return NOT_SUPPORTED
            if code == nvml.NVML_ERROR_GPU_IS_LOST:
                raise _Lost("gpu_is_lost") from None
            if code == nvml.NVML_ERROR_RESET_REQUIRED:
                raise _Lost("reset_required") from None
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            return None


def _map(value: Any, convert: Callable[[Any], Any]) -> Any:
    return value if value is None or value == NOT_SUPPORTED else convert(value)


def read_gpu(nvml: Nvml, index: int) -> GpuReadings:
    """Every signal of GPU ``index``."""
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except Exception as exc:
        code = _code(nvml, exc)
        lost: LostKind = (
            "gpu_is_lost"
            if code == nvml.NVML_ERROR_GPU_IS_LOST
            else "reset_required"
            if code == nvml.NVML_ERROR_RESET_REQUIRED
            else ""
        )
        if lost:
            return GpuReadings(index=index, uuid=f"{UNREAD_UUID_PREFIX}{index}", lost=lost)
        return GpuReadings(
            index=index,
            uuid=f"{UNREAD_UUID_PREFIX}{index}",
            errors={"handle": f"{type(exc).__name__}: {exc}"},
        )
    r = _Reader(nvml, handle)
    gpu = GpuReadings(index=index, uuid=f"{UNREAD_UUID_PREFIX}{index}")
    try:
        uuid = r.get("uuid", nvml.nvmlDeviceGetUUID)
        if isinstance(uuid, str | bytes):
            gpu.uuid = _text(uuid)
        gpu.name = _text(r.get("name", nvml.nvmlDeviceGetName) or "")
        pci = r.get("pci", nvml.nvmlDeviceGetPciInfo)
        if pci not in (None, NOT_SUPPORTED):
            gpu.pci = normalise_pci(_text(pci.busId))
        _read_signals(nvml, r, gpu)
    except _Lost as lost_exc:
        gpu.lost = lost_exc.kind
    gpu.errors = r.errors
    return gpu


def _read_signals(nvml: Nvml, r: _Reader, gpu: GpuReadings) -> None:
    mib = 1024 * 1024
    memory = r.get("memory", nvml.nvmlDeviceGetMemoryInfo)
    gpu.memory_total_mib = _map(memory, lambda m: m.total // mib)
    gpu.memory_used_mib = _map(memory, lambda m: m.used // mib)
    enabled = nvml.NVML_FEATURE_ENABLED
    gpu.persistence_mode = _map(
        r.get("persistence_mode", nvml.nvmlDeviceGetPersistenceMode), lambda v: v == enabled
    )
    gpu.ecc_mode = _map(r.get("ecc_mode", nvml.nvmlDeviceGetEccMode), lambda v: v[0] == enabled)
    uncorrected = nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    gpu.ecc_volatile_uncorrected = _map(
        r.get(
            "ecc_volatile_uncorrected",
            nvml.nvmlDeviceGetTotalEccErrors,
            uncorrected,
            nvml.NVML_VOLATILE_ECC,
        ),
        int,
    )
    gpu.ecc_aggregate_uncorrected = _map(
        r.get(
            "ecc_aggregate_uncorrected",
            nvml.nvmlDeviceGetTotalEccErrors,
            uncorrected,
            nvml.NVML_AGGREGATE_ECC,
        ),
        int,
    )
    rows = r.get("row_remap", nvml.nvmlDeviceGetRemappedRows)
    gpu.row_remap_pending = _map(rows, lambda v: bool(v[2]))
    gpu.row_remap_failure = _map(rows, lambda v: bool(v[3]))
    gpu.retired_pages_sbe = _map(
        r.get(
            "retired_pages_sbe",
            nvml.nvmlDeviceGetRetiredPages,
            nvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
        ),
        len,
    )
    gpu.retired_pages_dbe = _map(
        r.get(
            "retired_pages_dbe",
            nvml.nvmlDeviceGetRetiredPages,
            nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
        ),
        len,
    )
    gpu.retired_pages_pending = _map(
        r.get("retired_pages_pending", nvml.nvmlDeviceGetRetiredPagesPendingStatus),
        lambda v: v == enabled,
    )
    gpu.temperature_c = _map(
        r.get("temperature_c", nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU), int
    )
    gpu.slowdown_temperature_c = _map(
        r.get(
            "slowdown_temperature_c",
            nvml.nvmlDeviceGetTemperatureThreshold,
            nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
        ),
        int,
    )
    mask = r.get("clock_events", nvml.nvmlDeviceGetCurrentClocksEventReasons)
    gpu.clock_event_mask = _map(mask, int)
    gpu.clock_events = _map(
        mask,
        lambda m: [text for const, text in BAD_CLOCK_EVENTS.items() if m & getattr(nvml, const)],
    )
    gpu.power_w = _map(r.get("power_w", nvml.nvmlDeviceGetPowerUsage), lambda mw: mw / 1000)
    gpu.power_limit_w = _map(
        r.get("power_limit_w", nvml.nvmlDeviceGetEnforcedPowerLimit), lambda mw: mw / 1000
    )
    gpu.pcie_width = _map(r.get("pcie_width", nvml.nvmlDeviceGetCurrPcieLinkWidth), int)
    gpu.pcie_max_width = _map(r.get("pcie_max_width", nvml.nvmlDeviceGetMaxPcieLinkWidth), int)
    gpu.pcie_gen = _map(r.get("pcie_gen", nvml.nvmlDeviceGetCurrPcieLinkGeneration), int)
    gpu.pcie_max_gen = _map(r.get("pcie_max_gen", nvml.nvmlDeviceGetMaxPcieLinkGeneration), int)
    gpu.pcie_replay_count = _map(
        r.get("pcie_replay_count", nvml.nvmlDeviceGetPcieReplayCounter), int
    )
    _read_nvlink(nvml, r, gpu)


def _read_nvlink(nvml: Nvml, r: _Reader, gpu: GpuReadings) -> None:
    """Links 0.. until NVML says a link does not exist (NOT_SUPPORTED / INVALID_ARGUMENT)."""
    links: list[int] = []
    down: list[int] = []
    errors = 0
    for link in range(nvml.NVML_NVLINK_MAX_LINKS):
        probe = _Reader(nvml, r.handle)
        state = probe.get("nvlink_state", nvml.nvmlDeviceGetNvLinkState, link)
        if state is None or state == NOT_SUPPORTED:
            break
        links.append(link)
        if state != nvml.NVML_FEATURE_ENABLED:
            down.append(link)
            continue
        for counter in NVLINK_COUNTERS:
            value = r.get(
                "nvlink_errors", nvml.nvmlDeviceGetNvLinkErrorCounter, link, getattr(nvml, counter)
            )
            if isinstance(value, int):
                errors += value
    if not links:
        gpu.nvlink_links = gpu.nvlink_down = gpu.nvlink_errors = NOT_SUPPORTED
        return
    gpu.nvlink_links = len(links)
    gpu.nvlink_down = down
    gpu.nvlink_errors = errors


def unavailable_reason(nvml: Nvml, exc: BaseException) -> str | None:
    """Why NVML cannot be used at all, or None when ``exc`` is some other failure."""
    code = _code(nvml, exc)
    if code in (nvml.NVML_ERROR_LIBRARY_NOT_FOUND, nvml.NVML_ERROR_DRIVER_NOT_LOADED):
        return str(exc)
    return None


def read_node(nvml: Nvml, pci_functions: int | None) -> NodeReadings:
    """One poll of every GPU. Never raises: NVML's absence and failures are in the result."""
    try:
        nvml.nvmlInit()
    except Exception as exc:
        reason = unavailable_reason(nvml, exc) or f"nvmlInit failed: {type(exc).__name__}: {exc}"
        return NodeReadings(nvml=reason, nvml_available=False, pci_functions=pci_functions)
    try:
        node = NodeReadings(nvml="ok", nvml_available=True, pci_functions=pci_functions)
        errors: dict[str, str] = {}
        try:
            node.driver_version = _text(nvml.nvmlSystemGetDriverVersion())
        except Exception as exc:
            errors["driver_version"] = f"{type(exc).__name__}: {exc}"
        try:
            cuda = int(nvml.nvmlSystemGetCudaDriverVersion())
            node.cuda_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
        except Exception as exc:
            errors["cuda_version"] = f"{type(exc).__name__}: {exc}"
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            errors["device_count"] = f"{type(exc).__name__}: {exc}"
            count = 0
        node.gpus = [read_gpu(nvml, index) for index in range(count)]
        node.errors = errors
        return node
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def watch_xid_events(
    nvml: Nvml,
    on_event: Callable[[XidEvent], None],
    stop: threading.Event,
    clock: Callable[[], float],
) -> str:
    """Deliver NVML critical-error (XID) events until ``stop`` is set; blocking (a thread).

    Returns why it ended early: "" when stopped, or the reason events are not available
    (no NVML, no device supports them), so the caller can say so and rely on the kernel log."""
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return unavailable_reason(nvml, exc) or f"nvmlInit failed: {exc}"
    event_set = None
    try:
        event_set = nvml.nvmlEventSetCreate()
        registered = 0
        uuids: dict[int, str] = {}
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            try:
                supported = nvml.nvmlDeviceGetSupportedEventTypes(handle)
                if not supported & nvml.nvmlEventTypeXidCriticalError:
                    continue
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, event_set)
            except nvml.NVMLError:
                continue
            uuids[_handle_key(handle)] = _text(nvml.nvmlDeviceGetUUID(handle))
            registered += 1
        if registered == 0:
            return "no GPU supports NVML XID events"
        while not stop.is_set():
            try:
                data = nvml.nvmlEventSetWait(event_set, EVENT_WAIT_MS)
            except nvml.NVMLError as exc:
                if _code(nvml, exc) == nvml.NVML_ERROR_TIMEOUT:
                    continue
                raise
            on_event(
                XidEvent(
                    xid=int(data.eventData),
                    source="nvml-event",
                    at=clock(),
                    uuid=uuids.get(_handle_key(data.device), ""),
                )
            )
        return ""
    except Exception as exc:
        return f"NVML events failed: {type(exc).__name__}: {exc}"
    finally:
        if event_set is not None:
            try:
                nvml.nvmlEventSetFree(event_set)
            except Exception:
                pass
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def _handle_key(handle: Any) -> int:
    """A hashable identity of a device handle (ctypes pointers compare by their address)."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value or 0
    except (TypeError, ctypes.ArgumentError):
        return hash(handle)
