"""A head deposed for an unreachable GCS, with real gpud + serf + `ray start` in namespaces.

The head's GCS port blocked (nftables drop on the head; gossip and peer API open): a majority
of its workers cannot reach it, so it steps down and another node leads. The deposed head
rejoins at once as a worker of the new head (3 Ray nodes during the fault, not 2); while the
port stays blocked `gpud doctor` fails on the other nodes naming that GCS, and on the deposed
head naming its own; once unblocked, within 30 s the other nodes stop reporting it, their
probes end the deposed head's cool-down (it may lead again, though the new head keeps the
role), and all 3 Ray nodes are in one cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import faults
from tests.harness.gpud_node import Cluster, GpudNode, problems, wait_for
from tests.harness.ray_cluster import (
    RAY_EXECUTABLE,
    STEADY_S,
    agreed_head,
    describe,
    one_ray_cluster,
    ray_overrides,
)

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason=f"no {RAY_EXECUTABLE}"),
]

# A deposed head's worker Ray starts (10-20 s on 2 busy cores) and the head's GCS poll
# (every 10 s) lists it.
REJOIN_S = 60.0
DIAGNOSE_S = 60.0
HEALED_S = 30.0


def ray_nodes_in(node: GpudNode, gcs: str) -> set[str] | None:
    """The Ray nodes ``node`` last saw alive in the GCS at ``gcs`` (None: not asked there)."""
    seen = node.api("/v1/ray")["ray_nodes"]
    if seen["gcs_address"] != gcs or seen["nodes"] is None:
        return None
    return {n["name"] for n in seen["nodes"]}


def doctor(node: GpudNode) -> tuple[int, str]:
    # Doctor probes now, and waits out connect timeouts to a blocked port: more than the
    # CLI's default deadline for a plain status read.
    done = node.cli("doctor", "--timeout", "60", check=False, timeout=120)
    return done.returncode, done.stdout + done.stderr


def test_deposed_head_rejoins_as_worker_and_doctor_names_the_blocked_gcs(
    cluster: Callable[..., Cluster], temp_root: str
) -> None:
    c = cluster(3, overrides=ray_overrides(temp_root))
    nodes = list(c)
    names = {n.name for n in nodes}
    by_name = {n.name: n for n in nodes}
    head, term, gcs = one_ray_cluster(nodes, STEADY_S)
    h0 = by_name[head]
    others = [n for n in nodes if n is not h0]
    with faults.block_port(h0.host, gcs):
        blocked_at = time.monotonic()
        moved, new_term, new_gcs = wait_for(
            lambda: (found := agreed_head(nodes)) and found[0] != head and found,
            STEADY_S,
            0.5,
            what=f"a head other than {head}",
            describe=describe(nodes),
        )
        elected_at = time.monotonic()
        assert new_term > term
        new_address = f"{by_name[moved].addr}:{new_gcs}"
        # The deposed head runs Ray as a worker of the new head at once: 3 Ray nodes.
        wait_for(
            lambda: (
                ray_nodes_in(by_name[moved], new_address) == names
                and h0.api("/v1/ray")["role"] == "worker"
            ),
            REJOIN_S,
            0.5,
            what=f"{head} back as a Ray worker of {moved}",
            describe=describe(nodes),
        )
        rejoined_at = time.monotonic()
        ray = h0.api("/v1/ray")
        assert ray["head"] == moved and ray["process"]["target"]["role"] == "worker", ray
        assert ray["stepped_down"]["address"] == f"{h0.addr}:{gcs}", ray
        # The other nodes keep probing the port it stepped down for, and say it is blocked.
        wait_for(
            lambda: all(
                any(p["subject"] == head for p in problems(n, "ray.gcs_unreachable"))
                for n in others
            ),
            DIAGNOSE_S,
            0.5,
            what=f"ray.gcs_unreachable naming {head} on {[n.name for n in others]}",
            describe=describe(nodes),
        )
        for node in others:
            code, text = doctor(node)
            assert code != 0, text
            assert "ray.gcs_unreachable" in text and f"{h0.addr}:{gcs}" in text, text
            assert f"a firewall on {head} blocks tcp/{gcs}" in text, text
        code, text = doctor(h0)
        assert code != 0, text
        assert "ray.head_gcs_unreachable" in text and f"{h0.addr}:{gcs}" in text, text
        # The new head stays: the deposed one sits out the election, it does not stand again.
        assert agreed_head(nodes) is not None and agreed_head(nodes)[0] == moved  # type: ignore[index]
    unblocked_at = time.monotonic()

    def healed() -> bool:
        found = agreed_head(nodes)
        if found is None or found[0] != moved:
            return False
        if any(ray_nodes_in(n, new_address) != names for n in nodes):
            return False
        # The others' probes pass again: that ends the deposed head's cool-down too.
        if h0.api("/v1/ray")["stepped_down"] is not None:
            return False
        return not any(
            p["subject"] == head for n in others for p in problems(n, "ray.gcs_unreachable")
        )

    wait_for(
        healed,
        HEALED_S,
        0.5,
        what=f"one cluster of 3 Ray nodes under {moved}, {head}'s GCS port no longer reported",
        describe=describe(nodes),
    )
    for node in others:
        code, text = doctor(node)
        assert "ray.gcs_unreachable" not in text, text
    code, text = doctor(h0)
    assert "ray.head_gcs_unreachable" not in text, text
    assert h0.api("/v1/ray")["not_eligible_reason"] is None
    assert agreed_head(nodes) is not None and agreed_head(nodes)[0] == moved  # type: ignore[index]
    print(
        f"deposed after {elected_at - blocked_at:.1f} s, rejoined as worker "
        f"{rejoined_at - elected_at:.1f} s after the new head, healed "
        f"{time.monotonic() - unblocked_at:.1f} s after unblocking"
    )
