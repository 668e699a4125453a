"""One node's side of the Ray head election: the I/O around the pure gpud.ray.election.

HeadElection answers vote queries (decide, persist, then reply: gpud.ray.votes), stands as
candidate when the plan says so, and keeps this node's ray/term tags current. It decides
nothing itself and knows nothing of the Ray process.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Protocol

import msgspec

from gpud import log
from gpud.context import Member, NodeContext
from gpud.ray.election import (
    DataPathVerdict,
    Plan,
    highest_term,
    known_members,
    plan,
    quorum,
    vote_refusal,
)
from gpud.ray.votes import (
    VOTE_QUERY,
    VoteReply,
    VoteRequest,
    VoteStore,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from gpud.serf.agent import QueryHandler
from gpud.tags import RayRole

_log = log.get("ray")

# A candidate that lost waits a random time in this range before standing again, so two
# candidates with different views do not split the vote forever.
RETRY_S = (1.0, 3.0)


class QueryTransport(Protocol):
    """The slice of gpud.serf.agent the election needs (the test transport implements it too)."""

    async def query(
        self, name: str, payload: bytes, *, timeout_s: float | None = None
    ) -> dict[str, bytes]: ...

    def on_query(self, name: str, handler: QueryHandler) -> None: ...


class HeadElection:
    """One node's side of the election: votes when asked, stands when the plan says so."""

    def __init__(
        self,
        ctx: NodeContext,
        serf: QueryTransport,
        store: VoteStore,
        verdict: DataPathVerdict | None = None,
        *,
        vote_timeout_s: float | None = None,
        retry_s: tuple[float, float] = RETRY_S,
    ) -> None:
        self.ctx = ctx
        self._serf = serf
        self.store = store
        self._verdict = verdict
        self._vote_timeout_s = vote_timeout_s
        self._retry_s = retry_s
        self._next_stand = 0.0
        self.plan = Plan(action="wait", term=store.state.term, reason="starting")
        self.last_election: str = ""
        serf.on_query(VOTE_QUERY, self._on_vote)

    def view(self) -> dict[str, Member]:
        """The membership with this node's own entry carrying its current tags."""
        members = dict(self.ctx.members)
        own = members.get(self.ctx.node_name)
        members[self.ctx.node_name] = Member(
            name=self.ctx.node_name,
            addr=self.ctx.advertise_addr,
            port=own.port if own else 0,
            status="alive",
            tags=self.ctx.tags,
        )
        return members

    async def _on_vote(self, from_node: str, payload: bytes) -> bytes | None:
        me = self.ctx.node_name
        try:
            request = decode_request(payload)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            reply = VoteReply(
                voter=me,
                term=self.store.state.term,
                granted=False,
                reason=f"malformed vote request: {exc}",
            )
            return encode_reply(reply)
        members = self.view()
        if request.candidate != from_node:
            refusal: str | None = f"{from_node} asked for a vote for {request.candidate}"
        else:
            refusal = vote_refusal(request.candidate, request.term, members, self._verdict)
        try:
            reply = await self.store.vote(
                request, voter=me, own_known=len(known_members(members)), refusal=refusal
            )
        except OSError as exc:  # a vote that cannot be made durable is not given
            log.error(_log, "cannot persist vote", error=str(exc))
            reply = VoteReply(
                voter=me,
                term=self.store.state.term,
                granted=False,
                reason=f"cannot persist the vote: {exc.strerror}",
            )
        log.info(
            _log,
            "vote",
            candidate=request.candidate,
            term=request.term,
            granted=reply.granted,
            reason=reply.reason,
        )
        return encode_reply(reply)

    async def step(self) -> Plan:
        """Adopt higher terms, compute the plan, act on it (tags, candidacy); return it."""
        members = self.view()
        announced = highest_term(members, 0)
        if announced > self.store.state.term:
            await self.store.adopt_term(announced)
        current = plan(self.ctx.node_name, members, self.store.state.term, self._verdict)
        if current.action == "stand":
            if time.monotonic() >= self._next_stand:
                await self._stand(current.term, members)
            current = plan(self.ctx.node_name, self.view(), self.store.state.term, self._verdict)
        await self._announce(current, members)
        self.plan = current
        return current

    async def _announce(self, current: Plan, members: Mapping[str, Member]) -> None:
        tags = self.ctx.tags
        if current.action == "lead":
            return
        if current.action == "follow" and current.head is not None:
            head = members[current.head]
            term = head.tags.term if head.tags else tags.term
            # Only a node that can run Ray joins the head's Ray cluster.
            role: RayRole = "worker" if tags.rv else "none"
            await self.ctx.update_tags(ray=role, term=term, gcs=0)
        elif tags.ray != "none" or tags.gcs:
            # Step down, or no head to follow: this node runs no Ray and keeps no head role.
            await self.ctx.update_tags(ray="none", gcs=0, term=max(tags.term, current.term))

    async def _stand(self, term: int, members: Mapping[str, Member]) -> None:
        me = self.ctx.node_name
        known = known_members(members)
        request = VoteRequest(term=term, candidate=me, known=len(known))
        own = await self.store.vote(request, voter=me, own_known=len(known), refusal=None)
        if not own.granted:
            log.info(_log, "not standing", term=term, reason=own.reason)
            return
        try:
            replies = await self._serf.query(
                VOTE_QUERY, encode_request(request), timeout_s=self._vote_timeout_s
            )
        except Exception as exc:  # serf down or restarting: no votes this round
            log.warning(_log, "vote query failed", error=str(exc))
            replies = {}
        names = {m.name for m in known}
        granted = {me}
        refusals: list[str] = []
        for node, payload in replies.items():
            try:
                reply = decode_reply(payload)
            except (msgspec.ValidationError, msgspec.DecodeError):
                refusals.append(f"{node}: malformed reply")
                continue
            if reply.term > term:
                await self.store.adopt_term(reply.term)
            if reply.granted and reply.term == term and reply.voter == node and node in names:
                granted.add(node)
            elif not reply.granted:
                refusals.append(f"{node}: {reply.reason}")
        needed = quorum(len(known))
        if len(granted) >= needed:
            self.last_election = f"won term {term} with {len(granted)} of {len(known)} votes"
            log.info(_log, "elected head", term=term, votes=len(granted), known=len(known))
            await self.ctx.update_tags(ray="head", term=term, gcs=0)
            return
        self.last_election = (
            f"lost term {term}: {len(granted)} of {needed} needed votes; " + "; ".join(refusals)
        )[:500]
        log.info(
            _log,
            "election lost",
            term=term,
            votes=len(granted),
            needed=needed,
            refusals="; ".join(refusals),
        )
        self._next_stand = time.monotonic() + random.uniform(*self._retry_s)
