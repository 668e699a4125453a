"""SerfAgent against a real `serf agent` child: generated config, restarts, re-advertising,
RPC reconnects, queries, graceful leave, and a missing binary."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from gpud.context import NodeContext
from gpud.preflight import PortConflict, rpc_listener
from gpud.secret import keygen
from gpud.serf.agent import SerfAgent, unwrap_query, wrap_query
from gpud.serf.config import serf_config
from gpud.serf.rpc import SerfConnectionError
from gpud.tags import Tags, TagsError, encode
from tests.harness.serf import free_port, node_config, running
from tests.harness.wait import async_wait_for


async def self_member(agent: SerfAgent):  # type: ignore[no-untyped-def]
    assert agent.rpc is not None
    [me] = await agent.rpc.members()
    return me


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_serf_config_is_pure_and_complete(tmp_path: Path) -> None:
    config = node_config(tmp_path, "n1", retry_join=["127.0.0.9:7946", "127.0.0.8", "::1"])
    tags = Tags(pp=7948, gpu=8)
    generated = serf_config(
        config,
        node_name="n1",
        advertise_addr="127.0.0.1",
        tags=tags,
        rpc_auth="t",
        keyring_file=None,
        snapshot_path="/s",
    )
    port = config.serf.bind_port
    assert generated["bind"] == generated["advertise"] == f"127.0.0.1:{port}"
    assert generated["rpc_addr"] == f"127.0.0.1:{config.serf.rpc_port}"
    assert generated["tags"] == encode(tags)
    # Without a port: gpud's gossip port, never serf's default 7946 (a stand-alone serf's).
    assert generated["retry_join"] == ["127.0.0.9:7946", f"127.0.0.8:{port}", f"[::1]:{port}"]
    assert generated["leave_on_terminate"] is False
    assert generated["skip_leave_on_interrupt"] is True
    assert "keyring_file" not in generated and "encrypt_key" not in generated


def test_query_envelope() -> None:
    assert unwrap_query(wrap_query("n1", b"\x00x")) == ("n1", b"\x00x")
    assert unwrap_query(b"raw from the serf CLI") == ("", b"raw from the serf CLI")


async def test_agent_lifecycle(tmp_path: Path) -> None:
    key_file = tmp_path / "cluster.key"
    key_file.write_text(keygen() + "\n")
    config = node_config(tmp_path, "n1")
    config.cluster.key_file = str(key_file)
    ctx = NodeContext(config, "127.0.0.1")
    agent = SerfAgent(ctx)
    async with running(agent):
        await asyncio.wait_for(agent.ready.wait(), 15)

        # Generated files: private, token fresh, keyring from the cluster key.
        for path in (agent.config_file, agent.token_file, agent.keyring_file):
            assert mode(path) == 0o600, path
        generated = json.loads(agent.config_file.read_text())
        assert generated["rpc_auth"] == agent.token_file.read_text().strip()
        assert json.loads(agent.keyring_file.read_text()) == [key_file.read_text().strip()]
        first_token, first_pid = generated["rpc_auth"], agent.supervisor.child.pid

        me = await self_member(agent)
        assert (me.name, me.addr, me.port) == ("n1", "127.0.0.1", config.serf.bind_port)
        assert me.tags == encode(ctx.tags)
        await async_wait_for(lambda: agent.status().members == 1, 10)
        assert agent.status().rpc_connected

        # Tags: published over RPC; too large ones are refused and change nothing.
        await ctx.update_tags(gpu=8, hl="passing")
        assert (await self_member(agent)).tags["gpu"] == "8"
        with pytest.raises(TagsError):
            await ctx.update_tags(role="x" * 600)
        assert (await self_member(agent)).tags == encode(ctx.tags)

        # Queries: a handler answers, a failing handler is logged and the stream survives.
        async def pong(sender: str, payload: bytes) -> bytes:
            return f"pong from {ctx.node_name} to {sender}: ".encode() + payload

        async def broken(sender: str, payload: bytes) -> bytes:
            raise RuntimeError("handler bug")

        agent.on_query("ping", pong)
        agent.on_query("boom", broken)
        assert await agent.query("boom", b"", timeout_s=0.5) == {}
        assert await agent.query("ping", b"1", timeout_s=2) == {"n1": b"pong from n1 to n1: 1"}

        # The RPC connection breaks while serf lives: the agent reconnects.
        old_rpc = agent.rpc
        assert old_rpc is not None
        await old_rpc.close()
        await async_wait_for(lambda: agent.rpc is not None and agent.rpc is not old_rpc, 10)
        assert agent.supervisor.child.pid == first_pid

        # SIGKILL the serf child: restarted (backoff 1 s) with a fresh token, tags kept.
        agent.ready.clear()
        os.killpg(first_pid, signal.SIGKILL)
        await async_wait_for(
            lambda: agent.ready.is_set() and agent.supervisor.child.pid != first_pid, 15
        )
        assert json.loads(agent.config_file.read_text())["rpc_auth"] != first_token
        assert (await self_member(agent)).tags["gpu"] == "8"
        assert agent.supervisor.status.restarts >= 1

        # Re-advertise on another loopback address: serf restarts with it.
        agent.readvertise("127.0.0.2")
        await async_wait_for(lambda: agent.ready.is_set(), 15)
        await async_wait_for(lambda: _addr_is(agent, "127.0.0.2"), 10)
        assert json.loads(agent.config_file.read_text())["advertise"].startswith("127.0.0.2:")

        # Graceful leave: serf exits and is not restarted.
        child = agent.supervisor.child
        await agent.leave()
        assert child.returncode is not None
        await asyncio.sleep(1.5)
        assert agent.supervisor.child is child
        with pytest.raises(SerfConnectionError):
            await agent.query("ping", b"")


async def _addr_is(agent: SerfAgent, addr: str) -> bool:
    rpc = agent.rpc
    if rpc is None:
        return False
    with contextlib.suppress(SerfConnectionError):
        return (await rpc.members())[0].addr == addr
    return False


async def test_missing_binary_is_reported_not_crashed(tmp_path: Path) -> None:
    config = node_config(tmp_path, "n1", binary="/nonexistent/serf")
    agent = SerfAgent(NodeContext(config, "127.0.0.1"))
    async with running(agent) as task:
        await async_wait_for(lambda: agent.status().supervisor.state == "backoff", 5)
        status = agent.status()
        assert "'/nonexistent/serf' not found" in (status.last_error or "")
        assert not status.rpc_connected and not agent.ready.is_set()
        [problem] = agent.problems()
        assert problem.code == "serf.down" and "'/nonexistent/serf' not found" in problem.message
        assert agent.summary().startswith("serf is not running (backoff)")
        assert not task.done()


def _codes(agent: SerfAgent) -> list[str]:
    return [p.code for p in agent.problems()]


def test_rpc_listener_tells_our_serf_from_a_squatter() -> None:
    """The check made before every RPC authentication: a listener counts as serf only if the
    socket belongs to our serf child's pid."""
    port = free_port()
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        assert rpc_listener(port, stranger.pid) == "nobody"
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", port))
            listener.listen(1)
            # This process holds it: ours if our "child" is this process, a conflict otherwise.
            assert rpc_listener(port, os.getpid()) == "ours"
            conflict = rpc_listener(port, stranger.pid)
            assert isinstance(conflict, PortConflict)
            [holder] = conflict.holders
            assert holder.pid == os.getpid() and holder.uid == os.getuid()
            assert conflict.problem().code == "serf.port_conflict"
    finally:
        stranger.kill()
        stranger.wait()


