"""The `gpud` command line. Client commands talk to the local API over its Unix socket.

Imports stay lazy: `gpud status` must start fast, so the agent's dependencies (aiohttp,
pyroute2, NVML) load only for `gpud agent`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3

STATUS_SECTIONS = ("node", "members", "health", "network", "ports", "ray", "gpus")


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    from gpud import config

    return config.load(config.config_path(args.config), missing_ok=True).socket_path


def api_get(args: argparse.Namespace, path: str) -> Any:
    from gpud import client

    return client.request(_socket_path(args), "GET", path)


def api_call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    from gpud import client

    return client.request(_socket_path(args), method, path, body)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def cmd_agent(args: argparse.Namespace) -> int:
    from gpud import config

    cfg = config.load(config.config_path(args.config), missing_ok=args.config is None)
    if args.check_config:
        print(f"{config.config_path(args.config)}: ok")
        return EXIT_OK
    from gpud import agent

    return agent.main(cfg)


def cmd_status(args: argparse.Namespace) -> int:
    data = api_get(args, "/v1/status")
    if args.json:
        print_json(data)
    else:
        print(render_status(data))
    return EXIT_OK


def cmd_members(args: argparse.Namespace) -> int:
    members = api_get(args, "/v1/members")["members"]
    if args.json:
        print_json(members)
    else:
        print(render_members(members))
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    report = api_get(args, "/v1/doctor")
    if args.json:
        print_json(report)
    else:
        print(f"checked {report['peers_checked']} peer(s) from {report['node']}")
        if report["ok"]:
            print("no problems found")
        for problem in report["problems"]:
            print(f"[{problem['severity']}] {problem['subject']}: {problem['message']}")
            print(f"    fix: {problem['fix']}")
    return EXIT_PROBLEM if report["critical"] else EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    from gpud import secret

    print(secret.keygen())
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    from gpud import __version__

    print(f"gpud {__version__}")
    return EXIT_OK


def render_members(members: list[dict[str, Any]]) -> str:
    lines = [f"{'NAME':<20} {'ADDRESS':<22} {'STATUS':<8} {'GPUS':>4}  {'RAY':<7} TAGS"]
    for member in members:
        tags = member.get("tags") or {}
        addr = f"{member.get('addr')}:{member.get('port')}"
        note = (
            member.get("tags_error") or f"health={tags.get('hl', '?')} block={tags.get('blk', '?')}"
        )
        lines.append(
            f"{member.get('name', '?'):<20} {addr:<22} {member.get('status', '?'):<8} "
            f"{tags.get('gpu', '-')!s:>4}  {tags.get('ray', '-'):<7} {note}"
        )
    return "\n".join(lines)


def _summary(section: Any) -> str:
    if not isinstance(section, dict):
        return str(section)
    if "summary" in section:
        return str(section["summary"])
    scalars = [f"{k}={v}" for k, v in section.items() if isinstance(v, str | int | float | bool)]
    return " ".join(scalars) or "-"


def _health_line(health: dict[str, Any]) -> str:
    if "state" not in health or "peers" not in health:
        return _summary(health)
    out = [row for row in health["peers"] if row.get("direction") == "out"]
    passing = sum(row.get("state") == "passing" for row in out)
    line = f"{health['state']}, {passing}/{len(out)} peers reached over the data path"
    if health.get("behind_nat"):
        line += f"; BEHIND NAT: {health.get('nat_message', '')}"
    problems = [p["message"] for p in health.get("pairs", []) if p.get("state") != "passing"]
    return "\n         ".join([line, *problems])


def _network_line(network: dict[str, Any]) -> str:
    if "advertise" not in network:
        return _summary(network)
    line = (
        f"{network['advertise']} on {network.get('interface') or '?'} "
        f"(mtu {network.get('mtu')}, chosen by {network.get('chosen_by')})"
    )
    problems = [f"[{p['severity']}] {p['message']}" for p in network.get("problems", [])]
    return "\n         ".join([line, *problems])


def render_status(data: dict[str, Any]) -> str:
    node = data.get("node", {})
    members = data.get("members", [])
    counts: dict[str, int] = {}
    for member in members:
        counts[member.get("status", "?")] = counts.get(member.get("status", "?"), 0) + 1
    by_status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
    serf = node.get("serf", {}).get("supervisor", {}).get("state", "?")
    lines = [
        f"node     {node.get('name')}  {node.get('addr')}  gpud {node.get('version')}  serf {serf}",
        f"members  {len(members)} ({by_status})",
        f"health   {_health_line(data.get('health', {}))}",
        f"network  {_network_line(data.get('network', {}))}",
    ]
    for section in ("ports", "ray", "gpus"):
        lines.append(f"{section:<8} {_summary(data.get(section))}")
    lines.append("")
    lines.append(render_members(members))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpud",
        description="Node daemon for GPU clusters: gossip membership, data-path health, "
        "port partitioning and Ray head election.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client_command(
        name: str, help_text: str, handler: Callable[..., int]
    ) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument(
            "--config", help="config file (default: $GPUD_CONFIG or /etc/gpud/gpud.toml)"
        )
        cmd.add_argument("--socket", help="local API socket (default: from the config)")
        cmd.add_argument("--json", action="store_true", help="print JSON as the API returns it")
        cmd.set_defaults(func=handler)
        return cmd

    agent = sub.add_parser("agent", help="run the daemon in the foreground (systemd runs this)")
    agent.add_argument(
        "--config", help="config file (default: $GPUD_CONFIG or /etc/gpud/gpud.toml)"
    )
    agent.add_argument("--check-config", action="store_true", help="validate the config and exit")
    agent.set_defaults(func=cmd_agent)

    client_command("status", "one-screen summary of this node and the cluster", cmd_status)
    client_command("members", "cluster members as this node sees them", cmd_members)
    client_command(
        "doctor", "run the network checks now; print each problem with its fix", cmd_doctor
    )

    from gpud.ports import cli as ports_cli

    ports_cli.add_commands(sub, client_command)

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
