"""Trust in the Ray election: only verified gpud nodes count, and a
head is followed only with proof of office. Property tests drive the pure rules production
runs (gpud.ray.election.screen / plan / proof_refusal); in-process clusters drive HeadElection
over the loopback query transport. The attacks against real agents: test_trust_ray_netns.py."""

from __future__ import annotations

from pathlib import Path

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from gpud import secret
from gpud.context import Member, NodeContext
from gpud.ray.election import (
    TERM_BOUND,
    has_majority,
    highest_term,
    plan,
    proof_refusal,
    quorum,
    screen,
    vote_refusal,
)
from gpud.ray.head_election import HeadElection
from gpud.ray.votes import (
    VoteCertificate,
    VoteState,
    VoteStore,
    certificate_page,
    decode_certificate,
    signature_valid,
    vote_signature,
)
from gpud.state import StateStore
from gpud.tags import Tags
from tests.harness.config import config_for
from tests.harness.ray_loopback import LoopbackNetwork
from tests.harness.ray_views import NAMES, tags_strategy, views, with_self_alive

ROGUES = [f"r{i}" for i in range(5)]
KEY = b"k" * 32


@st.composite
def rogues(draw: st.DrawFn) -> dict[str, Member]:
    """Members that never answered our peer API as themselves: any status, any tags."""
    names = draw(st.lists(st.sampled_from(ROGUES), max_size=5, unique=True))
    return {
        name: Member(
            name=name,
            addr="10.77.0.66",
            port=7946,
            status=draw(st.sampled_from(["alive", "failed", "leaving"])),
            tags=draw(
                st.one_of(
                    tags_strategy,
                    st.builds(Tags, ray=st.just("head"), term=st.integers(0, 10**30)),
                )
            ),
        )
        for name in names
    }


def verified_among(names: set[str]):  # type: ignore[no-untyped-def]
    return lambda name: name in names


@given(views(), rogues(), st.sets(st.sampled_from(NAMES)), st.integers(0, 5))
def test_unverified_members_never_change_the_count_or_the_plan(
    members: dict[str, Member], extra: dict[str, Member], ok: set[str], own_term: int
) -> None:
    me = next(iter(members))
    members = with_self_alive(members, me)
    verified = verified_among(ok)
    clean = screen(me, members, own_term, verified).members
    poisoned = screen(me, members | extra, own_term, verified).members
    assert poisoned == clean
    assert set(clean) <= ok | {me}
    assert has_majority(poisoned) == has_majority(clean)
    assert plan(me, poisoned, own_term) == plan(me, clean, own_term)


@given(views(), rogues(), st.sets(st.sampled_from(NAMES)), st.integers(0, 5))
def test_unverified_members_are_never_followed_nor_given_votes(
    members: dict[str, Member], extra: dict[str, Member], ok: set[str], own_term: int
) -> None:
    me = next(iter(members))
    members = with_self_alive(members, me) | extra
    view = screen(me, members, own_term, verified_among(ok)).members
    current = plan(me, view, own_term)
    if current.action in ("follow", "lead"):
        assert current.head in ok | {me}
    for name in members.keys() - ok - {me}:
        assert vote_refusal(name, own_term + 1, view) is not None


@given(views(), st.sampled_from(NAMES), st.integers(TERM_BOUND + 1, 10**30))
def test_a_wild_term_is_neither_adopted_nor_followed(
    members: dict[str, Member], wild: str, jump: int
) -> None:
    me = next(iter(members))
    members = with_self_alive(members, me)
    if wild == me:
        return
    others = [m.tags.term for n, m in members.items() if n != wild and m.tags is not None]
    vouched = max([0, *others])
    members[wild] = Member(
        name=wild,
        addr="10.77.0.9",
        port=7946,
        status="alive",
        tags=Tags(ray="head", term=vouched + jump, rv=True, hl="passing"),
    )
    screened = screen(me, members, 0, None)
    assert wild in screened.ignored
    assert highest_term(screened.members, 0) <= vouched
    assert plan(me, screened.members, 0).head != wild


votes_strategy = st.dictionaries(
    st.sampled_from(NAMES), st.sampled_from(["good", "bad", "other-term"]), max_size=7
)


