"""Readiness: every node probes the health path of every placed replica over the data path, and
a replica's head announces it ready once a peer's latest probe of it passed (judged from
another host, never over loopback).

A probe is GET health_path and, with the spec's `ready_check = "completion"`, a one-token
completion too (bounded by the probe timeout): vLLM's health endpoint can stay green while its
Ray workers are dead.

Startup: a server that has not passed a probe since its start is starting, never restarted
before its spec's `startup_timeout_s`; past it, gpud stops it and its Supervisor starts it again
after its backoff (`startup_step`). Liveness: one that answered and then passes no probe for
`LIVENESS_ROUNDS` rounds is restarted the same way (`liveness_step`).

A replica of N > 1 nodes is restarted as a whole, on its head, when its Ray cluster lost a node
(`cluster_step`: a node that was alive in the replica's GCS is no longer listed alive there, or
its host is no longer an alive member the replica is placed on, i.e. its raylet is gone as the
gossip sees it), and for a startup timeout or a liveness failure too: its Ray head starts afresh (a new
cluster, with no dead node in it and no actor on one). The head's claim carries the verdict:
while its new GCS is not up it announces no GCS port, so the server here stops and every other
node of the replica leaves the old cluster (`Replicas.drive`), and all of them join the new one
once the head announces it; the server then starts on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import aiohttp
import msgspec

from gpud import log
from gpud.config import Config
from gpud.context import Member, NodeContext
from gpud.deployments import placement, spec
from gpud.deployments.claims import Claim
from gpud.deployments.model import PeerProbesReply, PeerProbesRequest, ProbeReport
from gpud.deployments.peers import PeerNetwork, ask_peers, verified_peers
from gpud.deployments.replicas import Replica, RestartCause, restart_server, stop_server
from gpud.ray.probes import GcsNodes

if TYPE_CHECKING:
    from gpud.netcheck import NetCheck

_log = log.get("deployments")

PATH_PEER_PROBES = "/peer/v1/deployments/probes"
# Peers a replica's head asks for their probe of it before it announces itself ready.
READY_REPORTERS = 2
# Rounds in a row without a passed probe after which a server that had answered is restarted.
LIVENESS_ROUNDS = 3
# How long (0.1 s polls) a replica restarted as a whole waits for its old Ray head to go.
RAY_TEARDOWN_POLLS = 100
# Bytes of a completion reply read by a probe (one token: a small JSON document).
COMPLETION_REPLY_BYTES = 64 * 1024

# Where a placed replica's server answers: replica -> (node, addr, port).
Targets = dict[placement.ReplicaKey, tuple[str, str, int]]
# This node's last probe of a placed replica: (node, port, ok, error).
Probe = tuple[str, int, bool, str]
# The nodes (gpud names) a replica's GCS lists alive, asked of the Ray head process with this
# pid (a restarted head is a new cluster); None: the GCS did not answer.
GcsAlive = tuple[int, frozenset[str] | None]


def probe_targets(
    placed: Iterable[placement.Placed],
    heads: Mapping[placement.ReplicaKey, str],
    claims: Mapping[str, Mapping[placement.ReplicaKey, Claim]],
    members: Mapping[str, Member],
) -> Targets:
    """Placed replicas whose head (where the server runs) announces a port. Pure."""
    out = {}
    for p in placed:
        node = heads[p.key]
        claim = claims.get(node, {}).get(p.key)
        member = members.get(node)
        if claim is not None and member is not None:
            out[p.key] = (node, member.addr, claim.port)
    return out


def startup_step(
    answered: bool, passed_now: bool, elapsed_s: float, timeout_s: float
) -> tuple[bool, bool]:
    """One judgement of a server since its latest start: (answered, restart now). ``answered``:
    a probe of it passed since that start (it stays so: what happens after is liveness, not
    startup); ``passed_now``: one passed in this round. A server is restarted only when none has
    passed and more than ``timeout_s`` went by since its start. Pure."""
    answered = answered or passed_now
    return answered, not answered and elapsed_s > timeout_s


def liveness_step(passed: bool, silent_rounds: int, rounds: int) -> tuple[int, bool]:
    """One judgement of a server that has answered since its start: (rounds in a row without
    a passed probe, restart now). Pure."""
    silent = 0 if passed else silent_rounds + 1
    return silent, silent >= rounds


def cluster_step(
    joined: frozenset[str], alive: frozenset[str] | None, members: frozenset[str]
) -> tuple[frozenset[str], frozenset[str]]:
    """One judgement of a multi-node replica's Ray cluster, on its head: (its nodes seen alive
    in its GCS since the cluster started, the nodes it lost: restart it as a whole when any).

    ``joined``: the first result of the previous round (empty for a new cluster); ``alive``:
    the nodes its GCS lists alive now (None: it did not answer, so nothing new is learned and
    only ``members`` counts); ``members``: the alive members the replica is placed on now
    (with those it is leaving, whose old copy still serves). A node that joined is lost once
    the GCS no longer lists it alive (Ray marked it dead) or once it is not in ``members``
    (its host left the membership, so its raylet is gone as the gossip sees it, seconds before
    Ray's own health check gives up on it; or the replica moved off it). A node never seen is
    not lost: it may still be joining. Pure."""
    if alive is None:
        return joined, joined - members
    seen = joined | (alive & members)
    return seen, (seen - members) | (seen - alive)


class Readiness:
    """The probe loop (``probes``: this node's latest of each placed replica), the peer route
    that reports them, and the readiness of the replicas whose server runs here."""

    def __init__(
        self,
        ctx: NodeContext,
        peers: PeerNetwork,
        network: NetCheck | None,
        *,
        targets: Callable[[], Targets],
        spec_of: Callable[[str], spec.DeploymentSpec | None],
        running: Mapping[placement.ReplicaKey, Replica],
        on_change: Callable[[], None],
        nodes_of: Callable[[], Mapping[placement.ReplicaKey, frozenset[str]]],
    ) -> None:
        self._ctx = ctx
        self._peers = peers
        self._network = network
        self._targets = targets
        self._spec_of = spec_of
        self._running = running
        self._on_change = on_change
        self._nodes_of = nodes_of
        self.probes: dict[placement.ReplicaKey, Probe] = {}
        # Multi-node replicas whose head runs here: what their GCS lists alive, and the nodes
        # seen alive there since their Ray head process (pid) started (`cluster_step`).
        self._gcs_alive: dict[placement.ReplicaKey, GcsAlive] = {}
        self._joined: dict[placement.ReplicaKey, tuple[int, frozenset[str]]] = {}
        peers.add_route(PATH_PEER_PROBES, self._peer_probes)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_clusters())
            await self._probe_loop()

    async def _watch_clusters(self) -> None:
        """Ask the GCS of each multi-node replica whose head runs here which nodes it lists
        alive, every round, through one long-lived query process per GCS address."""
        queries: dict[placement.ReplicaKey, GcsNodes] = {}
        cfg = self._ctx.config
        try:
            while True:
                heads = {
                    key: (r.ray.status().process.pid, f"{self._ctx.advertise_addr}:{r.gcs}")
                    for key, r in self._running.items()
                    if r.ray is not None and r.gcs
                }
                for key in [
                    k for k, q in queries.items() if heads.get(k, (0, ""))[1] != q.gcs_address
                ]:
                    await queries.pop(key).close()
                for key in [k for k in self._gcs_alive if k not in heads]:
                    del self._gcs_alive[key]
                for key, (pid, address) in heads.items():
                    query = queries.setdefault(key, GcsNodes(cfg.ray.executable, address))
                    self._gcs_alive[key] = (pid, await _alive_nodes(query, key, cfg))
                await asyncio.sleep(cfg.deployments.interval_s)
        finally:
            for query in queries.values():
                await query.close()

    async def _probe_loop(self) -> None:
        cfg = self._ctx.config.deployments
        timeout = aiohttp.ClientTimeout(total=cfg.probe_timeout_s)
        while True:
            # From the advertised address (the data path replicas use) while it is ours;
            # behind NAT it is not, and the kernel picks the source.
            network = self._network.status() if self._network else None
            local = (
                None if network and network.address_is_local is False else self._ctx.advertise_addr
            )
            connector = aiohttp.TCPConnector(
                force_close=True, local_addr=(local, 0) if local else None
            )
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                targets = self._targets()
                results = await asyncio.gather(
                    *(
                        self._probe(session, key, addr, port)
                        for key, (_, addr, port) in targets.items()
                    )
                )
            self.probes = {
                key: (targets[key][0], targets[key][2], ok, error)
                for key, (ok, error) in zip(targets, results, strict=True)
            }
            await self._judge()
            await asyncio.sleep(cfg.interval_s)

    async def _judge(self) -> None:
        """Replicas whose server runs here are ready (announced in their claim) when a peer's
        latest probe of them over the data path passed: a probe from this host would go over
        loopback. With no verified peer to ask, this node's own probe decides."""
        me = self._ctx.node_name
        serving = [r for r in self._running.values() if r.supervisor is not None]
        # Peers by a hash of (this node, peer): each head asks its own few, not everyone the same.
        peers = sorted(
            verified_peers(self._peers, self._ctx.peers()),
            key=lambda m: placement.score(me, 0, m.name),
        )[:READY_REPORTERS]
        seen: set[tuple[placement.ReplicaKey, int]] = set()
        if serving and peers:
            replies = await ask_peers(
                self._peers, peers, PATH_PEER_PROBES, PeerProbesRequest(), PeerProbesReply
            )
            for reply in replies:
                if isinstance(reply, PeerProbesReply):
                    seen.update(
                        ((p.deployment, p.replica), p.port)
                        for p in reply.probes
                        if p.ok and p.node == me
                    )
        else:
            seen = {
                (key, port) for key, (node, port, ok, _) in self.probes.items() if ok and node == me
            }
        changed = False
        own = {(key, port) for key, (node, port, ok, _) in self.probes.items() if ok and node == me}
        for replica in list(self._running.values()):
            ready = replica.supervisor is not None and (replica.key, replica.port) in seen
            changed |= ready != replica.ready
            replica.ready = ready
            await self._lifecycle(replica, ready or (replica.key, replica.port) in own)
        self._joined = {k: v for k, v in self._joined.items() if k in self._running}
        if changed:
            self._on_change()

    async def _lifecycle(self, replica: Replica, passed: bool) -> None:
        """Restart a multi-node replica whose Ray cluster lost a node (`_check_cluster`), and
        a running server that has not passed a probe within its startup_timeout_s, or that
        answered and then passed none for LIVENESS_ROUNDS rounds. Any passed probe counts,
        this node's own too: it proves the server answers (a peer that cannot reach it is a
        network problem, not the server's)."""
        if replica.ray is not None and replica.gcs and await self._check_cluster(replica):
            return
        sup = replica.supervisor
        s = replica.entry.record.spec
        if sup is None or sup.status.state != "running" or s is None or not replica.started_at:
            return
        if passed:
            replica.restarted = ("", "")
        if (probe := self.probes.get(replica.key)) is not None and probe[0] != self._ctx.node_name:
            # An old copy retiring (a drain): the probes follow its new copy, and a restart
            # would only kill the requests it is finishing.
            return
        if replica.answered:
            replica.silent_rounds, dead = liveness_step(
                passed, replica.silent_rounds, LIVENESS_ROUNDS
            )
            if dead:
                await self._restart(
                    replica,
                    "unresponsive",
                    f"its server answered, then passed no probe ({_check_text(s)}) in "
                    f"{LIVENESS_ROUNDS} rounds",
                )
            return
        timeout = spec.startup_timeout(s)
        elapsed = time.monotonic() - replica.started_at
        replica.answered, late = startup_step(False, passed, elapsed, timeout)
        if late:
            await self._restart(
                replica,
                "startup_timeout",
                f"its server did not pass a probe ({_check_text(s)}) within "
                f"startup_timeout_s = {timeout} s of its start",
            )

    async def _check_cluster(self, replica: Replica) -> bool:
        """On the head of a multi-node replica whose GCS answers: one `cluster_step` of its
        cluster (the Ray head process's, by pid), and the restart as a whole if it lost a node.
        Whether it was restarted."""
        placed = self._nodes_of().get(replica.key)
        if replica.ray is None or placed is None:
            return False
        members = frozenset(m.name for m in self._ctx.members.values() if m.alive)
        # Its nodes still in it: alive members the replica is still placed on.
        members = (members | {self._ctx.node_name}) & placed
        pid = replica.ray.status().process.pid or 0
        asked = self._gcs_alive.get(replica.key)
        alive = asked[1] if asked is not None and asked[0] == pid else None
        began, joined = self._joined.get(replica.key, (pid, frozenset()))
        joined, lost = cluster_step(joined if began == pid else frozenset(), alive, members)
        self._joined[replica.key] = (pid, joined)
        if not lost:
            return False
        gone = ", ".join(sorted(lost))
        await self._restart(
            replica,
            "ray_node_lost",
            f"its Ray cluster lost node(s) {gone} (not alive in its GCS, or the host left "
            "the membership or the replica)",
        )
        return True

    async def _restart(self, replica: Replica, cause: RestartCause, why: str) -> None:
        """Restart the server; for N > 1 the replica as a whole: its Ray head starts afresh
        here, and the claim without a GCS port meanwhile takes the server here and the other
        nodes' Ray nodes off the old cluster (see the module's docstring)."""
        await restart_server(replica, cause, why)
        ray = replica.ray
        if ray is None or ray.target is None:
            return
        if not replica.restarted[0]:  # no server ran: nothing of it to quote
            replica.restarted = (cause, f"{why}, so gpud restarted the replica")
        target = ray.target
        # The server goes for good (its Supervisor would start it again on the old cluster's
        # address); `Replicas.drive` starts a new one once the new GCS answers.
        await stop_server(replica)
        # A changed target restarts Ray at once: clearing it and setting it back is a fresh
        # Ray head on the same settings (and leases ports anew).
        ray.set_target(None)
        ray.set_target(target)
        # Until the old head is gone: a server started before would get the old GCS address.
        for _ in range(RAY_TEARDOWN_POLLS):
            if not ray.gcs_ready_port:
                break
            await asyncio.sleep(0.1)
        replica.gcs = 0
        self._joined.pop(replica.key, None)
        log.warning(_log, "replica restarted as a whole", replica=replica.id, cause=cause)
        self._on_change()

    async def _peer_probes(self, body: bytes) -> bytes:
        msgspec.json.decode(body or b"{}", type=PeerProbesRequest)
        reports = [
            ProbeReport(deployment=key[0], replica=key[1], node=node, port=port, ok=ok)
            for key, (node, port, ok, _) in sorted(self.probes.items())
        ]
        return msgspec.json.encode(PeerProbesReply(name=self._ctx.node_name, probes=reports))

    async def _probe(
        self, session: aiohttp.ClientSession, key: placement.ReplicaKey, addr: str, port: int
    ) -> tuple[bool, str]:
        s = self._spec_of(key[0])
        if s is None:
            return False, "deleted"
        host = f"[{addr}]" if ":" in addr else addr
        what = s.health_path
        try:
            async with session.get(f"http://{host}:{port}{s.health_path}") as r:
                await r.read()
                if r.status != 200:
                    return False, f"HTTP {r.status}"
            if s.ready_check == "completion":
                what = "a one-token completion"
                body = {"model": s.model, "prompt": "ping", "max_tokens": 1}
                async with session.post(f"http://{host}:{port}/v1/completions", json=body) as r:
                    reply = await r.content.read(COMPLETION_REPLY_BYTES)
                    if r.status != 200:
                        return False, f"completion: HTTP {r.status}"
                    if not _has_choice(reply):
                        return False, "completion: the reply has no choices"
            return True, ""
        except TimeoutError:
            return False, f"{what}: no answer in time"
        except (aiohttp.ClientError, OSError) as exc:
            return False, str(exc) or type(exc).__name__


async def _alive_nodes(
    query: GcsNodes, key: placement.ReplicaKey, cfg: Config
) -> frozenset[str] | None:
    """The gpud nodes whose Ray node of replica ``key`` its GCS lists alive (each is named
    NODE-NAME.INDEX, see `Replicas`); None when the GCS does not answer in time. A name listed
    twice is a node whose Ray restarted while the GCS still lists its old raylet alive (the
    workers on that one are gone with it): not alive."""
    suffix = f"-{key[0]}.{key[1]}"
    try:
        nodes = await query.alive(cfg.deployments.probe_timeout_s)
    except RuntimeError as exc:
        log.event(_log, logging.DEBUG, "replica gcs not answering", replica=key[0], error=str(exc))
        return None
    names = [n.name.removesuffix(suffix) for n in nodes if n.name.endswith(suffix)]
    return frozenset(n for n in names if names.count(n) == 1)


def _check_text(s: spec.DeploymentSpec) -> str:
    if s.ready_check == "completion":
        return f"{s.health_path} and a one-token completion"
    return s.health_path


def _has_choice(reply: bytes) -> bool:
    """Whether an OpenAI completion reply carries at least one choice."""
    try:
        data = msgspec.json.decode(reply)
    except msgspec.DecodeError:
        return False
    return isinstance(data, dict) and bool(data.get("choices"))
