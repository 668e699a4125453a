"""Readiness: every node probes the health path of every placed replica over the data path, and
a replica's head announces it ready once a peer's latest probe of it passed (judged from
another host, never over loopback).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import aiohttp
import msgspec

from gpud.context import Member, NodeContext
from gpud.deployments import placement
from gpud.deployments.claims import Claim
from gpud.deployments.model import PeerProbesReply, PeerProbesRequest, ProbeReport
from gpud.deployments.peers import PeerNetwork, ask_peers, verified_peers
from gpud.deployments.replicas import Replica

if TYPE_CHECKING:
    from gpud.netcheck import NetCheck

PATH_PEER_PROBES = "/peer/v1/deployments/probes"
# Peers a replica's head asks for their probe of it before it announces itself ready.
READY_REPORTERS = 2

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
        health_path: Callable[[str], str | None],
        running: Mapping[placement.ReplicaKey, Replica],
        on_change: Callable[[], None],
    ) -> None:
        self._ctx = ctx
        self._peers = peers
        self._network = network
        self._targets = targets
        self._health_path = health_path
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
        for replica in self._running.values():
            ready = replica.supervisor is not None and (replica.key, replica.port) in seen
            changed |= ready != replica.ready
            replica.ready = ready
        if changed:
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
        path = self._health_path(key[0])
        if path is None:
            return False, "deleted"
        host = f"[{addr}]" if ":" in addr else addr
        try:
            async with session.get(f"http://{host}:{port}{path}") as r:
                await r.read()
                return (r.status == 200, "" if r.status == 200 else f"HTTP {r.status}")
        except TimeoutError:
            return False, "no answer in time"
        except (aiohttp.ClientError, OSError) as exc:
            return False, str(exc) or type(exc).__name__
