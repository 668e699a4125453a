"""Which Ray process this node should run, from the election's plan (pure).

The election (gpud.ray.head_election) decides who is head; this turns its plan into a
RayTarget for the supervisor (gpud.ray.supervisor), which knows nothing of elections.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpud.context import Member
from gpud.ray.election import Plan
from gpud.ray.supervisor import RayTarget

# How long an adopted Ray node keeps running while the election has no plan for this node yet
# (right after gpud starts: its head's proof of office not checked, its view still settling).
ADOPT_SETTLE_S = 30.0


def decide_target(
    current: Plan,
    members: Mapping[str, Member],
    *,
    usable: bool,
    node_ip: str,
    running: RayTarget | None,
    gpus: tuple[int, ...] | None = None,
) -> RayTarget | None:
    """The Ray node to run now (None: none). ``running`` is the current target; ``gpus`` the
    GPUs Ray may use (None: the supervisor's default).

    A worker whose head has not (re)announced its GCS keeps running toward that same head
    (its GCS may be restarting), but never toward a head that is no longer the head.
    """
    if not usable:
        return None
    if current.action == "lead":
        return RayTarget(role="head", node_ip=node_ip, gpus=gpus)
    if current.action != "follow" or current.head is None:
        return None
    head = members.get(current.head)
    if head is None:
        return None
    gcs = head.tags.gcs if head.tags else 0
    if gcs:
        return RayTarget(
            role="worker", head_addr=head.addr, gcs_port=gcs, node_ip=node_ip, gpus=gpus
        )
    if running is not None and running.role == "worker" and running.head_addr == head.addr:
        return running
    return None


def keep_adopted(current: Plan, adopted: bool, adopted_for_s: float) -> bool:
    """Whether a Ray node adopted ``adopted_for_s`` ago keeps running although the plan gives
    it no target: only while the plan waits (no decision yet), within ADOPT_SETTLE_S. A step
    down, a different head or no majority stop it as before."""
    return (
        adopted
        and current.action == "wait"
        and current.code != "no_majority"
        and adopted_for_s < ADOPT_SETTLE_S
    )
