"""`gpud health`, `gpud network`, `gpud ray`: this node's view of the data path, the host
network and Ray, read from the component routes the agent already serves.

Each reply is decoded into a struct that declares only what the command prints (a tolerant
reader: the server may add fields). The servers' own structs live beside their components,
which load aiohttp, pyroute2 or Ray's probes; a client command loads none of that.
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from gpud import logfiles
from gpud.client import (
    EXIT_OK,
    EXIT_PROBLEM,
    ApiRefused,
    api_get,
    client_command,
    client_options,
    print_api_json,
)
from gpud.component import Problem
from gpud.text import escape, table


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_problems(problems: list[Problem]) -> str:
    """Each problem on two lines: severity, subject and message; then its fix and code."""
    lines = []
    for problem in problems:
        subject = f" {escape(problem.subject)}:" if problem.subject else ""
        lines.append(f"[{problem.severity}]{subject} {escape(problem.message)}")
        lines.append(f"    fix: {escape(problem.fix)}  ({escape(problem.code)})")
    return "\n".join(lines)


# ---- gpud health: GET /v1/health (gpud.health.service.HealthStatus) ----------------------


class PeerRowView(msgspec.Struct, kw_only=True):
    peer: str
    addr: str
    port: int
    direction: str
    state: str
    rtt_ms: float | None = None
    reason: str = ""
    serf: str = ""
    source: str = ""


class PairRowView(msgspec.Struct, kw_only=True):
    peer: str
    state: str
    kind: str
    message: str
    fix: str


class WorkloadView(msgspec.Struct, kw_only=True):
    check: str
    subject: str
    target: str
    state: str
    reason: str = ""


class HealthView(msgspec.Struct, kw_only=True):
    state: str
    reasons: list[str]
    behind_nat: bool
    nat_message: str
    rounds: int
    peers: list[PeerRowView]
    pairs: list[PairRowView]
    workload: list[WorkloadView] = []


def render_health(view: HealthView) -> str:
    lines = [f"health {view.state} after {view.rounds} probe round(s)"]
    lines += [f"  {escape(reason)}" for reason in view.reasons]
    if view.behind_nat:
        lines.append(f"behind NAT: {escape(view.nat_message)}")
    if view.peers:
        lines += [
            "",
            table(
                ["PEER", "ADDRESS", "DIR", "STATE", "RTT MS", "SERF", "REASON"],
                [
                    [
                        escape(p.peer),
                        escape(f"{p.addr}:{p.port}"),
                        escape(p.direction),
                        escape(p.state),
                        _ms(p.rtt_ms),
                        escape(p.serf),
                        escape(" ".join(x for x in (p.reason, p.source and f"({p.source})") if x)),
                    ]
                    for p in view.peers
                ],
                right=[4],
            ),
        ]
    troubled = [p for p in view.pairs if p.state != "passing"]
    for pair in troubled:
        lines.append(f"[{escape(pair.state)}] {escape(pair.peer)}: {escape(pair.message)}")
        lines.append(f"    fix: {escape(pair.fix)}  ({escape(pair.kind)})")
    if view.workload:
        lines += [
            "",
            table(
                ["CHECK", "SUBJECT", "TARGET", "STATE", "REASON"],
                [
                    [escape(x) for x in (w.check, w.subject, w.target, w.state, w.reason)]
                    for w in view.workload
                ],
            ),
        ]
    return "\n".join(lines)


def cmd_health(args: argparse.Namespace) -> int:
    if args.json:
        print_api_json(args, "/v1/health")
        return EXIT_OK
    view = api_get(args, "/v1/health", HealthView)
    print(render_health(view))
    return EXIT_PROBLEM if view.state == "critical" else EXIT_OK


# ---- gpud network: GET /v1/network (gpud.netcheck.model.NetworkStatus) -------------------


class RouteView(msgspec.Struct, kw_only=True):
    peer: str
    addr: str
    iface: str
    src: str | None = None
    mtu: int | None = None
    gateway: str | None = None
    warnings: list[str] = []


class NetworkView(msgspec.Struct, kw_only=True):
    advertise: str
    chosen_by: str
    interface: str
    mtu: int | None
    address_is_local: bool | None
    address_reason: str = ""
    routes: list[RouteView] = []
    problems: list[Problem] = []


def render_network(view: NetworkView) -> str:
    local = {None: "not checked yet", True: "on a local interface", False: "NOT local"}
    lines = [
        f"advertise {escape(view.advertise)} (chosen by {escape(view.chosen_by)}), "
        f"{local[view.address_is_local]}"
        + (f" on {escape(view.interface)}" if view.interface else "")
        + (f", mtu {view.mtu}" if view.mtu else "")
    ]
    if view.address_reason:
        lines.append(f"  {escape(view.address_reason)}")
    if view.routes:
        lines += [
            "",
            table(
                ["PEER", "ADDRESS", "IFACE", "SOURCE", "GATEWAY", "MTU", "WARNINGS"],
                [
                    [
                        escape(r.peer),
                        escape(r.addr),
                        escape(r.iface),
                        escape(r.src or "-"),
                        escape(r.gateway or "-"),
                        str(r.mtu or "-"),
                        escape("; ".join(r.warnings)),
                    ]
                    for r in view.routes
                ],
                right=[5],
            ),
        ]
    if view.problems:
        lines += ["", render_problems(view.problems)]
    return "\n".join(lines)


def cmd_network(args: argparse.Namespace) -> int:
    if args.json:
        print_api_json(args, "/v1/network")
        return EXIT_OK
    view = api_get(args, "/v1/network", NetworkView)
    print(render_network(view))
    return EXIT_PROBLEM if any(p.severity == "critical" for p in view.problems) else EXIT_OK


# ---- gpud ray: GET /v1/ray (gpud.ray.problems.RayStatus) ---------------------------------


class DirectionView(msgspec.Struct, kw_only=True):
    state: str = "unknown"
    reason: str = ""


class ProcessView(msgspec.Struct, kw_only=True):
    state: str = "stopped"
    pid: int | None = None
    restarts: int = 0
    last_error: str | None = None


class RayProcessView(msgspec.Struct, kw_only=True):
    process: ProcessView = msgspec.field(default_factory=ProcessView)
    gcs_ready_port: int = 0
    error: str | None = None


class RayNodeView(msgspec.Struct, kw_only=True):
    name: str
    ip: str
    head: bool


class RayNodesView(msgspec.Struct, kw_only=True):
    nodes: list[RayNodeView] | None = None
    error: str | None = None


class GcsReachView(msgspec.Struct, kw_only=True):
    head: str
    head_addr: str
    gcs_port: int
    direction: DirectionView = msgspec.field(default_factory=DirectionView)


class WorkerView(msgspec.Struct, kw_only=True):
    name: str
    addr: str
    in_gcs: bool = False
    direction: DirectionView = msgspec.field(default_factory=DirectionView)


class RayView(msgspec.Struct, kw_only=True):
    enabled: bool
    role: str
    term: int
    head: str | None = None
    candidate: str | None = None
    head_address: str | None = None
    action: str
    election_reason: str = ""
    eligible: bool
    not_eligible_reason: str | None = None
    ray_available: bool
    ray_version: str = ""
    process: RayProcessView
    recent_failures: int = 0
    restarts_total: int = 0
    ray_nodes: RayNodesView
    gcs_reach: GcsReachView | None = None
    workers: list[WorkerView] = []


class StatusSummaries(msgspec.Struct):
    summaries: dict[str, str]


def render_ray(view: RayView) -> str:
    if not view.enabled:
        return "ray disabled (ray.enabled = false)"
    head = escape(view.head or "none")
    lines = [
        f"role {escape(view.role)}, term {view.term}, head {head}"
        + (f" at {escape(view.head_address)}" if view.head_address else "")
        + (f", waiting for {escape(view.candidate)}" if view.candidate else ""),
        f"election: {escape(view.action)}"
        + (f": {escape(view.election_reason)}" if view.election_reason else ""),
    ]
    if not view.eligible:
        lines.append(f"not eligible as head: {escape(view.not_eligible_reason or '')}")
    version = escape(view.ray_version) if view.ray_available else "not installed"
    process = view.process.process
    lines.append(
        f"ray {version}: {escape(process.state)}"
        + (f" (pid {process.pid})" if process.pid else "")
        + f", {view.restarts_total} restart(s), {view.recent_failures} recent failure(s)"
    )
    for error in (process.last_error, view.process.error):
        if error:
            lines.append(f"  {escape(error)}")
    reach = view.gcs_reach
    if reach is not None:
        lines.append(
            f"head's GCS {escape(reach.head_addr)}:{reach.gcs_port} over the data path: "
            f"{escape(reach.direction.state)} {escape(reach.direction.reason)}".rstrip()
        )
    if view.ray_nodes.error:
        lines.append(f"GCS nodes unknown: {escape(view.ray_nodes.error)}")
    if view.ray_nodes.nodes:
        lines += [
            "",
            table(
                ["RAY NODE", "IP", "HEAD"],
                [
                    [escape(n.name), escape(n.ip), "yes" if n.head else ""]
                    for n in view.ray_nodes.nodes
                ],
            ),
        ]
    if view.workers:
        lines += [
            "",
            table(
                ["WORKER", "ADDRESS", "IN GCS", "STATE", "REASON"],
                [
                    [
                        escape(w.name),
                        escape(w.addr),
                        "yes" if w.in_gcs else "no",
                        escape(w.direction.state),
                        escape(w.direction.reason),
                    ]
                    for w in view.workers
                ],
            ),
        ]
    return "\n".join(lines)


def cmd_ray(args: argparse.Namespace) -> int:
    if args.json:
        print_api_json(args, "/v1/ray")
        return EXIT_OK
    try:
        view = api_get(args, "/v1/ray", RayView)
    except ApiRefused as exc:
        if exc.status != 404:
            raise
        # Ray switched off: the component serves no route; its status summary says why.
        summaries = api_get(args, "/v1/status", StatusSummaries).summaries
        print(f"ray {escape(summaries.get('ray', 'not running in this gpud'))}")
        return EXIT_OK
    print(render_ray(view))
    failing = view.gcs_reach is not None and view.gcs_reach.direction.state == "critical"
    return EXIT_PROBLEM if failing else EXIT_OK


def cmd_ray_logs(args: argparse.Namespace) -> int:
    return logfiles.show(args, "/v1/ray/logs", {})


def add_commands(sub: Any) -> None:
    """Register `gpud health`, `gpud network` and `gpud ray` on the top-level subparsers."""
    client_command(
        sub,
        "health",
        "data-path probes to and from every peer, each pair's verdict (exit 1 if critical)",
        cmd_health,
    )
    client_command(
        sub,
        "network",
        "the advertised address, its interface and the route to every peer (exit 1 if critical)",
        cmd_network,
    )
    ray = client_command(
        sub,
        "ray",
        "this node's Ray role, the election, its Ray process and the GCS (exit 1 if this "
        "worker cannot reach its head's GCS)",
        cmd_ray,
    )
    actions = ray.add_subparsers(dest="ray_command", metavar="ACTION")
    logs = actions.add_parser(
        "logs",
        help="this node's Ray process's output (the last lines; -f follows)",
        description="Print the output file of this node's Ray process (`ray start`).",
    )
    logfiles.add_options(logs)
    client_options(logs, nested=True)
    logs.set_defaults(func=cmd_ray_logs)
