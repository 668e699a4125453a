"""GPU health: NVML and kernel signals, verdicts with repair actions, GPU leases.

- ``signals``: what is read (plain data), ``nvml``: the NVML boundary (the only importer of
  nvidia-ml-py), ``kmsg``: kernel XID lines and the PCI count, ``xid``: NVIDIA's XID catalogue,
  ``verdict``: pure judgement with hysteresis, ``leases``: GPU leases in the state store,
  ``service``: the component (``GpuService``), ``cli``: `gpud gpus ...`.

``read_inventory`` reads NVML once without the component (the agent's start-up line and
``python -m gpud.gpus``).
"""

from __future__ import annotations

import msgspec

from gpud.gpus.signals import number


class Gpu(msgspec.Struct, kw_only=True):
    index: int
    uuid: str
    name: str
    memory_total_mib: int | None
    memory_used_mib: int | None


class GpuInventory(msgspec.Struct, kw_only=True):
    # "ok", or "unavailable (<reason>)" when NVML cannot be used.
    nvml: str
    driver_version: str | None = None
    count: int = 0
    gpus: list[Gpu] = []
    summary: str = ""


def read_inventory(module: str = "pynvml") -> GpuInventory:
    """Query NVML once. Never raises: a missing driver or library is reported, not fatal."""
    # Here, not at the top: every `gpud` command imports this package (gpud.gpus.cli), and
    # the NVML boundary (ctypes, threads) is a tenth of `gpud status`'s start-up.
    from gpud.gpus import nvml as nvml_io

    try:
        nvml = nvml_io.load(module)
    except ImportError as exc:
        return _unavailable(f"nvidia-ml-py not importable: {exc}")
    node = nvml_io.read_node(nvml, pci_functions=None)
    if not node.nvml_available:
        return _unavailable(node.nvml)
    gpus = [
        Gpu(
            index=g.index,
            uuid=g.uuid,
            name=g.name,
            memory_total_mib=_int(g.memory_total_mib),
            memory_used_mib=_int(g.memory_used_mib),
        )
        for g in node.gpus
    ]
    names = sorted({g.name for g in gpus})
    return GpuInventory(
        nvml="ok",
        driver_version=node.driver_version,
        count=len(gpus),
        gpus=gpus,
        summary=f"{len(gpus)} GPU(s) {', '.join(names)} driver {node.driver_version}",
    )


def _int(value: object) -> int | None:
    n = number(value)
    return None if n is None else int(n)


def _unavailable(reason: str) -> GpuInventory:
    return GpuInventory(
        nvml=f"unavailable ({reason})", summary=f"0 GPUs, nvml unavailable ({reason})"
    )
