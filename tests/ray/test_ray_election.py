"""Head election: property tests of the pure plan and of votes, and in-process clusters."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpud.context import Member, NodeContext
from gpud.ray.election import (
    FORGET_S,
    LEFT_FORGET_S,
    MEMBERSHIP_UNKNOWN,
    REMEMBERED,
    choose_candidate,
    current_head,
    has_majority,
    ineligible_reason,
    plan,
    quorum,
    remember,
    vote_refusal,
    with_remembered,
)
from gpud.ray.head_election import HeadElection
from gpud.ray.votes import (
    VoteReply,
    VoteRequest,
    VoteState,
    VoteStateError,
    VoteStore,
    decide_vote,
    decode_reply,
    encode_reply,
)
from gpud.state import StateStore
from gpud.tags import Tags
from tests.harness.config import config_for
from tests.harness.ray_loopback import LoopbackNetwork
from tests.harness.ray_views import NAMES, views, with_self_alive


@given(views(), st.randoms())
def test_plan_is_deterministic_and_order_free(
    members: dict[str, Member], rnd: random.Random
) -> None:
    me = next(iter(members))
    members = with_self_alive(members, me)
    shuffled = list(members.items())
    rnd.shuffle(shuffled)
    assert plan(me, members, 0) == plan(me, dict(shuffled), 0)


@given(views())
def test_no_lead_or_stand_without_majority(members: dict[str, Member]) -> None:
    for me in members:
        view = with_self_alive(members, me)
        p = plan(me, view, 0)
        if not has_majority(view)[0]:
            assert p.action in ("wait", "step_down")
        if p.action in ("lead", "stand"):
            assert ineligible_reason(view[me]) is None


@given(views())
def test_one_candidate_per_shared_view(members: dict[str, Member]) -> None:
    """Nodes that share one view never both stand, nor stand while another leads."""
    alive = [name for name, m in members.items() if m.alive]
    actions = {name: plan(name, members, 0).action for name in alive}
    assert sum(1 for a in actions.values() if a == "stand") <= 1
    if "lead" in actions.values():
        assert "stand" not in actions.values()
    assert sum(1 for a in actions.values() if a == "lead") <= 1


@given(views(), st.sampled_from(NAMES), st.integers(0, 5))
def test_incumbent_stickiness(members: dict[str, Member], head_name: str, term: int) -> None:
    """An eligible head of the highest announced term keeps the role: all others follow it,
    and no voter grants a vote to anyone else."""
    head = Member(
        name=head_name,
        addr="10.77.0.9",
        port=7946,
        status="alive",
        tags=Tags(ray="head", term=term, rv=True, hl="passing"),
    )
    members = {**members, head_name: head}
    for name, m in list(members.items()):
        if name != head_name and m.tags is not None and m.tags.term > term:
            members[name] = Member(
                name=name,
                addr=m.addr,
                port=m.port,
                status=m.status,
                tags=Tags(ray="worker", term=term),
            )
        elif name != head_name and m.tags is not None and m.tags.ray == "head":
            members[name] = Member(
                name=name,
                addr=m.addr,
                port=m.port,
                status=m.status,
                tags=Tags(ray="none", term=term),
            )
    if not has_majority(members)[0]:
        return
    for name, m in members.items():
        if not m.alive:
            continue
        p = plan(name, members, term)
        assert p.action == ("lead" if name == head_name else "follow"), p
        assert p.head == head_name
        if name != head_name:
            assert vote_refusal(name, term + 1, members) is not None


def test_order_prefers_prefer_then_priority() -> None:
    def member(name: str, **tags: object) -> Member:
        return Member(name=name, addr="x", port=1, status="alive", tags=Tags(rv=True, **tags))  # type: ignore[arg-type]

    members = {
        "a": member("a", pri=5),
        "b": member("b", rh="prefer", pri=0),
        "c": member("c", pri=9),
        "d": member("d", rh="never", pri=99),
    }
    assert choose_candidate(members)[0].name == "b"  # type: ignore[union-attr]
    del members["b"]
    assert choose_candidate(members)[0].name == "c"  # type: ignore[union-attr]
    reasons = choose_candidate({"e": member("e", nat=True)})[1]
    assert "NAT" in reasons["e"]
    # Unhealthy GPUs (the GPU component's verdict in tag gh) keep a node from being head;
    # degraded ones do not.
    reasons = choose_candidate({"g": member("g", gh="unhealthy")})[1]
    assert "GPUs are unhealthy" in reasons["g"]
    assert ineligible_reason(member("h", gh="degraded")) is None
    assert ineligible_reason(member("f"), lambda _: False) is not None
    assert current_head({}) is None and quorum(4) == 3 and quorum(3) == 2


# ---- votes -----------------------------------------------------------------------------

requests = st.builds(
    VoteRequest,
    term=st.integers(1, 6),
    candidate=st.sampled_from(NAMES[:4]),
    known=st.integers(1, 6),
)


contested = st.builds(
    VoteRequest,
    term=st.integers(1, 2),
    candidate=st.sampled_from(NAMES[:2]),
    known=st.sampled_from([5, 5, 5, 4, 6]),
)
# Hypothesis favours small values; keep objections and restarts the exception.
rarely = st.sampled_from([False, False, False, False, True])


@settings(  # deadline=None: each example fsyncs SQLite commits, slow under load
    suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200, deadline=None
)
@given(st.lists(st.tuples(st.integers(0, 4), contested, rarely, rarely), max_size=40))
async def test_never_two_heads_in_one_term(
    tmp_path_factory: pytest.TempPathFactory,
    deliveries: list[tuple[int, VoteRequest, bool, bool]],
) -> None:
    """5 voters (durable stores), requests in any order, random objections, random restarts:
    no term ever has two candidates with a majority of grants."""
    root = tmp_path_factory.mktemp("votes")
    stores = [VoteStore(StateStore(root / f"v{i}")) for i in range(5)]
    grants: dict[tuple[int, str], set[int]] = {}
    for voter, request, objects, restart in deliveries:
        if restart:  # crash + restart: the state comes back from the store
            stores[voter] = VoteStore(StateStore(root / f"v{voter}"))
        reply = await stores[voter].vote(
            request, voter=f"v{voter}", own_known=5, refusal="objection" if objects else None
        )
        if reply.granted:
            grants.setdefault((request.term, request.candidate), set()).add(voter)
    winners: dict[int, set[str]] = {}
    for (term, candidate), voters in grants.items():
        if len(voters) >= quorum(5):
            winners.setdefault(term, set()).add(candidate)
    assert all(len(c) == 1 for c in winners.values()), winners


@given(
    st.builds(VoteState, term=st.integers(0, 5), voted_for=st.sampled_from([None, *NAMES[:3]])),
    requests,
    st.integers(1, 6),
)
def test_decide_vote_rules(state: VoteState, request: VoteRequest, own_known: int) -> None:
    new, reply = decide_vote(state, request, voter="v", own_known=own_known, refusal=None)
    if reply.granted:
        assert new == VoteState(term=request.term, voted_for=request.candidate)
        assert request.term >= state.term and request.known >= own_known
        assert state.term < request.term or state.voted_for in (None, request.candidate)
    else:
        assert new == state and reply.reason
    assert new.term >= state.term


async def test_vote_store_survives_restart_and_rejects_corruption(tmp_path: Path) -> None:
    store = VoteStore(StateStore(tmp_path))
    first = await store.vote(
        VoteRequest(term=3, candidate="a", known=3), voter="v", own_known=3, refusal=None
    )
    assert first.granted
    reopened = VoteStore(StateStore(tmp_path))
    assert reopened.state == VoteState(term=3, voted_for="a")
    second = await reopened.vote(
        VoteRequest(term=3, candidate="b", known=3), voter="v", own_known=3, refusal=None
    )
    assert not second.granted and "already voted for a" in second.reason
    await reopened.adopt_term(5)
    assert VoteStore(StateStore(tmp_path)).state == VoteState(term=5)
    # A corrupt vote file of gpud 0.1.0 stops the start instead of being voted over.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "ray-vote.json").write_text("{not json")
    with pytest.raises(VoteStateError, match="corrupt"):
        VoteStore(StateStore(tmp_path / "old"))


def test_reply_payload_fits_serf_limit() -> None:
    reply = VoteReply(voter="v", term=1, granted=False, reason="x" * 5000)
    data = encode_reply(reply)
    assert len(data) <= 1024 and decode_reply(data).granted is False


# ---- in-process clusters over the loopback query transport ------------------------------


class Cluster:
    """N HeadElections whose membership views are computed from each other's tags."""

    def __init__(
        self, root: Path, names: list[str], *, data_path: bool = False, **tags: object
    ) -> None:
        """``data_path``: each node judges the others by its own reach (a cut peer is
        unhealthy), and serf keeps listing cut peers alive (gossip finds indirect ways, or
        has not given up on them yet): the view a cut-off minority really has for a while."""
        self.root = root
        self.net = LoopbackNetwork()
        self.down: set[str] = set()
        self.frozen: set[str] = set()
        self.left: set[str] = set()
        # Restarted nodes whose serf is not connected yet (no member list at all), or whose
        # serf lists only itself (it has not joined its peers again yet).
        self.unread: set[str] = set()
        self.alone: set[str] = set()
        self.data_path = data_path
        self.tags = tags
        self.nodes: dict[str, HeadElection] = {}
        for name in names:
            self.start(name)

    def start(self, name: str) -> None:
        """Start (or restart: same state dir, fresh process) the node ``name``."""
        config = config_for(name, self.root / name)
        old = self.nodes.get(name)
        addr = old.ctx.advertise_addr if old else f"10.77.0.{len(self.nodes) + 1}"
        ctx = NodeContext(config, advertise_addr=addr)
        ctx.tags = Tags(rv=True, hl="passing", **self.tags)  # type: ignore[arg-type]
        store = VoteStore(StateStore(config.state_dir))
        verdict = (lambda other: self.net.reachable(name, other)) if self.data_path else None
        # No random pause before standing again: the test steps the nodes itself.
        self.nodes[name] = HeadElection(
            ctx, self.net.transport(name), store, verdict, retry_s=(0.0, 0.0)
        )

    def refresh(self) -> None:
        for a, election in self.nodes.items():
            if a in self.unread:
                continue
            members = {}
            for b, other in self.nodes.items():
                if b in self.left or (a in self.alone and b != a):
                    continue
                reach = self.data_path or self.net.reachable(a, b)
                up = b not in self.down and reach
                members[b] = Member(
                    name=b,
                    addr=other.ctx.advertise_addr,
                    port=7946,
                    status="alive" if up else "failed",
                    tags=other.ctx.tags,
                )
            election.ctx.set_members(members)

    async def rounds(self, n: int = 6) -> None:
        for _ in range(n):
            for name, election in self.nodes.items():
                if name in self.down or name in self.frozen:
                    continue
                self.refresh()
                await election.step()
        self.refresh()

    def heads(self) -> dict[str, int]:
        return {
            n: e.ctx.tags.term
            for n, e in self.nodes.items()
            if e.ctx.tags.ray == "head" and n not in self.down
        }

    def actions(self) -> dict[str, str]:
        return {n: e.plan.action for n, e in self.nodes.items() if n not in self.down}


