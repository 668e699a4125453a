"""A replica of two nodes (its own Ray cluster) outlives the gpud of either of its hosts, on
real gpud + serf + Ray in the namespace harness (fake GPUs).

3 hosts; R=1, N=2, G=1 of the stand-in server, which joins its replica's Ray cluster as a
driver and serves only once that cluster has both nodes. A client on the third host sends
completions back to back straight to the replica (the `openai` client) while the gpud of the
replica's worker host, then of its head host, is stopped gracefully and started again, then
killed with SIGKILL alone and started again. Not one request fails; the server keeps its pid
and port, each host's Ray node of the replica its pid (never restarted), the replica's GCS
lists exactly its two nodes alive, and every lease of the replica belongs to the gpud that runs
now.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpud.process_groups import process_start
from tests.harness import fake_nvml
from tests.harness.deployments import SERVER, operated_cluster, ready_everywhere
from tests.harness.gpud_node import GpudNode, wait_for
from tests.harness.ray_cluster import RAY_EXECUTABLE
from tests.harness.router_cluster import background_load, records

pytestmark = [
    pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason="Ray is not installed"),
]

READY_S = 300.0
ADOPT_S = 60.0
# Load before the first fault and after each adoption.
SETTLE_S = 4.0
MODEL = "pair-model"


@pytest.fixture
def ray_temp() -> Iterator[str]:
    # Short: Ray's unix socket paths under it must fit in 107 bytes.
    path = tempfile.mkdtemp(prefix="gdr", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def replica_view(node: GpudNode) -> dict[str, Any] | None:
    views = node.api("/v1/deployments/pair")["replica_views"]
    return views[0] if views else None


def leases(node: GpudNode) -> list[tuple[str, int | None]]:
    """The deployments' GPU and port leases on ``node`` as (owner, owner pid)."""
    gpus = [(g["owner"], g["pid"]) for g in node.api("/v1/gpus/leases")]
    ports = [(p["owner"], p["pid"]) for p in node.api("/v1/ports/leases")]
    return sorted(lease for lease in gpus + ports if lease[0].startswith("deploy:"))


@pytest.mark.timeout(900)
def test_two_node_replica_outlives_gpud_restarts_on_its_worker_and_head(
    cluster: Any, tmp_path: Path, ray_temp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = tmp_path / "nvml.json"
    fake_nvml.write_state(nvml, fake_nvml.node(2))
    monkeypatch.setenv(fake_nvml.ENV, str(nvml))
    c, key = operated_cluster(
        cluster,
        tmp_path,
        3,
        {"command_allow": [sys.executable]},
        ray={"executable": RAY_EXECUTABLE, "num_cpus": 1, "temp_root": ray_temp},
    )
    command = [sys.executable, SERVER, "--port", "{port}", "--host", "{host_ip}",
               "--model", "{model}", "--ray-nodes", "2"]  # fmt: skip
    spec = tmp_path / "pair.toml"
    spec.write_text(
        f'name = "pair"\nengine = "command"\nmodel = "{MODEL}"\nreplicas = 1\n'
        'nodes_per_replica = 2\ngpus_per_node = 1\nhealth_path = "/health"\n'
        f"command = {json.dumps(command)}\n"
    )
    c[0].cli("deploy", "apply", str(spec), "--key", str(key))
    found = wait_for(
        lambda: ready_everywhere(c.nodes, "pair", 1),
        READY_S,
        1.0,
        what="the replica of 2 nodes ready",
        describe=lambda: "\n".join(
            n.cli("deploy", "status", "pair", check=False).stdout for n in c
        ),
    )
    [(head_name, port)] = found["endpoints"]
    by_name = {n.name: n for n in c}
    head = by_name[head_name]
    view = replica_view(head)
    assert view is not None
    worker = by_name[next(n for n in view["nodes"] if n != head_name)]
    client = next(n for n in c if n not in (head, worker))

    def models() -> dict[str, Any]:
        fetch = client.host.run(
            [sys.executable, "-c", "import urllib.request;print(urllib.request.urlopen("
             f"'http://{head.addr}:{port}/v1/models',timeout=5).read().decode())"]
        )  # fmt: skip
        return json.loads(fetch.stdout)["gpud"]

    def pids() -> dict[str, Any]:
        """The server's pid and each host's Ray node of the replica (pid, restarts)."""
        views = {n.name: replica_view(n) or {} for n in (head, worker)}
        rays = {name: (v.get("ray_pid"), v.get("ray_restarts")) for name, v in views.items()}
        return {"server": (views[head_name].get("pid"), views[head_name].get("port")), **rays}

    before = pids()
    server_pid = before["server"][0]
    assert server_pid and all(before[n.name][0] for n in (head, worker)), before
    cluster_nodes = sorted([head.addr, worker.addr])
    assert sorted(models()["ray"]["nodes"]) == cluster_nodes

    adopted: list[tuple[str, float]] = []
    bases = {"direct": f"http://{head.addr}:{port}/v1"}
    with background_load(client.host, bases, tmp_path, MODEL) as files:
        time.sleep(SETTLE_S)
        for node, fault in ((worker, "sigterm"), (head, "sigterm"), (worker, "kill9"),
                            (head, "kill9")):  # fmt: skip
            step = f"{fault} of {'head' if node is head else 'worker'}"
            assert node.proc is not None
            if fault == "kill9":
                os.kill(node.proc.pid, signal.SIGKILL)
                node.proc.wait(timeout=10)
            else:
                assert node.terminate() == 0, node.log_tail()
            began, seen = time.monotonic(), node.log_text().count("replica adopted")
            node.start()
            wait_for(
                lambda node=node, seen=seen: (
                    node.log_text().count("replica adopted") > seen
                    and (v := replica_view(node)) is not None
                    and v["state"] == "ready"
                ),
                ADOPT_S,
                0.2,
                what=f"the replica adopted after the {step}",
                describe=lambda node=node: f"{replica_view(node)}\n{node.log_tail()}",
            )
            adopted.append((step, round(time.monotonic() - began, 1)))
            time.sleep(SETTLE_S)
            assert pids() == before, (step, before, pids())
            info = models()
            assert info["pid"] == server_pid and sorted(info["ray"]["nodes"]) == cluster_nodes
            for n in (head, worker):
                owned = leases(n)
                assert owned and {pid for _, pid in owned} == {n.pid}, (step, n.name, owned)
    print("adopted (step, s after the start):", adopted)
    loaded = records(files["direct"])
    failed = [r for r in loaded if not r["ok"]]
    span = loaded[-1]["sent"] - loaded[0]["sent"]
    print(f"direct: {len(loaded)} requests in {span:.0f} s, {len(failed)} failed")
    assert not failed, failed[:5]
    assert len(loaded) / span >= 20, (len(loaded), span)
    for n in (head, worker):
        refused = [line for line in n.log_text().splitlines() if "not adopting" in line]
        assert not [line for line in refused if "pair.0" in line], refused

    # Deleted: what the adopted replica ran stops on both hosts (nothing is left running for
    # a next gpud), and its leases are released.
    processes = [before["server"][0], before[head.name][0], before[worker.name][0]]
    starts = [process_start(pid) for pid in processes]
    assert None not in starts
    c[0].cli("deploy", "delete", "pair", "--key", str(key))
    wait_for(
        lambda: (
            all(process_start(p) != s for p, s in zip(processes, starts, strict=True))
            and not leases(head)
            and not leases(worker)
        ),
        60.0,
        0.5,
        what="the deleted replica's server and Ray nodes stopped, its leases released",
        describe=lambda: f"{[process_start(p) for p in processes]} {leases(head)} {leases(worker)}",
    )
