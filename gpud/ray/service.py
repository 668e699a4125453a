"""The "ray" component: head election over Serf queries, and this node's Ray process.

HeadElection is the I/O around the pure election (gpud.ray.election): it answers vote
queries, stands when the plan says so, and keeps this node's ray/term tags current. RayService
turns each plan into a Ray target (head, worker toward the announced head, or nothing) for the
RaySupervisor, announces the GCS port once the head's GCS answers, and serves /v1/ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import msgspec
from aiohttp import web

from gpud import log
from gpud.context import Member, NodeContext
from gpud.ray.election import (
    DataPathVerdict,
    Plan,
    highest_term,
    ineligible_reason,
    known_members,
    plan,
    quorum,
    vote_refusal,
)
from gpud.ray.supervisor import (
    PortLeaser,
    RayInstall,
    RayNode,
    RayProcessStatus,
    RaySupervisor,
    RayTarget,
    alive_ray_nodes,
    probe_ray,
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
from gpud.tags import RayRole

_log = log.get("ray")

QueryHandler = Callable[[str, bytes], Awaitable[bytes | None]]
# Seconds between election steps when nothing else wakes the loop.
TICK_S = 1.0
# A candidate that lost waits a random time in this range before standing again, so two
# candidates with different views do not split the vote forever.
RETRY_S = (1.0, 3.0)
# How often to ask the GCS which Ray nodes are alive (bounded subprocess, cached).
RAY_NODES_EVERY_S = 10.0
NODES_POLL_S = 0.5
# How often to look for a missing `ray` executable again.
PROBE_EVERY_S = 60.0
# Restarts without GCS ready after which a head gives up its eligibility for COOLDOWN_S.
CRASH_LOOP_RESTARTS = 3
CRASH_COOLDOWN_S = 300.0


class QueryTransport(Protocol):
    """The slice of gpud.serf.agent the election needs (the test transport implements it too)."""

    async def query(
        self, name: str, payload: bytes, *, timeout_s: float | None = None
    ) -> dict[str, bytes]: ...

    def on_query(self, name: str, handler: QueryHandler) -> None: ...


class DataPathHealth(Protocol):
    """The health component's verdict on a node, as seen by a majority of its peers."""

    def healthy_by_majority(self, node: str) -> bool | None: ...


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
    ) -> None:
        self.ctx = ctx
        self._serf = serf
        self.store = store
        self._verdict = verdict
        self._vote_timeout_s = vote_timeout_s
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
        self._next_stand = time.monotonic() + random.uniform(*RETRY_S)


class RayNodesSeen(msgspec.Struct, kw_only=True):
    nodes: list[RayNode] | None = None
    error: str | None = None
    gcs_address: str | None = None
    age_s: float | None = None


class RayStatus(msgspec.Struct, kw_only=True):
    enabled: bool
    role: RayRole
    term: int
    head: str | None = None
    # head_addr:gcs_port once the head's GCS is ready.
    head_address: str | None = None
    # The election plan: lead, stand, follow, step_down or wait.
    action: str
    eligible: bool
    not_eligible_reason: str | None = None
    ray_available: bool
    ray_version: str = ""
    process: RayProcessStatus
    ray_nodes: RayNodesSeen
    last_election: str = ""
    # Why this node runs no Ray / has no head (None when all is well).
    reason: str | None = None
    summary: str


