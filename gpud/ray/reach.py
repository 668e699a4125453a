"""Does the workload's data path work: pure verdicts on Ray's own ports.

Three checks, each through the health component's hysteresis (gpud.health.verdict.step):
- a worker connects to its head's GCS port from its advertised address every round;
- the head compares the members whose tags say they are its Ray workers with the nodes its
  GCS reports alive, and probes the node-manager port of any that is missing;
- every node looks for itself among the nodes the GCS reports alive.

Nothing here does I/O; gpud.ray.gcs_monitor runs the probes and feeds the results in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from gpud.component import Problem
from gpud.context import Member
from gpud.health.verdict import Direction, DirectionState, Thresholds, majority_verdict, step
from gpud.netprobe import ProbeCause, ProbeOutcome
from gpud.ray.probes import RayNode
from gpud.tags import GcsReachSummary


class GcsReach(msgspec.Struct, kw_only=True):
    """A worker's view of its head's GCS port over the data path."""

    head: str
    # The head's term: a verdict on one term's GCS says nothing about the next one's.
    term: int
    head_addr: str
    gcs_port: int
    direction: Direction = msgspec.field(default_factory=Direction)
    # The head's peer API on the last failed round: None (not asked), True (it answers),
    # False (it does not either), with its error.
    peer_api_answers: bool | None = None
    peer_api_error: str = ""

    @property
    def address(self) -> str:
        return f"{self.head_addr}:{self.gcs_port}"


def record_gcs_probe(
    reach: GcsReach, probe: ProbeOutcome, peer_api: ProbeOutcome | None, thresholds: Thresholds
) -> GcsReach:
    """Add one round's GCS connect (and, after a failure, the head's peer API connect)."""
    return msgspec.structs.replace(
        reach,
        direction=step(reach.direction, probe.ok, probe.error, thresholds, probe.cause),
        peer_api_answers=None if peer_api is None else peer_api.ok,
        peer_api_error="" if peer_api is None else peer_api.error,
    )


def gcs_reach_tag(reach: GcsReach | None, head: str | None, term: int) -> GcsReachSummary:
    """What a worker that follows ``head`` in ``term`` gossips about its GCS (tag ``hg``).

    A verdict formed on another head or term is "unknown": gossiped beside the new term tag
    it would count against the new head, and a stale "fail" would depose it at once."""
    if (
        reach is None
        or (reach.head, reach.term) != (head, term)
        or reach.direction.state == "unknown"
    ):
        return "unknown"
    return "ok" if reach.direction.state == "passing" else "fail"


def _short(reason: str, cause: ProbeCause | None) -> str:
    return {"refused": "connection refused", "timeout": "timed out"}.get(cause or "", reason)


def gcs_reach_problem(node: str, node_addr: str, reach: GcsReach | None) -> Problem | None:
    """``ray.gcs_unreachable`` once the worker's GCS probes are critical; the head's peer API
    tells a blocked GCS port (host answers) from a host or path that is down."""
    if reach is None or reach.direction.state != "critical":
        return None
    head, port = reach.head, reach.gcs_port
    direction = reach.direction
    seen = f"{node} cannot reach GCS {reach.address} ({_short(direction.reason, direction.cause)})"
    refused = direction.cause == "refused"
    if reach.peer_api_answers is False:
        message = (
            f"{seen} and {head}'s peer API does not answer either ({reach.peer_api_error}): "
            f"{head} or the path to it is down"
        )
        fix = f"see the health section of `gpud status`: {head} is not reachable from {node}"
    elif refused:
        message = (
            f"{seen} while {head}'s peer API answers: nothing listens on tcp/{port} on {head} "
            "(its GCS is down) or a firewall on it rejects"
        )
        fix = f"check Ray on {head} (`gpud status` there); if it runs, open tcp/{port} on {head}"
    else:
        message = (
            f"{seen} while {head}'s peer API answers: a firewall on {head} blocks tcp/{port}"
            if reach.peer_api_answers
            else f"{seen}: a firewall on {head} or on the path blocks tcp/{port}"
        )
        fix = (
            f"open TCP {port} and the Ray ports on {head} ({reach.head_addr}) for {node_addr}; "
            "until then Ray on this node cannot join"
        )
    return Problem(
        code="ray.gcs_unreachable",
        severity="critical",
        subject=head,
        message=message,
        fix=fix,
        supersedes=frozenset({"ray.down", "ray.crash_loop"}),
    )


def record_stepped_down_probe(
    reach: GcsReach, probe: ProbeOutcome, peer_api: ProbeOutcome | None, thresholds: Thresholds
) -> GcsReach:
    """Add one connect to the GCS port a head stepped down for. Nothing listens there any
    more, so a refusal passes: the host's own kernel answered, no firewall drops the packets.
    Only a connect that goes unanswered says the path is still blocked (a firewall that
    rejects instead of dropping looks open here, and the workers depose that head again)."""
    answered = probe.ok or probe.cause == "refused"
    if not answered:
        return record_gcs_probe(reach, probe, peer_api, thresholds)
    direction = step(reach.direction, True, "", thresholds)
    if direction.state == "critical":
        # Critical until enough answers in a row: the problem keeps saying what failed.
        failed = reach.direction
        direction = msgspec.structs.replace(direction, reason=failed.reason, cause=failed.cause)
        return msgspec.structs.replace(reach, direction=direction)
    return msgspec.structs.replace(
        reach, direction=direction, peer_api_answers=None, peer_api_error=""
    )


def stepped_down_tag(reaches: Iterable[GcsReach]) -> GcsReachSummary:
    """What a node gossips (tag ``hx``) about the GCS ports peers stepped down for: "fail"
    while any is critical, "ok" once every one passes, else "unknown"."""
    states = [r.direction.state for r in reaches]
    if "critical" in states:
        return "fail"
    return "ok" if states and all(s == "passing" for s in states) else "unknown"


def path_reopened(me: str, members: Mapping[str, Member]) -> bool:
    """Does a majority of the other alive members (by their ``hx`` tags) reach the GCS port
    ``me`` stepped down for again? Then its cool-down ends: the fault is gone."""
    views = [m.tags.hx for m in members.values() if m.name != me and m.alive and m.tags is not None]
    states: list[DirectionState] = [
        "passing" if v == "ok" else "critical" for v in views if v != "unknown"
    ]
    return majority_verdict(states, len(views)) is True


def stepped_down_problem(node: str, node_addr: str, reach: GcsReach) -> Problem | None:
    """``ray.gcs_unreachable`` for a peer that stepped down as head because its workers could
    not reach its GCS, while this node's connects to that port still go unanswered."""
    if reach.direction.state != "critical":
        return None
    head, port = reach.head, reach.gcs_port
    seen = (
        f"{node} cannot reach {head}'s GCS port {reach.address} "
        f"({_short(reach.direction.reason, reach.direction.cause)})"
    )
    where = (
        f"{head}'s peer API answers: a firewall on {head} blocks tcp/{port}"
        if reach.peer_api_answers
        else f"a firewall on {head} or on the path blocks tcp/{port}"
    )
    return Problem(
        code="ray.gcs_unreachable",
        severity="critical",
        subject=head,
        message=(
            f"{seen} while {where}; {head} stepped down as Ray head for it and may not lead "
            "while its workers cannot reach its GCS"
        ),
        fix=(
            f"open TCP {port} and the Ray ports on {head} ({reach.head_addr}) for {node_addr}; "
            f"Ray runs meanwhile under another head, with {head} as a worker"
        ),
    )


