"""GPU inventory from NVML (nvidia-ml-py). Without a driver: no GPUs and the reason why."""

from __future__ import annotations

import msgspec


class Gpu(msgspec.Struct, kw_only=True):
    index: int
    uuid: str
    name: str
    memory_total_mib: int
    memory_used_mib: int


class GpuInventory(msgspec.Struct, kw_only=True):
    # "ok", or "unavailable (<reason>)" when NVML cannot be used.
    nvml: str
    driver_version: str | None = None
    count: int = 0
    gpus: list[Gpu] = []
    summary: str = ""


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_inventory() -> GpuInventory:
    """Query NVML once. Never raises: a missing driver or library is reported, not fatal."""
    try:
        import pynvml
    except ImportError as exc:
        return _unavailable(f"nvidia-ml-py not importable: {exc}")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return _unavailable(str(exc))
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                Gpu(
                    index=index,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_total_mib=memory.total // (1024 * 1024),
                    memory_used_mib=memory.used // (1024 * 1024),
                )
            )
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
    except pynvml.NVMLError as exc:
        return _unavailable(f"query failed: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    names = sorted({gpu.name for gpu in gpus})
    return GpuInventory(
        nvml="ok",
        driver_version=driver,
        count=len(gpus),
        gpus=gpus,
        summary=f"{len(gpus)} GPU(s) {', '.join(names)} driver {driver}",
    )


def _unavailable(reason: str) -> GpuInventory:
    return GpuInventory(
        nvml=f"unavailable ({reason})", summary=f"0 GPUs, nvml unavailable ({reason})"
    )
