"""Peer-API request signing: what the verifier accepts and refuses."""

from __future__ import annotations

import pytest

from gpud.health.auth import H_NONCE, H_SIGNATURE, H_TIME, AuthError, Verifier, sign

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


def test_full_nonce_cache_never_lets_a_forgotten_nonce_replay():
    verifier = Verifier(KEY, cache_size=4)
    sent = [sign(KEY, "n1", "POST", "/p", b"", now=NOW + i) for i in range(10)]
    for i, headers in enumerate(sent):
        verifier.verify("POST", "/p", headers, b"", now=NOW + i)
    for headers in sent:
        with pytest.raises(AuthError, match="replayed"):
            verifier.verify("POST", "/p", headers, b"", now=NOW + 10)
    assert len(verifier._seen) <= 4
