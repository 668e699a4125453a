"""The `gpud` command line. Client commands talk to the local API over its Unix socket.

Imports stay lazy: `gpud status` must start fast, so the agent's dependencies (aiohttp,
pyroute2, NVML) load only for `gpud agent`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gpud.client import (
    CONFIG_HELP,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_USAGE,
    api_call,
    api_get,
    client_command,
    print_json,
)
from gpud.deployments.cli import add_commands as deploy_commands
from gpud.gpus.cli import add_commands as gpus_commands
from gpud.ports.cli import add_commands as ports_commands
from gpud.serf.cli import add_commands as keys_commands
from gpud.text import escape

if TYPE_CHECKING:
    from gpud.component import Problem
    from gpud.context import Member
    from gpud.status import StatusDocument

# Each package's `add_commands(sub)`: its client commands (`gpud ports ...`, `gpud gpus ...`).
CLIENT_COMMAND_GROUPS = (ports_commands, gpus_commands, keys_commands, deploy_commands)


def cmd_agent(args: argparse.Namespace) -> int:
    from gpud import config, preflight

    cfg = config.load(config.config_path(args.config), missing_ok=args.config is None)
    preflight.check_host(cfg)  # state dir and cluster key: the agent's host, not a client's
    if args.check_config:
        for warning in preflight.check_config(cfg):
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{config.config_path(args.config)}: ok")
        return EXIT_OK
    from gpud import agent

    return agent.main(cfg, config.config_path(args.config))


def cmd_status(args: argparse.Namespace) -> int:
    if args.json:
        print_json(api_get(args, "/v1/status"))
        return EXIT_OK
    from gpud.status import StatusDocument

    print(render_status(api_get(args, "/v1/status", StatusDocument)))
    return EXIT_OK


def cmd_members(args: argparse.Namespace) -> int:
    from gpud.membership import MembersResponse

    members = api_get(args, "/v1/members", MembersResponse).members
    if args.json:
        print_json(members)
    else:
        print(render_members(members))
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from gpud.status import DoctorReport

    report = api_get(args, "/v1/doctor", DoctorReport)
    if args.json:
        print_json(report)
    else:
        print(f"checked {report.peers_checked} peer(s) from {escape(report.node)}")
        if report.ok:
            print("no problems found")
        print(render_problems(report.problems))
    return EXIT_PROBLEM if report.critical else EXIT_OK


def cmd_drain(args: argparse.Namespace) -> int:
    """Cordon this host and wait (at most --timeout) until its replicas moved elsewhere."""
    import time

    reply = api_call(args, "POST", "/v1/drain", {"timeout_s": args.timeout})
    print(f"cordoned: no new replicas here; moving {len(reply['running_here'])} replica(s)")
    deadline = time.monotonic() + args.timeout
    while True:
        left = api_get(args, "/v1/status")["deployments"]["running_here"]
        if left == 0:
            print("drained: no replica runs here (`gpud uncordon` puts it back in service)")
            return EXIT_OK
        if time.monotonic() >= deadline:
            print(
                f"still draining after {args.timeout:g}s: {left} replica(s) here wait for a new "
                "copy to get ready elsewhere (see `gpud deploy status`); the drain goes on",
                file=sys.stderr,
            )
            return EXIT_PROBLEM
        time.sleep(1.0)


def cmd_uncordon(args: argparse.Namespace) -> int:
    api_call(args, "POST", "/v1/uncordon")
    print("uncordoned: replicas may be placed here again")
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    from gpud import secret

    print(secret.keygen())
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    from gpud import __version__

    print(f"gpud {__version__}")
    return EXIT_OK


def render_members(members: list[Member]) -> str:
    lines = [f"{'NAME':<20} {'ADDRESS':<22} {'STATUS':<8} {'GPUS':>4}  {'RAY':<7} TAGS"]
    for member in members:
        tags = member.tags
        addr = f"{member.addr}:{member.port}"
        if tags is None:
            gpus, ray, note = "-", "-", member.tags_error or "no tags"
        else:
            gpus, ray, note = str(tags.gpu), tags.ray, f"health={tags.hl} block={tags.blk}"
            note += " cordoned" if tags.cd else ""
        lines.append(
            f"{escape(member.name):<20} {addr:<22} {member.status:<8} {gpus:>4}  {ray:<7} "
            f"{escape(note)}"
        )
    return "\n".join(lines)


def render_problems(problems: list[Problem]) -> str:
    lines = []
    for problem in problems:
        subject = f" {escape(problem.subject)}:" if problem.subject else ""
        lines.append(f"[{problem.severity}]{subject} {escape(problem.message)}")
        lines.append(f"    fix: {escape(problem.fix)}  ({problem.code})")
    return "\n".join(lines)


def render_status(doc: StatusDocument) -> str:
    node = doc.node
    width = max(len("node"), *(len(name) for name in doc.summaries))
    lines = [f"{'node':<{width}}  {escape(node.name)}  {node.addr}  gpud {escape(node.version)}"]
    lines += [f"{name:<{width}}  {escape(text)}" for name, text in doc.summaries.items()]
    if doc.problems:
        lines += ["", f"{len(doc.problems)} problem(s):", render_problems(doc.problems)]
    lines += ["", render_members(doc.members)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpud",
        description="Node daemon for GPU clusters: gossip membership, data-path health, "
        "port partitioning and Ray head election.",
    )
    from gpud import __version__

    parser.add_argument("--version", action="version", version=f"gpud {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = sub.add_parser("agent", help="run the daemon in the foreground (systemd runs this)")
    agent.add_argument("--config", help=CONFIG_HELP)
    agent.add_argument("--check-config", action="store_true", help="validate the config and exit")
    agent.set_defaults(func=cmd_agent)

    client_command(sub, "status", "one-screen summary of this node and the cluster", cmd_status)
    client_command(sub, "members", "cluster members as this node sees them", cmd_members)
    client_command(
        sub,
        "doctor",
        "run every check now; print each problem with its cause and fix (exit 1 if critical)",
        cmd_doctor,
    )
    drain = client_command(
        sub,
        "drain",
        "cordon this host (admin): no new replicas, never Ray head; move its replicas "
        "elsewhere make-before-break and wait until none runs here",
        cmd_drain,
    )
    drain.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait, and the most an old copy serves requests already sent to it "
        "after its new copy is ready (default 60)",
    )
    client_command(
        sub,
        "uncordon",
        "end this host's cordon (admin): replicas may be placed here again",
        cmd_uncordon,
    )
    for add_commands in CLIENT_COMMAND_GROUPS:
        add_commands(sub)

    sub.add_parser("keygen", help="print a new cluster key").set_defaults(func=cmd_keygen)
    sub.add_parser("version", help="print gpud's version").set_defaults(func=cmd_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from gpud.errors import ConfigError, GpudError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"gpud: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GpudError as exc:
        from gpud.client import DaemonNotRunning

        print(f"gpud: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING if isinstance(exc, DaemonNotRunning) else EXIT_PROBLEM
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
