"""Deployments on real gpud + serf in the namespace harness, with fake GPUs (fake NVML).

One cluster of 3 hosts with 2 fake GPUs each, the `command` engine running tests/harness/deploy_server.py:
apply R=2 N=1 G=1 on host A -> both endpoints ready from every host; an unsigned spec and a
command outside the allow list are refused on every host with the reason; a spec change rolls
one replica at a time; kill -9 a host that runs a replica -> the replica is re-placed and ready
again; delete on host B without the operator's key -> refused there, nothing changes; signed ->
gone everywhere, and the killed host catches up on rejoin (the delete survives, nothing runs
there). A tombstone gossiped without an operator's signature is not applied where operators are
trusted.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gpud.deployments import authority
from gpud.state import DB_NAME
from tests.harness import fake_nvml, faults
from tests.harness.deployments import (
    FAKE_GPUS,
    READY_S,
    operated_cluster,
    ready_everywhere,
    spec_text,
)
from tests.harness.gpud_node import Cluster, GpudNode, wait_for


def status(node: GpudNode, name: str) -> dict[str, Any]:
    result = node.cli("deploy", "status", name, "--json", check=False)
    return json.loads(result.stdout)


def test_deploy_apply_refuse_failover_delete(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = tmp_path / "nvml.json"
    fake_nvml.write_state(nvml, fake_nvml.node(2))
    monkeypatch.setenv(fake_nvml.ENV, str(nvml))
    c, key_file = operated_cluster(cluster, tmp_path, 3, {"command_allow": [sys.executable]})
    a, b, _ = c.nodes

    def describe() -> str:
        return "\n".join(
            f"{n.name}: {n.cli('deploy', 'status', 'echo', check=False).stdout}"
            for n in c
            if n.running()
        )

    # A bad spec is a 400 naming the field, and nothing changes.
    bad = tmp_path / "bad.toml"
    bad.write_text(spec_text("echo").replace("replicas = 2", "replicas = -1"))
    result = a.cli("deploy", "apply", str(bad), check=False)
    assert result.returncode != 0 and "replicas" in result.stderr, result.stderr
    assert a.api("/v1/deployments")["deployments"] == []

    spec = tmp_path / "echo.toml"
    spec.write_text(spec_text("echo"))
    started = time.monotonic()
    a.cli("deploy", "apply", str(spec), "--key", str(key_file))
    found = wait_for(
        lambda: ready_everywhere(c.nodes, "echo", 2),
        READY_S,
        0.5,
        what="2 ready replicas",
        describe=describe,
    )
    print(f"apply -> 2 replicas ready on every node: {time.monotonic() - started:.1f} s")
    # Readiness is in the tags: every node sees each replica's head announce it ready (a peer's
    # probe over the data path passed), in the API and in `gpud deploy status`.
    wait_for(
        lambda: all(
            all(r["announced_ready"] for r in status(n, "echo")["replica_views"]) for n in c
        ),
        30,
        0.5,
        what="readiness announced in every replica's claim",
        describe=describe,
    )
    assert "ANNOUNCED" in b.cli("deploy", "status", "echo").stdout

    # The server runs with the leased GPU and the verified interface (read over the data path
    # from another host).
    node_name, port = found["endpoints"][0]
    runner = next(n for n in c if n.name == node_name)
    other = next(n for n in c if n.name != node_name)
    fetch = other.host.run(
        [
            sys.executable,
            "-c",
            f"import urllib.request;print(urllib.request.urlopen("
            f"'http://{runner.addr}:{port}/v1/models',timeout=5).read().decode())",
        ]
    )
    info = json.loads(fetch.stdout)["gpud"]
    assert info["cuda_visible_devices"].isdigit(), info
    assert info["nccl_socket_ifname"] and info["vllm_host_ip"] == runner.addr, info

    # Unsigned, and a command outside the allow list: refused everywhere, with the reason.
    unsigned = tmp_path / "unsigned.toml"
    unsigned.write_text(spec_text("unsigned", replicas=1))
    b.cli("deploy", "apply", str(unsigned))
    outside = tmp_path / "outside.toml"
    outside.write_text(spec_text("outside", replicas=1, argv0="/bin/sh"))
    b.cli("deploy", "apply", str(outside), "--key", str(key_file))
    for name, reason in (("unsigned", "not signed"), ("outside", "command_allow")):
        for node in c:
            view = wait_for(
                lambda node=node, name=name: status(node, name),
                30,
                0.5,
                what=f"{name} on {node.name}",
            )
            assert view["state"] == "refused" and reason in view["reason"], view
            assert all(r["state"] == "refused" for r in view["replica_views"]), view

    # A spec change rolls: one replica at a time, never fewer than R-1 ready on any node.
    spec.write_text(spec_text("echo").replace('"test-model"', '"test-model-2"'))
    a.cli("deploy", "apply", str(spec), "--key", str(key_file))
    new = a.api("/v1/deployments/echo")["digest"][:4]
    fewest_ready = 2

    def rolled() -> bool:
        nonlocal fewest_ready
        views = [n.api("/v1/deployments/echo")["replica_views"] for n in c]
        for replicas in views:
            fewest_ready = min(fewest_ready, sum(r["state"] == "ready" for r in replicas))
        return all(r["state"] == "ready" and r["spec"] == new for v in views for r in v)

    wait_for(rolled, READY_S, 0.2, what="the spec change rolled out", describe=describe)
    assert fewest_ready >= 1

    # kill -9 a host that runs a replica: it is re-placed on the free host and ready again.
    victim = runner
    survivors = [n for n in c if n is not victim]
    killed = time.monotonic()
    victim.kill9()
    wait_for(
        lambda: (
            (r := ready_everywhere(survivors, "echo", 2))
            and victim.name not in {e[0] for e in r["endpoints"]}
        ),
        READY_S,
        0.5,
        what="replica re-placed after kill -9",
        describe=describe,
    )
    print(f"kill -9 -> ready again: {time.monotonic() - killed:.1f} s")

    # Delete on another host than the one that applied: without the operator's key it is
    # refused there with the fix and nothing changes; signed, it is gone everywhere.
    deleter = next(n for n in survivors if n is not a) if a in survivors else survivors[0]
    before = deleter.api("/v1/deployments")["digest"]
    refused = deleter.cli("deploy", "delete", "echo", check=False)
    assert refused.returncode != 0 and "--key" in refused.stderr, refused.stderr
    assert deleter.api("/v1/deployments")["digest"] == before
    assert status(deleter, "echo")["state"] == "active"
    deleter.cli("deploy", "delete", "echo", "--key", str(key_file))
    for node in survivors:
        wait_for(
            lambda node=node: (
                "echo" in node.api("/v1/deployments")["deleted"]
                and node.api("/v1/status")["deployments"]["running_here"] == 0
            ),
            30,
            0.5,
            what=f"echo deleted on {node.name}",
        )
    # The killed host catches up on rejoin: the delete reached it, nothing runs there.
    victim.reap_children()
    victim.start()
    wait_for(
        lambda: "echo" in victim.api("/v1/deployments")["deleted"],
        60,
        0.5,
        what="the delete reaching the rejoined host",
    )
    time.sleep(3)
    assert victim.api("/v1/status")["deployments"]["running_here"] == 0
    assert victim.cli("deploy", "status", "echo", check=False).returncode != 0


def test_tombstone_gossiped_without_an_operator_signature_is_not_applied(
    cluster: Any, tmp_path: Path
) -> None:
    """A key-holding member whose config names no operators takes an unsigned delete and
    gossips the tombstone: the hosts that trust operators keep the deployment live and say
    why in `gpud deploy status`; the operator's signed delete then removes it everywhere."""
    private, public = authority.keygen()
    key_file = tmp_path / "operator.key"
    key_file.write_text(private + "\n")
    c: Cluster = cluster(
        3,
        overrides={"deployments": {"operators": [public], "command_allow": [sys.executable]}},
        node_overrides={2: {"deployments": {"operators": []}}},
    )
    c.wait_converged()
    a, b, forger = c.nodes
    spec = tmp_path / "kept.toml"
    spec.write_text(spec_text("kept", replicas=1))
    a.cli("deploy", "apply", str(spec), "--key", str(key_file))
    wait_for(
        lambda: all(
            "kept" in [d["name"] for d in n.api("/v1/deployments")["deployments"]] for n in c
        ),
        30,
        0.5,
        what="'kept' on every node",
    )
    forger.cli("deploy", "delete", "kept")
    assert "kept" in forger.api("/v1/deployments")["deleted"]
    for node in (a, b):
        view = wait_for(
            lambda node=node: (v := status(node, "kept"))["delete_refused"] and v,
            30,
            0.5,
            what=f"the unsigned delete refused on {node.name}",
        )
        assert view["state"] == "active" and "not signed" in view["delete_refused"], view
        assert "not signed" in node.cli("deploy", "status", "kept", check=False).stdout
    b.cli("deploy", "delete", "kept", "--key", str(key_file))
    wait_for(
        lambda: all("kept" in n.api("/v1/deployments")["deleted"] for n in c),
        30,
        0.5,
        what="the signed delete on every node",
    )


