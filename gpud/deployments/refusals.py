"""Deployments this node refuses to run because it lacks their spec's local model path.

A refusal is announced in the `dp` tag (`claims.format_claims`) so that placement on every
node prefers other nodes for that spec; it holds for one spec version (a changed spec is tried
again) and the path is looked for again every START_RETRY_S (it may have been copied here).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping

import msgspec

from gpud import log
from gpud.component import Problem
from gpud.context import Member
from gpud.deployments import engines
from gpud.deployments.claims import DIGEST_CHARS, parse_refusals
from gpud.deployments.model import Entry
from gpud.deployments.placement import NodeView
from gpud.deployments.replicas import START_RETRY_S

_log = log.get("deployments")


class ModelRefusals:
    def __init__(self) -> None:
        # name -> (digest prefix of the refused spec, why, when checked (monotonic)).
        self._held: dict[str, tuple[str, str, float]] = {}

    def announced(self) -> dict[str, str]:
        """name -> digest prefix of each refused spec, as the `dp` tag carries them."""
        return {name: held[0] for name, held in self._held.items()}

    async def recheck(self, entries: Mapping[str, Entry]) -> None:
        """Drop refusals of specs no longer runnable or changed, and look again for the model
        path of the others every START_RETRY_S."""
        now = time.monotonic()
        for name, (digest, _, checked) in list(self._held.items()):
            entry = entries.get(name)
            if (
                entry is None
                or entry.record.spec is None
                or entry.record.digest[:DIGEST_CHARS] != digest
            ):
                del self._held[name]
            elif now - checked >= START_RETRY_S:
                await self.check(entry)

    async def check(self, entry: Entry) -> None:
        """Refuse ``entry``'s deployment here while this host lacks its local model path."""
        assert entry.record.spec is not None
        # Off the loop: a model path on a hung network mount would block it.
        missing = await asyncio.to_thread(engines.local_model_missing, entry.record.spec)
        name = entry.record.name
        if missing:
            if name not in self._held:
                log.warning(_log, "deployment refused here", deployment=name, why=missing)
            self._held[name] = (entry.record.digest[:DIGEST_CHARS], missing, time.monotonic())
        elif self._held.pop(name, None) is not None:
            log.info(_log, "deployment no longer refused here", deployment=name)

    def problems(self) -> list[Problem]:
        return [
            Problem(
                code="deployments.model_missing",
                severity="warning",
                subject=name,
                message=f"this node refuses deployment {name}: {why}; its replicas are "
                "placed on other nodes while enough others fit",
                fix="copy the model to this host (gpud looks again every "
                f"{START_RETRY_S:.0f} s), or give the spec a selector of hosts that have it",
            )
            for name, (_, why, _) in sorted(self._held.items())
        ]


def with_refusals(
    views: Iterable[NodeView],
    members: Iterable[Member],
    me: str,
    own: Mapping[str, str],
    entries: Mapping[str, Entry],
) -> list[NodeView]:
    """Each node view with the deployments its node refuses, as its `dp` tag announces them
    (``own``: this node's, name -> digest prefix), for the spec version in ``entries`` only: a
    changed spec is tried again (pure)."""
    refused = {
        m.name: parse_refusals(m.tags.dp) for m in members if m.tags is not None and m.name != me
    }
    refused[me] = dict(own)
    digests = {name: e.record.digest[:DIGEST_CHARS] for name, e in entries.items()}
    return [
        msgspec.structs.replace(
            v,
            refuses=frozenset(n for n, d in refused.get(v.name, {}).items() if digests.get(n) == d),
        )
        for v in views
    ]
