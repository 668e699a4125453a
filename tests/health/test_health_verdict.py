"""Pure health decisions: hysteresis, pair verdicts, NAT detection, node verdict, targets."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from gpud.health.prober import select_targets, watches_head
from gpud.health.verdict import (
    Direction,
    Endpoint,
    NatVerdict,
    PairVerdict,
    Thresholds,
    detect_nat,
    judge_node,
    judge_pair,
    majority_verdict,
    step,
)

thresholds = st.builds(Thresholds, st.integers(1, 6), st.integers(1, 6))
results = st.lists(st.booleans(), max_size=60)


def run(th: Thresholds, seq: list[bool], start: Direction | None = None) -> list[Direction]:
    states = [start or Direction()]
    for ok in seq:
        states.append(step(states[-1], ok, "" if ok else "refused", th))
    return states


@given(thresholds, results)
def test_state_changes_only_when_a_streak_reaches_its_threshold(th: Thresholds, seq: list[bool]):
    states = run(th, seq)
    for before, after, ok in zip(states[:-1], states[1:], seq, strict=True):
        if after.state != before.state:
            if ok:
                assert after.state == "passing"
                assert after.ok_streak == th.successes_before_passing
            else:
                assert after.state == "critical"
                assert after.fail_streak == th.failures_before_critical


@given(thresholds, results, st.booleans(), st.integers(0, 10))
def test_threshold_consecutive_results_always_decide(
    th: Thresholds, prefix: list[bool], ok: bool, extra: int
):
    start = run(th, prefix)[-1]
    needed = th.successes_before_passing if ok else th.failures_before_critical
    states = run(th, [ok] * (needed + extra), start)
    assert states[-1].state == ("passing" if ok else "critical")
    # ... and not one result earlier, unless it already was in that state.
    if start.state != states[-1].state and (start.ok_streak if ok else start.fail_streak) == 0:
        assert all(s.state == start.state for s in states[:needed])


@given(thresholds, results)
def test_reason_is_the_latest_failure(th: Thresholds, seq: list[bool]):
    last = run(th, seq)[-1]
    assert last.reason == ("refused" if seq and not seq[-1] else "")


US = Endpoint("a", "10.0.0.1", 7948)
PEER = Endpoint("b", "10.0.0.5", 7948)
PASS = Direction("passing", ok_streak=2)
FAIL = Direction("critical", fail_streak=3, reason="TCP connect: connection refused")
FADING = Direction("passing", fail_streak=1, reason="no probe from b")
UNKNOWN = Direction()


def test_pair_verdicts_judge_each_direction():
    assert judge_pair(US, PEER, "alive", PASS, PASS).state == "passing"
    out_failing = judge_pair(US, PEER, "alive", FAIL, PASS)
    assert (out_failing.state, out_failing.kind) == ("warning", "out-failing")
    assert out_failing.message.startswith(
        "10.0.0.5 reaches us but we cannot reach 10.0.0.5:7948 (TCP connect: connection refused)"
        " — a firewall on 10.0.0.5 or a one-way NAT"
    )
    in_failing = judge_pair(US, PEER, "alive", PASS, FAIL)
    assert (in_failing.state, in_failing.kind) == ("warning", "in-failing")
    assert "10.0.0.5 cannot reach us at 10.0.0.1:7948" in in_failing.message
    assert "firewall on this host (10.0.0.1)" in in_failing.message
    data_path = judge_pair(US, PEER, "alive", FAIL, FAIL)
    assert (data_path.state, data_path.kind) == ("critical", "data-path")
    assert "Serf sees b alive (its gossip port works) but its peer API 10.0.0.5:7948" in (
        data_path.message
    )
    down = judge_pair(US, PEER, "failed", FAIL, FAIL)
    assert (down.state, down.kind) == ("critical", "down")
    # A peer that just died still has a passing-but-fading in-direction: not one-way.
    assert judge_pair(US, PEER, "alive", FAIL, FADING).kind == "data-path"
    assert judge_pair(US, PEER, "failed", PASS, PASS).kind == "gossip-failing"
    assert judge_pair(US, PEER, "alive", UNKNOWN, UNKNOWN).state == "unknown"


def test_pair_verdict_is_total_and_every_problem_has_a_fix():
    directions = [PASS, FAIL, FADING, UNKNOWN, Direction("critical", ok_streak=1)]
    for out, inbound, serf in itertools.product(directions, directions, ["alive", "failed"]):
        verdict = judge_pair(US, PEER, serf, out, inbound)
        assert verdict.message
        assert bool(verdict.fix) == (verdict.state in ("warning", "critical"))
        # Both directions down is never reported as merely one-way.
        if out.state == inbound.state == "critical":
            assert verdict.state == "critical"


def test_nat_detection():
    assert not detect_nat(US, True, 3, 0).behind_nat
    assert not detect_nat(US, None, 0, 0).behind_nat
    not_local = detect_nat(US, False, 3, 0)
    assert not_local.behind_nat and "10.0.0.1 is not on any local interface" in not_local.message
    assert "Ray needs host networking" in not_local.message
    no_way_back = detect_nat(US, True, 2, 2)
    assert no_way_back.behind_nat and "none of them can connect back to 10.0.0.1:7948" in (
        no_way_back.message
    )
    # One peer alone that cannot dial back: as likely a one-way firewall; the pair says so.
    assert not detect_nat(US, True, 1, 1).behind_nat
    assert not detect_nat(US, True, 3, 2).behind_nat


def test_node_verdict():
    ok = PairVerdict("passing", "ok", "fine")
    warn = PairVerdict("warning", "out-failing", "one-way", "fix")
    crit = PairVerdict("critical", "down", "down", "fix")
    no_nat = NatVerdict(False)
    assert judge_node(False, [], no_nat)[0] == "unknown"
    assert judge_node(True, [], no_nat) == ("passing", ["no peers to probe"])
    assert judge_node(True, [ok, ok], no_nat) == ("passing", [])
    assert judge_node(True, [ok, warn], no_nat) == ("warning", ["one-way"])
    # One dead peer is that peer's problem; most peers unreachable is ours.
    assert judge_node(True, [crit], no_nat)[0] == "warning"
    assert judge_node(True, [crit, crit, ok], no_nat)[0] == "critical"
    state, reasons = judge_node(True, [ok], NatVerdict(True, "behind NAT"))
    assert (state, reasons) == ("critical", ["behind NAT"])
    # NetCheck's problems count: a removed address is critical at once, route warnings warn.
    assert judge_node(True, [ok], no_nat, [("critical", "address removed")]) == (
        "critical",
        ["address removed"],
    )
    assert judge_node(True, [ok], no_nat, [("warning", "MTU differs")])[0] == "warning"
    many = judge_node(True, [warn] * 15, no_nat)[1]
    assert len(many) == 11 and many[-1] == "and 5 more peers with problems"


names = st.lists(st.text("abcdefgh", min_size=1, max_size=4), unique=True, max_size=80)


@given(names, st.integers(2, 40), st.integers(1, 8), st.integers(0, 2**32), st.data())
def test_target_selection(peers: list[str], mesh_max: int, k: int, seed: int, data: st.DataObject):
    me = "self-node"
    head = data.draw(st.sampled_from([None, *peers]))

    def select() -> list[str]:
        return select_targets(
            me, peers, head=head, full_mesh_max=mesh_max, random_peers=k, step=seed
        )

    targets = select()
    assert targets == select()  # deterministic given the step
    assert me not in targets and set(targets) <= set(peers)
    assert len(set(targets)) == len(targets)
    if len(peers) + 1 <= mesh_max:
        assert targets == sorted(peers)
        return
    assert len(targets) <= k + 3  # O(k), whatever the cluster size
    ring = sorted([*peers, me])
    at = ring.index(me)
    watched = head is not None and watches_head(ring, at, ring.index(head), seed)
    if watched:
        assert head in targets
    assert {ring[at - 1], ring[(at + 1) % len(ring)]} <= set(targets)
    fixed = {head if watched else None, ring[at - 1], ring[(at + 1) % len(ring)]} - {None}
    assert len(targets) == min(len(peers), len(fixed) + k)


@given(st.lists(st.sampled_from(["unknown", "passing", "critical"]), max_size=9), st.integers(0, 9))
def test_majority_verdict_needs_more_than_half_of_all_observers(states, extra):
    observers = len(states) + extra
    verdict = majority_verdict(states, observers)
    passing = states.count("passing")
    critical = states.count("critical")
    if verdict is True:
        assert passing * 2 > observers
    elif verdict is False:
        assert critical * 2 > observers
    else:
        assert passing * 2 <= observers and critical * 2 <= observers
    # Both majorities at once are impossible.
    assert not (passing * 2 > observers and critical * 2 > observers)
