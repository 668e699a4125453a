"""A fake NVML: the part of nvidia-ml-py's ``pynvml`` API that gpud uses, driven by a JSON file.

No GPU here or in CI, so tests put this module where gpud imports NVML (``GpuService(ctx,
nvml=tests.harness.fake_nvml)`` in-process, ``[gpus] nvml_module = "tests.harness.fake_nvml"`` for a gpud
subprocess). The file named by ``$GPUD_FAKE_NVML`` is re-read on every call, so a test changes a
running gpud's GPUs by rewriting it (``write_state``; atomic). Shape::

    {"init": "ok",                     # or an error name: "library_not_found", ...
     "driver": "550.54.15", "cuda": 12040,
     "hang_s": 0,                      # nvmlDeviceGetCount sleeps this long (a hung driver)
     "devices": [{"uuid": "GPU-...", "name": "...", "bus_id": "00000000:3B:00.0",
                  "readings": {...},   # overrides of DEFAULT_READINGS
                  "errors": {"nvmlDeviceGetTemperature": "not_supported",
                             "*": "gpu_is_lost"}}],   # "*": every call on the device
     "events": [{"seq": 1, "index": 0, "xid": 79}]}    # each delivered once per process

Error names are the keys of ``ERRORS``; "python" raises a RuntimeError (not an NVMLError).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ENV = "GPUD_FAKE_NVML"

NVML_SUCCESS = 0
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_UNKNOWN = 999

ERRORS = {
    "invalid_argument": NVML_ERROR_INVALID_ARGUMENT,
    "not_supported": NVML_ERROR_NOT_SUPPORTED,
    "driver_not_loaded": NVML_ERROR_DRIVER_NOT_LOADED,
    "timeout": NVML_ERROR_TIMEOUT,
    "library_not_found": NVML_ERROR_LIBRARY_NOT_FOUND,
    "gpu_is_lost": NVML_ERROR_GPU_IS_LOST,
    "reset_required": NVML_ERROR_RESET_REQUIRED,
    "unknown": NVML_ERROR_UNKNOWN,
}
_TEXT = {
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}

NVML_FEATURE_DISABLED = 0
NVML_FEATURE_ENABLED = 1
NVML_TEMPERATURE_GPU = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = 0
NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = 1
NVML_NVLINK_MAX_LINKS = 18
NVML_NVLINK_ERROR_DL_REPLAY = 0
NVML_NVLINK_ERROR_DL_RECOVERY = 1
NVML_NVLINK_ERROR_DL_CRC_FLIT = 2
NVML_NVLINK_ERROR_DL_CRC_DATA = 3
nvmlClocksEventReasonGpuIdle = 0x1
nvmlClocksEventReasonSwPowerCap = 0x4
nvmlClocksEventReasonHwSlowdown = 0x8
nvmlClocksEventReasonSwThermalSlowdown = 0x20
nvmlClocksEventReasonHwThermalSlowdown = 0x40
nvmlClocksEventReasonHwPowerBrakeSlowdown = 0x80
nvmlEventTypeXidCriticalError = 0x8

# A healthy H100 SXM at idle.
DEFAULT_READINGS: dict[str, Any] = {
    "memory_total_mib": 81559,
    "memory_used_mib": 512,
    "persistence_mode": 1,
    "ecc_mode": 1,
    "ecc_volatile_uncorrected": 0,
    "ecc_aggregate_uncorrected": 0,
    # corrected rows, uncorrected rows, pending, failure
    "remapped_rows": [0, 0, 0, 0],
    "retired_pages_sbe": 0,
    "retired_pages_dbe": 0,
    "retired_pages_pending": 0,
    "temperature_c": 34,
    "slowdown_temperature_c": 87,
    "clock_events": nvmlClocksEventReasonGpuIdle,
    "power_mw": 70_000,
    "power_limit_mw": 700_000,
    "pcie_width": 16,
    "pcie_max_width": 16,
    "pcie_gen": 5,
    "pcie_max_gen": 5,
    "pcie_replay_count": 0,
    # one state per NVLink (1 = active); [] for a GPU without NVLink
    "nvlink_states": [1] * 18,
    # per-link, per-counter error count
    "nvlink_error_count": 0,
}


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _TEXT.get(self.value, f"NVML error {self.value}")


def device(index: int, **readings: Any) -> dict[str, Any]:
    """One fake GPU; ``readings`` override DEFAULT_READINGS."""
    return {
        "uuid": f"GPU-{index:08d}-fake-0000-0000-{index:012d}",
        "name": "NVIDIA H100 80GB HBM3",
        "bus_id": f"00000000:{0x18 + index * 0x10:02X}:00.0",
        "readings": readings,
        "errors": {},
    }


def node(gpus: int = 8, **extra: Any) -> dict[str, Any]:
    return {
        "init": "ok",
        "driver": "550.54.15",
        "cuda": 12040,
        "devices": [device(i) for i in range(gpus)],
        "events": [],
        **extra,
    }


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Replace the state file atomically (a reader never sees half of it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def _state() -> dict[str, Any]:
    return json.loads(Path(os.environ[ENV]).read_text())


def _raise(name: str) -> None:
    if name == "python":
        raise RuntimeError("fake NVML: an unexpected failure inside the library")
    raise NVMLError(ERRORS[name])


def _dev(handle: int, fn: str) -> dict[str, Any]:
    devices = _state()["devices"]
    if not 0 <= handle < len(devices):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    dev = devices[handle]
    errors = dev.get("errors", {})
    failure = errors.get(fn) or errors.get("*")
    if failure:
        _raise(failure)
    return dev


def _reading(handle: int, fn: str, key: str) -> Any:
    dev = _dev(handle, fn)
    return dev.get("readings", {}).get(key, DEFAULT_READINGS[key])


def nvmlInit() -> None:
    init = _state().get("init", "ok")
    if init != "ok":
        _raise(init)


def nvmlShutdown() -> None:
    pass


def nvmlSystemGetDriverVersion() -> str:
    return _state()["driver"]


def nvmlSystemGetCudaDriverVersion() -> int:
    return _state()["cuda"]


def nvmlDeviceGetCount() -> int:
    state = _state()
    if state.get("hang_s"):
        time.sleep(state["hang_s"])
    failure = state.get("count_error")
    if failure:
        _raise(failure)
    return len(state["devices"])


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    _dev(index, "nvmlDeviceGetHandleByIndex")
    return index


def nvmlDeviceGetUUID(handle: int) -> str:
    return _dev(handle, "nvmlDeviceGetUUID")["uuid"]


def nvmlDeviceGetName(handle: int) -> str:
    return _dev(handle, "nvmlDeviceGetName")["name"]


def nvmlDeviceGetPciInfo(handle: int) -> SimpleNamespace:
    return SimpleNamespace(busId=_dev(handle, "nvmlDeviceGetPciInfo")["bus_id"])


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    fn = "nvmlDeviceGetMemoryInfo"
    mib = 1024 * 1024
    total = _reading(handle, fn, "memory_total_mib") * mib
    used = _reading(handle, fn, "memory_used_mib") * mib
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetPersistenceMode(handle: int) -> int:
    return _reading(handle, "nvmlDeviceGetPersistenceMode", "persistence_mode")


def nvmlDeviceGetEccMode(handle: int) -> list[int]:
    mode = _reading(handle, "nvmlDeviceGetEccMode", "ecc_mode")
    return [mode, mode]


def nvmlDeviceGetTotalEccErrors(handle: int, error_type: int, counter_type: int) -> int:
    key = (
        "ecc_volatile_uncorrected"
        if counter_type == NVML_VOLATILE_ECC
        else "ecc_aggregate_uncorrected"
    )
    return _reading(handle, "nvmlDeviceGetTotalEccErrors", key)


def nvmlDeviceGetRemappedRows(handle: int) -> tuple[int, int, int, int]:
    return tuple(_reading(handle, "nvmlDeviceGetRemappedRows", "remapped_rows"))  # type: ignore[return-value]


def nvmlDeviceGetRetiredPages(handle: int, cause: int) -> list[int]:
    key = (
        "retired_pages_dbe"
        if cause == NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
        else "retired_pages_sbe"
    )
    return [0x1000 * i for i in range(_reading(handle, "nvmlDeviceGetRetiredPages", key))]


def nvmlDeviceGetRetiredPagesPendingStatus(handle: int) -> int:
    return _reading(handle, "nvmlDeviceGetRetiredPagesPendingStatus", "retired_pages_pending")


def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:
    return _reading(handle, "nvmlDeviceGetTemperature", "temperature_c")


def nvmlDeviceGetTemperatureThreshold(handle: int, threshold: int) -> int:
    return _reading(handle, "nvmlDeviceGetTemperatureThreshold", "slowdown_temperature_c")


def nvmlDeviceGetCurrentClocksEventReasons(handle: int) -> int:
    return _reading(handle, "nvmlDeviceGetCurrentClocksEventReasons", "clock_events")


def nvmlDeviceGetPowerUsage(handle: int) -> int:
    return _reading(handle, "nvmlDeviceGetPowerUsage", "power_mw")


def nvmlDeviceGetEnforcedPowerLimit(handle: int) -> int:
    return _reading(handle, "nvmlDeviceGetEnforcedPowerLimit", "power_limit_mw")


def nvmlDeviceGetCurrPcieLinkWidth(handle: int) -> int:
    return _reading(handle, "nvmlDeviceGetCurrPcieLinkWidth", "pcie_width")


def nvmlDeviceGetMaxPcieLinkWidth(handle: int) -> int:
    return _reading(handle, "nvmlDeviceGetMaxPcieLinkWidth", "pcie_max_width")


def nvmlDeviceGetCurrPcieLinkGeneration(handle: int) -> int:
    return _reading(handle, "nvmlDeviceGetCurrPcieLinkGeneration", "pcie_gen")


def nvmlDeviceGetMaxPcieLinkGeneration(handle: int) -> int:
    return _reading(handle, "nvmlDeviceGetMaxPcieLinkGeneration", "pcie_max_gen")


def nvmlDeviceGetPcieReplayCounter(handle: int) -> int:
    return _reading(handle, "nvmlDeviceGetPcieReplayCounter", "pcie_replay_count")


def nvmlDeviceGetNvLinkState(handle: int, link: int) -> int:
    states = _reading(handle, "nvmlDeviceGetNvLinkState", "nvlink_states")
    if not states:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    if link >= len(states):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return states[link]


def nvmlDeviceGetNvLinkErrorCounter(handle: int, link: int, counter: int) -> int:
    return _reading(handle, "nvmlDeviceGetNvLinkErrorCounter", "nvlink_error_count")


# ---- events ------------------------------------------------------------------------------

_delivered: set[tuple[str, int]] = set()


def nvmlEventSetCreate() -> object:
    return object()


def nvmlDeviceGetSupportedEventTypes(handle: int) -> int:
    dev = _dev(handle, "nvmlDeviceGetSupportedEventTypes")
    return nvmlEventTypeXidCriticalError if dev.get("events", True) else 0


def nvmlDeviceRegisterEvents(handle: int, event_types: int, event_set: object) -> None:
    _dev(handle, "nvmlDeviceRegisterEvents")


def nvmlEventSetWait(event_set: object, timeout_ms: int) -> SimpleNamespace:
    deadline = time.monotonic() + timeout_ms / 1000
    path = os.environ[ENV]
    while True:
        for event in _state().get("events", []):
            key = (path, event["seq"])
            if key not in _delivered:
                _delivered.add(key)
                return SimpleNamespace(
                    device=event["index"],
                    eventType=nvmlEventTypeXidCriticalError,
                    eventData=event["xid"],
                )
        if time.monotonic() >= deadline:
            raise NVMLError(NVML_ERROR_TIMEOUT)
        time.sleep(0.05)


def nvmlEventSetFree(event_set: object) -> None:
    pass
