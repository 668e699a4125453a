"""Multi-node replicas: one real Ray cluster per replica, in the namespace harness.

4 hosts with 2 fake GPUs each (fake NVML); deploy R=2, N=2, G=2 with the `command` engine
running tests/deploy_server.py, which joins its replica's Ray cluster (RAY_ADDRESS from gpud)
and serves only once that cluster has its 2 nodes. Expect two Ray clusters of 2 nodes each, no
host in both, 4 GPUs per cluster, both endpoints ready from every host.
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

from gpud.deployments import authority
from tests import fake_nvml
from tests.harness.gpud_node import Cluster, wait_for
from tests.ray_helpers import RAY_EXECUTABLE
from tests.test_deploy_cluster import SERVER, ready_everywhere

pytestmark = [
    pytest.mark.netns,
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
    private, public = authority.keygen()
    key = tmp_path / "operator.key"
    key.write_text(private + "\n")
    c: Cluster = cluster(
        4,
        overrides={
            "gpus": {"nvml_module": "tests.fake_nvml", "poll_interval_s": 0.5},
            "ray": {"executable": RAY_EXECUTABLE, "num_cpus": 1, "temp_root": ray_temp},
            "deployments": {"operators": [public], "command_allow": [sys.executable]},
        },
    )
    c.wait_converged()
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
    for head, port in found["endpoints"]:
        group = next(g for g in groups if head in g)
        other = next(n for n in c if n.name not in group)
        runner = addr_of[head]
        fetch = other.host.run(
            [
                sys.executable,
                "-c",
                "import urllib.request;print(urllib.request.urlopen("
                f"'http://{runner}:{port}/v1/models',timeout=5).read().decode())",
            ]
        )
        ray_info = json.loads(fetch.stdout)["gpud"]["ray"]
        # The replica's own cluster: exactly its two hosts, with their 2 leased GPUs each.
        assert sorted(ray_info["nodes"]) == sorted(addr_of[n] for n in group), ray_info
        assert ray_info["gpus"] == 4, ray_info
        assert ray_info["address"].startswith(f"{runner}:"), ray_info
