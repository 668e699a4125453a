"""This node's record set: replicated by merge (`version.merge`, a CRDT), stored before it is
acted on, judged for trust, and pulled from verified peers whose gossiped digest differs.

A peer's record is held to the checks of an apply before it is merged; a tombstone must carry a
trusted operator's signature where operators are configured; a spec runs here only if a trusted
operator signed it and, for the `command` engine, its executable is allowed on this host.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from gpud import log
from gpud.context import NodeContext
from gpud.deployments import authority, engines, spec, version
from gpud.deployments.model import (
    ApplyReply,
    DeleteRequest,
    Entry,
    PeerRecordsReply,
    PeerRecordsRequest,
)
from gpud.deployments.peers import PeerNetwork, ask_peers, verified_peers
from gpud.deployments.store import SpecStore, set_digest
from gpud.errors import ApiError
from gpud.state import StateStore

_log = log.get("deployments")

PATH_PEER_RECORDS = "/peer/v1/deployments"
# Names (deployments and tombstones) a node keeps: a bound on what peers can make it store.
MAX_NAMES = 1024


def majority_refusal(members: Iterable[Any], self_name: str) -> str:
    """Why an apply here must be refused (this side of a partition lacks a majority of known
    members), or "". Members that left gracefully are not counted. Pure."""
    known = {m.name: m.status for m in members if m.status != "left"}
    known.setdefault(self_name, "alive")
    alive = sum(1 for s in known.values() if s == "alive")
    if alive * 2 > len(known):
        return ""
    return (
        f"this node sees only {alive} of {len(known)} known members alive (no majority): it may "
        "be on the minority side of a partition; apply on a node of the majority side, or wait "
        "for the partition to heal"
    )


class Records:
    """The stored records (`entries`, `clock`, `digest`) and what this node thinks of them."""

    def __init__(
        self,
        ctx: NodeContext,
        store: StateStore,
        peers: PeerNetwork,
        on_change: Callable[[], None],
    ) -> None:
        self._ctx = ctx
        self._peers = peers
        self._on_change = on_change
        self._specs = SpecStore(store)
        self.entries, self.clock = self._specs.load()
        self.digest = set_digest(self.entries)
        self.fetch_errors: dict[str, str] = {}
        self._refusals: dict[tuple[str, str, str], str] = {}
        # Deletes refused (unsigned or wrongly signed): name -> (tombstone version, reason).
        self._refused_deletes: dict[str, tuple[str, str]] = {}
        peers.add_route(PATH_PEER_RECORDS, self._peer_records)

    # ---- this node's apply and delete (the local API) ---------------------------------------

    async def apply(self, text: bytes, operator: str = "", signature: str = "") -> ApplyReply:
        """Validate, version, store and announce a spec. ApiError (nothing changes) if bad.
        The spec is decoded once here and its signature checked once."""
        try:
            s = spec.load_spec(text)
        except spec.SpecError as exc:
            raise ApiError(400, f"bad spec: {exc}") from None
        if (operator or signature) and authority.signature_refusal(s, operator, signature):
            raise ApiError(400, "bad spec: the signature does not verify for this spec")
        self._require_majority()
        held = self.entries.get(s.name)
        if held is None and len(self.entries) >= MAX_NAMES:
            raise ApiError(
                409, f"this cluster already holds {MAX_NAMES} deployment names (tombstones count)"
            )
        if (
            held is not None
            and held.record.digest == version.digest(s)
            and (held.operator, held.signature) == (operator, signature)
        ):
            return ApplyReply(
                name=s.name,
                version=str(held.record.version),
                digest=held.record.digest,
                changed=False,
            )
        record = version.applied(s, self.next_version())
        await self.merge_own(Entry(record=record, operator=operator, signature=signature))
        log.info(_log, "applied", name=s.name, version=str(record.version))
        return ApplyReply(
            name=s.name, version=str(record.version), digest=record.digest, changed=True
        )

    async def delete(self, name: str, signed: DeleteRequest | None = None) -> ApplyReply:
        """Store and announce a tombstone. With operators configured it must be ``signed`` by
        one of them (`gpud deploy delete NAME --key FILE`). ApiError (nothing changes) if not.
        The signature is checked once here."""
        held = self.entries.get(name)
        if held is None or held.record.spec is None:
            raise ApiError(404, f"no deployment named {name!r}; see `gpud deploy list`")
        operators = self._ctx.config.deployments.operators
        if signed is None:
            entry = Entry(record=version.deleted(name, self.next_version()))
        else:
            entry = Entry(
                record=version.deleted(name, signed.version),
                operator=signed.operator,
                signature=signed.signature,
            )
            if authority.delete_signature_refusal(
                name, signed.version, signed.operator, signed.signature
            ):
                raise ApiError(400, "bad delete: the signature does not verify for it")
        if operators:
            reason = authority.delete_refusal(
                name,
                entry.record.version,
                entry.operator,
                entry.signature,
                operators,
                verified=signed is not None,
            )
            if reason:
                raise ApiError(403, f"refused: {reason}")
        if entry.record.order() <= held.record.order():
            raise ApiError(
                409,
                f"refused: {name} changed since this delete was signed (now version "
                f"{held.record.version}); run the delete again",
            )
        self._require_majority()
        await self.merge_own(entry)
        log.info(_log, "deleted", name=name, version=str(entry.record.version))
        return ApplyReply(name=name, version=str(entry.record.version), digest="", changed=True)

    def _require_majority(self) -> None:
        refusal = majority_refusal(self._ctx.members.values(), self._ctx.node_name)
        if refusal:
            raise ApiError(409, f"refused: {refusal}")

    # ---- merging -----------------------------------------------------------------------------

    async def merge(self, incoming: Iterable[Entry]) -> list[str]:
        """Merge a peer's entries and persist; returns the names that changed."""
        return await self._merge(e for e in incoming if self._admissible(e))

    async def merge_own(self, entry: Entry) -> None:
        """Merge this node's own apply or delete: the caller decoded the spec once
        (`spec.load_spec`) and checked the signature it came with, so neither is done again."""
        if entry.record.spec is not None:
            self._refusals[self._cache_key(entry)] = self._judge(
                entry.record.spec, entry, verified=True
            )
        await self._merge([entry])

    def _admissible(self, entry: Entry) -> bool:
        try:
            version.check(entry.record)
            if entry.record.spec is not None:
                # The same checks as an apply: a peer's record decoded only by type.
                spec.decode(spec.encode(entry.record.spec))
        except spec.SpecError as exc:
            log.warning(_log, "peer record refused", error=str(exc))
            return False
        return not (entry.record.spec is None and self._delete_refused(entry))

    async def _merge(self, incoming: Iterable[Entry]) -> list[str]:
        changed: list[Entry] = []
        records = {n: e.record for n, e in self.entries.items()}
        clock = self.clock
        for entry in incoming:
            if entry.record.name not in records and len(records) >= MAX_NAMES:
                log.warning(_log, "record refused: too many names", name=entry.record.name)
                continue
            clock = max(clock, entry.record.version.lamport)
            records, took = version.merge(records, entry.record)
            if took:
                self._refused_deletes.pop(entry.record.name, None)
                changed = [c for c in changed if c.record.name != entry.record.name] + [entry]
        if changed or clock != self.clock:
            await asyncio.to_thread(self._specs.save, changed, clock)
            for entry in changed:
                self.entries[entry.record.name] = entry
            self.clock = clock
            self.digest = set_digest(self.entries)
            self._on_change()
        return [c.record.name for c in changed]

    def _delete_refused(self, entry: Entry) -> bool:
        """With operators configured, a tombstone must carry a trusted operator's signature of
        its name and version; one that does not is not merged (the record stays live) and the
        reason is kept for `gpud deploy status`."""
        operators = self._ctx.config.deployments.operators
        record = entry.record
        if not operators:
            return False
        reason = authority.delete_refusal(
            record.name, record.version, entry.operator, entry.signature, operators
        )
        if not reason:
            return False
        refused = (str(record.version), reason)
        if self._refused_deletes.get(record.name) != refused:
            self._refused_deletes[record.name] = refused
            log.warning(_log, "delete refused", name=record.name, version=refused[0], reason=reason)
        return True

    def delete_refusal_text(self, name: str) -> str:
        refused = self._refused_deletes.get(name)
        return f"delete {refused[0]} refused: {refused[1]}" if refused else ""

    def next_version(self) -> version.SpecVersion:
        records = {n: e.record for n, e in self.entries.items()}
        return version.next_version(records, self._ctx.node_name, self.clock)

    def live(self) -> dict[str, Entry]:
        return {n: e for n, e in sorted(self.entries.items()) if e.record.spec is not None}

    def refusal(self, entry: Entry) -> str:
        """Why this node will not run ``entry``'s spec ("" when it may). Cached per signature."""
        s = entry.record.spec
        if s is None:
            return "deleted"
        cache_key = self._cache_key(entry)
        if cache_key not in self._refusals:
            self._refusals[cache_key] = self._judge(s, entry)
        return self._refusals[cache_key]

    @staticmethod
    def _cache_key(entry: Entry) -> tuple[str, str, str]:
        return (entry.record.digest, entry.operator, entry.signature)

    def _judge(self, s: spec.DeploymentSpec, entry: Entry, *, verified: bool = False) -> str:
        cfg = self._ctx.config.deployments
        reason = authority.refusal(
            s, entry.operator, entry.signature, cfg.operators, verified=verified
        )
        if reason:
            return reason
        if s.engine == "command" and not engines.executable_allowed(
            s.command[0], cfg.command_allow
        ):
            return (
                f"command {s.command[0]!r} is not in this host's [deployments] command_allow; "
                "add its absolute path there"
            )
        return ""

    def runnable(self) -> list[spec.DeploymentSpec]:
        """Specs that enter placement: live and signed by a trusted operator (the same on every
        host whose config lists the same operators)."""
        out = [
            e.record.spec
            for e in self.entries.values()
            if e.record.spec is not None and not self.refusal(e)
        ]
        return sorted(out, key=lambda s: s.name)

    async def sync(self) -> None:
        """Pull the records of verified peers whose gossiped digest differs from ours."""
        wanted = [
            m
            for m in verified_peers(self._peers, self._ctx.peers())
            if m.tags is not None and m.tags.dv != self.digest
        ]
        if not wanted:
            return
        replies = await ask_peers(
            self._peers, wanted, PATH_PEER_RECORDS, PeerRecordsRequest(), PeerRecordsReply
        )
        for member, reply in zip(wanted, replies, strict=True):
            if isinstance(reply, BaseException):
                self.fetch_errors[member.name] = str(reply) or type(reply).__name__
                continue
            self.fetch_errors.pop(member.name, None)
            names = await self.merge(reply.entries)
            if names:
                log.info(_log, "records merged", peer=member.name, names=",".join(names))

    async def _peer_records(self, body: bytes) -> bytes:
        msgspec.json.decode(body or b"{}", type=PeerRecordsRequest)
        reply = PeerRecordsReply(
            name=self._ctx.node_name, digest=self.digest, entries=list(self.entries.values())
        )
        return msgspec.json.encode(reply)
