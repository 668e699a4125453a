"""`gpud deploy ...`: apply, delete, list and inspect deployments; make operator keys."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from gpud import logfiles
from gpud.client import (
    EXIT_OK,
    EXIT_PROBLEM,
    api_exchange,
    api_get,
    client_options,
    path_part,
    print_raw_json,
)
from gpud.errors import ConfigError, GpudError
from gpud.text import duration, escape, table

if TYPE_CHECKING:
    # Loaded by the handlers that decode them: building the parser for another command
    # (`gpud status`) must not pay for the spec and version modules.
    from gpud.deployments.model import DeploymentsList


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    deploy = sub.add_parser(
        "deploy",
        help="model deployments: apply, delete, list, status, logs, keygen",
        description="Deployments: R replicas of a server on N hosts with G GPUs each.",
    )
    client_options(deploy)
    actions = deploy.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")

    apply = actions.add_parser("apply", help="apply a spec file (TOML) on every host")
    apply.add_argument("file", help="the deployment spec (TOML)")
    apply.add_argument("--key", help="operator private key file (from `gpud deploy keygen`)")
    client_options(apply, nested=True)
    apply.set_defaults(func=cmd_apply)

    delete = actions.add_parser("delete", help="delete a deployment everywhere")
    delete.add_argument("name")
    delete.add_argument(
        "--key", help="operator private key file (needed where [deployments] operators is set)"
    )
    client_options(delete, nested=True)
    delete.set_defaults(func=cmd_delete)

    listing = actions.add_parser("list", help="deployments and their ready replicas")
    client_options(listing, nested=True)
    listing.set_defaults(func=cmd_list)

    status = actions.add_parser("status", help="every replica of one deployment")
    status.add_argument("name")
    client_options(status, nested=True)
    status.set_defaults(func=cmd_status)

    logs = actions.add_parser(
        "logs",
        help="a replica server's output on this host (the last lines; -f follows)",
        description="Print the output file of a replica's server on this host, or with --ray "
        "that of this host's Ray node of a multi-node replica. REPLICA may be left out when "
        "this host has one replica of NAME.",
    )
    logs.add_argument("name")
    logs.add_argument("replica", nargs="?", type=int, help="replica index (0, 1, ...)")
    logs.add_argument(
        "--ray",
        action="store_true",
        help="the output of this host's Ray node of the replica (N > 1) instead of its server's",
    )
    logfiles.add_options(logs)
    client_options(logs, nested=True)
    logs.set_defaults(func=cmd_logs)

    keygen = actions.add_parser(
        "keygen", help="print a new operator key pair (private key file, public key for configs)"
    )
    keygen.set_defaults(func=cmd_keygen)


def cmd_apply(args: argparse.Namespace) -> int:
    from gpud.deployments import spec
    from gpud.deployments.model import ApplyReply

    try:
        text = Path(args.file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{args.file}: {exc.strerror}") from None
    body = {"spec": text.decode(errors="replace"), "operator": "", "signature": ""}
    if args.key:
        from gpud.deployments import authority

        try:
            private = authority.load_private(Path(args.key).read_text())
        except OSError as exc:
            raise ConfigError(f"{args.key}: {exc.strerror}") from None
        try:
            loaded = spec.load_spec(text)
        except spec.SpecError as exc:
            raise GpudError(f"{args.file}: {exc}") from None
        body["operator"], body["signature"] = authority.sign(loaded, private)
    reply, raw = api_exchange(args, "POST", "/v1/deployments", body, ApplyReply)
    if args.json:
        print_raw_json(raw)
    else:
        what = "applied" if reply.changed else "unchanged"
        print(f"{escape(reply.name)}: {what} (version {escape(reply.version)})")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    from gpud.deployments.model import ApplyReply, DeploymentsList

    body = None
    if args.key:
        from gpud.deployments import authority
        from gpud.deployments.version import SpecVersion

        try:
            private = authority.load_private(Path(args.key).read_text())
        except OSError as exc:
            raise ConfigError(f"{args.key}: {exc.strerror}") from None
        # The tombstone's version, signed with it: after everything the node has seen.
        listing = api_get(args, "/v1/deployments", DeploymentsList)
        tomb = SpecVersion(lamport=listing.lamport + 1, origin=listing.node)
        operator, signature = authority.sign_delete(args.name, tomb, private)
        body = {
            "version": {"lamport": tomb.lamport, "origin": tomb.origin},
            "operator": operator,
            "signature": signature,
        }
    path = f"/v1/deployments/{path_part(args.name)}"
    reply, raw = api_exchange(args, "DELETE", path, body, ApplyReply)
    if args.json:
        print_raw_json(raw)
    else:
        print(f"{escape(reply.name)}: deleted (version {escape(reply.version)})")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from gpud.deployments.model import DeploymentsList

    listing, raw = api_exchange(args, "GET", "/v1/deployments", type=DeploymentsList)
    if args.json:
        print_raw_json(raw)
        return EXIT_OK
    print(render_list(listing))
    return EXIT_OK


def render_list(listing: DeploymentsList) -> str:
    rows = []
    for d in listing.deployments:
        ready = sum(1 for r in d.replica_views if r.state == "ready")
        state = d.state if not d.reason else f"{d.state}: {d.reason}"
        rows.append(
            [
                escape(d.name),
                escape(d.engine),
                f"{ready}/{d.replicas}",
                escape(d.version),
                escape(state),
            ]
        )
    return table(["NAME", "ENGINE", "READY", "VERSION", "STATE"], rows, right=[2])


def cmd_status(args: argparse.Namespace) -> int:
    from gpud.deployments.model import DeploymentView

    path = f"/v1/deployments/{path_part(args.name)}"
    view, raw = api_exchange(args, "GET", path, type=DeploymentView)
    if args.json:
        print_raw_json(raw)
        return EXIT_OK
    print(
        f"{escape(view.name)}  {escape(view.engine)}  R={view.replicas} "
        f"N={view.nodes_per_replica} G={view.gpus_per_node}  version {escape(view.version)}  "
        f"{escape(view.state)}"
    )
    if view.reason:
        print(f"refused on this host: {escape(view.reason)}")
    if view.delete_refused:
        print(f"on this host: {escape(view.delete_refused)}")
    rows = []
    for r in view.replica_views:
        endpoint = f"{r.addr}:{r.port}" if r.port else "-"
        detail = r.reason or r.last_error
        if r.gpus:
            detail = f"gpus {','.join(r.gpus)} {detail}".strip()
        # What the replica's head announces in its tags (a peer's data-path probe passed).
        announced = "ready" if r.announced_ready else "-"
        # How long its server has been starting (known on the node that runs it).
        state = r.state if r.starting_s is None else f"{r.state} ({duration(r.starting_s)})"
        rows.append(
            [
                str(r.index),
                escape(state),
                escape(r.node) or "-",
                escape(endpoint),
                announced,
                str(r.restarts),
                escape(detail),
            ]
        )
    print(
        table(
            ["REPLICA", "STATE", "NODE", "ENDPOINT", "ANNOUNCED", "RESTARTS", "DETAIL"],
            rows,
            right=[0, 5],
        )
    )
    return EXIT_OK if all(r.state == "ready" for r in view.replica_views) else EXIT_PROBLEM


def cmd_logs(args: argparse.Namespace) -> int:
    query = {} if args.replica is None else {"replica": str(args.replica)}
    if args.ray:
        query["ray"] = "1"
    return logfiles.show(args, f"/v1/deployments/{path_part(args.name)}/logs", query)


def cmd_keygen(args: argparse.Namespace) -> int:
    from gpud.deployments import authority

    private, public = authority.keygen()
    print(f"private {private}")
    print(f"public  {public}")
    print("# save the private key line's value in a file readable only by you (--key FILE);")
    print("# put the public key in every host's [deployments] operators")
    return EXIT_OK
