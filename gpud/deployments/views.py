"""What `gpud deploy status`, `/endpoints` and the problems show, built from this node's view of
the records, the assignment, the claims, its probes and the replicas it runs. Pure.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Literal

from gpud.component import Metric, Problem
from gpud.context import Member
from gpud.deployments import placement, spec
from gpud.deployments.claims import Claim
from gpud.deployments.model import DeploymentView, Endpoint, Entry, ReplicaView, TargetGroup
from gpud.deployments.readiness import Probe
from gpud.deployments.replicas import Replica, RestartCause
from gpud.text import duration

Claims = Mapping[str, Mapping[placement.ReplicaKey, Claim]]

# A server that failed this often within this window is crash-looping: its last error line is
# shown even in the moments it runs between two failures.
CRASH_WINDOW_S = 300.0
CRASH_LOOP_FAILURES = 2

TroubleCode = Literal[
    "", "cannot_start", "startup_timeout", "unresponsive", "ray_node_lost", "server_failed"
]
# What to do about each cause gpud restarted a replica for.
RESTART_FIXES: dict[str, str] = {
    "startup_timeout": "if the model needs longer to load, raise startup_timeout_s in the spec; "
    "else see the server's output in gpud's journal",
    "unresponsive": "see the server's output in gpud's journal (a dead worker, a hung GPU)",
    "ray_node_lost": "nothing if it gets ready again on its nodes; else see `gpud members` for "
    "the lost host and `gpud deploy status` for where the replica runs now",
}


def trouble(
    cannot_start: str,
    restarted: tuple[RestartCause, str],
    supervisor_state: str,
    last_error: str,
    recent_failures: int,
) -> tuple[TroubleCode, str]:
    """What is wrong with a replica this node runs, by cause, with the text to show ("" when
    nothing): it could not start here; gpud restarted its server (``restarted``: not answering
    within its startup_timeout_s, or no longer answering; until a later start answers); its
    server is down or crash-looping (its last error line). Pure."""
    if cannot_start:
        return "cannot_start", cannot_start
    if restarted[0]:
        return restarted
    down = supervisor_state in ("backoff", "failed")
    if last_error and (down or recent_failures >= CRASH_LOOP_FAILURES):
        return "server_failed", last_error
    return "", ""


def _trouble(here: Replica) -> tuple[TroubleCode, str]:
    sup = here.supervisor
    return trouble(
        here.error,
        here.restarted,
        sup.status.state if sup else "",
        (sup.status.last_error or "") if sup else "",
        sup.failures_within(CRASH_WINDOW_S) if sup else 0,
    )


def deployment_view(
    entry: Entry, refused: str, delete_refused: str, replicas: list[ReplicaView]
) -> DeploymentView:
    s = entry.record.spec
    assert s is not None
    return DeploymentView(
        name=entry.record.name,
        version=str(entry.record.version),
        origin=entry.record.version.origin,
        digest=entry.record.digest,
        engine=s.engine,
        model=s.model,
        replicas=s.replicas,
        nodes_per_replica=s.nodes_per_replica,
        gpus_per_node=s.gpus_per_node,
        health_path=s.health_path,
        state="refused" if refused else "active",
        reason=refused,
        operator=entry.operator,
        delete_refused=delete_refused,
        replica_views=replicas,
    )


def replica_views(
    name: str,
    replicas: int,
    refused: str,
    *,
    me: str,
    assignment: placement.Assignment,
    heads: Mapping[placement.ReplicaKey, str],
    claims: Claims,
    members: Mapping[str, Member],
    probes: Mapping[placement.ReplicaKey, Probe],
    running: Mapping[placement.ReplicaKey, Replica],
    now: float | None = None,
) -> list[ReplicaView]:
    """Each replica of deployment ``name`` as this node sees it; ``heads``: where the server of
    each placed replica answers; ``now``: the monotonic clock (default: read it)."""
    now = time.monotonic() if now is None else now
    if refused:
        return [ReplicaView(index=i, state="refused", reason=refused) for i in range(replicas)]
    placed = {p.replica: p for p in assignment.placed if p.deployment == name}
    pending = {p.replica: p for p in assignment.pending if p.deployment == name}
    views = []
    for i in range(replicas):
        if i in pending or i not in placed:
            reason = pending[i].reason if i in pending else "not placed yet"
            views.append(ReplicaView(index=i, state="pending", reason=reason))
            continue
        node = heads[(name, i)]
        member = members.get(node)
        view = ReplicaView(
            index=i,
            state="starting",
            node=node,
            nodes=list(placed[i].nodes),
            addr=member.addr if member else "",
        )
        claim = claims.get(node, {}).get((name, i))
        view.spec = claim.spec if claim else ""
        view.announced_ready = claim.ready if claim else False
        probe = probes.get((name, i))
        if probe is not None and probe[0] == node:
            view.port, view.probe_ok, view.probe_error = probe[1], probe[2], probe[3]
        here = running.get((name, i))
        if here is not None and here.ray is not None:
            ray_status = here.ray.status()
            view.ray_pid = ray_status.process.pid
            view.ray_restarts = here.ray.restarts_total
            view.ray_error = ray_status.error or ray_status.process.last_error or ""
        if here is not None and node == me:
            _local(view, here, now)
        if view.state == "starting" and view.probe_ok:
            view.state, view.reason = "ready", ""
        elif view.state == "starting" and not view.reason:
            view.reason = view.probe_error or f"waiting for {node} to start it"
            if view.starting_s is not None:
                view.reason = (
                    f"starting ({duration(view.starting_s)} of startup_timeout_s "
                    f"{duration(view.startup_timeout_s)}): {view.reason}"
                )
        if view.state != "ready":
            _bridge(view, placed[i].leaving, (name, i), claims, members)
        views.append(view)
    return views


def _bridge(
    view: ReplicaView,
    leaving: Iterable[str],
    key: placement.ReplicaKey,
    claims: Claims,
    members: Mapping[str, Member],
) -> None:
    """Make-before-break: while a replica's new copy is not ready, the old copy on a cordoned
    node it is leaving (still running: it still claims the replica) stands in for it, so
    routers keep sending to the old copy until the new one is ready."""
    for node in leaving:
        claim = claims.get(node, {}).get(key)
        member = members.get(node)
        if claim is None or member is None or not member.alive:
            continue
        new = f"new copy on {view.node}: {view.reason or view.state}"
        view.node, view.addr, view.port, view.state = node, member.addr, claim.port, "ready"
        view.reason = f"old copy on cordoned {node} serves until the {new}"
        return


def _local(view: ReplicaView, here: Replica, now: float) -> None:
    """What only the node that runs the replica's server knows: its GPUs, its process, how long
    it has been starting, and what is wrong with it."""
    view.port, view.gpus = here.port, here.gpus
    sup = here.supervisor.status if here.supervisor else None
    if sup is not None:
        view.pid, view.restarts = sup.pid, sup.restarts
        view.last_error = sup.last_error or ""
        s = here.entry.record.spec
        if sup.state == "running" and here.started_at and not here.answered and s is not None:
            view.starting_s = max(0.0, now - here.started_at)
            view.startup_timeout_s = spec.startup_timeout(s)
    _, view.reason = _trouble(here)
    if here.error or (sup is not None and sup.state in ("backoff", "failed")):
        view.state = "failed"


def endpoints(view: DeploymentView) -> list[Endpoint]:
    """The ready replicas of a deployment, where they answer."""
    return [
        Endpoint(
            replica=r.index,
            node=r.node,
            addr=r.addr,
            port=r.port,
            url=f"http://{r.addr}:{r.port}",
        )
        for r in view.replica_views
        if r.state == "ready"
    ]


def file_sd_targets(name: str, ready: Iterable[Endpoint]) -> list[TargetGroup]:
    """Prometheus file_sd target groups of a deployment's ready endpoints."""
    return [
        TargetGroup(
            targets=[f"{e.addr}:{e.port}"],
            labels={"deployment": name, "replica": str(e.replica), "node": e.node},
        )
        for e in ready
    ]


