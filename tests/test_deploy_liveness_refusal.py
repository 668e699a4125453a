"""A host that lacks a deployment's local model path refuses it and announces so in its `dp` tag
(`name.0:0:digest::n`); placement on every node then prefers the other nodes for that deployment
(`NodeView.refuses`), and uses a refusing one only when too few others fit (there the replica
shows failed with the host's reason). Pure: the tag round trip and the placement input.
"""

from __future__ import annotations

import random

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from gpud.deployments.claims import Claim, format_claims, parse_claims, parse_refusals
from gpud.deployments.placement import NodeView, place
from gpud.tags import Tags
from tests.test_deploy_placement import check_invariants, spec

NAMES = [f"n{i}" for i in range(6)]
deployment_names = st.from_regex(r"[a-z][a-z0-9-]{0,7}", fullmatch=True)
digests = st.from_regex(r"[0-9a-f]{4}", fullmatch=True)


@given(
    st.dictionaries(
        st.tuples(deployment_names, st.integers(0, 9)),
        st.builds(Claim, st.integers(1, 65535), digests, st.integers(0, 65535), st.booleans()),
        max_size=4,
    ),
    st.dictionaries(deployment_names, digests, max_size=4),
)
def test_refusals_travel_in_the_dp_tag_beside_the_claims(
    claims: dict[tuple[str, int], Claim], refusals: dict[str, str]
) -> None:
    raw = format_claims(claims, refusals)
    msgspec.convert({"dp": raw}, Tags)  # the shape gossip tags accept
    assert parse_claims(raw) == claims  # a refusal is no claim (older nodes skip it too)
    assert parse_refusals(raw) == refusals
    assert parse_refusals(format_claims(claims)) == {}


def nodes_strategy() -> st.SearchStrategy[list[NodeView]]:
    return st.lists(
        st.tuples(st.integers(0, 2), st.booleans()), min_size=len(NAMES), max_size=len(NAMES)
    ).map(
        lambda rows: [
            NodeView(
                name=name,
                host=f"h-{name}",
                gpus=gpus,
                refuses=frozenset({"web"}) if refuses else frozenset(),
            )
            for name, (gpus, refuses) in zip(NAMES, rows, strict=True)
        ]
    )


@given(nodes_strategy(), st.integers(1, 3), st.integers(1, 2), st.randoms())
def test_placement_prefers_nodes_that_do_not_refuse(
    nodes: list[NodeView], replicas: int, per_replica: int, rnd: random.Random
) -> None:
    specs = [spec("web", r=replicas, n=per_replica)]
    a = place(specs, nodes, {})
    check_invariants(specs, nodes, a)
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    assert place(specs, shuffled, {}) == a, "the same on every node, in any order"
    # Soft: a refusal never leaves a replica pending that would be placed without it.
    plain = [NodeView(name=n.name, host=n.host, gpus=n.gpus) for n in nodes]
    assert len(place(specs, plain, {}).placed) == len(a.placed)
    # When the nodes that do not refuse can hold every replica, no refusing node is used.
    willing = [n for n in nodes if not n.refuses]
    if not place(specs, willing, {}).pending:
        refusing = {n.name for n in nodes if n.refuses}
        assert not any(set(p.nodes) & refusing for p in a.placed), a


def test_a_refusing_node_loses_its_replica_to_a_free_one() -> None:
    """The host that lacks the model path held the replica (it was placed there first): once
    it announces the refusal the replica is placed on the other host."""
    specs = [spec("web", r=1)]
    both = [NodeView(name=n, host=f"h-{n}", gpus=1) for n in ("a", "b")]
    first = place(specs, both, {}).placed[0].nodes[0]
    refusing = [
        NodeView(
            name=n.name,
            host=n.host,
            gpus=1,
            refuses=frozenset({"web"}) if n.name == first else frozenset(),
        )
        for n in both
    ]
    (moved,) = place(specs, refusing, {}).placed
    assert moved.nodes != (first,)
