"""`gpud deploy ...`: apply, delete, list and inspect deployments; make operator keys."""

from __future__ import annotations

import argparse
from pathlib import Path

from gpud.client import EXIT_OK, EXIT_PROBLEM, api_call, api_get, client_options, print_json
from gpud.deployments.model import ApplyReply, DeploymentsList, DeploymentView
from gpud.errors import ConfigError, GpudError
from gpud.text import duration, escape


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    deploy = sub.add_parser(
        "deploy",
        help="model deployments: apply, delete, list, status, keygen",
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

    keygen = actions.add_parser(
        "keygen", help="print a new operator key pair (private key file, public key for configs)"
    )
    keygen.set_defaults(func=cmd_keygen)


def cmd_apply(args: argparse.Namespace) -> int:
    from gpud.deployments import spec

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
    reply = api_call(args, "POST", "/v1/deployments", body, ApplyReply)
    if args.json:
        print_json(reply)
    else:
        what = "applied" if reply.changed else "unchanged"
        print(f"{escape(reply.name)}: {what} (version {escape(reply.version)})")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
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
    reply = api_call(args, "DELETE", f"/v1/deployments/{args.name}", body, ApplyReply)
    if args.json:
        print_json(reply)
    else:
        print(f"{escape(reply.name)}: deleted (version {escape(reply.version)})")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    listing = api_get(args, "/v1/deployments", DeploymentsList)
    if args.json:
        print_json(listing)
        return EXIT_OK
    print(f"{'NAME':<24} {'ENGINE':<8} {'READY':>7}  {'VERSION':<20} STATE")
    for d in listing.deployments:
        ready = sum(1 for r in d.replica_views if r.state == "ready")
        state = d.state if not d.reason else f"{d.state}: {d.reason}"
        print(
            f"{escape(d.name):<24} {d.engine:<8} {f'{ready}/{d.replicas}':>7}  "
            f"{escape(d.version):<20} {escape(state)}"
        )
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    view = api_get(args, f"/v1/deployments/{args.name}", DeploymentView)
    if args.json:
        print_json(view)
        return EXIT_OK
    print(
        f"{escape(view.name)}  {view.engine}  R={view.replicas} N={view.nodes_per_replica} "
        f"G={view.gpus_per_node}  version {escape(view.version)}  {view.state}"
    )
    if view.reason:
        print(f"refused on this host: {escape(view.reason)}")
    if view.delete_refused:
        print(f"on this host: {escape(view.delete_refused)}")
    print(
        f"{'REPLICA':>7}  {'STATE':<18} {'NODE':<16} {'ENDPOINT':<22} {'ANNOUNCED':<9} "
        f"{'RESTARTS':>8}  DETAIL"
    )
    for r in view.replica_views:
        endpoint = f"{r.addr}:{r.port}" if r.port else "-"
        detail = r.reason or r.last_error
        if r.gpus:
            detail = f"gpus {','.join(r.gpus)} {detail}".strip()
        # What the replica's head announces in its tags (a peer's data-path probe passed).
        announced = "ready" if r.announced_ready else "-"
        # How long its server has been starting (known on the node that runs it).
        state = r.state if r.starting_s is None else f"{r.state} ({duration(r.starting_s)})"
        print(
            f"{r.index:>7}  {state:<18} {escape(r.node) or '-':<16} {endpoint:<22} "
            f"{announced:<9} {r.restarts:>8}  {escape(detail)}"
        )
    return EXIT_OK if all(r.state == "ready" for r in view.replica_views) else EXIT_PROBLEM


def cmd_keygen(args: argparse.Namespace) -> int:
    from gpud.deployments import authority

    private, public = authority.keygen()
    print(f"private {private}")
    print(f"public  {public}")
    print("# save the private key line's value in a file readable only by you (--key FILE);")
    print("# put the public key in every host's [deployments] operators")
    return EXIT_OK
