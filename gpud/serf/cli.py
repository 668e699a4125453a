"""`gpud keys list|install KEY|use KEY|remove KEY`: rotate the cluster's gossip key."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from gpud.client import api_exchange, client_command, client_options, path_part, print_raw_json
from gpud.text import escape


class KeysView(msgspec.Struct, kw_only=True):
    """What `gpud keys` prints of every key route's reply (gpud.serf.keys.KeysReply, whose
    module loads aiohttp: a client command does not)."""

    nodes: int
    responses: int
    failed: int
    messages: dict[str, str]
    keys: dict[str, int] = {}
    hint: str = ""


def cmd_keys(args: argparse.Namespace) -> int:
    action = args.keys_command or "list"
    if action == "list":
        reply, raw = api_exchange(args, "GET", "/v1/keys", type=KeysView)
    else:
        path = f"/v1/keys/{path_part(action)}"
        reply, raw = api_exchange(args, "POST", path, {"key": args.key}, KeysView)
    if args.json:
        print_raw_json(raw)
        return 0
    print(f"{reply.responses} of {reply.nodes} node(s) answered, {reply.failed} failed")
    for key, count in sorted(reply.keys.items()):
        print(f"{escape(key)}  on {count} of {reply.nodes} node(s)")
    for node, message in sorted(reply.messages.items()):
        print(f"  {escape(node)}: {escape(message)}")
    if reply.hint:
        print(escape(reply.hint))
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