def metrics(live: Iterable[DeploymentView]) -> list[Metric]:
    """Replicas desired, placed and ready per live deployment, and the restarts of its
    replicas on this node."""
    samples: list[tuple[dict[str, str], float]] = []
    restarts: list[tuple[dict[str, str], float]] = []
    for view in live:
        name, replica_views = view.name, view.replica_views
        samples.append(({"deployment": name, "state": "desired"}, view.replicas))
        for state in ("placed", "ready"):
            count = sum(
                1 for v in replica_views if v.node and (state == "placed" or v.state == state)
            )
            samples.append(({"deployment": name, "state": state}, count))
        restarts.append(({"deployment": name}, sum(v.restarts for v in replica_views)))
    return [
        Metric(
            name="gpud_deployment_replicas",
            help="Replicas per deployment: desired, placed, ready (as this node sees them).",
            samples=samples,
        ),
        Metric(
            name="gpud_deployment_restarts_total",
            help="Restarts of the replicas that run on this node.",
            samples=restarts,
            kind="counter",
        ),
    ]


def problems(
    refusals: Iterable[tuple[str, str]],
    node: str,
    unannounced: list[str],
    pending: Iterable[placement.Pending],
    running: Iterable[Replica],
) -> list[Problem]:
    """``refusals``: (deployment, why this node will not run it) for the refused ones."""
    out = [
        Problem(
            code="deployments.refused",
            severity="warning",
            subject=name,
            message=f"this node will not run deployment {name}: {reason}",
            fix="sign the spec with a trusted operator key and allow its command "
            "on every host, then apply it again",
        )
        for name, reason in refusals
    ]
    if unannounced:
        out.append(
            Problem(
                code="deployments.claims_truncated",
                severity="warning",
                subject=node,
                message=f"replicas {', '.join(unannounced)} run here but do not fit in "
                "this node's gossip tags (memberlist allows 512 bytes in all), so other "
                "nodes do not see them and may place them again",
                fix="run fewer replicas per node, or use shorter deployment names",
            )
        )
    for p in pending:
        out.append(
            Problem(
                code="deployments.pending",
                severity="warning",
                subject=f"{p.deployment}/{p.replica}",
                message=f"replica cannot be placed: {p.reason}",
                fix="add healthy GPU nodes or lower replicas / gpus_per_node",
            )
        )
    for replica in running:
        code, text = _trouble(replica)
        if code in RESTART_FIXES:
            out.append(
                Problem(
                    code=f"deployments.replica_{code}",
                    severity="critical",
                    subject=replica.id,
                    message=f"replica {replica.id} on this node: {text}",
                    fix=RESTART_FIXES[code],
                )
            )
        elif code:
            out.append(
                Problem(
                    code="deployments.replica_failed",
                    severity="critical",
                    subject=replica.id,
                    message=f"replica {replica.id} on this node: {text}",
                    fix="see `gpud deploy status` and gpud's journal for the server's output",
                )
            )
    return out
