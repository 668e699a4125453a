"""`deployments.vllm_executable`: the `vllm` gpud runs, checked by `gpud agent --check-config`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.harness import fake_vllm


def check(tmp_path: Path, executable: str | None, path: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "gpud.toml"
    # serf by its path: the PATH given is only about where vllm is found.
    text = (
        f'[node]\nname = "a"\n[paths]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[serf]\nbinary = "{shutil.which("serf")}"\n'
    )
    if executable is not None:
        text += f'[deployments]\nvllm_executable = "{executable}"\n'
    cfg.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "gpud", "agent", "--config", str(cfg), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": path},
    )


def test_a_configured_vllm_that_cannot_run_is_one_error_line(tmp_path: Path) -> None:
    result = check(tmp_path, str(tmp_path / "no" / "vllm"), os.environ["PATH"])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "deployments.vllm_executable" in result.stderr and "not an executable" in result.stderr


def test_the_default_vllm_missing_is_a_warning_and_found_is_quiet(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = check(tmp_path, None, str(empty))
    assert result.returncode == 0, result.stderr
    assert "warning: deployments.vllm_executable: 'vllm' is not on PATH" in result.stderr
    bin_dir = fake_vllm.install(tmp_path / "bin").parent
    result = check(tmp_path, None, str(bin_dir))
    assert result.returncode == 0 and "vllm_executable" not in result.stderr, result.stderr
    result = check(tmp_path, str(bin_dir / "vllm"), str(empty))
    assert result.returncode == 0 and "vllm_executable" not in result.stderr, result.stderr
