"""The ray component's pure parts: the target decision and its problems."""

from __future__ import annotations

import typing

from hypothesis import given
from hypothesis import strategies as st

from gpud.context import Member
from gpud.process import SupervisorStatus
from gpud.ray.election import Ineligible, Plan
from gpud.ray.probes import RayInstall
from gpud.ray.problems import (
    CRASH_LOOP_RESTARTS,
    EligibilityCode,
    NotEligible,
    RayStatus,
    own_ineligibility,
    ray_problems,
)
from gpud.ray.supervisor import RayProcessStatus, RayTarget
from gpud.ray.target import decide_target
from gpud.tags import Tags
from tests.harness.ray_views import ray_status


def _codes(status: RayStatus) -> list[str]:
    return [p.code for p in ray_problems(status, "n1")]


def test_healthy_worker_has_no_problems() -> None:
    running = RayProcessStatus(
        target=RayTarget(role="worker", head_addr="10.0.0.1", gcs_port=6379),
        process=SupervisorStatus(state="running", pid=5),
    )
    assert _codes(ray_status(process=running, role="worker")) == []


def test_down_and_crash_loop() -> None:
    backoff = RayProcessStatus(
        target=RayTarget(role="head"),
        process=SupervisorStatus(
            state="backoff", last_error="exited with code 1", next_start_in_s=4.0
        ),
    )
    down = ray_problems(ray_status(process=backoff, role="head", recent_failures=1), "n1")
    assert [p.code for p in down] == ["ray.down"]
    assert down[0].severity == "critical" and "exited with code 1" in down[0].message
    looping = ray_problems(
        ray_status(process=backoff, role="head", recent_failures=CRASH_LOOP_RESTARTS), "n1"
    )
    assert {p.code for p in looping} == {"ray.crash_loop", "ray.down"}
    crash = next(p for p in looping if p.code == "ray.crash_loop")
    assert "ray.down" in crash.supersedes and "exited with code 1" in crash.message


def test_not_eligible_only_where_it_matters() -> None:
    why = "behind NAT or port mapping (advertised address is not local)"
    # Someone else leads: this node's ineligibility is no problem.
    assert _codes(ray_status(eligible=False, not_eligible_reason=why)) == []
    # Nobody can lead: it is, with the election's reason as a cluster problem.
    stuck = ray_status(
        eligible=False,
        not_eligible_reason=why,
        not_eligible_code="nat",
        head=None,
        action="wait",
        election_reason="no eligible head: n1: behind NAT",
    )
    problems = ray_problems(stuck, "n1")
    assert [p.code for p in problems] == ["ray.not_eligible", "ray.no_head"]
    assert "local interface" in problems[0].fix
    # A candidate being elected is no problem; nor is the first step.
    assert _codes(ray_status(head=None, action="wait", candidate="n2", election_reason="w")) == []
    assert _codes(ray_status(head=None, action="wait", election_reason="starting")) == []


names = st.sampled_from(["a", "b", "c"])


@given(
    action=st.sampled_from(["lead", "stand", "follow", "step_down", "wait"]),
    head=st.none() | names,
    gcs=st.integers(0, 3),
    usable=st.booleans(),
    running_head=st.none() | st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
    gpus=st.none() | st.lists(st.sampled_from(["GPU-a", "GPU-b"]), unique=True).map(tuple),
)
def test_target_follows_only_the_planned_head(
    action: str,
    head: str | None,
    gcs: int,
    usable: bool,
    running_head: str | None,
    gpus: tuple[str, ...] | None,
) -> None:
    members = {
        n: Member(name=n, addr=f"10.0.0.{i + 1}", port=7946, status="alive", tags=Tags(gcs=gcs))
        for i, n in enumerate("abc")
    }
    running = (
        None
        if running_head is None
        else RayTarget(role="worker", head_addr=running_head, gcs_port=1, node_ip="10.0.0.9")
    )
    plan = Plan(action=action, term=1, head=head)  # type: ignore[arg-type]
    target = decide_target(
        plan, members, usable=usable, node_ip="10.0.0.9", running=running, gpus=gpus
    )
    if not usable or action not in ("lead", "follow") or (action == "follow" and head is None):
        assert target is None
    elif action == "lead":
        assert target == RayTarget(role="head", node_ip="10.0.0.9", gpus=gpus)
    else:
        assert head is not None
        if target is not None:  # only ever toward the planned head
            assert target.role == "worker" and target.head_addr == members[head].addr
            # A new target carries the GPUs Ray may use; a kept one is the running one.
            assert target.gpus == gpus or target is running
        assert (target is not None) == (gcs > 0 or running_head == members[head].addr)


CODES: list[EligibilityCode] = list(typing.get_args(typing.get_args(EligibilityCode)[0]))
CODES += list(typing.get_args(typing.get_args(EligibilityCode)[1]))


@given(code=st.sampled_from(CODES), text=st.sampled_from(["", "NAT", "ray.head", "majority"]))
def test_fix_is_chosen_by_the_code_not_the_words(code: EligibilityCode, text: str) -> None:
    # The same code gets the same fix whatever its text says; misleading words change nothing.
    def fix(reason: str, election_reason: str) -> str:
        stuck = ray_status(
            eligible=False,
            not_eligible_reason=reason,
            not_eligible_code=code,
            head=None,
            action="wait",
            election_reason=election_reason,
        )
        return {p.code: p.fix for p in ray_problems(stuck, "n1")}["ray.not_eligible"]

    assert fix(text, "no eligible head: n1") == fix("", "x")
    assert ("local interface" in fix(text, "x")) == (code == "nat")
    # "majority" in the words of a reason is no lost majority: only the plan's code says so.
    problems = ray_problems(ray_status(head=None, action="wait", election_reason=text or "x"), "n1")
    assert all("majority of the known members" not in p.fix for p in problems)


@given(
    enabled=st.booleans(),
    unkeyed=st.none() | st.just("gossip is unencrypted"),
    install=st.sampled_from([None, RayInstall(reason="not found"), RayInstall(version="2")]),
    cooldown=st.none() | st.just(NotEligible("crash_loop", "Ray keeps crashing")),
    election=st.none() | st.just(Ineligible("nat", "behind NAT")),
)
def test_own_ineligibility_names_the_first_cause(
    enabled: bool,
    unkeyed: str | None,
    install: RayInstall | None,
    cooldown: NotEligible | None,
    election: Ineligible | None,
) -> None:
    own = own_ineligibility(
        enabled=enabled, unkeyed=unkeyed, install=install, cooldown=cooldown, election=election
    )
    if not enabled:
        expected: str | None = "disabled"
    elif unkeyed:
        expected = "unkeyed"
    elif install is None:
        expected = "nat" if election else "checking"
    elif install.reason:
        expected = "ray_missing"
    elif cooldown:
        expected = "crash_loop"
    else:
        expected = election.code if election else None
    assert (own.code if own else None) == expected
