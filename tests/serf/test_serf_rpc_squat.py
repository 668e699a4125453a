"""A local unprivileged user who binds serf's RPC port first: gpud runs serf's RPC on another
loopback port it can bind, names the squatter (pid, uid) and the fix, and never hands the
squatter the RPC token. Real serf (and real gpud nodes in the namespace harness); the squatter
is a real process of uid 65534."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpud.context import NodeContext
from gpud.serf.agent import SerfAgent
from tests.harness.ray_cluster import kill_host
from tests.harness.serf import node_config, running
from tests.harness.wait import async_wait_for, wait_for

UNPRIVILEGED_UID = 65534

# Drops to the unprivileged uid (the interpreter lives where that uid may not read), listens on
# the port, reports each connection it is handed (none may come), exits on EOF. SO_REUSEADDR as
# any server sets it: the port may still hold TIME_WAIT connections of a serf just killed.
_SQUATTER = """
import os, socket, sys, threading
os.setgroups([])
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[2]))
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(8)
print("listening", flush=True)
def accept():
    while True:
        s.accept()
        print("connected", flush=True)
threading.Thread(target=accept, daemon=True).start()
sys.stdin.read()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the squatter as another uid")
async def test_a_squatted_rpc_port_is_routed_around_and_the_squatter_named(tmp_path: Path):
    config = node_config(tmp_path, "n1")
    squatter = await asyncio.create_subprocess_exec(
        *[sys.executable, "-c", _SQUATTER, str(config.serf.rpc_port), str(UNPRIVILEGED_UID)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert squatter.stdout is not None
        assert await asyncio.wait_for(squatter.stdout.readline(), 10) == b"listening\n"
        agent = SerfAgent(NodeContext(config, "127.0.0.1"))
        async with running(agent):
            await async_wait_for(agent.ready.is_set, 15)
            assert agent.rpc is not None
            [me] = await agent.rpc.members()
            assert me.status == "alive"
            [problem] = [p for p in agent.problems() if p.code == "serf.rpc_port_squatted"]
            assert problem.severity == "warning"
            assert f"pid {squatter.pid}" in problem.message
            assert f"uid {UNPRIVILEGED_UID}" in problem.message
            assert f"127.0.0.1:{config.serf.rpc_port}" in problem.message
            assert "serf.rpc_port" in problem.fix
            assert not [p for p in agent.problems() if p.severity == "critical"]
    finally:
        assert squatter.stdin is not None
        squatter.stdin.close()  # EOF ends it
        out, _ = await asyncio.wait_for(squatter.communicate(), 10)
    # The squatter never got a connection, so never a handshake or the token.
    assert b"connected" not in out


@pytest.mark.netns
@pytest.mark.timeout(180)
def test_a_real_node_restarted_under_a_squat_rejoins_and_says_why(cluster):
    """gpud started while a local user held serf's RPC port: it refused to start (a port
    conflict), so its peers listed it failed. The host's processes all end first (a reboot:
    a plain stop of gpud leaves its serf, and so the port, to the next gpud)."""
    nodes = cluster(2)
    nodes.wait_converged()
    a, b = nodes[0], nodes[1]
    kill_host(b)
    squatter = b.host.popen(
        [sys.executable, "-c", _SQUATTER, str(b.config["serf"]["rpc_port"]), str(UNPRIVILEGED_UID)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == b"listening\n"
        b.start()
        wait_for(
            lambda: a.alive_members() == b.alive_members() == {a.name, b.name},
            30,
            what="both nodes alive in both views",
        )
        doctor = b.cli("doctor", check=False).stdout
        assert "serf.rpc_port_squatted" in doctor and f"pid {squatter.pid}" in doctor, doctor
        assert "serf.port_conflict" not in doctor and "serf.down" not in doctor, doctor
    finally:
        out, _ = squatter.communicate(timeout=10)  # closes its stdin: EOF ends it
    assert b"connected" not in out