async def test_three_nodes_elect_one_head_and_fail_over(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, ["a", "b", "c"])
    await cluster.rounds()
    heads = cluster.heads()
    assert len(heads) == 1
    ((head, term),) = heads.items()
    expected = choose_candidate(cluster.nodes["a"].view())[0]
    assert expected is not None and head == expected.name
    assert all(e.ctx.tags.term == term for e in cluster.nodes.values())
    assert sorted(cluster.actions().values()) == ["follow", "follow", "lead"]

    await cluster.rounds()  # stickiness: nothing changes
    assert cluster.heads() == {head: term}

    cluster.down.add(head)
    await cluster.rounds()
    heads = cluster.heads()
    assert len(heads) == 1 and head not in heads
    assert next(iter(heads.values())) == term + 1


async def test_prefer_node_joining_does_not_unseat_the_head(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, ["a", "b", "c"])
    await cluster.rounds()
    heads = cluster.heads()
    ((head, _),) = heads.items()
    other = next(n for n in cluster.nodes if n != head)
    await cluster.nodes[other].ctx.update_tags(rh="prefer", pri=100)
    await cluster.rounds()
    assert cluster.heads() == heads


async def test_partition_minority_elects_nobody(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, ["a", "b", "c"])
    await cluster.rounds()
    ((head, term),) = cluster.heads().items()
    rest = sorted(set(cluster.nodes) - {head})
    # 2|1 with the head alone: it steps down; the majority elects a new head of a newer term.
    cluster.net.cut({head}, set(rest))
    await cluster.rounds()
    heads = cluster.heads()
    assert head not in heads and len(heads) == 1
    new_head, new_term = next(iter(heads.items()))
    assert new_term == term + 1
    assert cluster.nodes[head].plan.action == "wait"
    assert "no majority" in cluster.nodes[head].plan.reason
    # Heal: the old head follows the new one, nobody stands again.
    cluster.net.heal()
    await cluster.rounds()
    assert cluster.heads() == {new_head: new_term}
    assert cluster.nodes[head].plan.action == "follow"

    # 2|1 with the head on the majority side: the head stays; the minority node keeps no head.
    lonely = next(n for n in cluster.nodes if n != new_head)
    cluster.net.cut({lonely}, set(cluster.nodes) - {lonely})
    await cluster.rounds()
    assert cluster.heads() == {new_head: new_term}
    assert cluster.nodes[lonely].plan.action == "wait"
    assert cluster.nodes[lonely].ctx.tags.ray == "none"


