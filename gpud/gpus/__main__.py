"""`python -m gpud.gpus check [CONFIG]`: read every GPU signal once through the real NVML path and
print it with the verdicts (scripts/gpu-check.sh). Exit 0 when the node has GPUs and all are
healthy, 1 when some are not, 2 when NVML is unavailable.

The gpus component alone, serving its routes: `python -m gpud.standalone gpus CONFIG`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gpud import config
from gpud.gpus import kmsg, nvml
from gpud.gpus.signals import XidEvent, signals_of
from gpud.gpus.verdict import assess
from gpud.gpus.xid import ACTION_TEXT


def _kernel_xids(path: str) -> tuple[list[XidEvent], str]:
    """XIDs in the kernel log so far (one pass, no following)."""
    found: list[XidEvent] = []
    try:
        kmsg.follow(path, kmsg.xid_records(found.append), stop=None)
    except OSError as exc:
        return [], f"not read: {path}: {exc.strerror or exc} (run as root to include kernel XIDs)"
    return found, f"read {path}"


def check(cfg: config.Config) -> int:
    gpus_cfg = cfg.gpus
    try:
        module = nvml.load(gpus_cfg.nvml_module)
    except ImportError as exc:
        print(f"NVML unavailable: module {gpus_cfg.nvml_module!r} not importable: {exc}")
        return 2
    pci = kmsg.count_nvidia_pci(Path(gpus_cfg.pci_root))
    readings = nvml.read_node(module, pci)
    xids, kmsg_state = _kernel_xids(gpus_cfg.kmsg_path)
    print(f"NVIDIA PCI GPU functions: {pci if pci is not None else 'unknown'}")
    print(f"kernel log: {kmsg_state}")
    if not readings.nvml_available:
        print(f"NVML unavailable: {readings.nvml}")
        result = assess(readings, None, xids, None, time.time(), gpus_cfg)
        print(f"node: {result.verdict.state}: {'; '.join(result.verdict.reasons)}")
        return 2
    print(f"NVML ok, driver {readings.driver_version}, CUDA {readings.cuda_version}")
    result = assess(readings, None, xids, None, time.time(), gpus_cfg)
    for gpu in readings.gpus:
        verdict = result.gpus[gpu.uuid].verdict
        assert verdict is not None
        print(f"\nGPU {gpu.index} {gpu.uuid} {gpu.name} pci {gpu.pci}")
        for signal in signals_of(gpu):
            print(f"  {signal.name:<28} {signal.value!s:<24} ({signal.source})")
        for name, error in gpu.errors.items():
            print(f"  error reading {name}: {error}")
        print(f"  verdict: {verdict.state}: {verdict.reason}")
        print(f"  repair action: {verdict.action} ({ACTION_TEXT[verdict.action]})")
    node = result.verdict
    print(
        f"\nnode: {node.state} ({node.healthy_gpus}/{node.gpus} GPUs healthy): "
        f"{'; '.join(node.reasons)}"
    )
    print(f"repair action: {node.action} ({ACTION_TEXT[node.action]})")
    return 0 if node.state == "healthy" and node.gpus > 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpud.gpus", description=__doc__)
    parser.add_argument("mode", choices=["check"])
    parser.add_argument("config", nargs="?", default=None, help="gpud config file")
    args = parser.parse_args(argv)
    cfg = config.load(config.config_path(args.config), missing_ok=args.config is None)
    return check(cfg)


if __name__ == "__main__":
    sys.exit(main())
