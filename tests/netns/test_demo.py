"""README's first command: the demo brings up a cluster, prints status from every host, cleans up."""

from __future__ import annotations

import re
import subprocess
import sys


def _namespaces(prefix: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.startswith(prefix)}


def test_demo_prints_status_from_every_host_and_tears_down() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.harness.demo", "--hosts", "2", "--timeout", "90"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for host in ("h0", "h1"):
        assert f"===== {host}  netns" in result.stdout
    assert len(re.findall(r"^membership +2 \(2 alive\)$", result.stdout, re.M)) == 2
    assert len(re.findall(r"^health +passing", result.stdout, re.M)) == 2
    assert "confirmed" in result.stdout
    # The demo deployment's replicas serve through the router of a host other than the first
    # replica's (with 2 hosts and R=2 every host runs one).
    assert re.search(r"^ +0 +ready +h[01] ", result.stdout, re.M), result.stdout
    asked = re.search(
        r"^router of (h[01]): GET http://10\.77\.\d+\.(\d+):7950/v1/models -> models \['demo/tiny'\]$",
        result.stdout,
        re.M,
    )
    assert asked, result.stdout
    served = re.search(
        rf"^router of {asked.group(1)}: POST http://10\.77\.\d+\.{asked.group(2)}:7950/v1/completions"
        r" -> 'ok' from replica 10\.77\.\d+\.\d+:\d+$",
        result.stdout,
        re.M,
    )
    assert served, result.stdout
    # The harness names its namespaces gh<id>- after the third octet of its subnet.
    subnet = re.search(r"subnet 10\.77\.(\d+)\.0/24", result.stdout)
    assert subnet, result.stdout
    assert not _namespaces(f"gh{subnet.group(1)}-"), "the demo left namespaces behind"
