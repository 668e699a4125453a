"""The gossip keyring survives restarts: a `gpud keys` rotation is not
undone when gpud restarts serf, while a changed cluster.key_file still takes effect."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud.context import NodeContext
from gpud.preflight import host_warnings, key_file_mode_warning
from gpud.secret import keygen
from gpud.serf.agent import SerfAgent
from gpud.serf.config import keep_keyring, key_fingerprint
from tests.harness.serf import node_config, running
from tests.harness.wait import async_wait_for

pytestmark = pytest.mark.timeout(120)

keys = st.binary(min_size=32, max_size=32)


@given(st.lists(keys, max_size=4), keys, st.sampled_from(["none", "this", "other"]))
def test_keep_keyring_rule(existing: list[bytes], key: bytes, seeded_from: str) -> None:
    seeded = {"none": "", "this": key_fingerprint(key), "other": key_fingerprint(b"x" * 32)}[
        seeded_from
    ]
    kept = keep_keyring(existing, key, seeded)
    if not existing:
        assert not kept  # nothing to keep: seed it
    elif key in existing:
        assert kept  # a rotation under way, or done and the key file updated
    else:
        # Rotated away from this key since gpud seeded it: kept; a changed key file: reseeded.
        assert kept == (seeded_from == "this")


async def keyring_of(agent: SerfAgent) -> dict[str, int]:
    assert agent.rpc is not None
    return (await agent.rpc.list_keys()).keys


async def test_a_rotation_survives_a_restart_and_a_new_key_file_wins(tmp_path: Path) -> None:
    old, new, other = keygen(), keygen(), keygen()
    key_file = tmp_path / "cluster.key"
    key_file.write_text(old + "\n")
    config = node_config(tmp_path, "n1")
    config.cluster.key_file = str(key_file)
    agent = SerfAgent(NodeContext(config, "127.0.0.1"))

    async with running(agent):
        await asyncio.wait_for(agent.ready.wait(), 15)
        assert await keyring_of(agent) == {old: 1}
        assert agent.rpc is not None
        assert (await agent.rpc.install_key(new)).error == ""
        assert (await agent.rpc.use_key(new)).error == ""
        assert (await agent.rpc.remove_key(old)).error == ""
        await async_wait_for(lambda: json.loads(agent.keyring_file.read_text()) == [new], 10)

    # Restart with cluster.key_file still holding the old key: serf keeps the rotated keyring.
    agent = SerfAgent(NodeContext(config, "127.0.0.1"))
    async with running(agent):
        await asyncio.wait_for(agent.ready.wait(), 15)
        assert await keyring_of(agent) == {new: 1}

    # Mid-rotation (both keys installed) with the key file updated to the new key: kept.
    key_file.write_text(new + "\n")
    agent.keyring_file.write_text(json.dumps([new, old]))
    agent = SerfAgent(NodeContext(config, "127.0.0.1"))
    async with running(agent):
        await asyncio.wait_for(agent.ready.wait(), 15)
        assert await keyring_of(agent) == {new: 1, old: 1}

    # The operator puts a different key in the key file: it wins over the old keyring.
    key_file.write_text(other + "\n")
    agent = SerfAgent(NodeContext(config, "127.0.0.1"))
    async with running(agent):
        await asyncio.wait_for(agent.ready.wait(), 15)
        assert await keyring_of(agent) == {other: 1}
        assert agent.keyring_seed_file.read_text().strip() == key_fingerprint(
            base64.b64decode(other)
        )


@pytest.mark.parametrize(
    ("mode", "group", "members", "warned"),
    [
        (0o600, "gpud", [], None),
        (0o640, "gpud-key", [], None),  # a service-only group
        (0o640, "gpud-key", ["gpud"], None),
        (0o640, "gpud", [], "the operators of the local API"),  # the socket group (old default)
        (0o640, "gpud-key", ["gpud", "alice"], "members alice"),
        (0o644, "gpud-key", [], "readable by every user"),
        (0o604, "gpud", [], "readable by every user"),
    ],
)
def test_key_file_mode_warning(mode: int, group: str, members: list[str], warned) -> None:
    warning = key_file_mode_warning(
        "/etc/gpud/cluster.key",
        0o100000 | mode,
        group,
        members,
        operator_groups={"gpud", "gpud-admin"},
        service_users={"root", "gpud"},
    )
    if warned is None:
        assert warning is None
    else:
        assert warning is not None and warned in warning and f"{mode:04o}" in warning


async def test_check_config_and_the_agent_warn_about_a_readable_key(tmp_path: Path) -> None:
    key_file = tmp_path / "cluster.key"
    key_file.write_text(keygen() + "\n")
    key_file.chmod(0o644)
    config = node_config(tmp_path, "n1")
    config.cluster.key_file = str(key_file)
    cfg_file = tmp_path / "gpud.toml"
    cfg_file.write_text(
        f'[node]\nname = "n1"\n[cluster]\nkey_file = "{key_file}"\n'
        f'[paths]\nstate_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n'
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gpud", "agent", "--config", str(cfg_file), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"warning: cluster.key_file {key_file} is readable by every user" in result.stderr
    agent = SerfAgent(NodeContext(config, "127.0.0.1"))
    async with running(agent):
        await asyncio.wait_for(agent.ready.wait(), 15)
        [problem] = [p for p in agent.problems() if p.code == "config.key_file_mode"]
        assert "readable by every user" in problem.message and "chmod 0600" in problem.fix
    key_file.chmod(0o600)
    assert host_warnings(config) == []
