"""Gossip key rotation against real `serf agent`s: install a new key everywhere,
make it primary, remove the old one; members stay alive throughout. Then the peer-API keys
derived from the keyring follow it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpud import secret
from gpud.serf.rpc import SerfRPC
from tests.harness.serf import RawSerf
from tests.harness.wait import async_wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def keyed_cluster(tmp_path: Path) -> AsyncIterator[tuple[str, list[RawSerf], list[SerfRPC]]]:
    old = secret.keygen()
    agents = [RawSerf(tmp_path, f"k{i}") for i in range(3)]
    for agent in agents:
        config = json.loads(agent.config_file.read_text())
        keyring = agent.dir / "keyring.json"
        keyring.write_text(json.dumps([old]))
        config["keyring_file"] = str(keyring)
        agent.config_file.write_text(json.dumps(config))
    rpcs: list[SerfRPC] = []
    try:
        for agent in agents:
            await agent.start()
            rpcs.append(await agent.connect())
        await rpcs[0].join([a.gossip_addr for a in agents[1:]])
        await async_wait_for(lambda: alive(rpcs[2], 3), 15)
        yield old, agents, rpcs
    finally:
        for rpc in rpcs:
            await rpc.close()
        for agent in agents:
            await agent.stop()


async def keys_are(rpc: SerfRPC, expected: dict[str, int]) -> bool:
    reply = await rpc.list_keys()
    return reply.keys == expected and reply.error == ""


async def alive(rpc: SerfRPC, count: int) -> bool:
    return sum(m.status == "alive" for m in await rpc.members()) == count


@pytest.mark.asyncio
async def test_rotate_the_gossip_key_without_a_restart(keyed_cluster):
    old, agents, rpcs = keyed_cluster
    new = secret.keygen()

    # Right after the join a node may not answer the keyring query yet.
    await async_wait_for(lambda: keys_are(rpcs[1], {old: 3}), 15)

    reply = await rpcs[0].install_key(new)
    assert (reply.error, reply.num_err, reply.num_nodes) == ("", 0, 3)
    assert (await rpcs[2].list_keys()).keys == {old: 3, new: 3}
    assert await alive(rpcs[1], 3)

    # The primary key cannot be removed: Serf says so per node, nothing changes.
    refused = await rpcs[0].remove_key(old)
    assert refused.error and refused.num_err == 3 and refused.messages
    assert (await rpcs[0].list_keys()).keys == {old: 3, new: 3}

    assert (await rpcs[1].use_key(new)).error == ""
    assert (await rpcs[2].remove_key(old)).error == ""
    assert (await rpcs[0].list_keys()).keys == {new: 3}
    # Gossip still flows under the new key: members stay alive for a few probe rounds.
    for _ in range(3):
        await asyncio.sleep(1)
        assert await alive(rpcs[0], 3) and await alive(rpcs[2], 3)
    # Serf persisted it: the keyring file now holds only the new key.
    for agent in agents:
        assert json.loads((agent.dir / "keyring.json").read_text()) == [new]


def test_peer_api_keys_follow_the_keyring(tmp_path):
    from gpud import config as config_mod
    from gpud.health.auth import AuthError, Verifier, sign, signing_key

    old, new = secret.keygen(), secret.keygen()
    key_file = tmp_path / "cluster.key"
    key_file.write_text(old)
    cfg = config_mod.parse(f'[cluster]\nkey_file = "{key_file}"')
    keyring = tmp_path / "keyring.json"
    # Not written yet (serf not started): the cluster key, as before rotation existed.
    keys = secret.PeerApiKeys(cfg, keyring)
    assert keys() == [secret.derive(cfg, "peer-api")]
    verifier = Verifier(keys)
    on_old = signing_key(keys)

    def accepted(key: bytes, now: float) -> bool:
        try:
            verifier.verify("POST", "/p", sign(key, "n", "POST", "/p", b"", now=now), b"", now=now)
        except AuthError:
            return False
        return True

    keyring.write_text(json.dumps([new, old]))  # installed and in use here, old still known
    on_new = signing_key(keys)
    assert on_new != on_old
    assert accepted(on_old, 1e9) and accepted(on_new, 1e9)
    keyring.write_text(json.dumps([new]) + "\n")  # old removed
    assert accepted(on_new, 1e9) and not accepted(on_old, 1e9)


@pytest.mark.asyncio
async def test_keys_api_rotates_and_refuses_bad_input(keyed_cluster, tmp_path):
    from gpud import api, client
    from gpud.serf import keys

    old, _agents, rpcs = keyed_cluster
    new = secret.keygen()
    app = api.make_app(keys.routes(lambda: rpcs[0], lambda: "gpud-admin"))
    server = api.GuardedServer(app, api.local_limits(api.fd_limit()), name="test API")
    await server.setup()
    sock = str(tmp_path / "api.sock")
    await server.listen_unix(sock)

    def call(method: str, path: str, body: object = None) -> object:
        return client.request(sock, method, path, body, timeout=30)

    try:
        await async_wait_for(lambda: keys_are(rpcs[0], {old: 3}), 15)
        with pytest.raises(client.ApiRefused, match="not base64"):
            await asyncio.to_thread(call, "POST", "/v1/keys/install", {"key": "no pe"})
        with pytest.raises(client.ApiRefused, match="primary"):
            await asyncio.to_thread(call, "POST", "/v1/keys/remove", {"key": old})
        for action, key in (("install", new), ("use", new), ("remove", old)):
            reply = await asyncio.to_thread(call, "POST", f"/v1/keys/{action}", {"key": key})
            assert reply["failed"] == 0 and reply["nodes"] == 3, reply
        assert (await asyncio.to_thread(call, "GET", "/v1/keys"))["keys"] == {new: 3}
        assert await alive(rpcs[1], 3)
    finally:
        await server.cleanup()