class RayService:
    """Component "ray"."""

    name = "ray"

    def __init__(
        self,
        ctx: NodeContext,
        serf: QueryTransport,
        ports: PortLeaser,
        health: DataPathHealth | None = None,
    ) -> None:
        self.ctx = ctx
        config = ctx.config.ray
        verdict = health.healthy_by_majority if health is not None else None
        self._verdict = verdict
        self.election = HeadElection(
            ctx,
            serf,
            VoteStore(ctx.config.state_dir / "ray-vote.json"),
            verdict,
            vote_timeout_s=config.vote_timeout_s,
        )
        self._wake = asyncio.Event()
        ctx.on_members_changed(lambda _members: self._wake.set())
        self.supervisor = RaySupervisor(
            executable=config.executable,
            node_name=ctx.node_name,
            node_ip=ctx.advertise_addr,  # default; each target carries the current address
            ports=ports,
            temp_root=config.temp_root,
            num_cpus=config.num_cpus,
            num_gpus=ctx.tags.gpu,
            env=config.env,
            on_change=self._wake.set,
        )
        self._install: RayInstall | None = None
        self._unavailable_until = 0.0
        self._crash_reason: str | None = None
        self._nodes = RayNodesSeen()
        self._nodes_at: float | None = None

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.supervisor.run())
            tg.create_task(self._probe_loop())
            tg.create_task(self._nodes_loop())
            tg.create_task(self._election_loop())

    async def _probe_loop(self) -> None:
        if not self.ctx.config.ray.enabled:
            await self.ctx.update_tags(rv=False)
            return
        while True:
            install = await probe_ray(self.ctx.config.ray.executable)
            self._install = install
            self.supervisor.client_server = install.client
            if install.reason is not None:
                log.warning(_log, "ray not available", reason=install.reason)
            self._wake.set()
            if install.reason is None:
                return
            await asyncio.sleep(PROBE_EVERY_S)

    def _ray_usable(self) -> bool:
        install = self._install
        return (
            self.ctx.config.ray.enabled
            and install is not None
            and install.reason is None
            and time.monotonic() >= self._unavailable_until
        )

    async def _election_loop(self) -> None:
        while True:
            self._wake.clear()
            self._watch_crash_loop()
            await self.ctx.update_tags(rv=self._ray_usable())
            current = await self.election.step()
            await self._apply(current)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)

    def _watch_crash_loop(self) -> None:
        process = self.supervisor.status().process
        target = self.supervisor.target
        if (
            target is not None
            and target.role == "head"
            and process.state == "backoff"
            and process.restarts >= CRASH_LOOP_RESTARTS
            and self.supervisor.gcs_ready_port == 0
        ):
            # Stop being a candidate for a while instead of holding the head role with no GCS.
            # (A crashing worker just keeps retrying with backoff; its reason is in status.)
            self._crash_reason = f"Ray keeps crashing ({process.last_error}); retry later"
            self._unavailable_until = time.monotonic() + CRASH_COOLDOWN_S
            log.warning(_log, "ray crash loop", reason=self._crash_reason)
        elif time.monotonic() >= self._unavailable_until:
            self._crash_reason = None

    async def _apply(self, current: Plan) -> None:
        tags = self.ctx.tags
        if not self._ray_usable():
            self.supervisor.set_target(None)
            return
        self.supervisor.num_gpus = tags.gpu
        if current.action == "lead":
            self.supervisor.set_target(RayTarget(role="head", node_ip=self.ctx.advertise_addr))
            ready = self.supervisor.gcs_ready_port
            if ready != tags.gcs:
                await self.ctx.update_tags(gcs=ready)
                log.info(_log, "head gcs announced", gcs=ready, term=tags.term)
        elif current.action == "follow" and current.head is not None:
            head = self.election.view()[current.head]
            gcs = head.tags.gcs if head.tags else 0
            if gcs:
                self.supervisor.set_target(
                    RayTarget(
                        role="worker",
                        head_addr=head.addr,
                        gcs_port=gcs,
                        node_ip=self.ctx.advertise_addr,
                    )
                )
            else:
                target = self.supervisor.target
                if target is not None and target.head_addr != head.addr:
                    self.supervisor.set_target(None)
        else:
            self.supervisor.set_target(None)

    async def _nodes_loop(self) -> None:
        while True:
            address = self._gcs_address()
            if address is not None:
                try:
                    nodes = await alive_ray_nodes(self.ctx.config.ray.executable, address)
                    self._nodes = RayNodesSeen(nodes=nodes, gcs_address=address)
                except (RuntimeError, OSError, msgspec.DecodeError) as exc:
                    self._nodes = RayNodesSeen(error=str(exc), gcs_address=address)
                self._nodes_at = time.monotonic()
            else:
                self._nodes, self._nodes_at = RayNodesSeen(), None
            # Ask again after RAY_NODES_EVERY_S, or at once when the GCS address changes (a
            # new head), so status shows the new cluster without waiting out the interval.
            for _ in range(int(RAY_NODES_EVERY_S / NODES_POLL_S)):
                await asyncio.sleep(NODES_POLL_S)
                if self._gcs_address() != address:
                    break

    def _gcs_address(self) -> str | None:
        target = self.supervisor.target
        if target is None:
            return None
        if target.role == "head":
            port = self.supervisor.gcs_ready_port
            return f"{self.ctx.advertise_addr}:{port}" if port else None
        return f"{target.head_addr}:{target.gcs_port}"

    def status(self) -> RayStatus:
        tags = self.ctx.tags
        current = self.election.plan
        members = self.election.view()
        own_reason = ineligible_reason(members[self.ctx.node_name], self._verdict)
        install = self._install
        if not self.ctx.config.ray.enabled:
            own_reason = "ray.enabled = false in the config"
        elif install is None:
            own_reason = own_reason or "checking the ray executable"
        elif install.reason is not None:
            own_reason = install.reason
        elif self._crash_reason is not None:
            own_reason = self._crash_reason
        head = members.get(current.head) if current.head else None
        head_address = None
        if head is not None and head.tags is not None and head.tags.gcs:
            head_address = f"{head.addr}:{head.tags.gcs}"
        process = self.supervisor.status()
        reason = self._reason(current, process, own_reason)
        nodes = msgspec.structs.replace(
            self._nodes,
            age_s=round(time.monotonic() - self._nodes_at, 1) if self._nodes_at else None,
        )
        return RayStatus(
            enabled=self.ctx.config.ray.enabled,
            role=tags.ray,
            term=tags.term,
            head=current.head,
            head_address=head_address,
            action=current.action,
            eligible=own_reason is None,
            not_eligible_reason=own_reason,
            ray_available=install is not None and install.reason is None,
            ray_version=install.version if install else "",
            process=process,
            ray_nodes=nodes,
            last_election=self.election.last_election,
            reason=reason,
            summary=_summary(tags.ray, tags.term, current, head_address, process, nodes, reason),
        )

    def _reason(
        self, current: Plan, process: RayProcessStatus, own_reason: str | None
    ) -> str | None:
        if not self._ray_usable():
            return own_reason
        if process.error:
            return process.error
        if process.process.state == "backoff":
            return (
                f"Ray {process.process.last_error}; restart in {process.process.next_start_in_s}s"
            )
        if current.action in ("wait", "step_down"):
            return current.reason
        if current.action == "follow" and process.target is None:
            return f"waiting for {current.head} to announce its GCS"
        return None

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/ray", self._get_ray)]

    async def _get_ray(self, request: web.Request) -> web.Response:
        return web.Response(
            body=msgspec.json.encode(self.status()), content_type="application/json"
        )


def _summary(
    role: RayRole,
    term: int,
    current: Plan,
    head_address: str | None,
    process: RayProcessStatus,
    nodes: RayNodesSeen,
    reason: str | None,
) -> str:
    alive = f", {len(nodes.nodes)} Ray nodes alive" if nodes.nodes is not None else ""
    state = process.process.state
    if role == "head":
        gcs = f"GCS {head_address} ready" if head_address else "GCS starting"
        text = f"head, term {term}, {gcs}, ray {state}{alive}"
    elif role == "worker":
        text = f"worker of {current.head} ({head_address or 'GCS not ready'}), term {term}, ray {state}{alive}"
    else:
        text = f"no Ray role, term {term}"
    return f"{text}: {reason}" if reason else text