def expected_workers(members: Mapping[str, Member], head: str, term: int) -> list[Member]:
    """Alive members whose tags say they are Ray workers of ``head``'s term."""
    return sorted(
        (
            m
            for m in members.values()
            if m.name != head
            and m.alive
            and m.tags is not None
            and m.tags.ray == "worker"
            and m.tags.term == term
        ),
        key=lambda m: m.name,
    )


def registered(name: str, nodes: Iterable[RayNode]) -> bool:
    """Is the gpud node ``name`` among the Ray nodes (Ray runs with --node-name=<name>)."""
    return any(n.name == name for n in nodes)


class WorkerCheck(msgspec.Struct, kw_only=True):
    """A member whose tags say it is our Ray worker, checked against our GCS and probed on
    its node-manager port (a GCS can list a node alive for a while after its Ray is gone)."""

    name: str
    addr: str
    node_manager_port: int = 0
    # passing: alive in our GCS and its node-manager answers; critical: not so for
    # failures_before_critical polls in a row.
    direction: Direction = msgspec.field(default_factory=Direction)
    in_gcs: bool = False
    # The node-manager port probe of the last poll ("" and None when not probed).
    probe_error: str = ""
    probe_cause: ProbeCause | None = None
    probe_ok: bool = False


def record_worker_poll(
    previous: WorkerCheck | None,
    member: Member,
    in_gcs: bool,
    node_manager: ProbeOutcome | None,
    thresholds: Thresholds,
) -> WorkerCheck:
    """Add one poll of the head's GCS for a tagged worker and the probe of its node-manager
    port (None when it announces none)."""
    base = previous or WorkerCheck(name=member.name, addr=member.addr)
    nm = member.tags.nm if member.tags is not None else 0
    answers = node_manager is not None and node_manager.ok
    ok = in_gcs and (answers or node_manager is None)
    reason = "" if ok else f"in GCS: {in_gcs}; node-manager: {node_manager}"
    return msgspec.structs.replace(
        base,
        addr=member.addr,
        node_manager_port=nm,
        direction=step(base.direction, ok, reason, thresholds),
        in_gcs=in_gcs,
        probe_ok=answers,
        probe_error=node_manager.error if node_manager is not None else "",
        probe_cause=node_manager.cause if node_manager is not None else None,
    )


