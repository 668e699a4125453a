"""Gossip tags: round trip, the 512-byte limit, and decoding that never raises on bad input."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud import tags
from gpud.tags import Tags, TagsError

ints = st.integers(min_value=-1, max_value=2**31)
tag_values = st.builds(
    Tags,
    pp=ints,
    blk=ints,
    gpu=st.integers(min_value=0, max_value=1024),
    ray=st.sampled_from(["none", "head", "worker"]),
    term=st.integers(min_value=0, max_value=2**62),
    gcs=st.integers(min_value=0, max_value=65535),
    rh=st.sampled_from(["auto", "prefer", "never"]),
    pri=ints,
    rv=st.booleans(),
    nat=st.booleans(),
    hl=st.sampled_from(["unknown", "passing", "warning", "critical"]),
    nm=st.integers(min_value=0, max_value=65535),
    hg=st.sampled_from(["unknown", "ok", "fail"]),
)


@given(tag_values)
def test_round_trip_within_limit(value: Tags) -> None:
    raw = tags.encode(value)
    assert len(msgpack.packb(raw)) <= tags.MAX_TAGS_BYTES
    assert all(isinstance(v, str) for v in raw.values())
    assert tags.decode(raw) == value


def test_oversized_tags_are_refused() -> None:
    with pytest.raises(TagsError, match="more than memberlist's 512"):
        tags.encode(Tags(role="x" * 600))


@given(st.dictionaries(st.text(max_size=8), st.text(max_size=12), max_size=12))
def test_decode_never_raises_anything_but_tags_error(raw: dict[str, str]) -> None:
    try:
        tags.decode(raw)
    except TagsError:
        pass


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({}, "no tag protocol version"),
        ({"v": "9"}, "unknown tag protocol version"),
        ({"v": "1", "pp": "seven"}, "malformed tags"),
        ({"v": "1", "ray": "boss"}, "malformed tags"),
        ({"v": 1}, "not a string map"),
    ],
)
def test_bad_tags_have_a_reason(raw: dict, reason: str) -> None:
    with pytest.raises(TagsError, match=reason):
        tags.decode(raw)
