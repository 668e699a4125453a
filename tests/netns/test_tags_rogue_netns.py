"""A cluster-key holder gossiping tags out of every bound, against real gpud agents: a plain
`serf agent` with the key, beside a 3-node gpud cluster in namespaces, cycles through
out-of-range and malformed values of every tag (`pp=-1` and `pp=70000` once crashed every gpud
that probed it). No gpud exits, no log holds a traceback, and every node lists the rogue with
its tags error, in the API and in `gpud members`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.harness.gpud_node import Cluster, GpudNode, wait_for

ROGUE_PORT = 7990
ROGUE_RPC = "127.0.0.1:7999"
# Each value must show as the rogue's tags error within this long (gossip + a members read).
SEEN_S = 15.0

# (tag, value) pairs: each out of its bounds or malformed. The tag protocol version last.
BAD_TAGS = [
    ("pp", "-1"),
    ("pp", "70000"),
    ("pp", "seven"),
    ("gcs", "70000"),
    ("nm", "-5"),
    ("blk", "-2"),
    ("blk", "99999999"),
    ("bc", "-1"),
    ("gpu", str(10**6)),
    ("term", "-1"),
    ("term", str(10**30)),
    ("pri", str(2**40)),
    ("role", ""),
    ("dv", "not-hex"),
    ("dp", "web.0:²:ab"),
    ("ray", "boss"),
    ("rh", "always"),
    ("rv", "maybe"),
    ("nat", "2"),
    ("hl", "fine"),
    ("gh", "x"),
    ("hg", "x"),
    ("v", "2"),
]


def start_rogue(cluster: Cluster, workdir: Path) -> subprocess.Popen[Any]:
    host = cluster.hosts[2]
    config = {
        "node_name": "rogue",
        "bind": f"{host.addr}:{ROGUE_PORT}",
        "rpc_addr": ROGUE_RPC,
        "encrypt_key": cluster.key,
        "tags": {"v": "1", "pp": "-1"},
        "start_join": [cluster[0].join_addr],
        "log_level": "warn",
    }
    path = workdir / "rogue.json"
    path.write_text(json.dumps(config))
    log = (workdir / "rogue.log").open("wb")
    rogue = host.popen(["serf", "agent", "-config-file", str(path)], stdout=log, stderr=log)
    # Its RPC listens a moment after the process starts; tags are set through it.
    wait_for(
        lambda: host.run(["serf", "info", f"-rpc-addr={ROGUE_RPC}"], check=False).returncode == 0,
        SEEN_S,
        0.25,
        what="the rogue's serf RPC answers",
    )
    return rogue


def rogue_error(node: GpudNode) -> str | None:
    for member in node.members():
        if member["name"] == "rogue":
            return member.get("tags_error")
    return None


def test_a_rogue_cycling_bad_tags_crashes_nobody(cluster, tmp_path: Path) -> None:
    c: Cluster = cluster(3)
    c.wait_converged(60)
    pids = [node.pid for node in c]
    rogue = start_rogue(c, tmp_path)
    try:
        previous: str | None = None
        for key, value in BAD_TAGS:
            if previous is not None:
                c.hosts[2].run(["serf", "tags", f"-rpc-addr={ROGUE_RPC}", "-delete", previous])
            c.hosts[2].run(["serf", "tags", f"-rpc-addr={ROGUE_RPC}", "-set", f"{key}={value}"])
            previous = key
            expected = "unknown tag protocol version" if key == "v" else f"$.{key}"
            for node in c:
                wait_for(
                    lambda node=node, expected=expected: expected in (rogue_error(node) or ""),
                    SEEN_S,
                    0.25,
                    what=f"{node.name} lists the rogue with a tags error for {key}={value!r}",
                    describe=c.describe,
                )
        assert all(node.running() for node in c), c.describe()
        assert [node.pid for node in c] == pids
        for node in c:
            members = node.cli("members").stdout
            (line,) = [row for row in members.splitlines() if row.startswith("rogue")]
            assert "unknown tag protocol version" in line, members
            status = node.api("/v1/status")
            assert status["membership"]["tags_errors"] == 1, status["membership"]
            assert any(
                p["code"] == "membership.foreign_tags" and "rogue" in p["subject"]
                for p in status["problems"]
            )
    finally:
        rogue.kill()
        rogue.wait(timeout=10)
    for node in c:
        text = node.log_text()
        assert "Traceback" not in text, node.log_tail(80)
        assert "agent failed" not in text, node.log_tail(80)
