"""The ray component's pure parts: the target decision and its problems."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpud.context import Member
from gpud.process import SupervisorStatus
from gpud.ray.election import Plan
from gpud.ray.service import CRASH_LOOP_RESTARTS, RayNodesSeen, RayStatus, ray_problems
from gpud.ray.supervisor import RayProcessStatus, RayTarget
from gpud.ray.target import decide_target
from gpud.tags import Tags


def _status(**over: object) -> RayStatus:
    base: dict[str, object] = {
        "enabled": True,
        "role": "none",
        "term": 1,
        "action": "follow",
        "head": "h",
        "eligible": True,
        "ray_available": True,
        "process": RayProcessStatus(),
        "ray_nodes": RayNodesSeen(),
        "summary": "",
    }
    return RayStatus(**(base | over))  # type: ignore[arg-type]


def _codes(status: RayStatus) -> list[str]:
    return [p.code for p in ray_problems(status, "n1")]


def test_healthy_worker_has_no_problems() -> None:
    running = RayProcessStatus(
        target=RayTarget(role="worker", head_addr="10.0.0.1", gcs_port=6379),
        process=SupervisorStatus(state="running", pid=5),
    )
    assert _codes(_status(process=running, role="worker")) == []


def test_down_and_crash_loop() -> None:
    backoff = RayProcessStatus(
        target=RayTarget(role="head"),
        process=SupervisorStatus(
            state="backoff", last_error="exited with code 1", next_start_in_s=4.0
        ),
    )
    down = ray_problems(_status(process=backoff, role="head", recent_failures=1), "n1")
    assert [p.code for p in down] == ["ray.down"]
    assert down[0].severity == "critical" and "exited with code 1" in down[0].message
    looping = ray_problems(
        _status(process=backoff, role="head", recent_failures=CRASH_LOOP_RESTARTS), "n1"
    )
    assert {p.code for p in looping} == {"ray.crash_loop", "ray.down"}
    crash = next(p for p in looping if p.code == "ray.crash_loop")
    assert "ray.down" in crash.supersedes and "exited with code 1" in crash.message


def test_not_eligible_only_where_it_matters() -> None:
    why = "behind NAT or port mapping (advertised address is not local)"
    # Someone else leads: this node's ineligibility is no problem.
    assert _codes(_status(eligible=False, not_eligible_reason=why)) == []
    # Nobody can lead: it is, with the election's reason as a cluster problem.
    stuck = _status(
        eligible=False,
        not_eligible_reason=why,
        head=None,
        action="wait",
        election_reason="no eligible head: n1: behind NAT",
    )
    problems = ray_problems(stuck, "n1")
    assert [p.code for p in problems] == ["ray.not_eligible", "ray.no_head"]
    assert "local interface" in problems[0].fix
    # A candidate being elected is no problem; nor is the first step.
    assert _codes(_status(head=None, action="wait", candidate="n2", election_reason="w")) == []
    assert _codes(_status(head=None, action="wait", election_reason="starting")) == []


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