def test_deploy_minority_refused_and_partition_heals_to_one_state(
    cluster: Any, tmp_path: Path
) -> None:
    """Apply on A, partition C off: apply on C (minority) is a 409; apply on A and delete on B
    go on; after the heal every node holds the same records."""
    c: Cluster = cluster(3)
    c.wait_converged()
    a, b, lone = c.nodes
    files = {}
    for name in ("one", "two", "three"):
        files[name] = tmp_path / f"{name}.toml"
        files[name].write_text(spec_text(name, replicas=1))
    a.cli("deploy", "apply", str(files["one"]))
    wait_for(
        lambda: all(
            [d["name"] for d in n.api("/v1/deployments")["deployments"]] == ["one"] for n in c
        ),
        30,
        0.5,
        what="'one' on every node",
    )
    with faults.partition_groups([lone.host], [a.host, b.host]):
        wait_for(lambda: lone.alive_members() == {lone.name}, 60, 0.5, what="C alone")
        wait_for(lambda: a.alive_members() == {a.name, b.name}, 60, 0.5, what="A sees C gone")
        refused = lone.cli("deploy", "apply", str(files["two"]), check=False)
        assert refused.returncode != 0 and "majority" in refused.stderr, refused.stderr
        a.cli("deploy", "apply", str(files["three"]))
        b.cli("deploy", "delete", "one")
    c.wait_converged()

    def listing(n: GpudNode) -> tuple[str, list[str], list[str]]:
        doc = n.api("/v1/deployments")
        return doc["digest"], [d["name"] for d in doc["deployments"]], doc["deleted"]

    wait_for(
        lambda: all(listing(n) == listing(a) for n in c) and listing(a)[1:] == (["three"], ["one"]),
        60,
        0.5,
        what="one record set on every node after the heal",
        describe=lambda: str([listing(n) for n in c]),
    )


