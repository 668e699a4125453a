"""The ray component's status and problems, as pure functions of what it saw.

Nothing here does I/O: gpud.ray.service gathers the election's plan, the Ray process, and
the GCS checks (gpud.ray.gcs_monitor), and these turn them into the status document, its
summary line, the problems `gpud status` and `gpud doctor` show, and the workload checks.
Every reason carries a code, and fixes are chosen by the code, never by the words.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from gpud.component import Problem
from gpud.health.verdict import Direction, WorkloadCheck
from gpud.ray.election import GCS_UNREACHABLE, Ineligible, IneligibleCode, Plan, PlanCode
from gpud.ray.probes import RayInstall, RayNode
from gpud.ray.reach import (
    GcsReach,
    WorkerCheck,
    gcs_reach_problem,
    missing_worker_problem,
    registration_problem,
    stepped_down_problem,
)
from gpud.ray.supervisor import RayProcessStatus
from gpud.tags import RayRole

# Ray failures (exits or failed starts) within CRASH_WINDOW_S that make a crash loop.
CRASH_LOOP_RESTARTS = 3
CRASH_WINDOW_S = 300.0

# Why this node may not be Ray head: the election's codes for any member, and this node's own.
EligibilityCode = (
    IneligibleCode
    | Literal[
        "disabled",  # ray.enabled = false
        "unkeyed",  # no cluster key and no consent to an unkeyed cluster
        "checking",  # the ray executable is not probed yet
        "ray_missing",  # the ray executable is missing or does not run
        "crash_loop",  # Ray keeps crashing here: out of the election for a cool-down
    ]
)


class NotEligible(msgspec.Struct, frozen=True):
    code: EligibilityCode
    text: str


def own_ineligibility(
    *,
    enabled: bool,
    unkeyed: str | None,
    install: RayInstall | None,
    cooldown: NotEligible | None,
    election: Ineligible | None,
) -> NotEligible | None:
    """Why this node may not be Ray head (pure): its config, consent, its Ray executable and a
    cool-down come before the election's own view of it."""
    if not enabled:
        return NotEligible("disabled", "ray.enabled = false in the config")
    if unkeyed is not None:
        return NotEligible("unkeyed", unkeyed)
    if install is None:
        if election is not None:
            return NotEligible(election.code, election.text)
        return NotEligible("checking", "checking the ray executable")
    if install.reason is not None:
        return NotEligible("ray_missing", install.reason)
    if cooldown is not None:
        return cooldown
    return NotEligible(election.code, election.text) if election is not None else None


def run_reason(
    usable: bool, current: Plan, process: RayProcessStatus, own: NotEligible | None
) -> str | None:
    """Why this node runs no Ray or has no head, or None when all is well (pure)."""
    if not usable:
        return own.text if own is not None else None
    if process.error:
        return process.error
    if process.process.state == "backoff":
        return f"Ray {process.process.last_error}; restart in {process.process.next_start_in_s}s"
    if current.action in ("wait", "step_down"):
        return current.reason
    if current.action == "follow" and process.target is None:
        return f"waiting for {current.head} to announce its GCS"
    return None


class SteppedDown(msgspec.Struct, kw_only=True, frozen=True):
    """This node stepped down as head: a majority of its workers could not reach its GCS."""

    address: str  # the GCS they could not reach, addr:port
    port: int
    # Seconds until it may stand again.
    left_s: float


class RayNodesSeen(msgspec.Struct, kw_only=True):
    nodes: list[RayNode] | None = None
    error: str | None = None
    gcs_address: str | None = None
    age_s: float | None = None


