"""The down verdict and the restart grace: the pure decisions the prober runs after a failed
probe's re-probe burst, driven by properties.

A peer is down only on refusals confirmed and unheard; while every port of the workload it
announces answers, it is "gpud restarting" (not down) until the grace has passed.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpud.deployments.claims import Claim, format_claims
from gpud.health.prober import CONFIRM_PROBES, down_verdict, restarting, workload_ports
from gpud.netprobe import ProbeOutcome
from gpud.tags import Tags

REFUSED = ProbeOutcome(
    ok=False, error="TCP connect: connection refused (nothing listens)", cause="refused"
)
TIMEOUT = ProbeOutcome(
    ok=False, error="TCP connect timed out after 1 s (packets dropped?)", cause="timeout"
)
ANSWERS = ProbeOutcome(ok=True)
GRACE_S = 30.0


@given(
    errors=st.lists(st.sampled_from([REFUSED, TIMEOUT]), min_size=0, max_size=6),
    heard=st.booleans(),
    workload=st.lists(st.sampled_from([ANSWERS, REFUSED]), max_size=3),
    failing_for=st.floats(min_value=0, max_value=120),
)
def test_down_only_on_refusals_confirmed_unheard_and_past_the_grace_of_a_live_workload(
    errors: list[ProbeOutcome],
    heard: bool,
    workload: list[ProbeOutcome],
    failing_for: float,
) -> None:
    verdict = down_verdict(
        "p", errors, workload, heard_since=heard, failing_for_s=failing_for, grace_s=GRACE_S
    )
    refused = len(errors) >= 1 + CONFIRM_PROBES and all(e is REFUSED for e in errors)
    answers = bool(workload) and all(w is ANSWERS for w in workload)
    expected = refused and not heard and not (answers and failing_for < GRACE_S)
    assert (verdict is not None) == expected
    if verdict is not None:
        assert verdict.startswith("p is down: its peer API port refuses connections")
    # Restarting is exactly the refused, unheard case the grace keeps from being down.
    is_restarting = restarting(errors, workload, failing_for_s=failing_for, grace_s=GRACE_S)
    assert is_restarting == (refused and answers and failing_for < GRACE_S)
    if not heard:
        assert not (is_restarting and verdict is not None)


def test_one_answer_in_the_burst_is_not_down() -> None:
    outcomes = [REFUSED] * CONFIRM_PROBES + [ANSWERS]
    assert down_verdict("p", outcomes, [], heard_since=False) is None
    assert not restarting(outcomes, [ANSWERS], failing_for_s=0, grace_s=GRACE_S)


def test_the_reasons_say_whether_the_workload_still_answers() -> None:
    burst = [REFUSED] * (1 + CONFIRM_PROBES)
    late = down_verdict("p", burst, [ANSWERS], heard_since=False, failing_for_s=31, grace_s=30)
    assert late is not None and "longer than health.restart_grace_s (30 s)" in late
    dead = down_verdict("p", burst, [ANSWERS, REFUSED], heard_since=False, grace_s=30)
    assert dead is not None and "its workload refuses too (TCP connect: connection" in dead
    bare = down_verdict("p", burst, [], heard_since=False, grace_s=30)
    assert bare is not None and bare.endswith(f"{1 + CONFIRM_PROBES} probes in a row")


ports = st.integers(min_value=1, max_value=65535)


@given(
    ray=st.sampled_from(["none", "head", "worker"]),
    gcs=st.one_of(st.just(0), ports),
    nm=st.one_of(st.just(0), ports),
    claims=st.lists(
        st.tuples(ports, st.one_of(st.just(0), ports), st.booleans(), st.one_of(st.just(0), ports)),
        max_size=4,
    ),
)
def test_workload_ports_are_what_the_tags_announce_as_listening(
    ray: str, gcs: int, nm: int, claims: list[tuple[int, int, bool, int]]
) -> None:
    dp = format_claims(
        {
            (f"d{i}", 0): Claim(port, "abcd", replica_gcs, ready, replica_nm)
            for i, (port, replica_gcs, ready, replica_nm) in enumerate(claims)
        }
    )
    tags = Tags(ray=ray, gcs=gcs, nm=nm, dp=dp)  # type: ignore[arg-type]
    expected = {p for p, _, ready, _ in claims if ready} | {g for _, g, _, _ in claims if g}
    expected |= {n for _, _, _, n in claims if n}
    if ray == "head" and gcs:
        expected.add(gcs)
    if ray == "worker" and nm:
        expected.add(nm)
    assert workload_ports(tags) == sorted(expected)
    assert workload_ports(None) == []