@given(
    votes_strategy,
    st.integers(1, 7),
    st.builds(VoteState, term=st.integers(0, 3), voted_for=st.sampled_from([None, "h", "x"])),
    st.sampled_from(["h", "x"]),
)
def test_a_head_without_proof_is_never_followed(
    kinds: dict[str, str], known: int, own: VoteState, cert_head: str
) -> None:
    """Followed iff this node voted for the head in that term, or the certificate holds valid
    signatures of a majority of the members the head counted."""
    term = 2

    def sig(voter: str, kind: str) -> str:
        if kind == "bad":
            return vote_signature(b"x" * 32, voter=voter, candidate="h", term=term, known=known)
        t = term if kind == "good" else term - 1
        return vote_signature(KEY, voter=voter, candidate=cert_head, term=t, known=known)

    cert = VoteCertificate(
        head=cert_head, term=term, known=known, votes={v: sig(v, k) for v, k in kinds.items()}
    )
    refusal = proof_refusal("h", term, own, cert, [KEY])
    own_vote = own.term == term and own.voted_for == "h"
    good = sum(1 for k in kinds.values() if k == "good")
    backed = cert_head == "h" and good >= quorum(known)
    assert (refusal is None) == (own_vote or backed), (refusal, kinds)
    assert (proof_refusal("h", term, own, None, [KEY]) is None) == own_vote


# ---- in-process clusters with a predicate and rogue members ---------------------------------


class TrustCluster:
    """N HeadElections over a loopback transport; ``rogues`` are members nobody verified."""

    def __init__(
        self, root: Path, names: list[str], *, vote_keys: dict[str, bytes] | None = None
    ) -> None:
        self.net = LoopbackNetwork()
        self.rogues: dict[str, Member] = {}
        self.absent: set[str] = set()
        self.nodes: dict[str, HeadElection] = {}
        for i, name in enumerate(names):
            config = config_for(name, root / name)
            ctx = NodeContext(config, advertise_addr=f"10.77.0.{i + 1}")
            ctx.tags = Tags(rv=True, hl="passing")
            self.nodes[name] = HeadElection(
                ctx,
                self.net.transport(name),
                VoteStore(StateStore(config.state_dir)),
                verified=lambda n: n in self.nodes and n not in self.absent,
                vote_keys=own_key((vote_keys or {}).get(name)),
                retry_s=(0.0, 0.0),
            )

    def refresh(self) -> None:
        for election in self.nodes.values():
            members = {
                b: Member(
                    name=b,
                    addr=other.ctx.advertise_addr,
                    port=7946,
                    status="alive",
                    tags=other.ctx.tags,
                )
                for b, other in self.nodes.items()
                if b not in self.absent
            }
            election.ctx.set_members(members | self.rogues)

    async def rounds(self, n: int = 6) -> None:
        for _ in range(n):
            for name, election in self.nodes.items():
                if name not in self.absent:
                    self.refresh()
                    await election.step()
        self.refresh()

    def heads(self) -> dict[str, int]:
        return {n: e.ctx.tags.term for n, e in self.nodes.items() if e.ctx.tags.ray == "head"}


def own_key(key: bytes | None):  # type: ignore[no-untyped-def]
    """A node's vote keys: ``key`` alone, or None for the cluster's default."""
    return None if key is None else lambda: [key]


def rogue(name: str, status: str = "alive", **tags: object) -> Member:
    return Member(name=name, addr="10.77.0.66", port=7946, status=status, tags=Tags(**tags))  # type: ignore[arg-type]


async def test_rogue_head_with_a_huge_term_is_ignored(tmp_path: Path) -> None:
    cluster = TrustCluster(tmp_path, ["a", "b", "c"])
    cluster.rogues = {"evil": rogue("evil", ray="head", term=10**30, rv=True, hl="passing")}
    await cluster.rounds()
    ((head, term),) = cluster.heads().items()
    assert head != "evil" and term < 10
    for election in cluster.nodes.values():
        assert election.plan.head == head and election.store.state.term < 10
        codes = {(p.code, p.subject) for p in election.problems()}
        assert ("ray.unverified_head", "evil") in codes


async def test_dead_unverified_members_never_block_the_quorum(tmp_path: Path) -> None:
    cluster = TrustCluster(tmp_path, ["a", "b", "c"])
    cluster.rogues = {r: rogue(r, status="failed") for r in ROGUES}
    await cluster.rounds()
    assert len(cluster.heads()) == 1


