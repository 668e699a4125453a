"""A host that lacks a deployment's local model path refuses it and announces so in its `dp` tag
(`name.0:0:digest::n`); placement on every node then prefers the other nodes for that deployment
(`NodeView.refuses`), and uses a refusing one only when too few others fit (there the replica
shows failed with the host's reason). The tag round trip and the placement input (pure), and a
node's own refusals as its model path comes and goes.
"""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from gpud.context import Member
from gpud.deployments import version
from gpud.deployments.claims import DIGEST_CHARS, Claim, format_claims, parse_claims, parse_refusals
from gpud.deployments.model import Entry
from gpud.deployments.placement import NodeView, place
from gpud.deployments.refusals import ModelRefusals, with_refusals
from gpud.deployments.spec import load_spec
from gpud.tags import Tags
from tests.harness.placement import check_invariants, spec

NAMES = [f"n{i}" for i in range(6)]
deployment_names = st.from_regex(r"[a-z][a-z0-9-]{0,7}", fullmatch=True)
digests = st.from_regex(r"[0-9a-f]{4}", fullmatch=True)
spec_names = st.from_regex(r"[a-z][a-z0-9]{0,7}", fullmatch=True)  # valid as a spec's name


@given(
    st.dictionaries(
        st.tuples(deployment_names, st.integers(0, 9)),
        st.builds(
            Claim,
            st.integers(1, 65535),
            digests,
            st.integers(0, 65535),
            st.booleans(),
            st.integers(0, 65535),
        ),
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


def _entry(name: str, model: str) -> Entry:
    s = load_spec(
        f'name = "{name}"\nengine = "command"\nmodel = "{model}"\nreplicas = 1\n'
        'command = ["/bin/srv", "--port", "{port}"]\n'.encode()
    )
    return Entry(record=version.applied(s, version.SpecVersion(lamport=1, origin="n0")))


@given(st.lists(st.dictionaries(spec_names, st.booleans(), max_size=3), min_size=4, max_size=4))
def test_a_refusal_counts_only_for_the_spec_version_it_names(
    refused: list[dict[str, bool]],
) -> None:
    """Node i refuses the deployments in ``refused[i]``, True where it refused the version held
    here: those count, a refusal of another version does not (a changed spec is tried again).
    This node (n0) counts its own refusals, not its tag; a member without tags refuses nothing."""
    names = ["n0", "n1", "n2", "n3"]
    entries = {d: _entry(d, "m") for r in refused for d in r}
    held = {d: e.record.digest[:DIGEST_CHARS] for d, e in entries.items()}

    def announced(r: dict[str, bool]) -> dict[str, str]:
        other = {d: "0000" if held[d] != "0000" else "ffff" for d in r}
        return {d: held[d] if current else other[d] for d, current in r.items()}

    def member(name: str, tags: Tags | None) -> Member:
        return Member(name=name, addr="10.0.0.1", port=7946, status="alive", tags=tags)

    everything = {d: held[d] for d in entries}
    members = [member("n0", Tags(dp=format_claims({}, everything)))]
    members += [
        member(n, Tags(dp=format_claims({}, announced(r))))
        for n, r in zip(names[1:3], refused[1:3], strict=True)
    ]
    members.append(member("n3", None))
    views = [NodeView(name=n, host=f"h-{n}", gpus=1) for n in names]
    out = with_refusals(views, members, "n0", announced(refused[0]), entries)
    expected = [{d for d, current in r.items() if current} for r in refused[:3]] + [set()]
    assert [v.refuses for v in out] == expected


async def test_a_missing_model_path_is_refused_until_the_spec_changes(tmp_path: Path) -> None:
    refusals = ModelRefusals()
    missing = _entry("web", str(tmp_path / "no-such-model"))
    await refusals.check(missing)
    assert refusals.announced() == {"web": missing.record.digest[:DIGEST_CHARS]}
    [problem] = refusals.problems()
    assert problem.code == "deployments.model_missing" and "does not exist" in problem.message
    # The model appears: the next check lifts the refusal.
    (tmp_path / "no-such-model").mkdir()
    await refusals.check(missing)
    assert refusals.announced() == {} and refusals.problems() == []
    # A refusal of a spec that changed (or went away) is dropped at the next recheck.
    gone = _entry("web", str(tmp_path / "elsewhere"))
    await refusals.check(gone)
    await refusals.recheck({"web": _entry("web", "/models/other")})
    assert refusals.announced() == {}