def test_gpud_crash_stops_its_orphaned_replica_and_starts_anew(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL of gpud alone leaves its replica's server running (its own process group); with
    the record of the spec it runs lost, the next gpud cannot adopt it (tests/*/test_adopt_*
    show the adoption): it stops exactly that group, releases the old leases and runs the
    replica again."""
    nvml = tmp_path / "nvml.json"
    fake_nvml.write_state(nvml, fake_nvml.node(2))
    monkeypatch.setenv(fake_nvml.ENV, str(nvml))
    private, public = authority.keygen()
    key_file = tmp_path / "operator.key"
    key_file.write_text(private + "\n")
    c: Cluster = cluster(
        1,
        overrides={
            "gpus": FAKE_GPUS,
            "deployments": {"operators": [public], "command_allow": [sys.executable]},
        },
    )
    (node,) = c.nodes
    spec = tmp_path / "solo.toml"
    spec.write_text(spec_text("solo", replicas=1))
    node.cli("deploy", "apply", str(spec), "--key", str(key_file))

    def server_pid() -> int | None:
        (view,) = node.api("/v1/deployments/solo")["replica_views"]
        return view["state"] == "ready" and view["pid"]

    old = wait_for(server_pid, READY_S, 0.5, what="solo ready")
    assert node.proc is not None
    # gpud and serf die; the server, in its own process group, survives (as on a real crash).
    node.kill9_serf()
    node.proc.kill()
    node.proc.wait(timeout=10)
    assert Path(f"/proc/{old}").exists(), "the server should outlive a SIGKILLed gpud"
    db = sqlite3.connect(node.dir / "state" / DB_NAME)
    with db:
        db.execute("DELETE FROM deployments_group_digests")
    db.close()
    node.start()
    new = wait_for(server_pid, READY_S, 0.5, what="solo ready after the restart")
    assert new != old
    wait_for(lambda: not Path(f"/proc/{old}").exists(), 15, 0.2, what="orphan stopped")
    leases = node.api("/v1/gpus/leases")
    owners = [lease["owner"] for lease in leases]
    assert owners == ["deploy:solo.0"], leases
