"""One node's side of the Ray head election: the I/O around the pure gpud.ray.election.

HeadElection answers vote queries (decide, persist, then reply: gpud.ray.votes), stands as
candidate when the plan says so, and keeps this node's ray/term tags current. It decides
nothing itself and knows nothing of the Ray process.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import msgspec

from gpud import log, secret
from gpud.component import Problem
from gpud.context import Member, NodeContext
from gpud.ray.election import (
    DataPathVerdict,
    Plan,
    Screened,
    Verified,
    highest_term,
    known_members,
    plan,
    proof_refusal,
    quorum,
    screen,
    vote_refusal,
)
from gpud.ray.votes import (
    CERT_QUERY,
    VOTE_QUERY,
    CertificateRequest,
    VoteCertificate,
    VoteReply,
    VoteRequest,
    VoteStore,
    certificate_page,
    decode_certificate,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    signature_valid,
    vote_signature,
)
from gpud.serf.agent import QueryHandler
from gpud.tags import RayRole

_log = log.get("ray")

# A candidate that lost waits a random time in this range before standing again, so two
# candidates with different views do not split the vote forever.
RETRY_S = (1.0, 3.0)
# An alive member that has not been verified as a gpud node within this long of first being
# seen is not one (gpud answers the first probe round); until then nobody stands.
PENDING_S = 15.0
# A follower asks a head for its certificate at most this often while it cannot verify it,
# in at most this many pages (each one Serf query; a page holds about 20-40 votes).
CERT_RETRY_S = 2.0
CERT_PAGES_MAX = 16


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
        verified: Verified | None = None,
        vote_keys: Callable[[], list[bytes]] | None = None,
        vote_timeout_s: float | None = None,
        retry_s: tuple[float, float] = RETRY_S,
    ) -> None:
        """``verified``: is a member a verified gpud node (None: trust every member, for
        in-process tests). ``vote_keys``: the keys that check votes, the first signs them
        (secret.PeerApiKeys for "vote": one per key in serf's keyring, so votes still check
        while the cluster key rotates; default: the cluster key's)."""
        self.ctx = ctx
        self._serf = serf
        self.store = store
        self._verdict = verdict
        self._verified = verified
        fixed = [secret.derive(ctx.config, "vote")]
        self._vote_keys = vote_keys or (lambda: fixed)
        # Members as first seen (monotonic), for the pending grace; claims ignored last step;
        # the head this node will not follow and why; the (head, term) already proven.
        self._first_seen: dict[str, float] = {}
        self.ignored: dict[str, str] = {}
        self.unproven: tuple[str, str] | None = None
        self._proven: tuple[str, int] | None = None
        self._fetched: VoteCertificate | None = None
        self._next_fetch = 0.0
        self._vote_timeout_s = vote_timeout_s
        self._retry_s = retry_s
        self._next_stand = 0.0
        self.plan = Plan(action="wait", term=store.state.term, reason="starting")
        self.last_election: str = ""
        serf.on_query(VOTE_QUERY, self._on_vote)
        serf.on_query(CERT_QUERY, self._on_certificate)

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

    def screened(self) -> Screened:
        """`view` less the members that do not count (see gpud.ray.election.screen)."""
        return screen(self.ctx.node_name, self.view(), self.store.state.term, self._verified)

    def _pending(self, members: Mapping[str, Member]) -> list[str]:
        """Alive unverified members that announce a peer API (as every gpud does) and are
        still inside their PENDING_S grace."""
        now = time.monotonic()
        seen = {name: self._first_seen.get(name, now) for name in members}
        self._first_seen = seen
        if self._verified is None:
            return []
        return [
            name
            for name, member in members.items()
            if name != self.ctx.node_name
            and member.alive
            and member.tags is not None
            and member.tags.pp > 0
            and now - seen[name] < PENDING_S
            and not self._verified(name)
        ]

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
        members = self.screened().members
        if request.candidate != from_node:
            refusal: str | None = f"{from_node} asked for a vote for {request.candidate}"
        elif from_node not in members:
            refusal = f"{from_node} is not a verified gpud node of this cluster"
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
        if reply.granted:
            sig = vote_signature(
                self._vote_keys()[0],
                voter=me,
                candidate=request.candidate,
                term=request.term,
                known=request.known,
            )
            reply = msgspec.structs.replace(reply, sig=sig)
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
        screened = self.screened()
        members = screened.members
        for name, why in screened.ignored.items():
            if self.ignored.get(name) != why:
                log.warning(_log, "claim ignored", member=name, reason=why)
        self.ignored = screened.ignored
        announced = highest_term(members, 0)
        if announced > self.store.state.term:
            await self.store.adopt_term(announced)
        pending = self._pending(self.view())
        me, verdict = self.ctx.node_name, self._verdict
        current = plan(me, members, self.store.state.term, verdict, pending=pending)
        if current.action == "stand":
            if time.monotonic() >= self._next_stand:
                await self._stand(current.term, members)
            members = self.screened().members
            current = plan(me, members, self.store.state.term, verdict, pending=pending)
        if current.action == "follow":
            current = await self._check_office(current)
        else:
            self.unproven = None  # no head to prove (or this node leads): nothing refused
        await self._announce(current, members)
        self.plan = current
        return current

    async def _check_office(self, current: Plan) -> Plan:
        """``current`` (follow) when a majority of checkable votes backs the head's term;
        else wait, and `unproven` says why (a head's word about itself is not enough)."""
        head, term = current.head, current.term
        assert head is not None
        if self._proven == (head, term):
            return current
        keys = self._vote_keys()
        refusal = proof_refusal(head, term, self.store.state, self._fetched, keys)
        if refusal is not None and time.monotonic() >= self._next_fetch:
            self._next_fetch = time.monotonic() + CERT_RETRY_S
            self._fetched = await self._fetch_certificate(head, term)
            refusal = proof_refusal(head, term, self.store.state, self._fetched, keys)
        if refusal is None:
            self._proven, self.unproven = (head, term), None
            return current
        if self.unproven != (head, refusal):
            log.warning(_log, "head not followed", head=head, term=term, reason=refusal)
        self.unproven = (head, refusal)
        return Plan(action="wait", term=term, reason=f"not following {head}: {refusal}"[:500])

    async def _fetch_certificate(self, head: str, term: int) -> VoteCertificate | None:
        """``head``'s certificate for ``term``, page by page until it holds a majority of the
        members it counted (or the head sends no more); None when it sends nothing."""
        cert: VoteCertificate | None = None
        for _ in range(CERT_PAGES_MAX):
            first = len(cert.votes) if cert is not None else 0
            request = msgspec.json.encode(CertificateRequest(head=head, term=term, first=first))
            try:
                replies = await self._serf.query(
                    CERT_QUERY, request, timeout_s=self._vote_timeout_s
                )
                page = decode_certificate(replies[head])
            except KeyError:  # the head did not answer
                break
            except (msgspec.ValidationError, msgspec.DecodeError):
                break
            except Exception as exc:  # serf down or restarting: ask again later
                log.warning(_log, "certificate query failed", error=str(exc))
                break
            if (page.head, page.term) != (head, term) or not page.votes:
                break
            votes = {**(cert.votes if cert is not None else {}), **page.votes}
            cert = msgspec.structs.replace(page, votes=votes)
            if len(votes) >= quorum(cert.known):
                break
        return cert

    async def _on_certificate(self, from_node: str, payload: bytes) -> bytes | None:
        """The head answers with its certificate for the asked term; everyone else stays
        silent."""
        try:
            request = msgspec.json.decode(payload, type=CertificateRequest)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        cert = self.store.certificate
        me = self.ctx.node_name
        if cert is None or request.head != me or (cert.head, cert.term) != (me, request.term):
            return None
        return certificate_page(cert, request.first)

    def problems(self) -> list[Problem]:
        """Claims this node refused to believe (issue 10): rogue heads, wild terms, heads
        that could not prove their office."""
        found = [
            Problem(
                code="ray.unverified_head" if "not a verified" in why else "ray.implausible_term",
                severity="warning",
                subject=name,
                message=f"{name} {why}; ignored",
                fix=(
                    f"find what runs as {name}: a gpud node answers the peer API (check its "
                    "peer port and cluster key); anything else holds the cluster key and must "
                    "be removed, and the key rotated (`gpud keys`)"
                ),
            )
            for name, why in sorted(self.ignored.items())
        ]
        if self.unproven is not None and self.plan.action == "wait":
            head, why = self.unproven
            found.append(
                Problem(
                    code="ray.unproven_head",
                    severity="critical",
                    subject=head,
                    message=f"not following Ray head {head}: {why}",
                    fix=(
                        f"check `gpud status` on {head}: a head elected by gpud serves its "
                        "vote certificate; if it is not a gpud node, remove it and rotate the "
                        "cluster key"
                    ),
                    supersedes=frozenset({"ray.no_head"}),
                )
            )
        return found

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

        keys = self._vote_keys()

        def signed_by(voter: str, sig: str) -> bool:
            return signature_valid(
                keys, sig, voter=voter, candidate=me, term=term, known=len(known)
            )

        votes = {me: vote_signature(keys[0], voter=me, candidate=me, term=term, known=len(known))}
        refusals: list[str] = []
        for node, payload in replies.items():
            try:
                reply = decode_reply(payload)
            except (msgspec.ValidationError, msgspec.DecodeError):
                refusals.append(f"{node}: malformed reply")
                continue
            if reply.term > term and node in names:  # only counted members move our term
                await self.store.adopt_term(reply.term)
            if reply.granted and reply.term == term and reply.voter == node and node in names:
                if signed_by(node, reply.sig):
                    granted.add(node)
                    votes[node] = reply.sig
                else:
                    refusals.append(f"{node}: vote not signed with this cluster's key")
            elif not reply.granted:
                refusals.append(f"{node}: {reply.reason}")
        needed = quorum(len(known))
        if len(granted) >= needed:
            self.last_election = f"won term {term} with {len(granted)} of {len(known)} votes"
            log.info(_log, "elected head", term=term, votes=len(granted), known=len(known))
            # A majority of signatures is proof enough (own vote first): a small certificate.
            kept = [me, *sorted(votes.keys() - {me})][:needed]
            cert = VoteCertificate(
                head=me, term=term, known=len(known), votes={v: votes[v] for v in kept}
            )
            await self.store.save_certificate(cert)
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
