"""Peer-API request signing: what the verifier accepts and refuses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.health.auth import (
    H_NONCE,
    H_SIGNATURE,
    H_TIME,
    HONEST_NONCES,
    NONCE_CACHE_SIZE,
    NONCES_PER_SENDER,
    AuthError,
    Verifier,
    sign,
)

KEY = b"k" * 32
NOW = 1_800_000_000.0


def test_valid_request_names_its_sender_once():
    verifier = Verifier(KEY)
    headers = sign(KEY, "n1", "POST", "/peer/v1/ping", b"{}", now=NOW)
    assert verifier.verify("POST", "/peer/v1/ping", headers, b"{}", now=NOW + 1) == "n1"
    with pytest.raises(AuthError, match="replayed"):
        verifier.verify("POST", "/peer/v1/ping", headers, b"{}", now=NOW + 2)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda h: h.pop(H_SIGNATURE), "missing"),
        (lambda h: h.update({H_SIGNATURE: "0" * 64}), "bad signature"),
        (lambda h: h.update({H_TIME: "yesterday"}), "malformed timestamp"),
        (lambda h: h.update({H_NONCE: "short"}), "malformed"),
    ],
)
def test_tampered_headers_are_refused(change, match):
    headers = sign(KEY, "n1", "POST", "/p", b"{}", now=NOW)
    change(headers)
    with pytest.raises(AuthError, match=match):
        Verifier(KEY).verify("POST", "/p", headers, b"{}", now=NOW)


def test_signature_covers_key_method_path_and_body():
    headers = sign(KEY, "n1", "POST", "/p", b"{}", now=NOW)
    for key, method, path, body in [
        (b"x" * 32, "POST", "/p", b"{}"),
        (KEY, "GET", "/p", b"{}"),
        (KEY, "POST", "/q", b"{}"),
        (KEY, "POST", "/p", b'{"echo":"x"}'),
    ]:
        with pytest.raises(AuthError, match="bad signature"):
            Verifier(key).verify(method, path, headers, body, now=NOW)


def test_clock_skew_is_generous_but_bounded():
    verifier = Verifier(KEY, max_skew_s=120)
    ok = sign(KEY, "n1", "POST", "/p", b"", now=NOW - 119)
    assert verifier.verify("POST", "/p", ok, b"", now=NOW) == "n1"
    for offset in (-121, 121):
        stale = sign(KEY, "n1", "POST", "/p", b"", now=NOW + offset)
        with pytest.raises(AuthError, match="off"):
            verifier.verify("POST", "/p", stale, b"", now=NOW)


def test_a_full_source_is_throttled_and_never_forgets_a_live_nonce():
    verifier = Verifier(KEY, per_sender=4)
    sent = [sign(KEY, "n1", "POST", "/p", b"", now=NOW + i) for i in range(10)]
    outcomes = []
    for i, headers in enumerate(sent):
        try:
            outcomes.append(verifier.verify("POST", "/p", headers, b"", source="a", now=NOW + i))
        except AuthError as exc:
            outcomes.append(str(exc))
    assert outcomes[:4] == ["n1"] * 4
    assert all("too many requests from a" in o for o in outcomes[4:])
    for headers in sent[:4]:
        for source in ("a", "b"):
            with pytest.raises(AuthError, match="replayed"):
                verifier.verify("POST", "/p", headers, b"", source=source, now=NOW + 10)
    assert verifier.remembered == 4
    # Once its nonces are too old to replay, the source is served again.
    late = sign(KEY, "n1", "POST", "/p", b"", now=NOW + 125)
    assert verifier.verify("POST", "/p", late, b"", source="a", now=NOW + 125) == "n1"


def test_future_stamps_beyond_a_small_skew_are_refused():
    verifier = Verifier(KEY, max_future_s=15)
    ahead = sign(KEY, "n1", "POST", "/p", b"", now=NOW + 16)
    with pytest.raises(AuthError, match="off"):
        verifier.verify("POST", "/p", ahead, b"", now=NOW)
    assert verifier.remembered == 0


def test_the_replay_floor_freeze_attack_fails():
    """Issue 10: 32,769 valid requests stamped +119 s froze the floor for ~2 minutes."""
    verifier = Verifier(KEY)
    for i in range(32769):
        headers = sign(KEY, "rogue", "POST", "/p", b"", now=NOW + 119)
        with pytest.raises(AuthError, match="off"):
            verifier.verify("POST", "/p", headers, b"", source="10.0.0.66", now=NOW + i * 1e-4)
    # The same flood as far ahead as is allowed raises only the flooder's own floor.
    for i in range(3000):
        headers = sign(KEY, "rogue", "POST", "/p", b"", now=NOW + 14.9)
        try:
            verifier.verify("POST", "/p", headers, b"", source="10.0.0.66", now=NOW + i * 1e-4)
        except AuthError as exc:
            assert i >= NONCES_PER_SENDER and "too many requests" in str(exc)
    assert verifier.held("10.0.0.66") == NONCES_PER_SENDER
    honest = sign(KEY, "n2", "POST", "/p", b"", now=NOW + 1)
    assert verifier.verify("POST", "/p", honest, b"", source="10.0.0.2", now=NOW + 1) == "n2"
    # Even the flooder's own address is served again once its stamps are too old to replay.
    later = sign(KEY, "rogue", "POST", "/p", b"", now=NOW + 135)
    assert verifier.verify("POST", "/p", later, b"", source="10.0.0.66", now=NOW + 135) == "rogue"


def test_any_installed_key_is_accepted_while_rotating():
    old, new = b"o" * 32, b"n" * 32
    keys = [old, new]
    verifier = Verifier(lambda: keys)
    for key in (old, new):
        headers = sign(key, "n1", "POST", "/p", b"", now=NOW)
        assert verifier.verify("POST", "/p", headers, b"", now=NOW) == "n1"
    keys.remove(old)
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify("POST", "/p", sign(old, "n1", "POST", "/p", b"", now=NOW), b"", now=NOW)


# One request: (source index, stamp offset from the clock, clock advance before it).
_requests = st.lists(
    st.tuples(st.integers(0, 3), st.floats(-130, 20), st.floats(0, 30)), max_size=80
)


@settings(max_examples=200, deadline=None)
@given(_requests)
def test_no_replay_ever_passes_and_no_source_freezes_another(requests):
    verifier = Verifier(KEY, per_sender=4, cache_size=200)
    now = NOW
    accepted: list[tuple[str, dict[str, str], float]] = []
    for step, (src, offset, advance) in enumerate(requests):
        now += advance
        source = f"10.0.0.{src}"
        headers = sign(KEY, "n", "POST", "/p", b"", now=now + offset)
        try:
            verifier.verify("POST", "/p", headers, b"", source=source, now=now)
        except AuthError:
            # Refused only outside the window (stamps are rounded to ms) or when this very
            # source holds its quota of live nonces.
            assert not -119.99 <= offset <= 14.99 or verifier.held(source) == 4
        else:
            accepted.append((source, headers, now + offset))
        # Whatever the other sources did, an honest peer is served.
        fresh = sign(KEY, "h", "POST", "/p", b"", now=now)
        honest = f"192.0.2.{step}"
        assert verifier.verify("POST", "/p", fresh, b"", source=honest, now=now) == "h"
    # No accepted request passes again, from its own address or another one.
    for source, headers, _ in accepted:
        for replay_from in (source, "10.0.0.9"):
            with pytest.raises(AuthError):
                verifier.verify("POST", "/p", headers, b"", source=replay_from, now=now)
    assert verifier.remembered <= 200


# Gossip as the verifier sees it: member name -> its address.
MEMBERS = {"n2": "10.0.0.2", "n3": "10.0.0.3"} | {f"fake{i}": f"10.9.{i}.1" for i in range(40)}


def member_at(node: str, source: str) -> bool:
    return MEMBERS.get(node) == source


def test_a_flood_of_valid_requests_from_many_addresses_never_refuses_an_honest_member():
    """33 addresses x 2,048 valid requests filled the one global nonce cap, and honest peers
    were refused for the whole window (~136 s)."""
    verifier = Verifier(KEY, member_at=member_at)
    flooders = [f"198.51.100.{i}" for i in range(33)]
    for i in range(NONCES_PER_SENDER):
        for source in flooders:
            headers = sign(KEY, "rogue", "POST", "/p", b"", now=NOW + 14)
            try:
                verifier.verify("POST", "/p", headers, b"", source=source, now=NOW + i * 1e-4)
            except AuthError as exc:
                assert "too many requests" in str(exc)
    assert verifier.remembered == NONCE_CACHE_SIZE
    for source in ("10.0.0.66", flooders[0]):
        with pytest.raises(AuthError, match="too many requests"):
            fresh = sign(KEY, "rogue", "POST", "/p", b"", now=NOW + 1)
            verifier.verify("POST", "/p", fresh, b"", source=source, now=NOW + 1)
    # Honest members at their own addresses are served all along, up to the honest quota.
    for i in range(HONEST_NONCES):
        for node in ("n2", "n3"):
            headers = sign(KEY, node, "POST", "/p", b"", now=NOW + 1 + i * 1e-3)
            assert (
                verifier.verify("POST", "/p", headers, b"", source=MEMBERS[node], now=NOW + 2)
                == node
            )
    assert verifier.held_by_member("n2") == HONEST_NONCES
    # A key holder signing as n2 from another address does not spend n2's quota.
    spoofed = sign(KEY, "n2", "POST", "/p", b"", now=NOW + 2)
    with pytest.raises(AuthError, match="too many requests from too many senders"):
        verifier.verify("POST", "/p", spoofed, b"", source="10.0.0.66", now=NOW + 2)
    assert verifier.held_by_member("n2") == HONEST_NONCES


def test_a_member_over_its_own_quota_throttles_only_itself():
    verifier = Verifier(KEY, member_at=member_at, per_sender=4)
    for i in range(4):
        headers = sign(KEY, "n2", "POST", "/p", b"", now=NOW + i)
        verifier.verify("POST", "/p", headers, b"", source="10.0.0.2", now=NOW + i)
    with pytest.raises(AuthError, match="too many requests from member 'n2'"):
        verifier.verify(
            "POST",
            "/p",
            sign(KEY, "n2", "POST", "/p", b"", now=NOW + 5),
            b"",
            source="10.0.0.2",
            now=NOW + 5,
        )
    n3 = sign(KEY, "n3", "POST", "/p", b"", now=NOW + 5)
    assert verifier.verify("POST", "/p", n3, b"", source="10.0.0.3", now=NOW + 5) == "n3"


def test_precheck_refuses_what_needs_no_body():
    verifier = Verifier(KEY)
    verifier.precheck(sign(KEY, "n1", "POST", "/p", b"{}", now=NOW), now=NOW)
    with pytest.raises(AuthError, match="missing"):
        verifier.precheck({}, now=NOW)
    with pytest.raises(AuthError, match="off"):
        verifier.precheck(sign(KEY, "n1", "POST", "/p", b"{}", now=NOW - 500), now=NOW)
    assert verifier.remembered == 0


# One flood request: (sender: a fake member, or a non-member address), stamp offset, advance.
_floods = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 39).map(lambda i: f"fake{i}"), st.integers(0, 9).map(str)),
        st.floats(-119, 14),
        st.floats(0, 5),
    ),
    max_size=120,
)


@settings(max_examples=100, deadline=None)
@given(_floods)
def test_honest_members_are_never_pushed_out_by_members_or_addresses(floods):
    verifier = Verifier(KEY, member_at=member_at, per_sender=6, cache_size=30, honest=3)
    now = NOW
    honest_sent: list[float] = []
    for sender, offset, advance in floods:
        now += advance
        node, source = (
            (sender, MEMBERS[sender]) if sender.startswith("fake") else ("x", f"192.0.2.{sender}")
        )
        headers = sign(KEY, node, "POST", "/p", b"", now=now + offset)
        try:
            verifier.verify("POST", "/p", headers, b"", source=source, now=now)
        except AuthError:
            pass
        # n2 sends one request now and then, never more than ``honest`` per window.
        honest_sent = [t for t in honest_sent if t >= now - 121]
        if len(honest_sent) < 2:
            fresh = sign(KEY, "n2", "POST", "/p", b"", now=now)
            assert verifier.verify("POST", "/p", fresh, b"", source="10.0.0.2", now=now) == "n2"
            honest_sent.append(now)
    # Bounded: the cap, plus at most ``honest`` per member beyond it.
    assert verifier.remembered <= 30 + 3 * len(MEMBERS)
