"""Component "deployments": stores specs, replicates them, places replicas, runs this node's.

Every node runs the same loop, with no leader:
1. Replicate (`records.py`): the `dv` tag gossips a digest of this node's record set; a verified
   peer whose digest differs is asked for its records over the authenticated peer API and they
   are merged (`version.merge`, a CRDT: every node ends with the same set). Rows are stored
   before the node acts on them, so deletes survive restarts and a node that was away catches up.
2. Place: `placement.place` over the specs this node may run (signed by a trusted operator)
   and the alive, healthy, verified members, with the assignments they announce in the `dp`
   tag (`name.replica:port`), so every node computes the same assignment.
3. Run (`replicas.py`): replicas placed here get leased GPUs and a leased port and run as gpud's
   own child in its own process group. A replica of N > 1 nodes is its own Ray cluster: its
   head (`claims.replica_head`: the node announcing a GCS port stays head, else the best by the
   Ray election's rank) runs `ray start --head` and, once GCS answers, the server; the others
   join the GCS port the head announces.
4. Judge (`readiness.py`): every node probes the health path of every placed replica over the
   data path; `gpud deploy status` shows the verdicts (`views.py`), `/endpoints` lists the ready
   ones. A replica's head asks peers for their latest probe of it and announces it ready in its
   claim when one passed (readiness in the tags, judged from another host, never over loopback).
5. Roll: a changed spec restarts replica i only once every lower replica runs it and is ready.
6. Drain (`drain.py`): a cordoned node gossips ``cd``; its replicas are placed elsewhere with it
   as ``leaving``, and it stops each old copy only after the new one is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from gpud import api, log
from gpud.aio import within
from gpud.component import ComponentBase, Metric, Problem
from gpud.context import NodeContext
from gpud.deployments import drain, logs, placement, spec, views
from gpud.deployments.claims import (
    DIGEST_CHARS,
    Claim,
    format_claims,
    parse_claims,
    replica_head,
)
from gpud.deployments.model import (
    ApplyRequest,
    DeleteRequest,
    DeploymentsList,
    DeploymentView,
    Endpoint,
    EndpointsReply,
    Entry,
    SectionStatus,
)
from gpud.deployments.peers import PeerNetwork
from gpud.deployments.placement import may_roll
from gpud.deployments.readiness import Readiness, Targets, probe_targets
from gpud.deployments.records import Records
from gpud.deployments.refusals import ModelRefusals, with_refusals
from gpud.deployments.replicas import START_RETRY_S, Replicas, keep_unplaced, worker_nm
from gpud.errors import ApiError
from gpud.router.service import REFRESH_S
from gpud.state import StateStore, open_store

if TYPE_CHECKING:
    from gpud.gpus.service import GpuService
    from gpud.netcheck import NetCheck
    from gpud.ports.service import PortsService

_log = log.get("deployments")

ClaimsView = dict[str, dict[placement.ReplicaKey, Claim]]


class DeploymentService(ComponentBase):
    name = "deployments"

    def __init__(
        self,
        ctx: NodeContext,
        *,
        ports: PortsService,
        gpus: GpuService,
        peers: PeerNetwork,
        network: NetCheck | None = None,
        store: StateStore | None = None,
    ) -> None:
        self.ctx = ctx
        self._peers = peers
        db = store or open_store(ctx.config.state_dir)
        self._db = db
        self.cordon = db.get(drain.CORDON)
        # Old copies that moved off this cordoned node -> when this node first saw the new
        # copy ready (monotonic; None: not yet).
        self._draining: dict[placement.ReplicaKey, float | None] = {}
        self._wake = asyncio.Event()
        self.records = Records(ctx, db, peers, on_change=self._wake.set)
        self._replicas = Replicas(ctx, db, ports=ports, gpus=gpus, network=network)
        self._readiness = Readiness(
            ctx,
            peers,
            network,
            targets=self._probe_targets,
            spec_of=self._spec_of,
            running=self._replicas.running,
            on_change=self._wake.set,
            nodes_of=self._replica_nodes,
        )
        self._assignment = placement.Assignment(placed=(), pending=())
        self._placeable_nodes = 0
        self._refusals = ModelRefusals()
        # Replicas left out of the `dp` tag because the tags would not fit (logged once).
        self._unannounced: list[str] = []
        self._tg: asyncio.TaskGroup | None = None

    # ---- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        self.ctx.on_members_changed(lambda _members: self._wake.set())
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                # Before the first announcement: peers see the adopted replicas as before.
                await self._replicas.adopt_leftovers(self.records.entries, tg)
                await self._publish()
                tg.create_task(self._readiness.run())
                while True:
                    await self.records.sync()
                    await self._reconcile()
                    await self._publish()
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await within(self._wake.wait(), self.ctx.config.deployments.interval_s)
        finally:
            self._tg = None

    def _nodes(self) -> list[placement.NodeView]:
        """The placeable nodes, each with the deployments it refuses (`with_refusals`)."""
        me, members = self.ctx.node_name, self.ctx.members.values()
        views = placement.node_views(members, me, self.ctx.tags, self._peers.verified)
        own = self._refusals.announced()
        return with_refusals(views, members, me, own, self.records.entries)

    def _claims(self) -> ClaimsView:
        """What each alive member announces it runs (this node: what it runs now)."""
        claims = {
            m.name: parse_claims(m.tags.dp)
            for m in self.ctx.members.values()
            if m.alive and m.tags is not None and m.name != self.ctx.node_name
        }
        claims[self.ctx.node_name] = self._own_claims()
        return claims

    def _own_claims(self) -> dict[placement.ReplicaKey, Claim]:
        return {
            k: Claim(r.port, r.entry.record.digest[:DIGEST_CHARS], r.gcs, r.ready, worker_nm(r.ray))
            for k, r in self._replicas.running.items()
            if r.task is not None
        }

    def _heads(
        self, claims: ClaimsView, placed: Iterable[placement.Placed] | None = None
    ) -> dict[placement.ReplicaKey, str]:
        """The head (`claims.replica_head`: where its server runs) of each ``placed`` replica
        (default: all) in this node's view, own tags current."""
        members = dict(self.ctx.members)
        own = members.get(self.ctx.node_name)
        if own is not None:
            members[self.ctx.node_name] = msgspec.structs.replace(own, tags=self.ctx.tags)
        placed = self._assignment.placed if placed is None else placed
        return {p.key: replica_head(p.key, p.nodes, members, claims) for p in placed}

    def _probe_targets(self) -> Targets:
        claims = self._claims()
        heads = self._heads(claims)
        return probe_targets(self._assignment.placed, heads, claims, self.ctx.members)

    def _replica_nodes(self) -> dict[placement.ReplicaKey, frozenset[str]]:
        """Each placed replica's nodes, with those it is leaving (their old copy serves)."""
        return {p.key: frozenset(p.nodes + p.leaving) for p in self._assignment.placed}

    def _spec_of(self, name: str) -> spec.DeploymentSpec | None:
        entry = self.records.entries.get(name)
        return None if entry is None else entry.record.spec

    def _may_roll(self, key: placement.ReplicaKey, entry: Entry) -> bool:
        claims = self._claims()
        heads = self._heads(claims)
        others = {}
        for p in self._assignment.placed:
            if p.deployment != key[0] or p.replica == key[1]:
                continue
            claim = claims.get(heads[p.key], {}).get(p.key)
            probe = self._readiness.probes.get(p.key)
            ready = (
                claim is not None
                and probe is not None
                and probe[:3] == (heads[p.key], claim.port, True)
            )
            others[p.replica] = (claim.spec if claim else "", ready)
        return may_roll(key[1], others, entry.record.digest[:DIGEST_CHARS])

    async def _reconcile(self) -> None:
        assert self._tg is not None
        specs = self.records.runnable()
        await self._refusals.recheck(self.records.entries)
        claims = self._claims()
        nodes = self._nodes()
        self._placeable_nodes = len(nodes)
        in_view = {n.name for n in nodes}
        current = placement.current_from_claims(
            {node: keys.keys() for node, keys in claims.items() if node in in_view}
        )
        self._assignment = placement.place(specs, nodes, current)
        running = self._replicas.running
        placed = {p.key: p for p in self._assignment.on_node(self.ctx.node_name)}
        wanted = set(placed)
        leaving = {p.key for p in self._assignment.placed if self.ctx.node_name in p.leaving}
        self._draining = {k: v for k, v in self._draining.items() if k in leaving}
        assigned = {p.key for p in self._assignment.placed}
        assigned |= {(p.deployment, p.replica) for p in self._assignment.pending}
        for key in [k for k in running if k not in wanted]:
            if keep_unplaced(running[key], key in assigned, time.monotonic()):
                continue  # adopted: this node's own verdicts are not in its view yet
            if key in leaving and not await self._may_retire(key):
                continue  # make-before-break: serves until its new copy is ready
            await self._stop(
                key, "moved off this cordoned node" if key in leaving else "no longer placed here"
            )
        for key in sorted(wanted):
            entry = self.records.entries[key[0]]
            replica = running.get(key)
            if replica is not None and replica.task is None:
                if time.monotonic() - replica.failed_at < START_RETRY_S:
                    continue
                del running[key]  # could not start: try again
                replica = None
            if replica is not None and replica.entry.record.digest != entry.record.digest:
                if not self._may_roll(key, entry):
                    continue  # keeps serving the old spec until the lower replicas are ready
                await self._stop(key, "spec changed")
                replica = None
            if replica is None:
                await self._refusals.check(entry)
                replica = await self._replicas.start(key, entry, self._tg)
            claims = self._claims()
            head = self._heads(claims, [placed[key]])[key]
            await self._replicas.drive(
                replica,
                self._tg,
                head,
                self.ctx.members.get(head),
                claims.get(head, {}).get(key),
            )

    async def _may_retire(self, key: placement.ReplicaKey) -> bool:
        """Whether the old copy of ``key`` here stops now (`drain.may_retire`): this node's
        probe of the new copy's head passed, long enough ago for every router to follow, and
        the old copy's engine holds no request (read from its /metrics only then)."""
        head = self._heads(self._claims()).get(key)
        probe = self._readiness.probes.get(key)
        now = time.monotonic()
        if probe is None or probe[0] != head or not probe[2]:
            self._draining[key] = None
        elif self._draining.get(key) is None:
            self._draining[key] = now
            log.info(
                _log,
                "new copy ready; old copy retiring",
                deployment=key[0],
                replica=key[1],
                at=head,
            )
        since = self._draining[key]
        ready_for = None if since is None else now - since
        timeout = self.cordon.timeout_s if self.cordon else drain.DEFAULT_TIMEOUT_S
        follow = drain.follow_s(self.ctx.config.deployments.interval_s, REFRESH_S)
        busy = None
        if ready_for is not None and follow <= ready_for < timeout:
            busy = await drain.read_busy(self.ctx.advertise_addr, self._replicas.running[key].port)
        retire = drain.may_retire(ready_for, follow=follow, timeout_s=timeout, busy=busy)
        if retire:
            log.info(
                _log,
                "old copy stops",
                replica=f"{key[0]}.{key[1]}",
                busy=busy,
                new_ready_for_s=round(ready_for or 0.0, 1),
            )
        return retire

    async def _stop(self, key: placement.ReplicaKey, why: str) -> None:
        await self._replicas.stop(key, why)
        self._readiness.probes.pop(key, None)

    async def _publish(self) -> None:
        """Gossip the record digest and this node's claims. Memberlist allows 512 bytes for all
        of a node's tags: claims that do not fit are left out (heads' first kept, as the other
        nodes of their replica join the GCS port they announce), with a warning."""
        own = self._own_claims()
        keys = sorted(own, key=lambda k: (own[k].gcs == 0, k))
        dropped: list[str] = []
        while True:
            try:
                await self.ctx.update_tags(
                    dv=self.records.digest,
                    dp=format_claims({k: own[k] for k in keys}, self._refusals.announced()),
                    cd=self.cordon is not None,
                )
                break
            except ValueError as exc:  # TagsError: too many replicas here to announce
                if not keys:
                    log.error(_log, "deployment tags do not fit", error=str(exc))
                    break
                name, index = keys.pop()
                dropped.append(f"{name}.{index}")
        if dropped != self._unannounced:
            self._unannounced = dropped
            if dropped:
                log.warning(
                    _log,
                    "replicas left out of the tags (memberlist's 512-byte limit)",
                    replicas=",".join(sorted(dropped)),
                )

    # ---- views -----------------------------------------------------------------------------

    def view(self, name: str) -> DeploymentView:
        entry = self.records.entries.get(name)
        if entry is None or entry.record.spec is None:
            raise ApiError(404, f"no deployment named {name!r}; see `gpud deploy list`")
        s = entry.record.spec
        reason = self.records.refusal(entry)
        claims = {} if reason else self._claims()
        replicas = views.replica_views(
            name,
            s.replicas,
            reason,
            me=self.ctx.node_name,
            assignment=self._assignment,
            heads={} if reason else self._heads(claims),
            claims=claims,
            members=self.ctx.members,
            probes=self._readiness.probes,
            running=self._replicas.running,
        )
        return views.deployment_view(
            entry, reason, self.records.delete_refusal_text(name), replicas
        )

    def listing(self) -> DeploymentsList:
        entries = self.records.entries
        return DeploymentsList(
            node=self.ctx.node_name,
            digest=self.records.digest,
            lamport=self.records.clock,
            deployments=[self.view(n) for n in self.records.live()],
            deleted=sorted(n for n, e in entries.items() if e.record.spec is None),
        )

    def endpoints(self, name: str) -> list[Endpoint]:
        return views.endpoints(self.view(name))

    # ---- component contract ----------------------------------------------------------------

    def status(self) -> SectionStatus:
        return SectionStatus(
            digest=self.records.digest,
            lamport=self.records.clock,
            deployments=len(self.records.live()),
            running_here=len(self._replicas.running),
            pending=len(self._assignment.pending),
            placeable_nodes=self._placeable_nodes,
            fetch_errors=dict(self.records.fetch_errors),
            cordoned=self.cordon is not None,
            draining=len(self._draining),
        )

    def summary(self) -> str:
        st = self.status()
        cordon = f", cordoned ({st.draining} draining)" if st.cordoned else ""
        return (
            f"{st.deployments} deployment(s), {st.running_here} replica(s) here, "
            f"{st.pending} pending{cordon}"
        )

    def problems(self) -> list[Problem]:
        refusals = [(n, self.records.refusal(e)) for n, e in self.records.live().items()]
        found = views.problems(
            [(n, r) for n, r in refusals if r],
            self.ctx.node_name,
            self._unannounced,
            self._assignment.pending,
            self._replicas.running.values(),
        )
        found += self._refusals.problems()
        if self.cordon is not None:
            found.append(
                Problem(
                    code="deployments.cordoned",
                    severity="warning",
                    subject=self.ctx.node_name,
                    message=f"cordoned by `gpud drain` since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(self.cordon.since))} UTC: "
                    f"no replicas are placed here, {len(self._replicas.running)} still run here",
                    fix="`gpud uncordon` on this host when it is back in service",
                )
            )
        return found

    def metrics(self) -> list[Metric]:
        return views.metrics([self.view(name) for name in self.records.live()])

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/deployments", self._get_list),
            web.post("/v1/deployments", self._post_apply),
            web.get("/v1/deployments/{name}", self._get_one),
            web.delete("/v1/deployments/{name}", self._delete),
            web.get("/v1/deployments/{name}/endpoints", self._get_endpoints),
            web.get("/v1/deployments/{name}/targets", self._get_targets),
            logs.route(self.view, self.ctx.node_name, self._replicas.log_path),
            web.post("/v1/drain", self._post_drain),
            web.post("/v1/uncordon", self._post_uncordon),
        ]

    # ---- local API -------------------------------------------------------------------------

    async def _get_list(self, request: web.Request) -> web.Response:
        return api.json_response(self.listing())

    async def _get_one(self, request: web.Request) -> web.Response:
        return api.json_response(self.view(request.match_info["name"]))

    async def _post_apply(self, request: web.Request) -> web.Response:
        api.require_admin(request, self.ctx.config.api.admin_group)
        if request.content_type == "application/json":
            body = await api.read_body(request, ApplyRequest, what="apply request")
            text, operator, signature = body.spec.encode(), body.operator, body.signature
        else:
            text = await request.content.read(spec.MAX_SPEC_BYTES + 1)
            operator = request.headers.get("X-Gpud-Operator", "")
            signature = request.headers.get("X-Gpud-Signature", "")
        return api.json_response(await self.records.apply(text, operator, signature))

    async def _delete(self, request: web.Request) -> web.Response:
        api.require_admin(request, self.ctx.config.api.admin_group)
        signed = None
        if request.content_type == "application/json" and request.content_length:
            signed = await api.read_body(request, DeleteRequest, what="delete request")
        return api.json_response(await self.records.delete(request.match_info["name"], signed))

    async def set_cordon(self, record: drain.CordonRecord | None) -> drain.DrainReply:
        """Cordon (``record``) or uncordon this node: stored before it is gossiped, so it
        survives a restart."""
        await asyncio.to_thread(self._db.put, drain.CORDON, record)
        self.cordon = record
        log.info(_log, "cordoned" if record else "uncordoned")
        await self._publish()
        self._wake.set()
        return drain.DrainReply(
            cordoned=record is not None,
            running_here=sorted(f"{k[0]}.{k[1]}" for k in self._replicas.running),
        )

    async def _post_drain(self, request: web.Request) -> web.Response:
        api.require_admin(request, self.ctx.config.api.admin_group)
        body = drain.DrainRequest()
        if request.content_length:
            body = await api.read_body(request, drain.DrainRequest, what="drain request")
        refusal = drain.timeout_refusal(body.timeout_s)
        if refusal:
            raise ApiError(400, f"bad drain request: {refusal}")
        record = self.cordon or drain.CordonRecord(since=time.time(), timeout_s=body.timeout_s)
        record = msgspec.structs.replace(record, timeout_s=body.timeout_s)
        return api.json_response(await self.set_cordon(record))

    async def _post_uncordon(self, request: web.Request) -> web.Response:
        api.require_admin(request, self.ctx.config.api.admin_group)
        return api.json_response(await self.set_cordon(None))

    async def _get_endpoints(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return api.json_response(EndpointsReply(name=name, endpoints=self.endpoints(name)))

    async def _get_targets(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return api.json_response(views.file_sd_targets(name, self.endpoints(name)))
