"""The router on real gpud + serf in the namespace harness, loaded with the real `openai` client.

3 hosts with 2 fake GPUs each, the `command` engine running tests/harness/deploy_server.py at R=2 and the
router on every host. Load (completions and chat, streamed and not) through the routers of all
3 hosts: the two replicas' counts are within ±20% of each other; one `x-session-id` lands on one
replica from every host. Then kill -9 of a replica's host during load through the other two
routers: only requests in flight at the kill fail, every request sent after it succeeds.
"""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness.gpud_node import GpudNode
from tests.harness.router_cluster import load, results, routed_cluster, start_load
from tests.harness.wait import wait_for


def refuses(node: GpudNode, port: int) -> bool:
    """Whether ``node``'s own address refuses a connection to ``port`` (asked from its host)."""
    probe = f"import socket; socket.create_connection(({node.addr!r}, {port}), timeout=1)"
    return node.host.run([sys.executable, "-c", probe], check=False).returncode != 0


def test_router_balances_sticks_and_survives_a_killed_host(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c, found, _ = routed_cluster(cluster, tmp_path, monkeypatch)
    replicas = {
        f"{n.addr}:{port}" for name, port in found["endpoints"] for n in c if n.name == name
    }

    # Balance: 3 routers, each deciding alone, split the load evenly over the two replicas.
    served = load(c.nodes, 8.0)
    failed = [r for r in served if not r["ok"]]
    assert not failed, failed[:3]
    counts = collections.Counter(r["replica"] for r in served)
    print(f"balance through 3 routers: {dict(counts)} of {len(served)} requests")
    assert set(counts) == replicas, counts
    low, high = min(counts.values()), max(counts.values())
    assert low >= 0.8 * high, counts

    # Affinity: one session id goes to one replica, whichever router it enters.
    for session in ("session-a", "session-b", "session-c"):
        stuck = load(c.nodes, 1.0, workers=1, session=session)
        assert stuck and all(r["ok"] for r in stuck), stuck[:3]
        landed = {r["replica"] for r in stuck}
        print(f"{session}: {len(stuck)} requests through 3 routers -> {landed}")
        assert len(landed) == 1, landed

    # kill -9 of a replica's host during load through the two other hosts' routers.
    victim = next(n for n in c if n.name == found["endpoints"][0][0])
    survivors = [n for n in c if n is not victim]
    procs = [start_load(n, 12.0) for n in survivors]
    # Every loader is under way (its first request done) before the kill.
    firsts = [p.stdout.readline() if p.stdout else "" for p in procs]
    time.sleep(2.0)
    # "After the kill" is once the victim's replica refuses connections: until its process
    # has exited, its listener still completes handshakes, and a request written on one dies
    # with it, in flight (nothing can tell it from one the engine was running).
    killing = time.time()
    victim.kill9()
    port = dict(found["endpoints"])[victim.name]
    wait_for(lambda: refuses(victim, port), 10, 0.05, what="the killed replica's port refused")
    killed = time.time()
    served = [r for p, first in zip(procs, firsts, strict=True) for r in results(p, 12.0, first)]
    failed = [r for r in served if not r["ok"]]
    after = [r for r in served if r["sent"] >= killed]
    print(
        f"kill -9 of {victim.name} during load: {len(served)} requests, "
        f"{len(served) - len(after)} sent before the kill, {len(failed)} failed (in flight at "
        f"the kill), {len(after)} sent after it"
    )
    assert len(after) < len(served), "the load began after the kill"
    # A failed request was in flight at the kill: sent before it returned, finished after it
    # began; at most one per loader worker can be.
    assert all(r["sent"] < killed and killing <= r["done"] for r in failed), failed
    assert len(failed) <= 4 * len(survivors), failed
    assert after and all(r["ok"] for r in after), [r for r in after if not r["ok"]][:3]
