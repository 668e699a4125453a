"""A head deposed for an unreachable GCS: the pure rules (the netns test runs them for real).

- A member announcing the GCS port it stepped down for (tag ``hc``) may not be head: no plan
  makes it stand or lead, and its reason says why.
- Its peers' probes of that port: only an unanswered connect counts against the path (nothing
  listens there any more, so a refusal means the packets arrive); the problem is shown exactly
  while the verdict is critical, naming the address and the blocked port.
- Their verdicts, gossiped (tag ``hx``), end the cool-down once a majority reaches it again.
"""

from __future__ import annotations

import itertools

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud.context import Member
from gpud.health.verdict import Direction, Thresholds
from gpud.netprobe import ProbeOutcome
from gpud.process import SupervisorStatus
from gpud.ray.election import GCS_UNREACHABLE, ineligible, plan
from gpud.ray.problems import SteppedDown, ray_problems, status_summary
from gpud.ray.reach import (
    GcsReach,
    path_reopened,
    record_stepped_down_probe,
    stepped_down_problem,
    stepped_down_tag,
)
from gpud.ray.supervisor import RayProcessStatus, RayTarget
from gpud.tags import Tags, TagsError, decode, encode
from tests.harness.ray_views import ray_status, views, with_self_alive

OUTCOMES = {
    "ok": ProbeOutcome(ok=True, rtt_ms=0.3),
    "refused": ProbeOutcome(ok=False, error="connection refused", cause="refused"),
    "timeout": ProbeOutcome(ok=False, error="timed out", cause="timeout"),
    "other": ProbeOutcome(ok=False, error="no route to host", cause="other"),
}
ANSWERED = {"ok", "refused"}


def critical_by_runs(seq: list[str], thresholds: Thresholds) -> bool:
    """Independent model of the hysteresis: critical iff the last run of unanswered probes
    that reached failures_before_critical came after the last run of answered ones that
    reached successes_before_passing."""
    last_fail = last_ok = -1
    for i, (answered, run) in enumerate(itertools.groupby(s in ANSWERED for s in seq)):
        length = len(list(run))
        if answered and length >= thresholds.successes_before_passing:
            last_ok = i
        if not answered and length >= thresholds.failures_before_critical:
            last_fail = i
    return last_fail > last_ok


@given(
    st.lists(st.sampled_from(sorted(OUTCOMES)), max_size=30),
    st.integers(1, 4),
    st.integers(1, 4),
    st.booleans(),
)
def test_only_unanswered_connects_count_against_a_stepped_down_heads_port(
    seq: list[str], failures: int, successes: int, peer_api: bool
) -> None:
    thresholds = Thresholds(failures, successes)
    reach = GcsReach(head="h0", term=3, head_addr="10.77.0.2", gcs_port=20001)
    answer = ProbeOutcome(ok=peer_api, error="" if peer_api else "timed out")
    for name in seq:
        outcome = OUTCOMES[name]
        api = None if name in ANSWERED else answer
        reach = record_stepped_down_probe(reach, outcome, api, thresholds)
    critical = critical_by_runs(seq, thresholds)
    assert (reach.direction.state == "critical") == critical
    problem = stepped_down_problem("h1", "10.77.0.3", reach)
    assert (problem is not None) == critical
    if problem is not None:
        assert problem.code == "ray.gcs_unreachable" and problem.severity == "critical"
        assert problem.subject == "h0" and "10.77.0.2:20001" in problem.message
        assert "blocks tcp/20001" in problem.message and "10.77.0.3" in problem.fix
        if peer_api:
            assert "a firewall on h0 blocks tcp/20001" in problem.message


@given(views(), st.integers(1, 65535))
def test_a_stepped_down_head_never_stands_nor_leads(members, port) -> None:
    me = sorted(members)[0]
    members = with_self_alive(members, me)
    own = members[me]
    assert own.tags is not None
    tags = msgspec.structs.replace(own.tags, hc=port)
    members[me] = msgspec.structs.replace(own, tags=tags)
    why = ineligible(members[me])
    assert why is not None
    if why.code == "gcs_unreachable":
        assert GCS_UNREACHABLE in why.text and f"tcp/{port}" in why.text
    for term in range(3):
        current = plan(me, members, term)
        assert current.candidate != me
        assert not (current.action == "lead" and current.head == me)


def test_the_stepped_down_tag_is_gossiped_and_bounded() -> None:
    tags = Tags(hc=20001, rv=True)
    assert encode(tags)["hc"] == "20001" and decode(encode(tags)).hc == 20001
    assert "hc" not in encode(Tags())
    for bad in ("-1", "65536", "x"):
        with pytest.raises(TagsError):
            decode(encode(Tags()) | {"hc": bad})


def test_the_stepped_down_head_says_so_while_it_sits_out_and_runs_as_a_worker() -> None:
    running = RayProcessStatus(
        target=RayTarget(role="worker", head_addr="10.77.0.3", gcs_port=20101),
        process=SupervisorStatus(state="running", pid=5),
    )
    down = SteppedDown(address="10.77.0.2:20001", port=20001, left_s=287.4)
    status = ray_status(process=running, role="worker", head="h1", stepped_down=down)
    (problem,) = ray_problems(status, "h0")
    assert problem.code == "ray.head_gcs_unreachable" and problem.severity == "critical"
    assert GCS_UNREACHABLE in problem.message and "10.77.0.2:20001" in problem.message
    assert "287 s" in problem.message and "tcp/20001" in problem.fix
    assert "stepped down as head (GCS 10.77.0.2:20001 unreachable)" in status_summary(status)
    assert ray_problems(ray_status(process=running, role="worker", head="h1"), "h0") == []


@given(st.lists(st.sampled_from(["ok", "fail", "unknown"]), max_size=7), st.integers(0, 3))
def test_the_cool_down_ends_once_a_majority_of_the_others_reaches_the_port(
    views: list[str], down: int
) -> None:
    members = {
        "h0": Member(name="h0", addr="10.77.0.2", port=7946, status="alive", tags=Tags(hc=20001))
    }
    for i, hx in enumerate(views):
        status = "failed" if i < down else "alive"
        members[f"p{i}"] = Member(
            name=f"p{i}", addr="10.77.0.9", port=7946, status=status, tags=Tags(hx=hx)
        )
    alive = [v for i, v in enumerate(views) if i >= down]
    assert path_reopened("h0", members) == (2 * alive.count("ok") > len(alive))


def test_the_stepped_down_verdict_gossiped() -> None:
    def reach(state: str) -> GcsReach:
        r = GcsReach(head="h0", term=1, head_addr="10.77.0.2", gcs_port=20001)
        return msgspec.structs.replace(r, direction=Direction(state=state))

    assert stepped_down_tag([]) == "unknown"
    assert stepped_down_tag([reach("passing")]) == "ok"
    assert stepped_down_tag([reach("passing"), reach("unknown")]) == "unknown"
    assert stepped_down_tag([reach("passing"), reach("critical")]) == "fail"
