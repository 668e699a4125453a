"""One node's side of the Ray head election: the I/O around the pure gpud.ray.election.

HeadElection answers vote queries (decide, persist, then reply: gpud.ray.votes), stands as
candidate when the plan says so, and keeps this node's ray/term tags current. It decides
nothing itself and knows nothing of the Ray process. The leader lease's rules are in
gpud.ray.lease, the exchange of vote certificates in gpud.ray.certificates.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Mapping

import msgspec

from gpud import log, secret
from gpud.component import Problem
from gpud.context import Member, NodeContext
from gpud.deployments.peers import PeerLinks, PeerNetwork
from gpud.health.service import HealthService
from gpud.ray.certificates import Certificates
from gpud.ray.election import (
    MEMBERSHIP_UNKNOWN,
    DataPathVerdict,
    Plan,
    Screened,
    Verified,
    highest_term,
    known_members,
    plan,
    proof_refusal,
    quorum,
    remember,
    remembered_changed,
    screen,
    vote_refusal,
    with_remembered,
)
from gpud.ray.lease import (
    LEASE_MARGIN_S,
    LEASE_REFUSAL,
    LEASE_RETRY_S,
    LEASE_S,
    LEASE_WAIT_MAX_S,
    VOTER_WAIT_MAX_S,
    LeaseSource,
    lease_ends_at,
    lease_holds,
    lease_refusal,
    newest,
)
from gpud.ray.lease_tree import RENEW_S, LeaseRelay, Renewal, RenewalAck
from gpud.ray.transport import QueryTransport
from gpud.ray.votes import (
    PRE_VOTE_QUERY,
    VOTE_QUERY,
    KnownView,
    VoteCertificate,
    VoteReply,
    VoteRequest,
    VoteStore,
    decode_request,
    encode_reply,
    encode_request,
    tally,
    vote_signature,
)
from gpud.tags import GcsReachSummary, RayRole, Tags

_log = log.get("ray")

# A candidate that lost waits a random time in this range before standing again, so two
# candidates with different views do not split the vote forever.
RETRY_S = (1.0, 3.0)
# An alive member that has not been verified as a gpud node within this long of first being
# seen is not one (gpud answers the first probe round); until then nobody stands.
PENDING_S = 15.0
# A follower asks a head for its certificate at most this often while it cannot verify it
# (gpud.ray.certificates).
CERT_RETRY_S = 2.0
# A gap this long between two election steps (normally <= 1 s apart) means this process was
# frozen (SIGSTOP, VM pause): a head re-probes its peers before it announces anything.
FREEZE_GAP_S = 2.5
FREEZE_RECHECK_S = 5.0
# The peer API route lease renewals travel down the tree by.
PATH_RENEW = "/v1/peer/ray/renew"


def _reach_in(term: int, tags: Tags) -> GcsReachSummary:
    """The ``hg`` tag to gossip beside ``term``: this node's verdict on its head's GCS belongs
    to the term it was formed in, and must not count against the next term's head."""
    return tags.hg if term == tags.term else "unknown"


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
        lease: LeaseSource | None = None,
        peers: PeerNetwork | None = None,
    ) -> None:
        """``verified``: is a member a verified gpud node (None: trust every member, for
        in-process tests). ``vote_keys``: the keys that check votes, the first signs them
        (secret.PeerApiKeys for "vote": one per key in serf's keyring, so votes still check
        while the cluster key rotates; default: the cluster key's). ``peers``: the signed peer
        API certificates travel over (default: that of the health component giving the lease;
        None without one: Serf pages only)."""
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
        # None: no lease (in-process tests without data-path probes).
        self._lease = lease
        # Votes count as contacts too: a voter's grant reached us after the request left.
        self._vote_contacts: dict[str, float] = {}
        self._last_step_end: float | None = None
        self._started = time.monotonic()
        self._next_stand = 0.0
        self.plan = Plan(action="wait", term=store.state.term, reason="starting")
        self.last_election: str = ""
        serf.on_query(VOTE_QUERY, self._on_vote)
        serf.on_query(PRE_VOTE_QUERY, self._on_pre_vote)
        if peers is None and isinstance(lease, HealthService):
            peers = PeerLinks(lease.client, lease.server.add_route, lease.prober.verified)
        self._peers = peers
        self.certificates = Certificates(ctx, serf, store, peers, vote_timeout_s)
        # The lease's renewal tree: needs the peer API and the lease's own contact times.
        self._relay: LeaseRelay | None = None
        self._next_renew = 0.0
        if peers is not None:
            if lease is not None:
                self._relay = LeaseRelay(ctx.node_name, self._relay_members, self._send_renewal)
                peers.add_route(PATH_RENEW, self._on_renewal)

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

    def membership_known(self) -> bool:
        """Has serf listed the members yet? Serf always lists this node itself, so before the
        first read (serf not connected yet) this node's own entry is missing."""
        return self.ctx.node_name in self.ctx.members

    def screened(self) -> Screened:
        """`view` less the members that do not count (see gpud.ray.election.screen), plus
        the remembered members serf does not list now (gpud.ray.election.with_remembered)."""
        view = self.view()
        found = screen(self.ctx.node_name, view, self.store.state.term, self._verified)
        counted = with_remembered(found.members, view, self.store.known.members, time.time())
        return msgspec.structs.replace(found, members=counted)

    async def _remember(self) -> None:
        """Persist the members counted now (see gpud.ray.election.remember)."""
        view = self.view()
        found = screen(self.ctx.node_name, view, self.store.state.term, self._verified)
        old = self.store.known.members
        new = remember(found.members, view, old, time.time())
        if remembered_changed(old, new):
            try:
                await self.store.save_known(KnownView(members=new))
            except OSError as exc:  # the old view stays: it only ever counts more members
                log.warning(_log, "cannot persist the known members", error=str(exc))

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
        return await self._answer(from_node, payload, pre=False)

    async def _on_pre_vote(self, from_node: str, payload: bytes) -> bytes | None:
        return await self._answer(from_node, payload, pre=True)

    async def _answer(self, from_node: str, payload: bytes, *, pre: bool) -> bytes | None:
        """A vote (``pre``: a pre-vote, the same decision with nothing persisted or signed)."""
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
        members, refusal = self._judge_vote(from_node, request)
        if refusal is not None and refusal.startswith(LEASE_REFUSAL):
            # The old head's lease ends within moments (the candidate waited out its own, and
            # ours differs by a probe interval): answer once it has, not with a refusal that
            # costs the candidate a retry. Judged again after the wait: it may have spoken.
            blocked = self._lease_block(request.candidate)
            if blocked is not None and blocked[1] <= VOTER_WAIT_MAX_S:
                await asyncio.sleep(blocked[1])
                members, refusal = self._judge_vote(from_node, request)
        own_known = len(known_members(members))
        if pre:
            reply = await self.store.pre_vote(
                request, voter=me, own_known=own_known, refusal=refusal
            )
            return encode_reply(reply)
        try:
            reply = await self.store.vote(request, voter=me, own_known=own_known, refusal=refusal)
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

    def _judge_vote(
        self, from_node: str, request: VoteRequest
    ) -> tuple[Mapping[str, Member], str | None]:
        """The members that count and why this vote is refused (None: grant it)."""
        members = self.screened().members
        if not self.membership_known():
            return members, f"voter's {MEMBERSHIP_UNKNOWN}"
        if request.candidate != from_node:
            return members, f"{from_node} asked for a vote for {request.candidate}"
        if from_node not in members:
            return members, f"{from_node} is not a verified gpud node of this cluster"
        refusal = vote_refusal(request.candidate, request.term, members, self._verdict)
        if refusal is None:
            blocked = self._lease_block(request.candidate)
            refusal = blocked[0] if blocked is not None else None
        return members, refusal

    def _lease_block(self, candidate: str) -> tuple[str, float] | None:
        """(why, seconds left) while another head's lease may still run, as seen here."""
        if self._lease is None:
            return None
        return lease_refusal(
            candidate,
            self.ctx.node_name,
            self.ctx.members,
            newest(self._lease.heard_from(), self._relay.heard if self._relay else {}),
            time.monotonic(),
            LEASE_S + LEASE_MARGIN_S,
            since=self._started,
        )

    async def step(self) -> Plan:
        """Adopt higher terms, compute the plan, act on it (tags, candidacy); return it."""
        await self._after_freeze()
        try:
            return await self._step()
        finally:
            self._last_step_end = time.monotonic()

    async def _after_freeze(self) -> None:
        """A head resuming from a freeze re-probes its peers before anything is announced, so
        the lease is judged on fresh contacts (a healthy head stays; a deposed one stops)."""
        last, now = self._last_step_end, time.monotonic()
        if last is None or now - last < FREEZE_GAP_S or self._lease is None:
            return
        if self.ctx.tags.ray != "head":
            return
        log.warning(_log, "resumed after a freeze; re-checking the lease", gap_s=round(now - last))
        try:
            async with asyncio.timeout(FREEZE_RECHECK_S):
                await self._lease.confirm_now()
        except TimeoutError:
            log.warning(_log, "lease re-check timed out")

    def _contacts(self) -> dict[str, float]:
        assert self._lease is not None
        return newest(
            self._lease.lease_contacts(),
            self._vote_contacts,
            self._relay.contacts if self._relay is not None else {},
        )

    def _relay_members(self) -> list[str]:
        """Members a renewal is passed to: alive ones that announce a peer API."""
        return [
            m.name
            for m in self.ctx.members.values()
            if m.alive and m.tags is not None and m.tags.pp and m.name != self.ctx.node_name
        ]

    async def _send_renewal(self, name: str, renewal: Renewal) -> RenewalAck:
        assert self._peers is not None
        member = self.ctx.members[name]
        assert member.tags is not None
        return await self._peers.call(member.addr, member.tags.pp, PATH_RENEW, renewal, RenewalAck)

    async def _on_renewal(self, body: bytes) -> bytes:
        """A renewal on its way down the tree (malformed requests: a 400 there)."""
        assert self._relay is not None
        renewal = msgspec.json.decode(body, type=Renewal)
        return msgspec.json.encode(await self._relay.receive(renewal))

    async def _renew(self, term: int) -> None:
        """As head: one renewal down the tree when due (every RENEW_S), before the lease is
        judged, so it is judged on fresh contacts."""
        if self._relay is None or time.monotonic() < self._next_renew:
            return
        self._next_renew = time.monotonic() + RENEW_S
        await self._relay.renew(term)

    def _lease_expired(self, members: Mapping[str, Member]) -> str | None:
        if self._lease is None:
            return None
        known = [m.name for m in known_members(members)]
        return lease_holds(self.ctx.node_name, known, self._contacts(), time.monotonic(), LEASE_S)

    def next_step_in(self, tick_s: float) -> float:
        """Seconds until the next step is due: ``tick_s``, or sooner when this node leads and
        its lease would end before then (it must stop acting at that moment, not a tick later:
        LEASE_MARGIN_S counts on it)."""
        if self.plan.action != "lead" or self._lease is None:
            return tick_s
        known = [m.name for m in known_members(self.screened().members)]
        ends = lease_ends_at(self.ctx.node_name, known, self._contacts(), LEASE_S)
        due = self._next_renew if self._relay is not None else math.inf
        return max(0.0, min(tick_s, ends - time.monotonic() + 0.01, due - time.monotonic()))

    async def _step(self) -> Plan:
        if not self.membership_known():
            # Before serf's first member list this node would count only itself: a majority
            # of one. Nothing to decide on yet, and nothing to announce.
            self.plan = Plan(action="wait", term=self.store.state.term, reason=MEMBERSHIP_UNKNOWN)
            return self.plan
        await self._remember()
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
        if current.action == "lead":
            await self._renew(current.term)
            expired = self._lease_expired(members)
            if expired is not None:
                log.warning(_log, "stepping down", term=current.term, reason=expired)
                current = Plan(action="step_down", term=current.term, reason=expired)
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
            self._fetched = await self.certificates.fetch(head, term)
            refusal = proof_refusal(head, term, self.store.state, self._fetched, keys)
        if refusal is None:
            self._proven, self.unproven = (head, term), None
            return current
        if self.unproven != (head, refusal):
            log.warning(_log, "head not followed", head=head, term=term, reason=refusal)
        self.unproven = (head, refusal)
        return Plan(action="wait", term=term, reason=f"not following {head}: {refusal}"[:500])

    def problems(self) -> list[Problem]:
        """Claims this node refused to believe: rogue heads, wild terms, heads
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
            await self.ctx.update_tags(ray=role, term=term, gcs=0, hg=_reach_in(term, tags))
        elif tags.ray != "none" or tags.gcs:
            # Step down, or no head to follow: this node runs no Ray and keeps no head role.
            # A candidacy's term is only a proposal until won: gossiping it would move every
            # member to a term nobody was elected in (and depose the head that holds one).
            term = tags.term if current.action == "stand" else max(tags.term, current.term)
            await self.ctx.update_tags(ray="none", gcs=0, term=term, hg=_reach_in(term, tags))

    async def _pre_vote(self, request: VoteRequest, names: set[str]) -> bool:
        """Would a majority vote for us in ``request.term``? Asked before the term is raised
        (persisted), so a candidate that cannot win leaves every term as it was."""
        me = self.ctx.node_name
        own = await self.store.pre_vote(request, voter=me, own_known=request.known, refusal=None)
        if not own.granted:
            log.info(_log, "not standing", term=request.term, reason=own.reason)
            return False
        keys, needed = self._vote_keys(), quorum(request.known)
        try:
            replies = await self._serf.query(
                PRE_VOTE_QUERY,
                encode_request(request),
                timeout_s=self._vote_timeout_s,
                enough=lambda got: (
                    len(tally(got, request, names, keys, signed=False).votes.keys() | {me})
                    >= needed
                ),
            )
        except Exception as exc:  # serf down or restarting: no votes this round
            log.warning(_log, "pre-vote query failed", error=str(exc))
            replies = {}
        counted = tally(replies, request, names, keys, signed=False)
        # A counted member that refused from this term or above (it voted in it): the next
        # proposal must be above it. Adopting a term a member already holds climbs nothing,
        # and a grant (which echoes the proposed term) never moves ours.
        if counted.refused_term >= request.term:
            await self.store.adopt_term(counted.refused_term)
        granted = counted.votes.keys() | {me}
        if len(granted) >= needed:
            return True
        self.last_election = (
            f"not standing for term {request.term}: pre-vote got {len(granted)} of {needed} "
            "needed; " + "; ".join(counted.refusals)
        )[:500]
        log.info(
            _log,
            "pre-vote lost",
            term=request.term,
            votes=len(granted),
            needed=needed,
            refusals="; ".join(counted.refusals),
        )
        self._stand_later(counted.refusals)
        return False

    def _stand_later(self, refusals: list[str]) -> None:
        # Refused only for leases: those run out in about a second, stand again soon.
        lease_only = bool(refusals) and all(LEASE_REFUSAL in r for r in refusals)
        retry = LEASE_RETRY_S if lease_only else self._retry_s
        self._next_stand = time.monotonic() + random.uniform(*retry)

    async def _stand(self, term: int, members: Mapping[str, Member]) -> None:
        me = self.ctx.node_name
        blocked = self._lease_block(me)
        if blocked is not None:
            if blocked[1] > LEASE_WAIT_MAX_S:
                self.last_election = f"not standing for term {term}: {blocked[0]}"
                return
            await asyncio.sleep(blocked[1])
        known = known_members(members)
        request = VoteRequest(term=term, candidate=me, known=len(known))
        if not await self._pre_vote(request, {m.name for m in known}):
            return
        own = await self.store.vote(request, voter=me, own_known=len(known), refusal=None)
        if not own.granted:
            log.info(_log, "not standing", term=term, reason=own.reason)
            return
        names = {m.name for m in known}
        keys = self._vote_keys()
        needed = quorum(len(known))
        own_sig = vote_signature(keys[0], voter=me, candidate=me, term=term, known=len(known))
        asked_at = time.monotonic()
        try:
            # Return as soon as a majority granted: members that are down never answer, and
            # waiting out the query timeout for them would add it to every failover.
            replies = await self._serf.query(
                VOTE_QUERY,
                encode_request(request),
                timeout_s=self._vote_timeout_s,
                enough=lambda got: (
                    len(tally(got, request, names, keys).votes.keys() | {me}) >= needed
                ),
            )
        except Exception as exc:  # serf down or restarting: no votes this round
            log.warning(_log, "vote query failed", error=str(exc))
            replies = {}
        counted = tally(replies, request, names, keys)
        if counted.highest_term > term:  # only counted members move our term
            await self.store.adopt_term(counted.highest_term)
        votes = {me: own_sig, **counted.votes}
        granted = set(votes)
        refusals = counted.refusals
        if len(granted) >= needed:
            self.last_election = f"won term {term} with {len(granted)} of {len(known)} votes"
            log.info(_log, "elected head", term=term, votes=len(granted), known=len(known))
            # A majority of signatures is proof enough (own vote first): a small certificate.
            kept = [me, *sorted(votes.keys() - {me})][:needed]
            cert = VoteCertificate(
                head=me, term=term, known=len(known), votes={v: votes[v] for v in kept}
            )
            await self.store.save_certificate(cert)
            self._vote_contacts = {voter: asked_at for voter in granted - {me}}
            await self.ctx.update_tags(ray="head", term=term, gcs=0, hg="unknown")
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
        self._stand_later(refusals)
