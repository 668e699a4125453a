"""README's first command: the demo brings up a cluster, prints status from every host, cleans up."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.netns


def _gh_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.startswith("gh")}


def test_demo_prints_status_from_every_host_and_tears_down() -> None:
    before = _gh_namespaces()
    result = subprocess.run(
        [sys.executable, "-m", "tests.harness.demo", "--hosts", "2", "--timeout", "90"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for host in ("h0", "h1"):
        assert f"===== {host}  netns" in result.stdout
    assert result.stdout.count("members  2 (2 alive)") == 2
    assert result.stdout.count("health   passing") == 2
    assert "confirmed" in result.stdout
    assert _gh_namespaces() <= before, "the demo left namespaces behind"
