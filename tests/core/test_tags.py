"""Gossip tags: round trip, the 512-byte limit, and decoding that never raises on bad input."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud import tags
from gpud.membership import member_from_serf
from gpud.serf.rpc import ReplyDemux, SerfFramingError, SerfMember, member_from_wire
from gpud.tags import Tags, TagsError

ports = st.integers(min_value=0, max_value=65535)
tag_values = st.builds(
    Tags,
    pp=ports,
    blk=st.integers(min_value=-1, max_value=65535),
    bc=st.integers(min_value=0, max_value=2**40),
    gpu=st.integers(min_value=0, max_value=1024),
    ray=st.sampled_from(["none", "head", "worker"]),
    term=st.integers(min_value=0, max_value=2**62),
    gcs=ports,
    rh=st.sampled_from(["auto", "prefer", "never"]),
    pri=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    rv=st.booleans(),
    nat=st.booleans(),
    hl=st.sampled_from(["unknown", "passing", "warning", "critical"]),
    nm=ports,
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


# Each field's bounds as the schema states them: (field, lowest, highest).
INT_BOUNDS = [
    ("pp", 0, 65535),
    ("gcs", 0, 65535),
    ("nm", 0, 65535),
    ("blk", -1, 65535),
    ("bc", 0, 2**40),
    ("gpu", 0, 4096),
    ("term", 0, 2**62),
    ("pri", -(2**31), 2**31 - 1),
]


@pytest.mark.parametrize(("field", "low", "high"), INT_BOUNDS)
def test_every_integer_is_bounded(field: str, low: int, high: int) -> None:
    for ok in (low, high):
        assert getattr(tags.decode({"v": "1", field: str(ok)}), field) == ok
    for bad in (low - 1, high + 1, -(2**70), 2**70, int("9" * 400)):
        with pytest.raises(TagsError, match=f"malformed tags: .*{field}"):
            tags.decode({"v": "1", field: str(bad)})
        # What peers refuse is never gossiped either.
        with pytest.raises(TagsError):
            tags.encode(Tags(**{field: bad}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pp", "٣"),  # a non-ASCII digit
        ("pp", " 80"),
        ("pp", "0x50"),
        ("role", ""),
        ("role", "g" * 17),
        ("dv", "z" * 8),
        ("dv", "a" * 65),
        ("dp", "web.0:²:ab"),
        ("dp", "web.0:20001:ab;"),
        ("dp", "x" * 600),
        ("ray", "boss"),
        ("rv", "yes"),
        ("hg", ""),
        ("pp", "\ud800"),
    ],
)
def test_malformed_strings_are_tags_errors(field: str, value: str) -> None:
    with pytest.raises(TagsError, match="malformed tags"):
        tags.decode({"v": "1", field: value})


def test_claims_gpud_writes_decode() -> None:
    raw = "web.0:20001:3fa2;big.1:20005:3fa2:20010:r;old.2:20009:3fa2:20011"
    assert tags.decode({"v": "1", "dp": raw, "dv": "0123456789ab"}).dp == raw


def _in_bounds(value: Tags) -> None:
    for field, low, high in INT_BOUNDS:
        assert low <= getattr(value, field) <= high


field_names = st.sampled_from([*Tags.__struct_fields__, "x"])
# Any text, numbers around every bound, and text from arbitrary bytes as the RPC decodes it.
field_values = st.one_of(
    st.text(max_size=24),
    st.integers(min_value=-(2**64), max_value=2**64).map(str),
    st.sampled_from(["-1", "0", "65535", "65536", "4611686018427387905", "1e3", "nan"]),
    st.binary(max_size=24).map(lambda b: b.decode("utf-8", "replace")),
)


@given(st.dictionaries(field_names, field_values, max_size=20))
def test_decode_any_string_map(raw: dict[str, str]) -> None:
    """The function membership runs on every Serf member: a decoded member is always within
    bounds, anything else is listed with its tags error."""
    member = member_from_serf(
        SerfMember(name="rogue", addr="10.0.0.9", port=7946, tags={"v": "1", **raw}, status="alive")
    )
    assert (member.tags is None) != (member.tags_error is None)
    if member.tags is not None:
        _in_bounds(member.tags)
    else:
        assert member.tags_error is not None
        assert member.tags_error.startswith(("malformed tags", "unknown tag protocol", "no tag"))


@given(st.binary(max_size=200))
def test_decode_any_bytes_as_tags(noise: bytes) -> None:
    """Arbitrary bytes where a member's tag map would be, through the RPC's own decoder and
    member conversion: a framing or protocol error (the connection is dropped and re-read),
    or a member that is in bounds or carries its tags error; never another exception."""
    demux = ReplyDemux()
    demux.expect(1, "body")
    placeholder = msgpack.packb("TAGS-PLACEHOLDER")
    member = msgpack.packb(
        {
            "Name": "rogue",
            "Addr": bytes(4),
            "Port": 7946,
            "Tags": "TAGS-PLACEHOLDER",
            "Status": "alive",
        }
    )
    # {"Members": [member]}: a one-entry map holding a one-entry array.
    body = b"\x81" + msgpack.packb("Members") + b"\x91" + member
    wire = msgpack.packb({"Seq": 1, "Error": ""}) + body.replace(placeholder, noise)
    try:
        frames = demux.feed(wire)
    except SerfFramingError:
        return
    for frame in frames:
        members = frame.body.get("Members") if isinstance(frame.body, dict) else None
        for raw in members if isinstance(members, list) else []:
            try:
                serf_member = member_from_wire(raw)
            except ValueError:  # the RPC client turns this into a SerfProtocolError
                continue
            result = member_from_serf(serf_member)
            if result.tags is not None:
                _in_bounds(result.tags)
            else:
                assert result.tags_error
