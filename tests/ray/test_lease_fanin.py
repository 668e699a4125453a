"""The leader lease without fan-in at the head: renewals down a tree (gpud.ray.lease_tree).

Property tests drive the real LeaseRelay over an in-memory network with dead members and
views that differ, then run the lease rule production runs (`lease_holds`, `lease_refusal`) on
the contact times it produced: the old head always stops before a successor can win. An
in-process cluster of HeadElections on real peer APIs (loopback, real signatures, no probe
rounds: the tree is the only source of contacts) keeps its head on renewals alone, with
FANOUT messages per renewal at the head, and the head steps down once a majority is cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud import secret
from gpud.context import Member, NodeContext
from gpud.health.peer_api import PeerCallError
from gpud.health.service import HealthService
from gpud.ray.election import quorum
from gpud.ray.head_election import PATH_RENEW, HeadElection
from gpud.ray.lease import LEASE_MARGIN_S, LEASE_S, lease_holds, lease_refusal
from gpud.ray.lease_tree import (
    FANOUT,
    LeaseRelay,
    Renewal,
    RenewalAck,
    relay_order,
    renewal_start,
    split,
    tree_depth,
)
from gpud.ray.votes import VoteStore
from gpud.state import StateStore
from gpud.tags import Tags
from tests.harness.config import config_for
from tests.harness.ray_loopback import LoopbackNetwork
from tests.harness.serf import free_port
from tests.harness.wait import async_wait_for


def covered(lo: int, hi: int, fanout: int) -> list[int]:
    out: list[int] = []
    for child, a, b in split(lo, hi, fanout):
        out += [child, *covered(a, b, fanout)]
    return out


@given(st.integers(1, 6000), st.integers(2, 16))
def test_the_tree_reaches_every_member_once_with_bounded_fanout_and_depth(
    members: int, fanout: int
) -> None:
    assert sorted(covered(1, members, fanout)) == list(range(1, members))
    assert len(split(1, members, fanout)) <= fanout
    # Each level divides what is left by the fan-out: log depth.
    assert (
        tree_depth(1, members, fanout) <= max(0, math.ceil(math.log(max(members, 1), fanout))) + 1
    )


@given(st.lists(st.text(min_size=1, max_size=8), max_size=30, unique=True), st.integers(0, 50))
def test_relay_order_is_a_permutation_with_the_head_first(names: list[str], epoch: int) -> None:
    ring = sorted({*names, "head"})
    order = relay_order("head", ring, renewal_start("head", ring, epoch))
    assert order[0] == "head" and sorted(order[1:]) == sorted(set(names) - {"head"})
    if len(ring) > 3:  # each renewal moves the relays to other runs
        assert relay_order("head", ring, renewal_start("head", ring, epoch + 1)) != order
    # A view lacking one member keeps everyone else's order.
    if len(ring) > 2:
        gone = order[1]
        lacking = relay_order("head", [n for n in ring if n != gone], order[1])
        assert lacking == [n for n in order if n != gone]


class Clock:
    """Virtual time: every message takes its delay, and time never runs backwards."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def relays(
    names: list[str],
    dead: set[str],
    missing: dict[str, set[str]],
    delays: dict[str, float],
    fanout: int,
    clock: Clock,
) -> dict[str, LeaseRelay]:
    """One real LeaseRelay per name over an in-memory network: ``dead`` never answer,
    ``missing[n]``: members n's view lacks, ``delays[n]``: how long a message to n takes."""
    nodes: dict[str, LeaseRelay] = {}

    async def send(to: str, renewal: Renewal) -> RenewalAck:
        if to in dead:
            raise ConnectionRefusedError(to)
        clock.now += delays.get(to, 0.0)
        return await nodes[to].receive(renewal)

    for name in names:
        view = [n for n in names if n != name and n not in missing.get(name, set())]
        nodes[name] = LeaseRelay(name, lambda view=view: view, send, fanout=fanout, clock=clock)
    return nodes


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(2, 40),
    fanout=st.integers(2, 8),
    data=st.data(),
)
def test_relayed_contacts_never_outlive_what_members_heard(
    size: int, fanout: int, data: st.DataObject
) -> None:
    """For any tree, dead relays, differing views and delays: every contact the head counts
    is no later than the moment that member heard it, so the old head stops before any
    successor can gather a majority (lease_holds against lease_refusal, as production)."""
    names = [f"n{i:02d}" for i in range(size)]
    head, others = names[0], names[1:]
    dead = set(data.draw(st.lists(st.sampled_from(others), max_size=size // 2)))
    missing = {
        n: set(data.draw(st.lists(st.sampled_from(names), max_size=3)))
        for n in data.draw(st.lists(st.sampled_from(others), max_size=4))
    }
    delays = {n: data.draw(st.floats(0, 0.3)) for n in others}
    renewals = data.draw(st.integers(1, 4))
    clock = Clock()
    nodes = relays(names, dead, missing, delays, fanout, clock)
    relay = nodes[head]
    before = relay.sent
    for _ in range(renewals):
        asyncio.run(relay.renew(term=3))
        clock.now += data.draw(st.floats(0, 1.5))
    # The head sends at most FANOUT per renewal; every member at most that many too.
    assert relay.sent - before <= fanout * renewals
    assert all(n.sent <= fanout * renewals for n in nodes.values())
    # Nobody dead is counted, and each count is backed by a member that heard no earlier.
    assert not relay.contacts.keys() & dead
    for name, at in relay.contacts.items():
        assert nodes[name].heard[head] >= at, (name, at, nodes[name].heard)
    members = {
        n: Member(name=n, addr="10.0.0.1", port=7946, status="alive", tags=Tags()) for n in others
    }
    members[head] = Member(
        name=head, addr="10.0.0.1", port=7946, status="alive", tags=Tags(ray="head")
    )
    ticks = [clock.now + i / 10 for i in range(60)]
    acting = [t for t in ticks if lease_holds(head, names, relay.contacts, t, LEASE_S) is None]
    stops = max(acting, default=-math.inf)
    for t in ticks:
        willing = [
            n
            for n in others
            if lease_refusal(others[0], n, members, nodes[n].heard, t, LEASE_S + LEASE_MARGIN_S)
            is None
        ]
        if len(willing) >= quorum(len(names)):
            assert t > stops, (t, stops)
            break


async def test_a_hanging_relay_costs_its_subtree_one_renewal_not_the_lease() -> None:
    """A relay that never answers is cut off by the renewal's budget; the other runs still
    confirm, and the next renewal (another order) reaches its subtree another way."""
    names = [f"n{i:02d}" for i in range(30)]
    clock = Clock()
    nodes = relays(names, set(), {}, {}, 3, clock)
    stuck = "n07"
    real = nodes[stuck].receive

    async def hang(renewal: Renewal) -> RenewalAck:
        await asyncio.sleep(5)
        return await real(renewal)

    nodes[stuck].receive = hang  # type: ignore[method-assign]
    head = nodes["n00"]
    got = await asyncio.wait_for(head.renew(term=1), 2.0)
    assert stuck not in head.contacts and 0 < got < len(names) - 1
    for _ in range(6):
        await asyncio.wait_for(head.renew(term=1), 2.0)
    assert set(head.contacts) == set(names[1:]) - {stuck}


async def test_a_relay_cannot_confirm_members_outside_its_run() -> None:
    """A faulty relay that answers for every member is believed for the run it was given at
    most: here the head reaches every member itself (runs of one), so the dead members the
    relay claims are never confirmed."""
    names = [f"n{i:02d}" for i in range(20)]
    dead = set(names[2:])
    nodes = relays(names, dead, {}, {}, len(names), Clock())
    given: list[Renewal] = []

    async def boast(renewal: Renewal) -> RenewalAck:
        given.append(renewal)
        return RenewalAck(acked=[*names, "ghost"])

    nodes["n01"].receive = boast  # type: ignore[method-assign]
    head = nodes["n00"]
    assert await head.renew(term=1) == 1
    assert [(r.lo, r.hi) for r in given] == [(given[0].lo, given[0].lo)]
    assert set(head.contacts) == {"n01"}


class LooseRenewal(msgspec.Struct, kw_only=True):
    head: str
    term: int
    epoch: int
    start: str
    lo: int
    hi: int
    budget_ms: int


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path, size: int
) -> AsyncIterator[list[tuple[HeadElection, HealthService]]]:
    key_file = tmp_path / "cluster.key"
    key_file.write_text(secret.keygen())
    net = LoopbackNetwork()
    nodes = []
    for i in range(size):
        addr = f"127.79.0.{i + 1}"
        name = f"n{i:02d}"
        config = config_for(
            name,
            tmp_path / name,
            {
                "cluster": {"insecure": False, "key_file": str(key_file)},
                "peer": {"port": free_port(addr)},
            },
        )
        ctx = NodeContext(config, advertise_addr=addr)
        ctx.tags = Tags(rv=True, hl="passing", pp=config.peer.port)
        health = HealthService(ctx)
        election = HeadElection(
            ctx,
            net.transport(name),
            VoteStore(StateStore(config.state_dir)),
            lease=health,
            retry_s=(0.0, 0.0),
        )
        nodes.append((election, health))
    for _, health in nodes:
        await health.server.start()
    try:
        yield nodes
    finally:
        for _, health in nodes:
            await health.server.stop()
            await health.client.close()


def refresh(nodes: list[tuple[HeadElection, HealthService]], down: set[str]) -> None:
    members = {
        e.ctx.node_name: Member(
            name=e.ctx.node_name,
            addr=e.ctx.advertise_addr,
            port=7946,
            status="alive",
            tags=e.ctx.tags,
        )
        for e, _ in nodes
    }
    for election, _ in nodes:
        if election.ctx.node_name not in down:
            election.ctx.set_members(dict(members))


async def test_a_head_keeps_its_lease_on_renewals_alone_and_loses_it_when_cut_off(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, 12) as nodes:
        down: set[str] = set()

        async def step_all() -> dict[str, str]:
            for election, _ in nodes:
                if election.ctx.node_name not in down:
                    refresh(nodes, down)
                    await election.step()
            return {e.ctx.node_name: e.plan.action for e, _ in nodes if e.ctx.node_name not in down}

        async def one_head() -> str | None:
            actions = await step_all()
            leads = [n for n, a in actions.items() if a == "lead"]
            return leads[0] if len(leads) == 1 else None

        # A renewal out of its bounds (a minute's wait asked of every relay) is refused with
        # a 400 and changes nothing.
        target, client = nodes[1][0], nodes[0][1].client
        bad = LooseRenewal(head="n00", term=1, epoch=1, start="", lo=1, hi=5, budget_ms=60_000)
        with pytest.raises(PeerCallError, match="HTTP 400"):
            await client.call(
                target.ctx.advertise_addr, target.ctx.config.peer.port, PATH_RENEW, bad, RenewalAck
            )
        assert target._relay is not None and target._relay.heard == {}

        head_name = await async_wait_for(one_head, 20, 0.2, what="one head elected")
        head = next(e for e, _ in nodes if e.ctx.node_name == head_name)
        assert head._relay is not None
        # No probe round ever ran: every contact the lease has comes from the tree.
        assert all(h.prober.rounds == 0 for _, h in nodes)
        sent = head._relay.sent
        renewed_at = asyncio.get_running_loop().time()
        for _ in range(12):  # 3 s: longer than LEASE_S, so only renewals keep it
            await asyncio.sleep(0.25)
            actions = await step_all()
            assert actions[head_name] == "lead", actions
        renewals = (asyncio.get_running_loop().time() - renewed_at) / 0.5
        assert head._relay.sent - sent <= FANOUT * (renewals + 2)
        # Followers heard the head through the tree, and refuse a successor meanwhile.
        heard = [e._relay.heard.get(head_name) for e, _ in nodes if e is not head]
        assert all(at is not None for at in heard)

        # A majority of the members' peer APIs stop answering (their gpud hangs, say): the
        # head cannot confirm a majority and stops within its lease.
        others = [(e, h) for e, h in nodes if e is not head]
        cut = others[: quorum(len(nodes))]
        for election, health in cut:
            await health.server.stop()
            down.add(election.ctx.node_name)
        started = asyncio.get_running_loop().time()

        async def stepped_down() -> bool:
            refresh(nodes, down)
            await head.step()
            return head.plan.action != "lead"

        await async_wait_for(stepped_down, LEASE_S + 2.0, 0.1, what="head steps down")
        assert asyncio.get_running_loop().time() - started <= LEASE_S + 1.0
        assert "lease expired" in head.plan.reason
