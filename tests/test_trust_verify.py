"""Only verified gpud nodes count (issue 10.1, the verification part): a member is verified once
it answered our authenticated ping as itself at the address gossip announces; dial-backs go only
to alive members' own address and peer port, never to loopback, link-local or ourselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpud import secret
from gpud.context import Member
from gpud.health.peer_api import PATH_PING, PingReply, dial_back_refusal, identity_mismatch
from gpud.tags import Tags
from tests.test_health_loopback import cluster, key_file, raw_post, rounds  # noqa: F401 -- fixtures


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
    assert reason in dial_back_refusal(who, "n2", "n1", self_addr)


def test_dial_back_allowed_to_an_alive_member_and_on_a_loopback_test_cluster():
    assert dial_back_refusal(member(), "n2", "n1", "10.0.0.1") is None
    assert dial_back_refusal(member(addr="127.77.0.2"), "n2", "n1", "127.77.0.1") is None


@pytest.mark.asyncio
async def test_a_member_is_verified_only_as_itself_at_its_own_address(key_file: Path):  # noqa: F811
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
async def test_peer_api_answers_invalid_utf8_with_a_400(key_file: Path):  # noqa: F811
    async with cluster(key_file, 2) as nodes:
        a = nodes[0]
        key = secret.derive(a.ctx.config, "peer-api")
        body = b'{"echo": "\xff\xfe"}'
        status, reply = await raw_post(
            a.ctx.advertise_addr, a.ctx.config.peer.port, PATH_PING, body, key
        )
        assert status == 400 and b"not valid UTF-8" in reply
