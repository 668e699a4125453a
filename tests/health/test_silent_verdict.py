"""The silent-death verdict: the pure decision the prober runs when a peer answers nothing
(no refusal either), driven by properties.

A peer is down for silence only when every connect of the check timed out, it has not been
heard from for the window, and no peer asked to try it reached it.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpud.health.prober import host_answers, silent_verdict
from gpud.netprobe import ProbeOutcome

TIMEOUT = ProbeOutcome(
    ok=False, error="TCP connect timed out after 1.5 s (packets dropped?)", cause="timeout"
)
REFUSED = ProbeOutcome(ok=False, error="TCP connect: connection refused", cause="refused")
UNREACHABLE = ProbeOutcome(ok=False, error="TCP connect: no route", cause="other")
ANSWERS = ProbeOutcome(ok=True)
WINDOW_S = 3.5


@given(
    outcomes=st.lists(st.sampled_from([TIMEOUT, REFUSED, UNREACHABLE, ANSWERS]), max_size=6),
    quiet=st.floats(min_value=0, max_value=60),
    others=st.sampled_from([True, False, None]),
)
def test_down_only_when_every_connect_timed_out_unheard_and_no_other_peer_reaches_it(
    outcomes: list[ProbeOutcome], quiet: float, others: bool | None
) -> None:
    verdict = silent_verdict(
        "p", outcomes, quiet_for_s=quiet, window_s=WINDOW_S, reached_by_others=others
    )
    silent = len(outcomes) >= 2 and all(o is TIMEOUT for o in outcomes)
    assert (verdict is not None) == (silent and quiet >= WINDOW_S and others is not True)
    if verdict is not None:
        assert verdict.startswith("p is down: it answers nothing")
        assert ("nor from the peers asked" in verdict) == (others is False)
    # A host that accepted or refused any connect is alive: never silent.
    if host_answers(outcomes):
        assert verdict is None


def test_one_connect_is_not_enough_evidence() -> None:
    assert (
        silent_verdict("p", [TIMEOUT], quiet_for_s=60, window_s=1, reached_by_others=None) is None
    )


def test_host_answers_on_accept_or_refusal_only() -> None:
    assert host_answers([TIMEOUT, ANSWERS]) and host_answers([REFUSED])
    assert not host_answers([TIMEOUT, UNREACHABLE]) and not host_answers([])
