"""Scale simulation: the real pure deciders at 100, 1,000 and 5,000 members, in one process.

No network and no processes: simulated members (8 GPUs each, gossip tags as a real node's)
and 100 deployments go through the functions every gpud runs on its own view: placement
(gpud.deployments.placement), the Ray election's plan and the vote certificate check
(gpud.ray.election), the lease renewal tree (gpud.ray.lease_tree), a block claim step
(gpud.ports.blocks), the roll's may-restart check (placement.may_roll), pair and majority verdicts (gpud.health.verdict) and the probe-set
selection (gpud.health.prober). Per size it prints the CPU of one decision round of one node
(median of a few), the bytes of tags and of the certificate, and the messages per second each
node and the head send and receive, counted from what the selection and the tree choose.
Messages are request/answer exchanges (a probe is one TCP connect plus one signed ping).

    .venv/bin/python -m bench.scale_sim [--sizes 100,1000,5000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import msgspec

from gpud.config import HealthConfig, PortsConfig
from gpud.context import Member
from gpud.deployments.claims import Claim, format_claims
from gpud.deployments.placement import current_from_claims, may_roll, node_views, place
from gpud.deployments.spec import DeploymentSpec
from gpud.health.prober import QUICK_S, ring_neighbours, select_targets
from gpud.health.verdict import Direction, Endpoint, judge_pair, majority_verdict
from gpud.ports import blocks
from gpud.ray.election import plan, proof_refusal, quorum
from gpud.ray.lease_tree import FANOUT, RENEW_S, relay_order, renewal_start, split, tree_depth
from gpud.ray.votes import MAX_PAYLOAD_BYTES, VoteCertificate, VoteState, vote_signature
from gpud.tags import MAX_TAGS_BYTES, Tags, encode

RESULTS = Path(__file__).resolve().parent / "results"
DEPLOYMENTS = 100
KEY = b"k" * 32
TERM = 9
REPEATS = 3
SAMPLE_ABOVE = 1000


def name_of(i: int) -> str:
    return f"gpu-{i:05d}.rack{i % 64:02d}"


def specs() -> list[DeploymentSpec]:
    """100 deployments: mostly 1-8 GPU single-node replicas, some two-node ones."""
    out = []
    for i in range(DEPLOYMENTS):
        out.append(
            DeploymentSpec(
                name=f"model-{i:03d}",
                engine="vllm",
                model=f"org/model-{i}",
                replicas=1 + i % 6,
                nodes_per_replica=2 if i % 10 == 0 else 1,
                gpus_per_node=(1, 2, 4, 8)[i % 4],
            )
        )
    return out


def members_for(size: int) -> dict[str, Member]:
    names = [name_of(i) for i in range(size)]
    return {
        n: Member(
            name=n,
            addr=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
            port=7946,
            status="alive",
            tags=Tags(
                pp=7947,
                blk=i % 4096,
                bc=1_700_000_000,
                gpu=8,
                rv=True,
                hl="passing",
                gh="healthy",
                ray="head" if i == 0 else "worker",
                term=TERM,
                nm=40000 + i % 1000,
                hg="ok",
            ),
        )
        for i, n in enumerate(names)
    }


def cpu_ms(fn: Callable[[], object]) -> float:
    """Median process CPU milliseconds of ``fn`` over REPEATS runs."""
    runs = []
    for _ in range(REPEATS):
        start = time.process_time()
        fn()
        runs.append((time.process_time() - start) * 1000)
    return statistics.median(runs)


def with_claims(members: dict[str, Member], deployments: list[DeploymentSpec]) -> dict[str, Any]:
    """Place once (a settled cluster), put each node's claims in its tags; the figures below
    are of the next round, the steady state every node re-runs."""
    views = node_views(members.values(), "", None, lambda _name: True)
    first = place(deployments, views, {})
    per_node: dict[str, dict[tuple[str, int], Claim]] = {}
    for p in first.placed:
        for node in p.nodes:
            per_node.setdefault(node, {})[p.key] = Claim(20000 + p.replica, "3fa2")
    for name, claims in per_node.items():
        m = members[name]
        assert m.tags is not None
        members[name] = msgspec.structs.replace(
            m, tags=msgspec.structs.replace(m.tags, dp=format_claims(claims))
        )
    current = current_from_claims({n: list(c) for n, c in per_node.items()})
    return {"views": views, "current": current, "placed": len(first.placed)}


def probe_messages(names: list[str], head: str, health: HealthConfig) -> dict[str, float]:
    """Probes per second each node sends and receives, from the real selection of every
    node at one step, or of every SAMPLE_ABOVE-th one of N (those counted N / sampled times:
    each selection sorts all N names, 5,000 of them take most of the run)."""
    sent, received = [], Counter[str]()
    quick_received = Counter[str]()
    step = 12345
    every = max(1, len(names) // SAMPLE_ABOVE)
    sampled = names[::every]
    for me in sampled:
        targets = select_targets(
            me,
            names,
            head=head,
            full_mesh_max=health.full_mesh_max,
            random_peers=health.random_peers,
            step=step,
        )
        received.update({t: every for t in targets})
        neighbours = ring_neighbours(me, [n for n in names if n != me])
        # Between rounds: the peer after us on the ring (gpud.health.service.probe_round).
        quick = {neighbours[1]} if neighbours else set()
        quick_received.update({q: every for q in quick})
        sent.append(len(targets) / health.interval_s + len(quick) / QUICK_S)
    # Sampled at 1 in `every`, a node's count is `every` or 0 per sampler: the median over
    # the sampled nodes' own receipts would be 0, so per node: the mean over all of them.
    per_node_in = [
        received[n] / health.interval_s + quick_received[n] / QUICK_S for n in names if n != head
    ]
    return {
        "sent_per_node": statistics.median(sent),
        "received_per_node": statistics.median(per_node_in)
        if every == 1
        else statistics.fmean(per_node_in),
        "received_max_non_head": max(per_node_in),
        "head_probes_in": received[head] / health.interval_s + quick_received[head] / QUICK_S,
    }


def lease_messages(names: list[str], head: str) -> dict[str, float]:
    """Renewal messages per second, from the real tree of one renewal: the head sends FANOUT,
    every other member receives one and passes on at most FANOUT."""
    order = relay_order(head, names, renewal_start(head, names, 1))
    sent = Counter[str]()

    def walk(position: int, lo: int, hi: int) -> None:
        for child, a, b in split(lo, hi, FANOUT):
            sent[order[position]] += 1
            walk(child, a, b)

    walk(0, 1, len(order))
    others = [sent[n] for n in order[1:]]
    return {
        "head_out": sent[head] / RENEW_S,
        "per_node_out": statistics.median(others) / RENEW_S if others else 0.0,
        "per_node_out_max": max(others, default=0) / RENEW_S,
        "per_node_in": 1 / RENEW_S,
        "depth": tree_depth(1, len(order), FANOUT),
    }


def simulate(size: int) -> dict[str, Any]:
    members = members_for(size)
    names = sorted(members)
    head, me = names[0], names[size // 2]
    deployments = specs()
    settled = with_claims(members, deployments)
    health = HealthConfig()

    placement = cpu_ms(lambda: place(deployments, settled["views"], settled["current"]))
    # A roll of every deployment at once: each replica asks whether it may restart now.
    announced = {
        spec.name: {r: ("3fa2", True) for r in range(spec.replicas)} for spec in deployments
    }
    roll = cpu_ms(
        lambda: [
            may_roll(r, announced[spec.name], "4b01")
            for spec in deployments
            for r in range(spec.replicas)
        ]
    )
    election = cpu_ms(lambda: plan(me, members, TERM, None))
    voters = [head, *names[1 : quorum(size)]]
    cert = VoteCertificate(
        head=head,
        term=TERM,
        known=size,
        votes={
            v: vote_signature(KEY, voter=v, candidate=head, term=TERM, known=size) for v in voters
        },
    )
    cert_bytes = len(msgspec.json.encode(cert))
    assert proof_refusal(head, TERM, VoteState(), cert, [KEY]) is None
    certificate = cpu_ms(lambda: proof_refusal(head, TERM, VoteState(), cert, [KEY]))
    views = tuple(
        blocks.ClaimView(
            name=m.name, addr=m.addr, status="alive", blk=m.tags.blk, confirmed_at=m.tags.bc
        )
        for m in members.values()
        if m.tags is not None
    )
    ports = PortsConfig()
    own = members[me].tags
    assert own is not None
    claim_input = blocks.ClaimInput(
        me=me,
        addr=members[me].addr,
        n_blocks=blocks.block_count(ports),
        settle_s=5.0,
        reserve=False,
        claim=blocks.Claim(blk=own.blk, confirmed_at=own.bc),
        state="confirmed",
        settled_since=0.0,
        published=(own.blk, own.bc),
        views=views,
        now=100.0,
        wall_now=1_700_000_100,
    )
    block_claims = cpu_ms(lambda: blocks.step(claim_input))
    targets = select_targets(
        me,
        names,
        head=head,
        full_mesh_max=health.full_mesh_max,
        random_peers=health.random_peers,
        step=7,
    )
    probe_set = cpu_ms(
        lambda: select_targets(
            me,
            names,
            head=head,
            full_mesh_max=health.full_mesh_max,
            random_peers=health.random_peers,
            step=7,
        )
    )
    us = Endpoint(me, members[me].addr, 7947)
    passing = Direction(state="passing", ok_streak=3)

    def verdicts() -> None:
        for t in targets:
            judge_pair(us, Endpoint(t, members[t].addr, 7947), "alive", passing, passing)
        majority_verdict(["passing"] * len(targets), size - 1)

    verdict = cpu_ms(verdicts)
    renewal = cpu_ms(lambda: relay_order(head, names, renewal_start(head, names, 2)))
    tag_sizes = [len(msgpack.packb(encode(m.tags))) for m in members.values() if m.tags]
    probes = probe_messages(names, head, health)
    lease = lease_messages(names, head)
    per_node_out = probes["sent_per_node"] + lease["per_node_out"]
    per_node_in = probes["received_per_node"] + lease["per_node_in"]
    return {
        "members": size,
        "deployments": DEPLOYMENTS,
        "replicas_placed": settled["placed"],
        "cpu_ms": {
            "placement": round(placement, 2),
            "election_plan": round(election, 2),
            "certificate_check": round(certificate, 2),
            "block_claim": round(block_claims, 2),
            "roll": round(roll, 3),
            "probe_set": round(probe_set, 2),
            "verdicts": round(verdict, 3),
            "lease_renewal_order": round(renewal, 2),
        },
        "bytes": {
            "tags_max": max(tag_sizes),
            "tags_limit": MAX_TAGS_BYTES,
            "certificate": cert_bytes,
            "certificate_votes": len(cert.votes),
            "certificate_serf_pages": -(-cert_bytes // MAX_PAYLOAD_BYTES),
        },
        "messages_per_s": {
            "node_out": round(per_node_out, 2),
            "node_in": round(per_node_in, 2),
            "node_out_max": round(probes["sent_per_node"] + lease["per_node_out_max"], 2),
            "node_in_max_non_head": round(
                probes["received_max_non_head"] + lease["per_node_in"], 2
            ),
            "head_lease_out": lease["head_out"],
            "head_probes_in": round(probes["head_probes_in"], 2),
            "lease_tree_depth": lease["depth"],
        },
    }


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'members':>7} {'place':>7} {'plan':>6} {'cert':>6} {'block':>6} {'probes':>6} "
        f"{'order':>6} {'tags B':>6} {'cert B':>8} {'node out/s':>10} {'node in/s':>9} "
        f"{'head lease/s':>12} {'head probes in/s':>16} {'depth':>5}"
    )
    lines = ["CPU per round of one node in ms (process time, median of 3)", header]
    for r in rows:
        c, b, m = r["cpu_ms"], r["bytes"], r["messages_per_s"]
        lines.append(
            f"{r['members']:>7} {c['placement']:>7.1f} {c['election_plan']:>6.1f} "
            f"{c['certificate_check']:>6.1f} {c['block_claim']:>6.1f} {c['probe_set']:>6.2f} "
            f"{c['lease_renewal_order']:>6.1f} {b['tags_max']:>6} {b['certificate']:>8} "
            f"{m['node_out']:>10.1f} {m['node_in']:>9.1f} {m['head_lease_out']:>12.1f} "
            f"{m['head_probes_in']:>16.1f} {m['lease_tree_depth']:>5}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--json", type=Path, default=RESULTS / "scale-sim.json")
    args = parser.parse_args()
    began = time.monotonic()
    rows = [simulate(int(s)) for s in args.sizes.split(",")]
    print(table(rows))
    print(f"({time.monotonic() - began:.0f} s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