class RayStatus(msgspec.Struct, kw_only=True):
    enabled: bool
    role: RayRole
    term: int
    head: str | None = None
    # The node the election waits for, while there is no head.
    candidate: str | None = None
    # head_addr:gcs_port once the head's GCS is ready.
    head_address: str | None = None
    # The election plan: lead, stand, follow, step_down or wait, and its reason.
    action: str
    election_reason: str = ""
    election_code: PlanCode = ""
    eligible: bool
    not_eligible_reason: str | None = None
    # not_eligible_reason as a code: the fix is chosen by it.
    not_eligible_code: EligibilityCode | None = None
    ray_available: bool
    ray_version: str = ""
    process: RayProcessStatus
    # Ray exits and failed starts in the last CRASH_WINDOW_S, and restarts since gpud started.
    recent_failures: int = 0
    restarts_total: int = 0
    ray_nodes: RayNodesSeen
    # Worker: its probes of the head's GCS port over the data path (None when not a worker).
    gcs_reach: GcsReach | None = None
    # Head: members tagged as its workers, checked against its GCS (missing ones probed).
    workers: list[WorkerCheck] = msgspec.field(default_factory=list)
    # Whether this node's own Ray is alive in the GCS (passing), or missing (critical).
    registration: Direction = msgspec.field(default_factory=Direction)
    # Head: a majority of its workers cannot reach its GCS, yet no other node could lead.
    gcs_unreachable_kept: bool = False
    # This node stepped down as head for that, and sits out the election (a worker meanwhile).
    stepped_down: SteppedDown | None = None
    # Peers that stepped down so: this node's probes of the GCS port each stepped down for.
    stepped_down_peers: list[GcsReach] = msgspec.field(default_factory=list)
    last_election: str = ""
    # Why this node runs no Ray / has no head (None when all is well).
    reason: str | None = None
    summary: str


def _nodes_text(nodes: RayNodesSeen) -> str:
    """ ", N Ray nodes alive", or why the count is not known."""
    if nodes.nodes is not None:
        return f", {len(nodes.nodes)} Ray nodes alive"
    if nodes.error is not None:
        return f", Ray nodes unknown ({nodes.error})"
    if nodes.gcs_address is None:
        return ", Ray nodes unknown (no GCS to ask yet)"
    return ", Ray nodes not counted yet"


def _summary(
    role: RayRole,
    term: int,
    head: str | None,
    head_address: str | None,
    process: RayProcessStatus,
    nodes: RayNodesSeen,
    reason: str | None,
) -> str:
    state = process.process.state
    if role == "head":
        gcs = f"GCS {head_address} ready" if head_address else "GCS starting"
        text = f"head, term {term}, {gcs}, ray {state}{_nodes_text(nodes)}"
    elif role == "worker":
        text = (
            f"worker of {head} ({head_address or 'GCS not ready'}), term {term}, "
            f"ray {state}{_nodes_text(nodes)}"
        )
    else:
        text = f"no Ray role, term {term}"
    return f"{text}: {reason}" if reason else text


def _reach_text(
    reach: GcsReach | None,
    workers: list[WorkerCheck],
    registration: Direction,
    gcs: str | None,
) -> str:
    """ "; GCS ... unreachable" for a worker, "; N workers missing from GCS: ..." for a head,
    "; not alive in GCS ..." for a node whose Ray runs but is not registered."""
    text = ""
    if registration.state == "critical":
        text += f"; not alive in GCS {gcs}"
    if reach is not None and reach.direction.state == "critical":
        text += f"; GCS {reach.address} unreachable ({reach.direction.reason})"
    missing = [w.name for w in workers if w.direction.state == "critical"]
    if missing:
        text += f"; {len(missing)} workers missing from GCS: {', '.join(missing)}"
    return text


def _stepped_down_text(status: RayStatus) -> str:
    text = ""
    if status.stepped_down is not None:
        text += f"; stepped down as head (GCS {status.stepped_down.address} unreachable)"
    for reach in status.stepped_down_peers:
        if reach.direction.state == "critical":
            text += f"; {reach.head}'s GCS {reach.address} unreachable"
    return text


