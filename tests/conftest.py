"""Shared pytest setup: skip `netns` tests where namespaces cannot be made; harness fixtures."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from gpud import secret
from tests.harness.agent import RunningAgent
from tests.harness.gpud_node import Cluster
from tests.harness.netns import Network, cleanup_leftovers

# Property tests check what the deciders decide, not how fast: a per-example deadline only
# measures how loaded the machine is (performance is measured by bench/, not by tests).
settings.register_profile("gpud", deadline=None)
settings.load_profile("gpud")


@functools.cache
def netns_unusable() -> str | None:
    """Why network-namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (creates network namespaces, veths, a bridge and nftables rules)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (Debian packages iproute2, nftables)"
    probe = f"ghprobe{os.getpid()}"
    try:
        made = subprocess.run(
            ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10
        )
        if made.returncode != 0:
            return f"`ip netns add` fails here: {made.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10, check=False)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    for item in items:
        if item.get_closest_marker("netns") is None:
            continue
        reason = reason or netns_unusable() or ""
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"netns: {reason}"))


@pytest.fixture(scope="session")
def _harness_leftovers_removed() -> None:
    """Once per session: remove namespaces left by crashed harness runs (owner process gone)."""
    cleanup_leftovers()


@pytest.fixture
def network(_harness_leftovers_removed: None) -> Iterator[Callable[..., Network]]:
    """Factory: ``network(hosts=3)`` returns a started Network, torn down after the test."""
    made: list[Network] = []

    def make(hosts: int = 3, **kwargs: Any) -> Network:
        net = Network(hosts, **kwargs)
        made.append(net)
        return net.start()

    try:
        yield make
    finally:
        for net in reversed(made):
            net.close()


@pytest.fixture
def cluster(_harness_leftovers_removed: None, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Factory: ``cluster(size=3, overrides=..., ...)`` returns a started Cluster of real gpud
    nodes (configs and logs under tmp_path), torn down after the test."""
    made: list[Cluster] = []

    def make(size: int = 3, **kwargs: Any) -> Cluster:
        kwargs.setdefault("workdir", tmp_path / f"cluster{len(made)}")
        c = Cluster(size, **kwargs)
        made.append(c)
        return c.start()

    try:
        yield make
    finally:
        for c in reversed(made):
            c.close()


@pytest.fixture
def bare_cluster(
    _harness_leftovers_removed: None, tmp_path: Path
) -> Iterator[Callable[[int], Cluster]]:
    """Factory: a Cluster whose network is up but which has no nodes yet (add them by hand)."""
    made: list[Cluster] = []

    def make(hosts: int) -> Cluster:
        c = Cluster(hosts, workdir=tmp_path / f"c{len(made)}")
        made.append(c)
        c.network.start()
        return c

    try:
        yield make
    finally:
        for c in reversed(made):
            c.close()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """A fresh cluster key file."""
    path = tmp_path / "cluster.key"
    path.write_text(secret.keygen())
    return path


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A temp dir with a short path (Unix socket names are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="gp-work-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    """One real `gpud agent` alone on loopback (tests/harness/agent.py), stopped after the test."""
    running = RunningAgent(tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def temp_root() -> Iterator[str]:
    """A Ray temp root for a test's cluster, removed after it: short, as Ray's socket paths
    live under it."""
    root = tempfile.mkdtemp(prefix="grh-")
    yield root
    shutil.rmtree(root, ignore_errors=True)
