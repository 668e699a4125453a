"""`gpud ports`: show the block and leases; `gpud ports lease` / `gpud ports release`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from gpud.client import (
    api_call,
    api_exchange,
    api_get,
    client_command,
    client_options,
    path_part,
    print_api_json,
    print_raw_json,
)
from gpud.text import escape, table


class LeaseView(msgspec.Struct, kw_only=True):
    """What the CLI prints of a lease (gpud.ports.leases.Lease, whose module loads the state
    store: a client command does not)."""

    id: str
    owner: str
    ports: list[int]
    pid: int | None = None


class PortsView(msgspec.Struct, kw_only=True):
    """What `gpud ports` prints of GET /v1/ports (gpud.ports.service.PortsDetail)."""

    summary: str
    reservation: str
    warnings: list[str] = []
    leases: list[LeaseView] = []


def cmd_ports(args: argparse.Namespace) -> int:
    if args.ports_command == "lease":
        return cmd_lease(args)
    if args.ports_command == "release":
        return cmd_release(args)
    if args.json:
        print_api_json(args, "/v1/ports")
        return 0
    data = api_get(args, "/v1/ports", PortsView)
    print(escape(data.summary))
    print(f"reservation: {escape(data.reservation)}")
    for warning in data.warnings:
        print(f"warning: {escape(warning)}")
    if data.leases:
        print(render_leases(data.leases))
    return 0


def render_leases(leases: list[LeaseView]) -> str:
    """The lease table; owners are free text from any caller, so they are escaped."""
    rows = [
        [escape(lease.id), escape(lease.owner), str(lease.pid or "-"), _ports_text(lease.ports)]
        for lease in leases
    ]
    return table(["ID", "OWNER", "PID", "PORTS"], rows, right=[2])


def cmd_lease(args: argparse.Namespace) -> int:
    body = {
        "owner": args.owner,
        "count": args.count,
        "contiguous": args.contiguous,
        "pid": args.pid,
    }
    lease, raw = api_exchange(args, "POST", "/v1/ports/leases", body, LeaseView)
    if args.json:
        print_raw_json(raw)
        return 0
    # The ports on one line, for scripts: `read -r a b c <<< "$(gpud ports lease ...)"`; the
    # id that `release` needs where a person sees it and `$(...)` does not take it.
    print(" ".join(str(p) for p in lease.ports))
    print(f"lease {escape(lease.id)} (release it with `gpud ports release ID`)", file=sys.stderr)
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    api_call(args, "DELETE", f"/v1/ports/leases/{path_part(args.lease_id)}")
    return 0


def _ports_text(ports: list[int]) -> str:
    """Compact "21200-21203,21210" form of a sorted port list."""
    parts: list[str] = []
    start = prev = None
    for port in sorted(ports):
        if prev is not None and port == prev + 1:
            prev = port
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = port
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)


def add_commands(sub: Any) -> None:
    """Register `gpud ports ...` on the top-level subparsers."""
    ports = client_command(sub, "ports", "this node's port block and leases", cmd_ports)
    actions = ports.add_subparsers(dest="ports_command", metavar="ACTION")
    lease = actions.add_parser(
        "lease", help="lease ports of this node's block; prints them on one line"
    )
    lease.add_argument("--owner", required=True, help="who holds the lease (free text)")
    lease.add_argument("--count", type=int, required=True, help="number of ports")
    lease.add_argument("--contiguous", action="store_true", help="consecutive ports")
    lease.add_argument(
        "--pid", type=int, default=None, help="owner process: the lease ends when it exits"
    )
    client_options(lease, nested=True)
    release = actions.add_parser("release", help="release a lease by its id")
    release.add_argument("lease_id", metavar="ID")
    client_options(release, nested=True)
