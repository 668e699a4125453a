"""`gpud keys list|install KEY|use KEY|remove KEY`: rotate the cluster's gossip key."""

from __future__ import annotations

import argparse
from typing import Any

from gpud.client import api_call, api_get, client_command, client_options, print_json
from gpud.serf.keys import KeysReply
from gpud.text import escape


def cmd_keys(args: argparse.Namespace) -> int:
    action = args.keys_command or "list"
    if action == "list":
        reply = api_get(args, "/v1/keys", KeysReply)
    else:
        reply = api_call(args, "POST", f"/v1/keys/{action}", {"key": args.key}, KeysReply)
    if args.json:
        print_json(reply)
        return 0
    print(f"{reply.responses} of {reply.nodes} node(s) answered, {reply.failed} failed")
    for key, count in sorted(reply.keys.items()):
        print(f"{key}  on {count} of {reply.nodes} node(s)")
    for node, message in sorted(reply.messages.items()):
        print(f"  {escape(node)}: {escape(message)}")
    if reply.hint:
        print(reply.hint)
    return 0


def add_commands(sub: Any) -> None:
    """Register `gpud keys ...` on the top-level subparsers."""
    keys = client_command(
        sub,
        "keys",
        "the cluster's gossip keys: list, install, use, remove (root or admin group)",
        cmd_keys,
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    listing = actions.add_parser("list", help="the installed keys and how many nodes hold each")
    client_options(listing, nested=True)
    for action, text in (
        ("install", "add KEY to every node's keyring (step 1 of a rotation)"),
        ("use", "make KEY the primary (encrypting) key everywhere (step 2)"),
        ("remove", "remove KEY from every node's keyring (step 3, the old key)"),
    ):
        parser = actions.add_parser(action, help=text)
        parser.add_argument("key", metavar="KEY", help="base64 key from `gpud keygen`")
        client_options(parser, nested=True)
