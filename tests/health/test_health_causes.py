"""Causes that match the evidence: the pair verdict names a stopped gpud, a
hung gpud or dropping firewall, or a peer behind NAT, from the same pure judge_pair the health
component runs, by the cause each probe carries as a code (never by its words); the causes
netprobe gives are pinned against real sockets."""

from __future__ import annotations

import socket

from hypothesis import given
from hypothesis import strategies as st

from gpud.health.verdict import Direction, Endpoint, judge_pair
from gpud.netprobe import tcp_connect

US = Endpoint("h0", "10.0.0.10", 7948)
PEER = Endpoint("h2", "10.0.0.12", 7948)
REFUSED = Direction(
    "critical",
    fail_streak=3,
    reason="TCP connect: connection refused (nothing listens, or a firewall rejects)",
    cause="refused",
)
TIMED_OUT = Direction(
    "critical",
    fail_streak=3,
    reason="TCP connect timed out after 1 s (packets dropped?)",
    cause="timeout",
)
UNKNOWN = Direction()
PASS = Direction("passing", ok_streak=2)

directions = st.sampled_from(
    [
        REFUSED,
        TIMED_OUT,
        UNKNOWN,
        PASS,
        Direction("critical", fail_streak=2, reason="ping: no answer within 1 s", cause="timeout"),
        Direction(
            "passing", ok_streak=3, fail_streak=1, reason="TCP connect timed out", cause="timeout"
        ),
        # Words that look like a cause are not one: only the code counts.
        Direction("critical", fail_streak=3, reason="connection refused", cause="other"),
    ]
)


def test_refused_while_serf_alive_means_gpud_is_not_running():
    verdict = judge_pair(US, PEER, "alive", REFUSED, UNKNOWN)
    assert verdict.state == "critical"
    assert verdict.message.startswith("gpud is not running on h2: ")
    assert "firewall passes gossip" not in verdict.message + verdict.fix
    assert "start gpud on h2" in verdict.fix


def test_timeouts_while_serf_alive_mean_hung_gpud_or_dropping_firewall():
    verdict = judge_pair(US, PEER, "alive", TIMED_OUT, TIMED_OUT)
    assert verdict.state == "critical"
    assert verdict.message.startswith("gpud on h2 is hung or a firewall drops: ")
    assert "h2 cannot reach us either" in verdict.message


def test_peer_behind_nat_gets_no_fix_on_its_unroutable_address():
    for serf in ("alive", "failed"):
        for out in (REFUSED, TIMED_OUT):
            verdict = judge_pair(US, PEER, serf, out, UNKNOWN, peer_nat=True)
            assert verdict.message.startswith(
                "h2 advertises a private address that is not reachable from here and reports "
                "itself behind NAT: run it with host networking"
            )
            assert PEER.addr not in verdict.fix and "host networking" in verdict.fix


@given(directions, directions, st.sampled_from(["alive", "failed"]), st.booleans())
def test_every_cause_matches_its_evidence(out, inbound, serf, nat):
    verdict = judge_pair(US, PEER, serf, out, inbound, peer_nat=nat)
    assert bool(verdict.fix) == (verdict.state in ("warning", "critical"))
    if out.state == "critical" and nat:
        assert "behind NAT" in verdict.message and PEER.addr not in verdict.fix
    if verdict.message.startswith("gpud is not running"):
        assert out.cause == "refused" and serf == "alive"
    if verdict.message.startswith("gpud on h2 is hung"):
        assert out.cause == "timeout" and serf == "alive"
    # The old catch-all is left only for failures that are neither refused nor timed out.
    if "a firewall passes gossip but blocks other ports" in verdict.fix:
        assert out.cause in ("other", None)


async def test_netprobe_names_the_cause():
    # A port that was just bound and closed on loopback refuses.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = await tcp_connect("127.0.0.1", port, 1.0)
    assert refused.cause == "refused" and "connection refused" in refused.error, refused
    # A zero budget expires at the connect's first wait: netprobe's timeout wording.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        timed_out = await tcp_connect("127.0.0.1", listener.getsockname()[1], 0.0)
    assert timed_out.cause == "timeout" and "timed out" in timed_out.error, timed_out