async def test_hung_serf_is_reported_within_seconds(tmp_path: Path) -> None:
    """SIGSTOP the serf child: status says its RPC is unreachable within a few seconds; after
    SIGCONT it reconnects. No task exception goes unretrieved on the way."""
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    agent = SerfAgent(NodeContext(node_config(tmp_path, "n1"), "127.0.0.1"))
    async with running(agent):
        await asyncio.wait_for(agent.ready.wait(), 15)
        await async_wait_for(lambda: agent.status().members == 1, 10)
        assert agent.problems() == [] and agent.summary() == "running, 1 members"
        pid = agent.supervisor.child.pid
        os.killpg(pid, signal.SIGSTOP)
        try:
            started = loop.time()
            await async_wait_for(lambda: "serf.rpc_unreachable" in _codes(agent), 20)
            took = loop.time() - started
            status = agent.status()
            assert not status.rpc_connected and "RPC unreachable" in status.summary
            # By design within MEMBER_COUNT_INTERVAL_S + RPC_PING_TIMEOUT_S (4 s); slack for
            # a loaded 2-core CI machine.
            assert took < 10, took
        finally:
            os.killpg(pid, signal.SIGCONT)
        await async_wait_for(lambda: agent.status().rpc_connected, 30)
        assert agent.problems() == [] and agent.supervisor.child.pid == pid
    gc.collect()
    await asyncio.sleep(0)
    assert not [c for c in unhandled if "never retrieved" in str(c.get("message"))], unhandled
