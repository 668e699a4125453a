"""The Ray node a node runs for a multi-node replica (`replicas.ray_target`), and how long an
adopted one keeps its target against a view that is still settling (`replicas.holds_adopted`):
the pure functions `Replicas.drive` runs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpud.context import Member
from gpud.deployments.claims import Claim
from gpud.deployments.replicas import ADOPT_SETTLE_S, holds_adopted, ray_target
from gpud.ray.supervisor import RayTarget

gpus = st.lists(st.integers(0, 7), max_size=4, unique=True).map(tuple)
ports = st.integers(1, 65535)
targets = st.none() | st.builds(
    RayTarget,
    role=st.sampled_from(["head", "worker"]),
    head_addr=st.sampled_from(["", "10.0.0.1", "10.0.0.2"]),
    gcs_port=st.integers(0, 3),
    node_ip=st.sampled_from(["10.0.0.3"]),
    gpus=st.none() | gpus,
)
heads = st.none() | st.builds(
    Member, name=st.just("h"), addr=st.sampled_from(["10.0.0.1", "10.0.0.2"]), port=st.just(7946)
)
claims = st.none() | st.builds(
    Claim, port=ports, spec=st.just("ab12"), gcs=st.integers(0, 3), ready=st.booleans()
)


@given(st.booleans(), gpus, heads, claims, targets)
def test_the_head_runs_ray_head_and_the_others_follow_the_gcs_its_claim_announces(
    is_head: bool,
    node_gpus: tuple[int, ...],
    head: Member | None,
    claim: Claim | None,
    running: RayTarget | None,
) -> None:
    target = ray_target(is_head, "10.0.0.3", node_gpus, head, claim, running)
    if is_head:
        assert target == RayTarget(role="head", node_ip="10.0.0.3", gpus=node_gpus)
    elif head is None or claim is None:
        assert target == running  # the head's claim is not seen: nothing changes
    elif not claim.gcs:
        assert target is None  # the head restarts its cluster: leave the old one
    else:
        assert target is not None and target.role == "worker"
        assert (target.head_addr, target.gcs_port) == (head.addr, claim.gcs)
        assert target.gpus == node_gpus and target.node_ip == "10.0.0.3"


@given(st.floats(0, 1e6), st.floats(-1.0, 3 * ADOPT_SETTLE_S), targets, targets)
def test_an_adopted_target_holds_only_for_the_settle_window_and_only_against_a_change(
    adopted_at: float, age: float, running: RayTarget | None, wanted: RayTarget | None
) -> None:
    held = holds_adopted(adopted_at, running, wanted, adopted_at + age)
    assert held == (adopted_at > 0 and age < ADOPT_SETTLE_S and wanted != running)
    # A Ray node this gpud started itself always follows the view.
    assert not holds_adopted(0.0, running, wanted, age)
