"""scripts/gpu-check.sh: the real NVML path once, every signal and verdict, and its exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gpud.gpus.signals import SOURCES
from tests.harness import fake_nvml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def check(config: Path | None, nvml_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    if nvml_file is not None:
        env[fake_nvml.ENV] = str(nvml_file)
    args = [str(SCRIPT)] + ([str(config)] if config else [])
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)


def fake_config(tmp_path: Path, state: dict) -> Path:
    fake_nvml.write_state(tmp_path / "nvml.json", state)
    (tmp_path / "kmsg").write_text("")
    config = tmp_path / "gpud.toml"
    config.write_text(
        f'[gpus]\nnvml_module = "tests.harness.fake_nvml"\nkmsg_path = "{tmp_path / "kmsg"}"\n'
        f'pci_root = "{tmp_path / "pci"}"\n'
    )
    return config


def test_healthy_gpus_pass_and_every_signal_is_printed(tmp_path: Path) -> None:
    result = check(fake_config(tmp_path, fake_nvml.node(2)), tmp_path / "nvml.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "node: healthy (2/2 GPUs healthy)" in result.stdout
    assert "driver 550.54.15, CUDA 12.4" in result.stdout
    for name in SOURCES:
        assert result.stdout.count(f"  {name} ") == 2, name


def test_an_unhealthy_gpu_fails_with_its_repair_action(tmp_path: Path) -> None:
    state = fake_nvml.node(2)
    state["devices"][1]["readings"]["remapped_rows"] = [0, 0, 0, 1]
    result = check(fake_config(tmp_path, state), tmp_path / "nvml.json")
    assert result.returncode == 1
    assert "verdict: unhealthy: row remapping failed" in result.stdout
    assert "repair action: inspect_hardware" in result.stdout


def test_without_nvml_it_says_so(tmp_path: Path) -> None:
    state = fake_nvml.node(0, init="library_not_found")
    result = check(fake_config(tmp_path, state), tmp_path / "nvml.json")
    assert result.returncode == 2
    assert "NVML unavailable: NVML Shared Library Not Found" in result.stdout
    # The real nvidia-ml-py on this machine: a healthy GPU host passes, any other says why.
    real = check(None)
    assert real.returncode == 0 or "NVML unavailable" in real.stdout, real.stdout + real.stderr
