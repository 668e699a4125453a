"""Only verified gpud nodes count (the verification part): a member is verified once
it answered our authenticated ping as itself at the address gossip announces; dial-backs go only
to alive members' own address and peer port (verified there, or the address the request came
from), never to another host, loopback, link-local or ourselves."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud import secret
from gpud.context import Member
from gpud.health.peer_api import (
    PATH_PING,
    PeerCallError,
    PingReply,
    dial_back_refusal,
    identity_mismatch,
)
from gpud.tags import Tags
from tests.harness.health_loopback import cluster, raw_post, rounds


def member(name: str = "n2", addr: str = "10.0.0.2", status: str = "alive", pp: int = 7948):
    return Member(name=name, addr=addr, port=7946, status=status, tags=Tags(pp=pp))


def ping(name: str, addr: str) -> PingReply:
    return PingReply(echo="", name=name, addr=addr, time=0.0, seen_from="")


def test_identity_is_name_and_address():
    assert identity_mismatch("n2", "10.0.0.2", ping("n2", "10.0.0.2")) is None
    assert "not as 'n2'" in identity_mismatch("n2", "10.0.0.2", ping("n3", "10.0.0.2"))
    assert "not 10.0.0.2" in identity_mismatch("n2", "10.0.0.2", ping("n2", "10.0.0.3"))


@pytest.mark.parametrize(
    ("who", "self_addr", "reason"),
    [
        (None, "10.0.0.1", "not a member"),
        (member(status="left"), "10.0.0.1", "is left"),
        (member(status="failed"), "10.0.0.1", "is failed"),
        (member(pp=0), "10.0.0.1", "no peer port"),
        (member(addr="127.0.0.1", pp=7373), "10.0.0.1", "loopback address"),
        (member(addr="169.254.1.1"), "10.0.0.1", "link-local address"),
        (member(addr="0.0.0.0"), "10.0.0.1", "not a host"),
        (member(addr="10.0.0.1"), "10.0.0.1", "our own address"),
        (member(name="n1"), "10.0.0.1", "not a member"),
    ],
)
def test_dial_back_refusals(who, self_addr, reason):
    source = who.addr if who is not None else "10.0.0.2"
    assert reason in dial_back_refusal(who, "n2", "n1", self_addr, source=source, verified=True)


def test_dial_back_allowed_to_an_alive_member_and_on_a_loopback_test_cluster():
    def refusal(m: Member, self_addr: str) -> str | None:
        return dial_back_refusal(m, "n2", "n1", self_addr, source=m.addr, verified=False)

    assert refusal(member(), "10.0.0.1") is None
    assert refusal(member(addr="127.77.0.2"), "127.77.0.1") is None


def test_dial_back_goes_only_to_the_callers_own_address():
    # Announcing another host's address: refused unless our probes verified the member there.
    elsewhere = member(addr="10.0.0.9", pp=22)
    reason = dial_back_refusal(elsewhere, "n2", "n1", "10.0.0.1", source="10.0.0.2", verified=False)
    assert "10.0.0.9:22, where our probes have not verified it" in reason
    assert "came from 10.0.0.2" in reason
    assert (
        dial_back_refusal(elsewhere, "n2", "n1", "10.0.0.1", source="10.0.0.2", verified=True)
        is None
    )
    # Behind SNAT the request comes from elsewhere: only a verified member is dialled.
    assert dial_back_refusal(member(), "n2", "n1", "10.0.0.1", source="192.0.2.7", verified=False)
    assert (
        dial_back_refusal(member(), "n2", "n1", "10.0.0.1", source="192.0.2.7", verified=True)
        is None
    )


_ADDRS = st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.9", "127.0.0.1", "169.254.0.2", ""])


@given(
    addr=_ADDRS,
    source=_ADDRS,
    verified=st.booleans(),
    status=st.sampled_from(["alive", "failed", "left"]),
    pp=st.integers(0, 65535),
)
def test_a_dial_back_target_is_always_the_callers_own(addr, source, verified, status, pp):
    m = member(addr=addr, status=status, pp=pp)
    refusal = dial_back_refusal(m, "n2", "n1", "10.0.0.1", source=source, verified=verified)
    if refusal is None:
        assert verified or source == addr
        assert status == "alive" and pp and addr not in ("10.0.0.1", "127.0.0.1", "169.254.0.2")
    elif status == "alive" and pp and addr in ("10.0.0.2", "10.0.0.9"):
        assert not verified and source != addr


@pytest.mark.asyncio
async def test_a_key_holder_cannot_point_a_dial_back_at_another_host(key_file: Path):
    """A key holder announced a third host's address and an arbitrary port as its own: the
    dial-back connected there and sent it a signed request."""
    async with cluster(key_file, 2) as nodes:
        a, b = nodes
        accepted: list[object] = []
        bait = await asyncio.start_server(lambda r, w: accepted.append(w), "127.77.0.9", 0)
        bait_port = bait.sockets[0].getsockname()[1]
        try:
            a.ctx.set_members(
                {n.name: n.member() for n in nodes}
                | {"n2": b.member(addr="127.77.0.9", tags=Tags(pp=bait_port))}
            )
            await b.service.client.set_source_addr(b.ctx.advertise_addr)
            with pytest.raises(PeerCallError, match=r"403.*only to a member's own address"):
                await b.service.client.dial_back(a.ctx.advertise_addr, a.ctx.config.peer.port)
            await asyncio.sleep(0.2)
        finally:
            bait.close()
            await bait.wait_closed()
        assert accepted == []
        # From its own address, to its own peer port, it is dialled back.
        a.ctx.set_members({n.name: n.member() for n in nodes})
        reply = await b.service.client.dial_back(a.ctx.advertise_addr, a.ctx.config.peer.port)
        assert (reply.addr, reply.port) == (b.ctx.advertise_addr, b.ctx.config.peer.port)
        assert reply.outcome.ok


@pytest.mark.asyncio
async def test_a_member_is_verified_only_as_itself_at_its_own_address(key_file: Path):
    async with cluster(key_file, 3) as nodes:
        n1, n2, n3 = nodes
        # Gossip as n1 sees it: "n2" claims n3's address and peer port.
        rogue = n2.member(addr=n3.ctx.advertise_addr, tags=Tags(pp=n3.ctx.config.peer.port))
        n1.ctx.set_members({n.name: n.member() for n in nodes} | {"n2": rogue})
        await rounds(nodes, 2)
        prober = n1.service.prober
        assert prober.verified("n3")
        assert not prober.verified("n2")
        assert "not that node" in prober.records["n2"].last_out.error
        assert not prober.verified("n1") and not prober.verified("nobody")
        # Its real address proves it; a later move to another address needs proof again.
        n1.ctx.set_members({n.name: n.member() for n in nodes})
        await rounds(nodes, 1)
        assert prober.verified("n2")
        n1.ctx.set_members({n.name: n.member() for n in nodes} | {"n2": rogue})
        n1.service.prober.sync(n1.ctx.members, "n1")
        assert not prober.verified("n2")


@pytest.mark.asyncio
async def test_peer_api_answers_invalid_utf8_with_a_400(key_file: Path):
    async with cluster(key_file, 2) as nodes:
        a = nodes[0]
        key = secret.derive(a.ctx.config, "peer-api")
        body = b'{"echo": "\xff\xfe"}'
        status, reply = await raw_post(
            a.ctx.advertise_addr, a.ctx.config.peer.port, PATH_PING, body, key
        )
        assert status == 400 and b"not valid UTF-8" in reply
