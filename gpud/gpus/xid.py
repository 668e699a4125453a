"""NVIDIA's published XID catalogue (docs.nvidia.com/deploy/xid-errors): what each XID means and
the repair action it calls for, in the vocabulary of leptonai/gpud.

An XID not in the table is reported with its number and "inspect the hardware" as the safe
default: an operator looks it up rather than gpud guessing.
"""

from __future__ import annotations

from typing import Literal

import msgspec

RepairAction = Literal["none", "restart_app", "reset_gpu", "reboot_host", "inspect_hardware"]

# The words operators see next to each action.
ACTION_TEXT: dict[RepairAction, str] = {
    "none": "no action needed",
    "restart_app": "restart the application using this GPU",
    "reset_gpu": "stop the GPU's workloads and reset the GPU (nvidia-smi -r -i <index>)",
    "reboot_host": "drain the host and reboot it",
    "inspect_hardware": "drain the host and have the hardware inspected (RMA if it repeats)",
}


class XidInfo(msgspec.Struct, frozen=True):
    name: str
    action: RepairAction


CATALOGUE: dict[int, XidInfo] = {
    8: XidInfo("GPU stopped processing (driver error or hang)", "reset_gpu"),
    13: XidInfo("Graphics engine exception (application fault)", "restart_app"),
    31: XidInfo("GPU memory page fault (application fault)", "restart_app"),
    32: XidInfo("Invalid or corrupted push buffer stream", "restart_app"),
    38: XidInfo("Driver firmware error", "reset_gpu"),
    43: XidInfo("GPU stopped processing (application fault)", "restart_app"),
    45: XidInfo("Preemptive cleanup, due to previous errors", "none"),
    48: XidInfo("Double-bit ECC error", "reset_gpu"),
    61: XidInfo("Internal micro-controller breakpoint/warning", "reset_gpu"),
    62: XidInfo("Internal micro-controller halt", "reset_gpu"),
    63: XidInfo("ECC page retirement or row remapping recorded", "none"),
    64: XidInfo("ECC page retirement or row remapping recording failure", "reset_gpu"),
    68: XidInfo("NVDEC0 exception", "restart_app"),
    69: XidInfo("Graphics engine class error", "restart_app"),
    74: XidInfo("NVLink error", "reset_gpu"),
    79: XidInfo("GPU has fallen off the bus", "reboot_host"),
    92: XidInfo("High single-bit ECC error rate", "none"),
    94: XidInfo("Contained ECC error (application restart needed)", "restart_app"),
    95: XidInfo("Uncontained ECC error", "reset_gpu"),
    109: XidInfo("Context switch timeout", "restart_app"),
    119: XidInfo("GSP RPC timeout", "reset_gpu"),
    120: XidInfo("GSP error", "reset_gpu"),
    121: XidInfo("C2C link error", "reset_gpu"),
    140: XidInfo("Unrecovered ECC error", "reset_gpu"),
    143: XidInfo("GPU initialization failure", "reset_gpu"),
    154: XidInfo("GPU recovery action changed", "reset_gpu"),
}


def describe(xid: int) -> XidInfo:
    """The catalogue entry of ``xid``; unknown XIDs ask for an inspection."""
    return CATALOGUE.get(xid) or XidInfo(f"XID {xid} (not in gpud's catalogue)", "inspect_hardware")
