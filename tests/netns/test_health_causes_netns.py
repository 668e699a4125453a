"""Causes that match the evidence, with real gpud + serf in namespaces: a
frozen gpud (SIGSTOP; its serf keeps gossiping) and a dead one (kill -9 of gpud) are named as
such by the other hosts, not as "a firewall passes gossip but blocks other ports"."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest

from tests.harness.gpud_node import Cluster, GpudNode, wait_for

pytestmark = [pytest.mark.netns]

# Three failed rounds of 2 s each, on 2 busy cores.
VERDICT_S = 60.0


def pair(node: GpudNode, peer: str) -> dict[str, Any] | None:
    return next((p for p in node.api("/v1/health")["pairs"] if p["peer"] == peer), None)


def wait_message(observer: GpudNode, peer: GpudNode, prefix: str) -> dict[str, Any]:
    def said() -> dict[str, Any] | None:
        found = pair(observer, peer.name)
        return found if found is not None and found["message"].startswith(prefix) else None

    return wait_for(
        said,
        VERDICT_S,
        0.5,
        what=f"{observer.name} says {prefix!r}",
        describe=lambda: str(pair(observer, peer.name)),
    )


def test_frozen_and_dead_gpud_are_named_as_such(cluster: Callable[..., Cluster]) -> None:
    c = cluster(3)
    c.wait_converged()
    h0, h2 = c[0], c[2]
    assert h2.pid is not None
    wait_for(
        lambda: (pair(h0, h2.name) or {}).get("state") == "passing",
        VERDICT_S,
        0.5,
        what="h0 -> h2 passing",
    )
    os.kill(h2.pid, signal.SIGSTOP)
    try:
        frozen = wait_message(h0, h2, f"gpud on {h2.name} is hung or a firewall drops: ")
        assert frozen["state"] == "critical"
        assert "firewall passes gossip" not in frozen["fix"]
    finally:
        os.kill(h2.pid, signal.SIGCONT)
    wait_for(
        lambda: (pair(h0, h2.name) or {}).get("state") == "passing",
        VERDICT_S,
        0.5,
        what="h0 -> h2 passing again after SIGCONT",
    )
    # gpud alone dies (kill -9 of its pid): whether or not its serf outlives it, the others
    # say gpud is not running there, never that a firewall blocks ports.
    serf = h2.serf_pid()
    assert serf is not None
    serf_group = os.getpgid(serf)
    try:
        os.kill(h2.pid, signal.SIGKILL)

        def named() -> dict[str, Any] | None:
            found = pair(h0, h2.name)
            return (
                found if found is not None and "gpud is not running" in found["message"] else None
            )

        dead = wait_for(
            named,
            VERDICT_S,
            0.5,
            what="h0 says gpud is not running on h2",
            describe=lambda: str(pair(h0, h2.name)),
        )
        assert dead["state"] == "critical", dead
        assert "firewall passes gossip" not in dead["fix"], dead
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(serf_group, signal.SIGKILL)
