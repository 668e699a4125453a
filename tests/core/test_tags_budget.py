"""The tags fit memberlist's 512 bytes whatever a node runs: the worst case of every field
together, built from the schema itself (a field added later is counted without editing this
test), and any tags within the schema's bounds, encode within the limit."""

from __future__ import annotations

import typing

import msgpack
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud import tags
from gpud.deployments.claims import Claim, format_claims, parse_claims
from gpud.tags import CLAIMS_MAX_CHARS, MAX_TAGS_BYTES, Tags, TagsError

FIELDS = msgspec.inspect.type_info(Tags).fields  # type: ignore[attr-defined]
# The longest valid value of each string field (each matches its field's pattern). A new
# string field fails `test_worst_case_of_every_field_fits` until it is given one here.
LONGEST_STR = {
    "role": "z" * 16,
    "dv": "f" * 64,
    "dp": "",  # filled in below: claims up to CLAIMS_MAX_CHARS
}


def longest_claims(limit: int) -> str:
    """Claims of the longest shape, as many as fit ``limit`` characters, then shorter ones
    (``name.0:0:``, 6 characters at the least) filling it to within 6 characters."""
    longest = f"{'d' * 63}.9999:65535:{'f' * 32}:65535:rrrrrrrr:65535"
    parts: list[str] = []
    while len(";".join([*parts, longest])) <= limit:
        parts.append(longest)
    while (room := limit - len(";".join(parts)) - (1 if parts else 0)) >= 6:
        parts.append(f"{'n' * min(63, room - 5)}.{len(parts)}:0:"[:room])
    return ";".join(parts)


def worst_case() -> Tags:
    values: dict[str, object] = {"v": tags.TAGS_VERSION}  # decode accepts only this one
    for field in FIELDS:
        kind = field.type
        if field.name == "v":
            continue
        if isinstance(kind, msgspec.inspect.IntType):
            low, high = kind.ge, kind.le
            assert low is not None and high is not None, f"{field.name} is unbounded"
            values[field.name] = max(low, high, key=lambda v: len(str(v)))
        elif isinstance(kind, msgspec.inspect.StrType):
            assert field.name in LONGEST_STR, f"no longest value for the new field {field.name}"
            assert kind.max_length is not None, f"{field.name} is unbounded"
            values[field.name] = LONGEST_STR[field.name]
        elif isinstance(kind, msgspec.inspect.LiteralType):
            # The longest value gossiped: the default is left out, whatever its length.
            sent = [v for v in kind.values if v != field.default] or list(kind.values)
            values[field.name] = max(sent, key=lambda v: len(str(v)))
        elif isinstance(kind, msgspec.inspect.BoolType):
            values[field.name] = True  # False is the default, left out of the gossip
        else:
            raise AssertionError(f"tags field {field.name} of a type the budget does not know")
    values["dp"] = longest_claims(CLAIMS_MAX_CHARS)
    return Tags(**values)  # type: ignore[arg-type]


def test_worst_case_of_every_field_fits() -> None:
    worst = worst_case()
    assert CLAIMS_MAX_CHARS - 6 < len(worst.dp) <= CLAIMS_MAX_CHARS
    assert parse_claims(worst.dp)  # real claims, not just characters
    raw = tags.encode(worst)
    size = len(msgpack.packb(raw))
    assert size <= MAX_TAGS_BYTES, size
    assert tags.decode(raw) == worst


def test_claims_past_their_budget_are_refused_but_still_decoded() -> None:
    too_long = longest_claims(CLAIMS_MAX_CHARS + 40)
    with pytest.raises(TagsError, match=f"more than the {CLAIMS_MAX_CHARS}"):
        tags.encode(Tags(dp=too_long))
    # An older node's longer claims still decode: the budget bounds only what we gossip.
    assert tags.decode({"v": "1", "dp": too_long}).dp == too_long


def _strategy(field: msgspec.inspect.Field) -> st.SearchStrategy[object]:
    kind = field.type
    if isinstance(kind, msgspec.inspect.IntType):
        return st.integers(kind.ge, kind.le)
    if isinstance(kind, msgspec.inspect.LiteralType):
        return st.sampled_from(kind.values)
    if isinstance(kind, msgspec.inspect.BoolType):
        return st.booleans()
    if field.name == "dp":
        return claims_strategy
    assert isinstance(kind, msgspec.inspect.StrType) and kind.pattern is not None
    return st.from_regex(kind.pattern, fullmatch=True).filter(
        lambda v: len(v) <= typing.cast(int, kind.max_length)
    )


name = st.from_regex(r"[a-z0-9-]{1,63}", fullmatch=True)
claim = st.tuples(
    st.tuples(name, st.integers(0, 9999)),
    st.builds(
        Claim,
        port=st.integers(0, 65535),
        spec=st.from_regex(r"[0-9a-f]{0,32}", fullmatch=True),
        gcs=st.integers(0, 65535),
        ready=st.booleans(),
        nm=st.integers(0, 65535),
    ),
)


def _fit(pairs: list[tuple[tuple[str, int], Claim]]) -> str:
    """As many claims as fit the budget, the way the deployments publisher leaves out the
    rest."""
    kept: dict[tuple[str, int], Claim] = {}
    for key, value in pairs:
        if len(format_claims({**kept, key: value})) <= CLAIMS_MAX_CHARS:
            kept[key] = value
    return format_claims(kept)


claims_strategy = st.lists(claim, max_size=12).map(_fit)


@given(st.fixed_dictionaries({f.name: _strategy(f) for f in FIELDS if f.name != "v"}))
def test_any_tags_within_the_schema_fit(values: dict[str, object]) -> None:
    value = Tags(**values)  # type: ignore[arg-type]
    raw = tags.encode(value)
    assert len(msgpack.packb(raw)) <= MAX_TAGS_BYTES
    assert tags.decode(raw) == value