def _crash_summary(role: RayRole, term: int, process: RayProcessStatus, failures: int) -> str:
    # A Ray that keeps restarting is never "running", even in the moment it happens to be up.
    return (
        f"{role if role != 'none' else 'no Ray role'}, term {term}, ray crash loop "
        f"({failures} failures in {CRASH_WINDOW_S / 60:.0f} min; last: "
        f"{process.process.last_error or process.error})"
    )


def status_summary(status: RayStatus) -> str:
    """The one line `gpud status` shows for Ray (pure)."""
    process, role, term = status.process, status.role, status.term
    if status.recent_failures >= CRASH_LOOP_RESTARTS and process.target is not None:
        return _crash_summary(role, term, process, status.recent_failures)
    nodes = status.ray_nodes
    return (
        _summary(role, term, status.head, status.head_address, process, nodes, status.reason)
        + _reach_text(status.gcs_reach, status.workers, status.registration, nodes.gcs_address)
        + _stepped_down_text(status)
    )


_ELIGIBILITY_FIX: dict[EligibilityCode, str] = {
    "unkeyed": "set cluster.key_file on every host (`gpud keygen`), or cluster.insecure = true",
    "ray_missing": "install Ray on this host, or point ray.executable at its `ray`",
    "nat": (
        "advertise an address assigned to a local interface (host networking, no port "
        "mapping); a node behind NAT can be a worker but not the head"
    ),
    "data_path": "see the health section of `gpud status`: peers cannot reach this node",
    "critical_health": "see the health section of `gpud status`: peers cannot reach this node",
    "gcs_unreachable": "open this node's GCS port to the workers (see ray.gcs_unreachable on them)",
    "crash_loop": "see ray.crash_loop: fix what makes Ray exit; gpud retries after a cool-down",
    "never": 'set ray.head to allow this node to lead (it is "never")',
    "disabled": "set ray.enabled = true on this node",
}
_ELIGIBILITY_FIX_ELSE = "see the ray section of `gpud status` on this node"


def ray_problems(status: RayStatus, node: str) -> list[Problem]:
    """What is wrong with Ray on this node, from its status (pure)."""
    if not status.enabled:
        return []
    found: list[Problem] = []
    process = status.process
    target = process.target
    crash_loop = target is not None and status.recent_failures >= CRASH_LOOP_RESTARTS
    last = process.error or process.process.last_error
    if crash_loop:
        assert target is not None
        found.append(
            Problem(
                code="ray.crash_loop",
                severity="critical",
                subject=node,
                message=(
                    f"Ray ({target.role}) failed {status.recent_failures} times in the last "
                    f"{CRASH_WINDOW_S / 60:.0f} min; last: {last}"
                ),
                fix=(
                    f"read this node's journal (component=ray-{target.role}) for the Ray "
                    "component that fails; check the ray installation, its temp dir and "
                    "that its leased ports are free"
                ),
                supersedes=frozenset({"ray.down"}),
            )
        )
    if target is not None and process.process.state != "running" and last is not None:
        retry = process.process.next_start_in_s
        found.append(
            Problem(
                code="ray.down",
                severity="critical" if target.role == "head" else "warning",
                subject=node,
                message=f"Ray {target.role} is not running: {last}"
                + (f"; next start in {retry:g}s" if retry is not None else ""),
                fix=f"read this node's journal (component=ray-{target.role}) for why it exits",
            )
        )
    found += _reach_problems(status, node)
    # No head and nobody standing: the election cannot produce one (a candidate is still
    # being elected otherwise).
    no_head = status.head is None and status.candidate is None and status.action == "wait"
    if status.not_eligible_reason is not None and (
        no_head or status.role == "head" or status.action == "step_down"
    ):
        # It matters when nobody can lead, or when this node leads (it is about to step down).
        found.append(
            Problem(
                code="ray.not_eligible",
                severity="warning",
                subject=node,
                message=f"this node may not be Ray head: {status.not_eligible_reason}",
                fix=_ELIGIBILITY_FIX.get(
                    status.not_eligible_code or "unknown", _ELIGIBILITY_FIX_ELSE
                ),
            )
        )
    if no_head and status.election_reason not in ("", "starting"):
        majority = status.election_code == "no_majority"
        found.append(
            Problem(
                code="ray.no_head",
                severity="critical",
                subject="cluster",
                message=f"no Ray head: {status.election_reason}",
                fix=(
                    "bring enough members back (or let the dead ones leave) so that a majority "
                    "of the known members is alive"
                    if majority
                    else "make at least one node eligible (see ray.not_eligible in "
                    "`gpud doctor` on each node)"
                ),
            )
        )
    return found