def missing_worker_problem(head: str, gcs: str, worker: WorkerCheck) -> Problem | None:
    """``ray.worker_missing`` on the head once a tagged worker stays missing from its GCS, or
    listed there while its node-manager port does not answer the head."""
    if worker.direction.state != "critical":
        return None
    name, nm = worker.name, worker.node_manager_port
    seen = (
        f"{name} is listed alive in GCS {gcs} but this head cannot reach its Ray"
        if worker.in_gcs
        else f"{name} says it is a Ray worker of {head} but is not alive in its GCS {gcs}"
    )
    if not nm:
        return Problem(
            code="ray.worker_missing",
            severity="warning",
            subject=name,
            message=f"{seen}; it announces no node-manager port (its Ray has not started)",
            fix=f"see `gpud doctor` on {name} for why its Ray does not start",
        )
    where = f"{worker.addr}:{nm}"
    if worker.probe_ok:
        why = f"its node-manager {where} answers: Ray runs there but has not registered"
        fix = f"see `gpud doctor` on {name}: its Ray cannot reach this GCS or is restarting"
    elif worker.probe_cause == "refused":
        why = f"its node-manager {where} refuses connections: its Ray is not running"
        fix = f"see `gpud doctor` on {name} for why its Ray exits"
    else:
        why = f"its node-manager {where} does not answer ({_short(worker.probe_error, worker.probe_cause)})"
        fix = (
            f"open the Ray ports on {name} ({worker.addr}) for this head: a firewall on "
            f"{name} blocks tcp/{nm}"
        )
    return Problem(
        code="ray.worker_missing",
        severity="warning",
        subject=name,
        message=f"{seen}; {why}",
        fix=fix,
    )


def registration_problem(
    node: str, gcs: str, direction: Direction, process_running: bool
) -> Problem | None:
    """``ray.not_registered``: this node's Ray runs but its GCS does not list it alive."""
    if not process_running or direction.state != "critical":
        return None
    return Problem(
        code="ray.not_registered",
        severity="critical",
        subject=node,
        message=f"Ray runs on {node} but GCS {gcs} does not list it alive",
        fix="check that the Ray ports of this node are open to the head (see `gpud doctor` "
        "on the head); gpud restarts Ray when it exits",
    )
