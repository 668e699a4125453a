"""Gossip key rotation on the local API (admin only): list, install, use and remove keys in
Serf's keyring, cluster-wide, through Serf's keyring RPC.

Rotation without restarting every node at once: ``install NEW`` (every node learns it), ``use
NEW`` (every node encrypts with it), ``remove OLD``. Serf persists the keyring; the peer API
follows it (``secret.PeerApiKeys``), accepting both keys while both are installed.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from aiohttp import web

from gpud import api, log, secret
from gpud.errors import ApiError, ConfigError
from gpud.serf.rpc import KeyringReply, SerfConnectionError, SerfRPC, SerfRPCError

_log = log.get("keys")


class KeyRequest(msgspec.Struct, forbid_unknown_fields=True):
    key: str


class KeysReply(msgspec.Struct, kw_only=True):
    """The answer of every key route: Serf's reply, the keys (for list) and the next step."""

    nodes: int
    responses: int
    failed: int
    # Per node that failed: Serf's message.
    messages: dict[str, str]
    # list: key -> how many nodes hold it.
    keys: dict[str, int] = {}
    hint: str = ""


_HINTS = {
    "install": "next: `gpud keys use KEY` once every node holds it",
    "use": "next: `gpud keys remove OLD`; put the new key in cluster.key_file on every host",
    "remove": "done; cluster.key_file must hold the new key on every host before a restart",
}


def keys_reply(reply: KeyringReply, hint: str = "") -> KeysReply:
    return KeysReply(
        nodes=reply.num_nodes,
        responses=reply.num_resp,
        failed=reply.num_err,
        messages=reply.messages or {},
        keys=reply.keys or {},
        hint=hint,
    )


def routes(rpc: Callable[[], SerfRPC | None], admin_group: Callable[[], str]) -> list[web.RouteDef]:
    """/v1/keys (GET: list; POST /v1/keys/{install,use,remove} with {"key": ...})."""

    def client() -> SerfRPC:
        current = rpc()
        if current is None:
            raise ApiError(503, "serf is not running; see `gpud status`")
        return current

    async def list_keys(request: web.Request) -> web.Response:
        # The keys themselves are secrets: only those who may change them may read them.
        api.require_admin(request, admin_group())
        return await _run(request, "list", lambda r: r.list_keys())

    async def change(request: web.Request) -> web.Response:
        caller = api.require_admin(request, admin_group())
        action = request.match_info["action"]
        body = await api.read_body(request, KeyRequest, what="key request")
        try:
            secret.parse_key(body.key, source="key")
        except ConfigError as exc:
            raise ApiError(400, str(exc)) from None
        call = {
            "install": SerfRPC.install_key,
            "use": SerfRPC.use_key,
            "remove": SerfRPC.remove_key,
        }
        log.info(_log, "keyring change", action=action, uid=caller.uid)
        return await _run(request, action, lambda r: call[action](r, body.key))

    async def _run(request: web.Request, action: str, op) -> web.Response:  # type: ignore[no-untyped-def]
        try:
            reply: KeyringReply = await op(client())
        except (SerfRPCError, SerfConnectionError) as exc:
            raise ApiError(502, f"serf keyring {action}: {exc}") from None
        if reply.error:
            failed = "; ".join(
                f"{node}: {msg}" for node, msg in sorted((reply.messages or {}).items())
            )
            raise ApiError(
                502, f"serf keyring {action}: {reply.error}" + (f" ({failed})" if failed else "")
            )
        return api.json_response(keys_reply(reply, _HINTS.get(action, "")))

    return [
        web.get("/v1/keys", list_keys),
        web.post("/v1/keys/{action:install|use|remove}", change),
    ]