async def test_stale_head_rejoining_steps_down(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, ["a", "b", "c"])
    await cluster.rounds()
    ((head, term),) = cluster.heads().items()
    # The head is paused (it cannot notice) while the others elect a new head.
    cluster.frozen.add(head)
    cluster.net.cut({head}, set(cluster.nodes) - {head})
    await cluster.rounds()
    assert len(cluster.heads()) == 2  # the frozen one still claims the old term
    cluster.frozen.clear()
    cluster.net.heal()
    await cluster.rounds()
    heads = cluster.heads()
    assert len(heads) == 1 and head not in heads and next(iter(heads.values())) == term + 1
    assert cluster.nodes[head].ctx.tags.term == term + 1


async def test_nobody_eligible_says_why(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, ["a", "b", "c"], rh="never")
    await cluster.rounds()
    assert cluster.heads() == {}
    reason = cluster.nodes["a"].plan.reason
    assert "no eligible head" in reason and 'ray.head = "never"' in reason


async def test_malformed_vote_request_is_refused(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, ["a", "b", "c"])
    cluster.refresh()
    handler = cluster.net.handlers["b"]["gpud-ray-vote"]
    reply = decode_reply(await handler("a", b"\xff garbage") or b"")
    assert not reply.granted and "malformed" in reply.reason
    # Asking for someone else's vote is refused, and changes nothing.
    request = VoteRequest(term=9, candidate="c", known=3)
    from gpud.ray.votes import encode_request

    reply = decode_reply(await handler("a", encode_request(request)) or b"")
    assert not reply.granted
    assert cluster.nodes["b"].store.state == VoteState()


