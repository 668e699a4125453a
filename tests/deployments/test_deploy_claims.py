"""The `dp` tag's claims (round trip, old claims, malformed parts) and the replica head rule
(`claims.replica_head`), driven with hypothesis on the same function the service runs."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from gpud.context import Member
from gpud.deployments.claims import Claim, format_claims, parse_claims, replica_head
from gpud.tags import Tags

names = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")
claims_st = st.builds(
    Claim,
    st.integers(1, 65535),
    st.from_regex(r"\A[0-9a-f]{4}\Z"),
    st.integers(0, 65535),
    st.booleans(),
    st.integers(0, 65535),
)


@given(st.dictionaries(st.tuples(names, st.integers(0, 255)), claims_st))
def test_claims_tag_round_trips(claims: dict[tuple[str, int], Claim]) -> None:
    assert parse_claims(format_claims(claims)) == claims


def test_old_claims_parse_as_not_announced_ready() -> None:
    assert parse_claims("web.0:20001:ab12;big.1:20005:ab12:20010") == {
        ("web", 0): Claim(20001, "ab12"),
        ("big", 1): Claim(20005, "ab12", 20010, ready=False),
    }
    # Ready, with and without a GCS port; unknown flag letters are ignored.
    assert format_claims({("web", 0): Claim(20001, "ab12", 0, True)}) == "web.0:20001:ab12::r"
    assert parse_claims("big.1:20005:ab12:20010:rx") == {
        ("big", 1): Claim(20005, "ab12", 20010, True)
    }


def test_a_worker_node_manager_port_is_the_last_field() -> None:
    claim = Claim(20007, "ab12", 0, False, 20040)
    assert format_claims({("big", 0): claim}) == "big.0:20007:ab12:::20040"
    assert parse_claims("big.0:20007:ab12:::20040") == {("big", 0): claim}
    assert parse_claims("big.0:20007:ab12:20010:r:20040") == {
        ("big", 0): Claim(20007, "ab12", 20010, True, 20040)
    }
    # Not a number: the claim is malformed and skipped.
    assert parse_claims("big.0:20007:ab12:::x") == {}


def test_malformed_claims_are_skipped() -> None:
    assert parse_claims("") == {}
    assert parse_claims("web.0:20001:ab12;junk;a.b:c;x.1:") == {("web", 0): Claim(20001, "ab12")}


# ---- replica_head --------------------------------------------------------------------------

KEY = ("big", 0)

tags_st = st.builds(
    Tags,
    rh=st.sampled_from(["auto", "prefer", "never"]),
    pri=st.integers(0, 3),
    rv=st.booleans(),
    nat=st.booleans(),
    gh=st.sampled_from(["unknown", "healthy", "unhealthy"]),
    hl=st.sampled_from(["passing", "critical"]),
)
node_names = st.lists(st.sampled_from([f"n{i}" for i in range(8)]), min_size=1, unique=True)


@st.composite
def views(draw: st.DrawFn) -> tuple[list[str], dict[str, Member], dict[str, dict]]:
    """A replica's nodes, a membership view (some nodes without tags or unknown) and claims
    (some nodes announcing a GCS port for the replica)."""
    nodes = draw(node_names)
    members = {}
    for name in draw(st.lists(st.sampled_from([f"n{i}" for i in range(10)]), unique=True)):
        tags = draw(st.none() | tags_st)
        members[name] = Member(name=name, addr="10.0.0.1", port=7946, status="alive", tags=tags)
    claims = {
        n: {KEY: Claim(20001, "ab12", draw(st.sampled_from([0, 0, 20010])))}
        for n in draw(st.lists(st.sampled_from(nodes), unique=True))
    }
    return nodes, members, claims


def shuffled(mapping: dict, seed: int) -> dict:
    items = list(mapping.items())
    random.Random(seed).shuffle(items)
    return dict(items)


@given(views(), st.integers())
def test_head_is_a_node_of_the_replica_and_independent_of_input_order(
    view: tuple[list[str], dict[str, Member], dict[str, dict]], seed: int
) -> None:
    nodes, members, claims = view
    head = replica_head(KEY, nodes, members, claims)
    assert head in nodes
    again = replica_head(
        KEY,
        random.Random(seed).sample(nodes, len(nodes)),
        shuffled(members, seed),
        shuffled(claims, seed),
    )
    assert again == head


@given(views(), st.data())
def test_head_stays_while_it_is_in_the_replica_and_changes_only_when_it_leaves(
    view: tuple[list[str], dict[str, Member], dict[str, dict]], data: st.DataObject
) -> None:
    """Once the head announces its GCS port (and no one else does), replacing other nodes of
    the replica and changing every member's tags keeps it head; it changes only when it
    leaves the replica."""
    nodes, members, _ = view
    head = replica_head(KEY, nodes, members, {})
    claims = {head: {KEY: Claim(20001, "ab12", 20010)}}
    for _ in range(5):
        others = data.draw(st.lists(st.sampled_from([f"n{i}" for i in range(8)]), unique=True))
        members = {
            name: Member(
                name=name, addr="10.0.0.1", port=7946, status="alive", tags=data.draw(tags_st)
            )
            for name in members
        }
        stays = data.draw(st.booleans())
        nodes = sorted({*others, head} if stays else set(others) - {head})
        if not nodes:
            continue
        new_head = replica_head(KEY, nodes, members, claims)
        assert (new_head == head) == stays, (nodes, head, new_head)
        if not stays:
            head = new_head
            claims = {head: {KEY: Claim(20001, "ab12", 20010)}}


def test_best_eligible_node_leads_and_ineligible_ones_only_when_no_one_else_can() -> None:
    def member(name: str, **tags: object) -> Member:
        return Member(name=name, addr="10.0.0.1", port=7946, status="alive", tags=Tags(**tags))

    members = {
        "a": member("a", rv=False),  # no Ray: ineligible
        "b": member("b", rv=True, rh="prefer"),
        "c": member("c", rv=True),
    }
    assert replica_head(KEY, ["a", "b", "c"], members, {}) == "b"
    assert replica_head(KEY, ["a", "c"], members, {}) == "c"
    assert replica_head(KEY, ["a"], members, {}) == "a"
    # c announces a GCS port: it stays head although b ranks higher.
    assert replica_head(KEY, ["a", "b", "c"], members, {"c": {KEY: Claim(1, "ab12", 2)}}) == "c"