def workload_checks(status: RayStatus, node: str) -> list[WorkloadCheck]:
    """Ray's ports as /v1/health shows them (pure): this worker's probes of its head's GCS,
    the head's checks of each tagged worker, and this node's registration in its GCS."""
    checks = []
    reach = status.gcs_reach
    if reach is not None:
        checks.append(
            WorkloadCheck(
                check="ray.gcs",
                subject=reach.head,
                target=reach.address,
                state=reach.direction.state,
                reason=reach.direction.reason,
            )
        )
    gcs = status.ray_nodes.gcs_address or ""
    if status.role == "head":
        for worker in status.workers:
            checks.append(
                WorkloadCheck(
                    check="ray.worker",
                    subject=worker.name,
                    target=f"{worker.addr}:{worker.node_manager_port}"
                    if worker.node_manager_port
                    else gcs,
                    state=worker.direction.state,
                    reason=worker.direction.reason,
                )
            )
    if gcs and status.process.process.state == "running":
        checks.append(
            WorkloadCheck(
                check="ray.registered",
                subject=node,
                target=gcs,
                state=status.registration.state,
                reason=status.registration.reason,
            )
        )
    return checks


def _reach_problems(status: RayStatus, node: str) -> list[Problem]:
    """Ray's own ports: the worker's GCS probes, the head's tagged workers missing from its
    GCS, this node missing from the GCS, and a head kept although its workers cannot reach it."""
    found: list[Problem] = []
    source = status.process.target.node_ip if status.process.target else ""
    reach = gcs_reach_problem(node, source or "this node", status.gcs_reach)
    if reach is not None:
        found.append(reach)
    gcs = status.ray_nodes.gcs_address or "?"
    if status.role == "head":
        for worker in status.workers:
            problem = missing_worker_problem(node, gcs, worker)
            if problem is not None:
                found.append(problem)
    running = status.process.process.state == "running"
    registration = registration_problem(node, gcs, status.registration, running)
    if registration is not None:
        found.append(registration)
    if status.gcs_unreachable_kept:
        found.append(
            Problem(
                code="ray.head_gcs_unreachable",
                severity="critical",
                subject=node,
                message=f"{GCS_UNREACHABLE}; {node} stays head: no other node is eligible",
                fix="open this node's GCS port to the workers (see ray.gcs_unreachable on "
                "them), or make another node eligible to lead",
            )
        )
    down = status.stepped_down
    if down is not None:
        found.append(
            Problem(
                code="ray.head_gcs_unreachable",
                severity="critical",
                subject=node,
                message=(
                    f"{node} stepped down as Ray head: {GCS_UNREACHABLE} {down.address}; it "
                    f"runs as a Ray worker and stays out of the election {down.left_s:.0f} s more"
                ),
                fix=(
                    f"open TCP {down.port} and the Ray ports on this node for the other members "
                    f"(a firewall here blocks tcp/{down.port}: see ray.gcs_unreachable on them)"
                ),
            )
        )
    for reach in status.stepped_down_peers:
        problem = stepped_down_problem(node, source or "this node", reach)
        if problem is not None:
            found.append(problem)
    return found
