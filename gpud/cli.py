"""The `gpud` command line. Client commands talk to the local API over its Unix socket.

Imports stay lazy: `gpud status` must start fast, so the agent's dependencies (aiohttp,
pyroute2, NVML, SQLite) load only for `gpud agent`; building the parser (also done for the man
page and the shell completions, gpud/manpage.py) imports no handler's types.

Exit status of every client command: 0 ok, 1 the daemon answered with a problem (a critical
verdict, a refused request, a reply of the wrong shape), 2 a usage or config error, 3 the daemon
could not be asked (no socket, nobody listening, no answer within --timeout).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from gpud.client import (
    CONFIG_HELP,
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_TRANSPORT,
    EXIT_USAGE,
    api_call,
    api_exchange,
    api_get,
    client_command,
    print_api_json,
    print_raw_json,
)
from gpud.context import Member
from gpud.deployments.cli import add_commands as deploy_commands
from gpud.gpus.cli import add_commands as gpus_commands
from gpud.ports.cli import add_commands as ports_commands
from gpud.serf.cli import add_commands as keys_commands
from gpud.text import escape, table
from gpud.views import add_commands as view_commands
from gpud.views import render_problems

if TYPE_CHECKING:
    from gpud.status import StatusDocument

# Each package's `add_commands(sub)`: its client commands (`gpud ports ...`, `gpud gpus ...`).
CLIENT_COMMAND_GROUPS = (
    view_commands,
    ports_commands,
    gpus_commands,
    keys_commands,
    deploy_commands,
)

EXIT_STATUS_HELP = (
    "exit status: 0 ok; 1 the daemon answered with a problem (critical verdict, refused "
    "request, reply of the wrong shape); 2 usage or config error; 3 the daemon could not be "
    "asked (no socket, nobody listening, no answer within --timeout). "
    "environment: GPUD_SOCKET names the local API socket (--socket wins), GPUD_CONFIG the config file."
)


class MembersReply(msgspec.Struct, kw_only=True):
    """GET /v1/members (gpud.membership.MembersResponse, whose module loads aiohttp)."""

    members: list[Member]


class DrainReply(msgspec.Struct, kw_only=True):
    """What `gpud drain` prints of POST /v1/drain (gpud.deployments.drain.DrainReply, whose
    module loads the state store)."""

    running_here: list[str] = []


class DeploymentsCount(msgspec.Struct, kw_only=True):
    running_here: int


class DrainProgress(msgspec.Struct, kw_only=True):
    """What `gpud drain` polls of GET /v1/status."""

    deployments: DeploymentsCount


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
        print_api_json(args, "/v1/status")
        return EXIT_OK
    from gpud.status import StatusDocument

    print(render_status(api_get(args, "/v1/status", StatusDocument)))
    return EXIT_OK


def cmd_members(args: argparse.Namespace) -> int:
    if args.json:
        print_api_json(args, "/v1/members")
        return EXIT_OK
    print(render_members(api_get(args, "/v1/members", MembersReply).members))
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from gpud.status import DoctorReport

    report, raw = api_exchange(args, "GET", "/v1/doctor", type=DoctorReport)
    if args.json:
        print_raw_json(raw)
    else:
        print(f"checked {report.peers_checked} peer(s) from {escape(report.node)}")
        if report.ok:
            print("no problems found")
        print(render_problems(report.problems))
    return EXIT_PROBLEM if report.critical else EXIT_OK


def cmd_drain(args: argparse.Namespace) -> int:
    """Cordon this host and wait (at most --timeout) until its replicas moved elsewhere."""
    import time

    reply = api_call(args, "POST", "/v1/drain", {"timeout_s": args.timeout}, DrainReply)
    print(f"cordoned: no new replicas here; moving {len(reply.running_here)} replica(s)")
    deadline = time.monotonic() + args.timeout
    while True:
        left = api_get(args, "/v1/status", DrainProgress).deployments.running_here
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
    rows = []
    for member in members:
        tags = member.tags
        if tags is None:
            gpus, ray, note = "-", "-", member.tags_error or "no tags"
        else:
            gpus, ray, note = str(tags.gpu), tags.ray, f"health={tags.hl} block={tags.blk}"
            note += " cordoned" if tags.cd else ""
        if member.down:
            note = f"down: {member.down_reason or 'no answer'}; {note}"
        addr = f"{member.addr}:{member.port}"
        rows.append([escape(member.name), escape(addr), member.status, gpus, ray, escape(note)])
    return table(["NAME", "ADDRESS", "STATUS", "GPUS", "RAY", "TAGS"], rows, right=[3])


def render_status(doc: StatusDocument) -> str:
    node = doc.node
    width = max(len("node"), *(len(name) for name in doc.summaries))
    lines = [f"{'node':<{width}}  {escape(node.name)}  {node.addr}  gpud {escape(node.version)}"]
    lines += [f"{name:<{width}}  {escape(text)}" for name, text in doc.summaries.items()]
    if doc.problems:
        lines += ["", f"{len(doc.problems)} problem(s):", render_problems(doc.problems)]
    lines += ["", render_members(doc.members)]
    return "\n".join(lines)


# Doctor runs its checks when asked (connects that may wait out their timeouts, a Serf query),
# so it waits longer than the commands that read the daemon's current state.
DOCTOR_TIMEOUT_S = 60.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpud",
        description="Node daemon for GPU clusters: gossip membership, data-path health, "
        "port partitioning and Ray head election.",
        epilog=EXIT_STATUS_HELP,
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
    doctor = client_command(
        sub,
        "doctor",
        "run every check now; print each problem with its cause and fix (exit 1 if critical)",
        cmd_doctor,
        timeout=False,
    )
    doctor.add_argument(
        "--timeout",
        type=float,
        default=DOCTOR_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for the checks' answer, then exit 3 (default "
        f"{DOCTOR_TIMEOUT_S:g}: doctor probes every peer and Ray's ports afresh, each within "
        "its own bound)",
    )
    drain = client_command(
        sub,
        "drain",
        "cordon this host (admin): no new replicas, never Ray head; move its replicas "
        "elsewhere make-before-break and wait until none runs here",
        cmd_drain,
        timeout=False,
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
    from gpud.manpage import add_commands as doc_commands

    doc_commands(sub, parser)
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
        from gpud.client import TransportError

        print(f"gpud: {exc}", file=sys.stderr)
        return EXIT_TRANSPORT if isinstance(exc, TransportError) else EXIT_PROBLEM
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