async def test_a_late_joiner_follows_only_with_the_heads_certificate(tmp_path: Path) -> None:
    cluster = TrustCluster(tmp_path, ["a", "b", "c", "d"])
    cluster.absent = {"d"}
    await cluster.rounds()
    ((head, term),) = cluster.heads().items()
    cluster.absent = set()  # d joins after the election: it never voted for this head
    await cluster.rounds(3)
    d = cluster.nodes["d"]
    assert d.store.state.voted_for is None
    assert d.plan.action == "follow" and d.plan.head == head and d.ctx.tags.term == term


async def test_a_head_whose_votes_cannot_be_checked_is_not_followed(tmp_path: Path) -> None:
    """Nodes with another vote key (a head that could not have been elected by this cluster)
    are verified members, yet a late joiner does not follow their head, and says why."""
    other = secret.keygen().encode()[:32]
    keys = {"a": other, "b": other, "c": other}
    cluster = TrustCluster(tmp_path, ["a", "b", "c", "d"], vote_keys=keys)
    cluster.absent = {"d"}
    await cluster.rounds()
    ((head, _),) = cluster.heads().items()
    cluster.absent = set()
    await cluster.rounds(3)
    d = cluster.nodes["d"]
    assert d.plan.action == "wait" and d.ctx.tags.ray == "none"
    assert "valid votes" in d.plan.reason
    (problem,) = [p for p in d.problems() if p.code == "ray.unproven_head"]
    assert problem.subject == head and "ray.no_head" in problem.supersedes


async def test_nobody_stands_while_a_member_awaits_verification(tmp_path: Path) -> None:
    cluster = TrustCluster(tmp_path, ["a", "b", "c"])
    cluster.absent = {"b", "c"}  # unverified, yet alive in gossip: at start, nobody is
    a = cluster.nodes["a"]
    a.ctx.set_members(
        {n: rogue(n, rv=True, hl="passing", pp=7948) for n in ("b", "c")}
        | {"a": rogue("a", rv=True, hl="passing")}
    )
    await a.step()
    assert a.plan.action == "wait" and "verifying b, c" in a.plan.reason
    assert a.ctx.tags.ray == "none"


def test_votes_check_across_a_key_rotation(tmp_path: Path) -> None:
    """Vote keys come from serf's keyring like the peer API's (signed with the primary,
    checked with every key), and never equal the peer-API keys."""
    old, new = b"o" * 32, b"n" * 32
    sig = vote_signature(old, voter="v", candidate="h", term=3, known=3)
    assert signature_valid([new, old], sig, voter="v", candidate="h", term=3, known=3)
    assert not signature_valid([new], sig, voter="v", candidate="h", term=3, known=3)
    config = config_for("a", tmp_path)
    vote = secret.PeerApiKeys(config, None, purpose="vote")()
    assert vote == [secret.derive(config, "vote")] != secret.PeerApiKeys(config, None)()


@given(st.lists(st.text(min_size=1, max_size=200), max_size=60, unique=True))
def test_certificate_pages_fit_serf_and_cover_every_vote(voters: list[str]) -> None:
    cert = VoteCertificate(
        head="h" * 200,
        term=10**6,
        known=2 * len(voters),
        votes={v: vote_signature(KEY, voter=v, candidate="h", term=1, known=1) for v in voters},
    )
    seen: dict[str, str] = {}
    for _ in range(len(voters) + 1):
        data = certificate_page(cert, len(seen))
        assert len(data) <= 1024
        page = decode_certificate(data)
        if not page.votes:
            break
        seen |= page.votes
    assert seen == cert.votes


async def test_a_certificate_larger_than_one_serf_response_comes_in_pages(
    tmp_path: Path,
) -> None:
    # Names near gpud's 128-character limit: 7 votes of ~150 bytes take two pages.
    names = [f"{i:02d}{'n' * 120}" for i in range(13)]
    cluster = TrustCluster(tmp_path, names)
    late = names[-1]
    cluster.absent = {late}
    await cluster.rounds()
    ((head, term),) = cluster.heads().items()
    cert = cluster.nodes[head].store.certificate
    assert cert is not None and len(msgspec.json.encode(cert)) > 1024
    cluster.absent = set()
    await cluster.rounds(3)
    joined = cluster.nodes[late]
    assert joined.plan.action == "follow" and joined.plan.head == head
    assert joined.ctx.tags.term == term