FIVE = ["a", "b", "c", "d", "e"]
# Faults aimed at whoever is head at that moment (random sets rarely hit it), plus random cuts.
events = st.lists(
    st.tuples(
        st.sampled_from(
            ["isolate_head", "kill_head", "freeze_head", "heal", "revive", "cut", "thaw"]
        ),
        st.sets(st.sampled_from(FIVE), min_size=1, max_size=2),
    ),
    max_size=6,
)


@settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=25, deadline=None
)
@given(events, st.randoms(use_true_random=False))
async def test_random_partitions_never_two_heads_per_term(
    tmp_path_factory: pytest.TempPathFactory,
    script: list[tuple[str, set[str]]],
    rnd: random.Random,
) -> None:
    """5 nodes under random partitions, crashes and pauses, stepped in random order: no term
    is ever announced by two different heads, and a healed cluster ends with one head."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), FIVE)
    announced: dict[int, str] = {}

    async def run_rounds(n: int) -> None:
        for _ in range(n):
            order = list(cluster.nodes)
            rnd.shuffle(order)
            for name in order:
                if name in cluster.down or name in cluster.frozen:
                    continue
                cluster.refresh()
                await cluster.nodes[name].step()
                for head, term in cluster.heads().items():
                    assert announced.setdefault(term, head) == head, (term, head, announced)

    await run_rounds(3)
    for kind, group in script:
        heads = [h for h in cluster.heads() if h not in cluster.frozen] or sorted(group)
        head = heads[0]
        if kind == "isolate_head":
            cluster.net.cut({head} | group, set(FIVE) - {head} - group)
        elif kind == "kill_head":
            cluster.down.add(head)
        elif kind == "freeze_head":
            cluster.frozen.add(head)
            cluster.net.cut({head}, set(FIVE) - {head})
        elif kind == "heal":
            cluster.net.heal()
        elif kind == "revive":
            cluster.down.clear()
        elif kind == "cut":
            cluster.net.cut(group, set(FIVE) - group)
        else:
            cluster.frozen.clear()
        await run_rounds(3)
    cluster.net.heal()
    cluster.down.clear()
    cluster.frozen.clear()
    await run_rounds(4)
    assert len(cluster.heads()) == 1


async def test_a_verdict_on_the_old_heads_gcs_does_not_depose_the_new_head(tmp_path: Path) -> None:
    """Workers that could not reach the old head's GCS gossip hg=fail; the verdict belongs to
    that term. Once they follow a new head it must not count against it (after a partition
    heal a stale "fail" deposed the new head, which then sat out a 5-minute cooldown)."""
    cluster = Cluster(tmp_path, ["a", "b", "c", "d"])
    await cluster.rounds()
    ((head, term),) = cluster.heads().items()
    workers = sorted(set(cluster.nodes) - {head})
    for name in workers:
        await cluster.nodes[name].ctx.update_tags(hg="fail")
    cluster.down.add(head)
    await cluster.rounds()
    heads = cluster.heads()
    assert len(heads) == 1 and head not in heads
    ((new_head, new_term),) = heads.items()
    assert new_term == term + 1
    assert cluster.nodes[new_head].plan.action == "lead", cluster.nodes[new_head].plan.reason
    followers = [n for n in workers if n != new_head]
    for name in followers:
        assert cluster.nodes[name].ctx.tags.term == new_term
        assert cluster.nodes[name].ctx.tags.hg == "unknown"
    # The same verdict formed in the new term does depose it (another node can lead).
    for name in followers:
        await cluster.nodes[name].ctx.update_tags(hg="fail")
    cluster.refresh()
    await cluster.nodes[new_head].step()
    assert cluster.nodes[new_head].plan.action == "step_down"


# ---- no head without a real majority: restarts, unknown membership, remembered views ----


async def test_no_election_before_serf_lists_the_members(tmp_path: Path) -> None:
    """At start serf is not connected yet: the node neither stands (a "majority" of itself
    alone) nor votes, and raises no term."""
    cluster = Cluster(tmp_path, ["a"])
    cluster.unread.add("a")
    await cluster.rounds()
    node = cluster.nodes["a"]
    assert node.plan.action == "wait" and node.plan.reason == MEMBERSHIP_UNKNOWN
    assert node.ctx.tags.ray == "none" and node.store.state == VoteState()
    from gpud.ray.votes import encode_request

    handler = cluster.net.handlers["a"]["gpud-ray-vote"]
    reply = decode_reply(
        await handler("b", encode_request(VoteRequest(term=1, candidate="b", known=3))) or b""
    )
    assert not reply.granted and MEMBERSHIP_UNKNOWN in reply.reason
    # Once serf lists it (a one-node cluster), it is head.
    cluster.unread.clear()
    await cluster.rounds()
    assert cluster.heads() == {"a": 1}


async def test_restarted_node_counts_the_members_it_remembers(tmp_path: Path) -> None:
    """A restarted node whose serf lists only itself must not win alone: the members it
    persisted still count (as not alive), so it waits for them."""
    cluster = Cluster(tmp_path, ["a", "b", "c"])
    await cluster.rounds()
    ((head, term),) = cluster.heads().items()
    cluster.down.add(head)
    cluster.start(head)
    cluster.alone.add(head)
    cluster.down.discard(head)
    for name in set(cluster.nodes) - {head}:
        cluster.down.add(name)  # the others are out of its reach as well
    await cluster.rounds()
    restarted = cluster.nodes[head]
    assert restarted.plan.action == "wait", restarted.plan
    assert "only 1 of 3 known members alive" in restarted.plan.reason
    assert restarted.ctx.tags.ray == "none" and restarted.store.certificate is not None
    assert restarted.store.certificate.term == term  # no new term was won
    cluster.down.clear()
    cluster.alone.clear()
    await cluster.rounds()
    assert len(cluster.heads()) == 1


@given(views(), st.dictionaries(st.sampled_from(NAMES), st.integers(0, 3 * FORGET_S)))
def test_remembered_members_count_until_serf_would_forget_them(
    listed: dict[str, Member], remembered: dict[str, int]
) -> None:
    """The pure rules: every remembered member not counted now counts as failed (never
    alive) until FORGET_S after it was last alive, LEFT_FORGET_S for one listed as left (a
    graceful stop is what a restart looks like); the persisted view takes every alive
    member at ``now``."""
    now = 3 * FORGET_S
    counted = {n: m for n, m in listed.items() if m.status != "left"}
    out = with_remembered(counted, listed, remembered, now)
    for name, seen in remembered.items():
        left = name in listed and listed[name].status == "left"
        window = LEFT_FORGET_S if left else FORGET_S
        assert (name in out) == (name in counted or now - seen <= window)
        if name not in counted and name in out:
            assert out[name].status == "failed" and not out[name].alive
            assert out[name].tags_error == REMEMBERED
    assert all(out[n] is m for n, m in counted.items())
    kept = remember(counted, listed, remembered, now)
    assert {n for n, m in counted.items() if m.alive} <= kept.keys()
    assert all(kept[n] == now for n, m in counted.items() if m.alive)
    assert kept.keys() <= out.keys()


async def test_all_restarted_at_once_nobody_wins_alone(tmp_path: Path) -> None:
    """Every gpud stopped gracefully one after the other (each sees the earlier ones leave),
    then started again one by one: the last to stop remembers the others as left, and still
    does not elect itself alone."""
    cluster = Cluster(tmp_path, ["a", "b", "c"])
    await cluster.rounds()
    for name in ["a", "b", "c"]:
        cluster.left.add(name)
        cluster.down.add(name)
        await cluster.rounds(2)
    for name in ["c", "a", "b"]:
        cluster.start(name)
        cluster.left.discard(name)
        cluster.down.discard(name)
        cluster.alone.add(name)
        await cluster.rounds(2)
        assert cluster.heads() == {}, cluster.nodes[name].plan
    cluster.alone.clear()
    await cluster.rounds()
    assert len(cluster.heads()) == 1, {n: e.last_election for n, e in cluster.nodes.items()}
    ((head, _),) = cluster.heads().items()
    cert = cluster.nodes[head].store.certificate
    assert cert is not None and cert.known == 3 and len(cert.votes) >= 2


RESTARTS = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["unread", "alone", "joined"]),
        st.integers(1, 4),
    ),
    min_size=1,
    max_size=5,
)


@settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=20, deadline=None
)
@given(RESTARTS, st.randoms(use_true_random=False))
async def test_restarts_with_persisted_terms_never_make_a_second_head(
    tmp_path_factory: pytest.TempPathFactory,
    script: list[tuple[str, str, int]],
    rnd: random.Random,
) -> None:
    """3 nodes, restarted one at a time (persisted votes, terms and views), each coming back
    with serf not connected, or listing only itself, for some steps: no term ever has two
    heads, no node ever leads in a term it won with fewer than 3 members counted, and the
    cluster ends with one head."""
    cluster = Cluster(tmp_path_factory.mktemp("restarts"), ["a", "b", "c"])
    announced: dict[int, str] = {}

    async def run_rounds(n: int) -> None:
        for _ in range(n):
            order = list(cluster.nodes)
            rnd.shuffle(order)
            for name in order:
                if name in cluster.down:
                    continue
                cluster.refresh()
                await cluster.nodes[name].step()
                for head, term in cluster.heads().items():
                    assert announced.setdefault(term, head) == head, (term, head, announced)
                    cert = cluster.nodes[head].store.certificate
                    assert cert is not None and cert.known == 3, cert
                    assert len(cert.votes) >= 2

    await run_rounds(3)
    for name, phase, steps in script:
        cluster.start(name)
        if phase == "unread":
            cluster.unread.add(name)
        elif phase == "alone":
            cluster.alone.add(name)
        await run_rounds(steps)
        cluster.unread.clear()
        cluster.alone.clear()
        await run_rounds(1)
    await run_rounds(4)
    assert len(cluster.heads()) == 1


# ---- pre-vote: a cut-off minority raises no term, and deposes nobody after the heal ----


async def test_cut_off_minority_neither_raises_its_term_nor_deposes_the_head(
    tmp_path: Path,
) -> None:
    """5 nodes split 3|2 with the head in the 3; the 2 still see everyone alive in serf but
    none of the 3 over the data path, so each of them is its own best candidate. Pre-votes
    keep them from raising their terms; after the heal the head and its term stay."""
    cluster = Cluster(tmp_path, FIVE, data_path=True)
    await cluster.rounds()
    ((head, term),) = cluster.heads().items()
    majority = {head, *sorted(set(FIVE) - {head})[:2]}
    minority = set(FIVE) - majority
    cluster.net.cut(majority, minority)
    await cluster.rounds(10)
    assert cluster.heads() == {head: term}
    for name in minority:
        node = cluster.nodes[name]
        assert node.store.state.term == term, (name, node.store.state, node.last_election)
    # The minority's best candidate did try, and stopped at the pre-vote.
    tried = [cluster.nodes[n].last_election for n in minority]
    assert any("pre-vote got 2 of 3 needed" in text for text in tried), tried
    cluster.net.heal()
    await cluster.rounds(6)
    assert cluster.heads() == {head: term}
    assert all(e.ctx.tags.term == term for e in cluster.nodes.values())
    assert sorted(cluster.actions().values()) == ["follow"] * 4 + ["lead"]
