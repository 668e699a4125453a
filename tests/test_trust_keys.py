"""The gossip keyring survives restarts (issue 10.11 with 10.10): a `gpud keys` rotation is not
undone when gpud restarts serf, while a changed cluster.key_file still takes effect."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud.context import NodeContext
from gpud.secret import keygen
from gpud.serf.agent import SerfAgent, keep_keyring, key_fingerprint
from tests.serf_util import node_config, wait_until
from tests.test_serf_agent import running

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
        await wait_until(lambda: json.loads(agent.keyring_file.read_text()) == [new], 10)

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
