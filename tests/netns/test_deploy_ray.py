"""Multi-node replicas: one real Ray cluster per replica, in the namespace harness.

5 hosts with 2 fake GPUs each (fake NVML); deploy R=2, N=2, G=2 with the `command` engine
running tests/harness/deploy_server.py, which joins its replica's Ray cluster (RAY_ADDRESS from gpud)
and serves only once that cluster has its 2 nodes. Expect two Ray clusters of 2 nodes each, no
host in both, 4 GPUs per cluster, both endpoints ready from every host. Then kill -9 a worker
host of one replica: that replica takes the free host into its Ray cluster and is ready again;
the other replica never restarts.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import fake_nvml
from tests.harness.deployments import SERVER, operated_cluster, ready_everywhere
from tests.harness.gpud_node import wait_for
from tests.harness.ray_cluster import RAY_EXECUTABLE

pytestmark = [
    pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason="Ray is not installed"),
]

READY_S = 300.0


@pytest.fixture
def ray_temp() -> Iterator[str]:
    # Short: Ray's unix socket paths under it must fit in 107 bytes.
    path = tempfile.mkdtemp(prefix="gdr", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(600)
def test_two_replicas_of_two_nodes_each_run_their_own_ray_cluster(
    cluster: Any, tmp_path: Path, ray_temp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = tmp_path / "nvml.json"
    fake_nvml.write_state(nvml, fake_nvml.node(2))
    monkeypatch.setenv(fake_nvml.ENV, str(nvml))
    c, key = operated_cluster(
        cluster,
        tmp_path,
        5,
        {"command_allow": [sys.executable]},
        ray={"executable": RAY_EXECUTABLE, "num_cpus": 1, "temp_root": ray_temp},
    )
    command = [sys.executable, SERVER, "--port", "{port}", "--host", "{host_ip}"]
    spec = tmp_path / "big.toml"
    spec.write_text(
        'name = "big"\nengine = "command"\nreplicas = 2\nnodes_per_replica = 2\n'
        f"gpus_per_node = 2\ncommand = {json.dumps([*command, '--ray-nodes', '2'])}\n"
    )
    started = time.monotonic()
    c[0].cli("deploy", "apply", str(spec), "--key", str(key))

    def describe() -> str:
        return "\n".join(n.cli("deploy", "status", "big", check=False).stdout for n in c)

    found = wait_for(
        lambda: ready_everywhere(c.nodes, "big", 2),
        READY_S,
        1.0,
        what="2 ready replicas of 2 nodes",
        describe=describe,
    )
    print(f"apply -> 2 Ray-backed replicas ready: {time.monotonic() - started:.1f} s")

    views = c[0].api("/v1/deployments/big")["replica_views"]
    groups = [set(v["nodes"]) for v in views]
    assert all(len(g) == 2 for g in groups) and not groups[0] & groups[1], views
    addr_of = {n.name: n.addr for n in c}

    def models(head: str, port: int, group: set[str]) -> dict[str, Any]:
        """/v1/models of the replica whose head is ``head``, fetched from a host outside it."""
        other = next(n for n in c if n.name not in group and n.running())
        fetch = other.host.run(
            [
                sys.executable,
                "-c",
                "import urllib.request;print(urllib.request.urlopen("
                f"'http://{addr_of[head]}:{port}/v1/models',timeout=5).read().decode())",
            ]
        )
        return json.loads(fetch.stdout)["gpud"]

    servers = {}
    for head, port in found["endpoints"]:
        group = next(g for g in groups if head in g)
        info = models(head, port, group)
        # The replica's own cluster: exactly its two hosts, with their 2 leased GPUs each.
        assert sorted(info["ray"]["nodes"]) == sorted(addr_of[n] for n in group), info
        assert info["ray"]["gpus"] == 4, info
        assert info["ray"]["address"].startswith(f"{addr_of[head]}:"), info
        servers[head] = (port, info["pid"])

    # kill -9 the worker host of one replica: it takes the free host and is ready again.
    (head_a, port_a), (head_b, port_b) = found["endpoints"]
    group_a = next(g for g in groups if head_a in g)
    victim = next(n for n in c if n.name in group_a and n.name != head_a)
    free = next(n.name for n in c if not any(n.name in g for g in groups))
    victim.kill9()
    killed = time.monotonic()

    def recovered() -> bool:
        views = c[0].api("/v1/deployments/big")["replica_views"]
        view_a = next(v for v in views if v["node"] == head_a)
        if set(view_a["nodes"]) != {head_a, free} or view_a["state"] != "ready":
            return False
        info = models(head_a, port_a, {head_a, free})
        return sorted(info["ray"]["nodes"]) == sorted([addr_of[head_a], addr_of[free]])

    wait_for(
        recovered, READY_S, 1.0, what="replica re-formed with the free host", describe=describe
    )
    print(f"kill -9 of a worker host -> replica whole again: {time.monotonic() - killed:.1f} s")
    # The other replica never restarted: same server process, its Ray nodes never restarted.
    group_b = next(g for g in groups if head_b in g)
    assert models(head_b, port_b, group_b)["pid"] == servers[head_b][1]
    for node in (n for n in c if n.name in group_b):
        view = next(
            v for v in node.api("/v1/deployments/big")["replica_views"] if v["node"] == head_b
        )
        assert view["ray_restarts"] == 0 and view["restarts"] == 0, view
