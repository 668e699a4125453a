"""Ray health decides the head, pure parts: the election rule on the
workers' gossiped GCS verdicts (tag hg), and the verdicts on Ray's own ports, driven through the
same functions gpud runs (gpud.ray.election, gpud.ray.reach)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpud.context import Member
from gpud.health.verdict import Thresholds
from gpud.netprobe import ProbeOutcome
from gpud.ray.election import (
    GCS_UNREACHABLE,
    head_ray_reason,
    plan,
    vote_refusal,
    workers_reach_gcs,
)
from gpud.ray.probes import RayNode
from gpud.ray.reach import (
    GcsReach,
    expected_workers,
    gcs_reach_problem,
    gcs_reach_tag,
    missing_worker_problem,
    record_gcs_probe,
    record_worker_poll,
    registered,
)
from gpud.tags import Tags

TERM = 4
TH = Thresholds(3, 2)
TIMED_OUT = ProbeOutcome(
    ok=False, error="TCP connect timed out after 1 s (packets dropped?)", cause="timeout"
)
REFUSED = ProbeOutcome(
    ok=False,
    error="TCP connect: connection refused (nothing listens, or a firewall rejects)",
    cause="refused",
)
OK = ProbeOutcome(ok=True, rtt_ms=0.2)


def member(name: str, **tags: object) -> Member:
    fields: dict[str, object] = {"rv": True, "term": TERM, "pp": 7948}
    fields.update(tags)
    return Member(
        name=name, addr=f"10.0.0.1{name[1:]}", port=7946, status="alive", tags=Tags(**fields)
    )  # type: ignore[arg-type]


def cluster(
    views: list[str], *, head_rh: str = "auto", others_rh: str = "auto"
) -> dict[str, Member]:
    """h0 is head of TERM; h1.. are its workers with the given hg views."""
    members = {"h0": member("h0", ray="head", gcs=26400, rh=head_rh)}
    for i, view in enumerate(views, start=1):
        members[f"h{i}"] = member(f"h{i}", ray="worker", hg=view, nm=30000 + i, rh=others_rh)
    return members


hg_views = st.lists(st.sampled_from(["unknown", "ok", "fail"]), min_size=1, max_size=6)


@given(hg_views)
def test_a_head_is_deposed_exactly_when_a_majority_of_its_workers_cannot_reach_its_gcs(views):
    members = cluster(views)
    failing = views.count("fail") * 2 > len(views)
    assert workers_reach_gcs(members["h0"], members) is (
        False if failing else True if views.count("ok") * 2 > len(views) else None
    )
    assert (head_ray_reason(members["h0"], members) == GCS_UNREACHABLE) is failing
    head_plan = plan("h0", members, TERM)
    if failing:
        assert head_plan.action == "step_down" and GCS_UNREACHABLE in head_plan.reason
        # Voters no longer defend it: a challenger of the next term gets their votes.
        assert vote_refusal("h1", TERM + 1, members) is None
    else:
        assert head_plan.action == "lead"
        for name in members:
            if name != "h0":
                assert plan(name, members, TERM).action == "follow"


@given(hg_views)
def test_without_another_eligible_node_the_head_is_kept_and_says_why(views):
    members = cluster(views, others_rh="never")
    assert head_ray_reason(members["h0"], members) is None
    assert plan("h0", members, TERM).action == "lead"


@given(st.integers(min_value=1, max_value=6))
def test_a_slow_gpud_whose_gcs_answers_is_kept(workers):
    # The head's gpud does not answer data-path probes (frozen): the data-path verdict says
    # unhealthy, but its workers reach its GCS directly, so Ray works and the head stays.
    members = cluster(["ok"] * workers)

    def frozen_head(name: str) -> bool | None:
        return False if name == "h0" else True

    assert head_ray_reason(members["h0"], members, frozen_head) is None
    assert plan("h0", members, TERM, frozen_head).action == "lead"
    assert plan("h1", members, TERM, frozen_head).action == "follow"
    assert vote_refusal("h1", TERM + 1, members, frozen_head) is not None
    # Without the workers' word, the data-path verdict still decides.
    unknown = cluster(["unknown"] * workers)
    assert head_ray_reason(unknown["h0"], unknown, frozen_head) is not None


def test_workers_of_another_term_or_dead_ones_do_not_count():
    members = cluster(["fail", "ok"])
    members["h3"] = member("h3", ray="worker", hg="fail", term=TERM - 1)
    members["h4"] = Member(
        name="h4",
        addr="10.0.0.14",
        port=7946,
        status="failed",
        tags=Tags(ray="worker", hg="fail", term=TERM),
    )
    assert [m.name for m in expected_workers(members, "h0", TERM)] == ["h1", "h2"]
    assert workers_reach_gcs(members["h0"], members) is None


def test_gcs_probes_go_critical_after_the_threshold_and_name_the_blocking_host():
    reach = GcsReach(head="h0", term=TERM, head_addr="10.0.0.10", gcs_port=26400)
    for _ in range(TH.failures_before_critical - 1):
        reach = record_gcs_probe(reach, TIMED_OUT, OK, TH)
        assert gcs_reach_problem("h1", "10.0.0.11", reach) is None
        assert gcs_reach_tag(reach, "h0", TERM) == "unknown"
    reach = record_gcs_probe(reach, TIMED_OUT, OK, TH)
    problem = gcs_reach_problem("h1", "10.0.0.11", reach)
    assert problem is not None and problem.code == "ray.gcs_unreachable"
    assert problem.message == (
        "h1 cannot reach GCS 10.0.0.10:26400 (timed out) while h0's peer API answers: "
        "a firewall on h0 blocks tcp/26400"
    )
    assert gcs_reach_tag(reach, "h0", TERM) == "fail"
    # The head down altogether is not blamed on a firewall for the GCS port.
    down = record_gcs_probe(reach, TIMED_OUT, TIMED_OUT, TH)
    problem = gcs_reach_problem("h1", "10.0.0.11", down)
    assert problem is not None and "h0 or the path to it is down" in problem.message
    refused = record_gcs_probe(reach, REFUSED, OK, TH)
    problem = gcs_reach_problem("h1", "10.0.0.11", refused)
    assert problem is not None and "nothing listens on tcp/26400 on h0" in problem.message
    # Recovery needs successes_before_passing good rounds.
    for _ in range(TH.successes_before_passing):
        reach = record_gcs_probe(reach, OK, None, TH)
    assert gcs_reach_tag(reach, "h0", TERM) == "ok" and gcs_reach_problem("h1", "x", reach) is None


@given(
    st.lists(st.sampled_from([OK, TIMED_OUT, REFUSED]), max_size=12),
    st.sampled_from(["h0", "h2", None]),
    st.integers(TERM - 1, TERM + 1),
)
def test_gcs_tag_follows_the_hysteresis_state_of_the_followed_term(probes, head, term):
    reach = GcsReach(head="h0", term=TERM, head_addr="10.0.0.10", gcs_port=26400)
    for probe in probes:
        reach = record_gcs_probe(reach, probe, None if probe.ok else OK, TH)
        state = reach.direction.state
        assert (
            gcs_reach_tag(reach, "h0", TERM)
            == {"unknown": "unknown", "passing": "ok", "critical": "fail"}[state]
        )
        # A verdict on another head or term never reaches gossip: it would count against the
        # head this node follows now (a stale "fail" deposed a new head after a partition).
        if (head, term) != ("h0", TERM):
            assert gcs_reach_tag(reach, head, term) == "unknown"
        assert (gcs_reach_problem("h1", "10.0.0.11", reach) is not None) == (state == "critical")


def test_missing_worker_is_reported_with_its_node_manager_probe():
    members = cluster(["ok"])
    h1 = members["h1"]
    nodes = [RayNode(name="h0", ip="10.0.0.10", head=True)]
    assert not registered("h1", nodes)
    worker = None
    for _ in range(TH.failures_before_critical):
        worker = record_worker_poll(worker, h1, False, TIMED_OUT, TH)
    assert worker is not None
    problem = missing_worker_problem("h0", "10.0.0.10:26400", worker)
    assert problem is not None and problem.code == "ray.worker_missing" and problem.subject == "h1"
    assert "h1 says it is a Ray worker of h0 but is not alive in its GCS" in problem.message
    assert "node-manager 10.0.0.11:30001 does not answer (timed out)" in problem.message
    dead = record_worker_poll(worker, h1, False, REFUSED, TH)
    assert "its Ray is not running" in missing_worker_problem("h0", "g", dead).message  # type: ignore[union-attr]
    back = record_worker_poll(record_worker_poll(worker, h1, True, None, TH), h1, True, None, TH)
    assert back.direction.state == "passing" and missing_worker_problem("h0", "g", back) is None


def test_a_worker_the_gcs_still_lists_but_whose_node_manager_is_blocked_is_reported():
    h1 = cluster(["ok"])["h1"]
    worker = None
    for _ in range(TH.failures_before_critical):
        worker = record_worker_poll(worker, h1, True, TIMED_OUT, TH)
    problem = missing_worker_problem("h0", "10.0.0.10:26400", worker)  # type: ignore[arg-type]
    assert problem is not None
    assert problem.message.startswith(
        "h1 is listed alive in GCS 10.0.0.10:26400 but this head cannot reach its Ray; "
        "its node-manager 10.0.0.11:30001 does not answer (timed out)"
    )
    assert "a firewall on h1 blocks tcp/30001" in problem.fix


@given(st.lists(st.tuples(st.booleans(), st.sampled_from([OK, TIMED_OUT, REFUSED, None]))))
def test_worker_check_is_critical_only_after_a_run_of_bad_polls(polls):
    h1 = cluster(["ok"])["h1"]
    worker = None
    bad_run = good_run = 0
    for in_gcs, probe in polls:
        worker = record_worker_poll(worker, h1, in_gcs, probe, TH)
        good = in_gcs and (probe is None or probe.ok)
        bad_run, good_run = (0, good_run + 1) if good else (bad_run + 1, 0)
        if bad_run >= TH.failures_before_critical:
            assert worker.direction.state == "critical"
            assert missing_worker_problem("h0", "g", worker) is not None
        if good_run >= TH.successes_before_passing:
            assert worker.direction.state == "passing"
            assert missing_worker_problem("h0", "g", worker) is None
