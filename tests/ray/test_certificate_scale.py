"""Vote certificates at thousands of members: served whole over the signed peer API (real
aiohttp servers on loopback, real signatures), checked by the same `proof_refusal` a follower
runs, and still refused when a vote does not check."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec

from gpud import secret
from gpud.context import Member, NodeContext
from gpud.health.service import HealthService
from gpud.ray.certificates import CERT_PAGES_MAX
from gpud.ray.election import proof_refusal, quorum
from gpud.ray.head_election import HeadElection
from gpud.ray.votes import (
    MAX_PAYLOAD_BYTES,
    VoteCertificate,
    VoteState,
    VoteStore,
    vote_signature,
)
from gpud.state import StateStore
from gpud.tags import Tags
from tests.harness.config import config_for
from tests.harness.ray_loopback import LoopbackNetwork
from tests.harness.serf import free_port

MEMBERS = 5000
TERM = 7


def certificate(key: bytes, head: str, voters: int) -> VoteCertificate:
    names = [head, *(f"gpu-node-{i:05d}.rack{i % 40:02d}" for i in range(1, voters))]
    votes = {
        v: vote_signature(key, voter=v, candidate=head, term=TERM, known=MEMBERS) for v in names
    }
    return VoteCertificate(head=head, term=TERM, known=MEMBERS, votes=votes)


@contextlib.asynccontextmanager
async def pair(tmp_path: Path) -> AsyncIterator[tuple[HeadElection, HeadElection]]:
    """A head and a follower, each with a health component serving its peer API."""
    key_file = tmp_path / "cluster.key"
    key_file.write_text(secret.keygen())
    net = LoopbackNetwork()
    elections, healths = [], []
    for i, name in enumerate(["head", "follower"]):
        addr = f"127.78.0.{i + 1}"
        config = config_for(
            name,
            tmp_path / name,
            {
                "cluster": {"insecure": False, "key_file": str(key_file)},
                "peer": {"port": free_port(addr)},
            },
        )
        ctx = NodeContext(config, advertise_addr=addr)
        health = HealthService(ctx)
        election = HeadElection(
            ctx, net.transport(name), VoteStore(StateStore(config.state_dir)), lease=health
        )
        elections.append(election)
        healths.append(health)
    members = {
        e.ctx.node_name: Member(
            name=e.ctx.node_name,
            addr=e.ctx.advertise_addr,
            port=7946,
            status="alive",
            tags=Tags(pp=e.ctx.config.peer.port, ray="head" if e is elections[0] else "none"),
        )
        for e in elections
    }
    for election, health in zip(elections, healths, strict=True):
        election.ctx.set_members(dict(members))
        await health.server.start()
    try:
        yield elections[0], elections[1]
    finally:
        for health in healths:
            await health.server.stop()
            await health.client.close()


def keys_of(election: HeadElection) -> list[bytes]:
    return [secret.derive(election.ctx.config, "vote")]


async def test_a_majority_of_5000_members_verifies_over_the_peer_api(tmp_path: Path) -> None:
    async with pair(tmp_path) as (head, follower):
        cert = certificate(keys_of(head)[0], "head", quorum(MEMBERS) + 100)
        # Far past what Serf pages can carry: a follower asking that way could never verify.
        assert len(msgspec.json.encode(cert)) > CERT_PAGES_MAX * MAX_PAYLOAD_BYTES
        await head.store.save_certificate(cert)
        fetched = await follower.certificates.fetch("head", TERM)
        assert fetched == cert
        assert proof_refusal("head", TERM, VoteState(), fetched, keys_of(follower)) is None


async def test_forged_or_wrong_certificates_are_still_refused(tmp_path: Path) -> None:
    async with pair(tmp_path) as (head, follower):
        needed = quorum(MEMBERS)
        cert = certificate(keys_of(head)[0], "head", needed)
        # One vote signed with another key leaves it one short of a majority.
        forged = dict(cert.votes)
        forged["gpu-node-00001.rack01"] = vote_signature(
            b"x" * 32, voter="gpu-node-00001.rack01", candidate="head", term=TERM, known=MEMBERS
        )
        await head.store.save_certificate(msgspec.structs.replace(cert, votes=forged))
        fetched = await follower.certificates.fetch("head", TERM)
        refusal = proof_refusal("head", TERM, VoteState(), fetched, keys_of(follower))
        assert refusal == (
            f"head's certificate for term {TERM} has {needed - 1} valid votes of {needed} "
            f"needed ({MEMBERS} members)"
        )
        # Another term, or a node that is not that head: nothing is served.
        assert await follower.certificates.fetch("head", TERM + 1) is None
        assert await head.certificates.fetch("follower", TERM) is None
        # Votes for more members than signed (a shrunken or swollen count) do not check.
        await head.store.save_certificate(msgspec.structs.replace(cert, known=needed))
        fetched = await follower.certificates.fetch("head", TERM)
        refusal = proof_refusal("head", TERM, VoteState(), fetched, keys_of(follower))
        assert refusal is not None and "0 valid votes" in refusal
