"""Port-block theft, tried against real gpud agents: a plain `serf agent` holding the
cluster key announces the victim's confirmed block (tags ``blk``, ``bc``) with an earlier
confirmation time, on the victim's address or from another host with a spoofed advertise
address. The victim keeps its block (no lease is refused, nothing dropped), says whom it
refused (``ports.claim_refused``), and still holds the block after the rogue is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from gpud.tags import Tags, encode
from tests.harness.gpud_node import PEER_PORT, Cluster, GpudNode, wait_for

ROGUE_PORT = 7990


def block_of(node: GpudNode) -> tuple[str, int | None]:
    ports = node.api("/v1/ports")
    return ports["state"], ports["block"]


def refusals(node: GpudNode) -> list[dict[str, Any]]:
    return [p for p in node.api("/v1/status")["problems"] if p["code"] == "ports.claim_refused"]


def start_rogue(
    cluster: Cluster, host_index: int, advertise: str, blk: int, workdir: Path
) -> subprocess.Popen[Any]:
    """A plain serf agent with the cluster key, claiming ``blk`` as confirmed at Unix second 1
    and pointing its peer port at the victim's peer API (which answers as the victim)."""
    host = cluster.hosts[host_index]
    config = {
        "node_name": "rogue",
        "bind": f"{host.addr}:{ROGUE_PORT}",
        "advertise": f"{advertise}:{ROGUE_PORT}",
        "rpc_addr": "127.0.0.1:7999",
        "encrypt_key": cluster.key,
        "tags": encode(Tags(blk=blk, bc=1, pp=PEER_PORT)),
        "start_join": [cluster[0].join_addr],
        "log_level": "warn",
    }
    path = workdir / "rogue.json"
    path.write_text(json.dumps(config))
    log = (workdir / "rogue.log").open("wb")
    return host.popen(["serf", "agent", "-config-file", str(path)], stdout=log, stderr=log)


@pytest.mark.parametrize("where", ["same-address", "spoofed-address"])
def test_a_rogue_cannot_take_a_confirmed_block(cluster, tmp_path: Path, where: str) -> None:
    c: Cluster = cluster(2)
    c.wait_converged(60)
    victim = c[0]
    wait_for(lambda: block_of(victim)[0] == "confirmed", 60, 0.5, what="victim's block confirmed")
    _, blk = block_of(victim)
    assert blk is not None
    # Same address: the rogue runs in the victim's namespace. Spoofed: on the other host,
    # advertising the victim's address.
    rogue = start_rogue(c, 0 if where == "same-address" else 1, victim.addr, blk, tmp_path)
    try:
        wait_for(
            lambda: any(
                m["name"] == "rogue" and m.get("tags", {}).get("blk") == blk
                for m in victim.members()
            ),
            30,
            0.5,
            what="the victim sees the rogue's claim",
            describe=c.describe,
        )
        refused = wait_for(
            lambda: refusals(victim), 30, 0.5, what="ports.claim_refused on the victim"
        )
        assert refused[0]["subject"] == "rogue"
        assert "not a verified gpud node" in refused[0]["message"]
        # Several claim rounds later the victim still holds its block, confirmed.
        for _ in range(6):
            assert block_of(victim) == ("confirmed", blk)
            time.sleep(1)
        doctor = victim.cli("doctor", "--json", check=False)
        assert "ports.claim_refused" in doctor.stdout
    finally:
        os.killpg(rogue.pid, signal.SIGKILL)
        rogue.wait(10)
    # The rogue is gone: the victim still holds the same block, and never dropped it.
    assert block_of(victim) == ("confirmed", blk)
    assert "lost a confirmed port block" not in victim.log_text()
