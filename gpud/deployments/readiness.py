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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import aiohttp
import msgspec

from gpud.context import Member, NodeContext
from gpud.deployments import placement, spec
from gpud.deployments.claims import Claim
from gpud.deployments.model import PeerProbesReply, PeerProbesRequest, ProbeReport
from gpud.deployments.peers import PeerNetwork, ask_peers, verified_peers
from gpud.deployments.replicas import Replica, restart_server

if TYPE_CHECKING:
    from gpud.netcheck import NetCheck

PATH_PEER_PROBES = "/peer/v1/deployments/probes"
# Peers a replica's head asks for their probe of it before it announces itself ready.
READY_REPORTERS = 2
# Rounds in a row without a passed probe after which a server that had answered is restarted.
LIVENESS_ROUNDS = 3
# Bytes of a completion reply read by a probe (one token: a small JSON document).
COMPLETION_REPLY_BYTES = 64 * 1024

# Where a placed replica's server answers: replica -> (node, addr, port).
Targets = dict[placement.ReplicaKey, tuple[str, str, int]]
# This node's last probe of a placed replica: (node, port, ok, error).
Probe = tuple[str, int, bool, str]


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
    ) -> None:
        self._ctx = ctx
        self._peers = peers
        self._network = network
        self._targets = targets
        self._spec_of = spec_of
        self._running = running
        self._on_change = on_change
        self.probes: dict[placement.ReplicaKey, Probe] = {}
        peers.add_route(PATH_PEER_PROBES, self._peer_probes)

    async def run(self) -> None:
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
        if changed:
            self._on_change()

    @staticmethod
    async def _lifecycle(replica: Replica, passed: bool) -> None:
        """Restart a running server that has not passed a probe within its startup_timeout_s,
        or that answered and then passed none for LIVENESS_ROUNDS rounds. Any passed probe
        counts, this node's own too: it proves the server answers (a peer that cannot reach it
        is a network problem, not the server's)."""
        sup = replica.supervisor
        s = replica.entry.record.spec
        if sup is None or sup.status.state != "running" or s is None or not replica.started_at:
            return
        if passed:
            replica.restarted = ("", "")
        if replica.answered:
            replica.silent_rounds, dead = liveness_step(
                passed, replica.silent_rounds, LIVENESS_ROUNDS
            )
            if dead:
                await restart_server(
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
            await restart_server(
                replica,
                "startup_timeout",
                f"its server did not pass a probe ({_check_text(s)}) within "
                f"startup_timeout_s = {timeout} s of its start",
            )

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
