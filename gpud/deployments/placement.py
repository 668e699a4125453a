"""Which nodes run which replica: one pure function that every node evaluates on the same inputs.

There is no scheduler process. Every node computes `place(specs, nodes, current)` from the same
gossiped inputs and gets the same answer, so nodes agree on an assignment without talking about
it. Nothing here depends on input order, dict order or randomness: specs are taken by name,
replicas by index, and ties between nodes are broken by a rendezvous hash of
(deployment, replica, node), which also keeps a replica's preferred nodes stable as other nodes
come and go.

Rules, in order of precedence:
1. Never more GPUs on a node than it has healthy and free for deployments (all deployments
   counted together), and a node is in at most one multi-node replica (each multi-node replica
   is its own Ray cluster; a node's Ray process belongs to one cluster). Single-node replicas
   may share a node while GPUs last.
2. Sticky: a replica announced in `current` keeps its nodes while all of them are still
   eligible (alive, healthy, verified, matching the selector) and the rules above hold. Views
   that conflict (two replicas announcing more than a node has) are settled in (deployment,
   replica) order: the first keeps its nodes, the later one is placed again.
3. A replica that must be (re)placed keeps what it can of its previous nodes, so losing one
   host of a two-host replica moves one node, not two.
4. Spread: new nodes come from hosts holding the fewest nodes of the same deployment, so the
   replicas of one deployment land on different hosts when capacity allows.
5. A replica that cannot be placed is pending, with a reason an operator can act on.
6. Cordon (`gpud drain`): a cordoned node is never chosen for a replica. A replica on one moves
   make-before-break: it is placed on other nodes with the cordoned ones as ``leaving``, where
   the old copy keeps serving until the new one is ready (the drained node retires it then). A
   replica that fits nowhere else stays where it is, so a drain never takes capacity away.
7. Refusal: a replica being (re)placed goes to nodes that do not refuse its deployment
   (`NodeView.refuses`: they announce they lack the spec's local model path) whenever enough
   such nodes fit; only when too few do, to a refusing one, where it shows as failed with the
   node's reason (not pending with none).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Final

import msgspec

from gpud.deployments.spec import DeploymentSpec
from gpud.errors import GpudError

if TYPE_CHECKING:
    from gpud.context import Member
    from gpud.tags import Tags

ReplicaKey = tuple[str, int]  # (deployment name, replica index)


class NodeView(msgspec.Struct, frozen=True, kw_only=True):
    """A node placement may use: already filtered to alive, healthy, verified members."""

    name: str
    # The host it runs on (its advertised address): several gpud nodes may share one host, and
    # spreading replicas over nodes on one host protects nothing.
    host: str
    # Healthy GPUs that no one but deployments may use (leased to nothing else).
    gpus: int
    labels: dict[str, str] = {}
    # `gpud drain`: no replica is placed here; the ones here move make-before-break.
    cordoned: bool = False
    # Deployments this node refuses to run (it announces them: e.g. it lacks the spec's local
    # model path), so they are placed elsewhere.
    refuses: frozenset[str] = frozenset()


class Placed(msgspec.Struct, frozen=True, kw_only=True):
    deployment: str
    replica: int
    nodes: tuple[str, ...]
    gpus_per_node: int
    # Cordoned nodes the replica is moving off: their old copy serves until the new is ready.
    leaving: tuple[str, ...] = ()

    @property
    def key(self) -> ReplicaKey:
        return (self.deployment, self.replica)


class Pending(msgspec.Struct, frozen=True, kw_only=True):
    deployment: str
    replica: int
    reason: str


class Assignment(msgspec.Struct, frozen=True, kw_only=True):
    placed: tuple[Placed, ...]
    pending: tuple[Pending, ...]

    def current(self) -> dict[ReplicaKey, tuple[str, ...]]:
        """This assignment as the `current` input of the next round."""
        return {p.key: p.nodes for p in self.placed}

    def on_node(self, node: str) -> list[Placed]:
        return [p for p in self.placed if node in p.nodes]


class PlacementError(GpudError):
    """The inputs contradict themselves (e.g. two nodes with one name)."""


_NO_NODES: Final[tuple[str, ...]] = ()


def score(deployment: str, replica: int, node: str) -> int:
    """Rendezvous (highest-random-weight) score of `node` for one replica."""
    digest = hashlib.blake2b(f"{deployment}\x00{replica}\x00{node}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def current_from_claims(
    claims: Mapping[str, Iterable[ReplicaKey]],
) -> dict[ReplicaKey, tuple[str, ...]]:
    """Group what each node announces ("I am in replica web/0") into replica -> nodes."""
    groups: dict[ReplicaKey, list[str]] = {}
    for node, keys in claims.items():
        for key in keys:
            groups.setdefault(key, []).append(node)
    return {key: tuple(sorted(nodes)) for key, nodes in groups.items()}


def place(
    specs: Iterable[DeploymentSpec],
    nodes: Iterable[NodeView],
    current: Mapping[ReplicaKey, Sequence[str]],
) -> Assignment:
    """The assignment of every replica of every spec. Pure and order-independent."""
    by_name = _unique(nodes)
    ordered = sorted(specs, key=lambda s: s.name)
    if len({s.name for s in ordered}) != len(ordered):
        raise PlacementError("two specs with one name; merge versions before placing")
    free = {name: n.gpus for name, n in by_name.items()}
    in_group: set[str] = set()  # nodes held by a multi-node replica
    placed: dict[ReplicaKey, Placed] = {}

    # Sticky pass first, so a new replica never takes what a serving one holds. A replica on
    # a cordoned node holds its place too, until the moves below find it another.
    moving: dict[ReplicaKey, tuple[DeploymentSpec, tuple[str, ...]]] = {}
    for spec in ordered:
        for replica in range(spec.replicas):
            kept = tuple(current.get((spec.name, replica), _NO_NODES))
            if len(kept) != spec.nodes_per_replica or len(set(kept)) != len(kept):
                continue
            cordoned = any(n in by_name and by_name[n].cordoned for n in kept)
            if all(_fits(spec, by_name.get(n), free, in_group, cordoned_ok=cordoned) for n in kept):
                placed[(spec.name, replica)] = _take(spec, replica, kept, free, in_group)
                if cordoned:
                    moving[(spec.name, replica)] = (spec, kept)

    # Moves off cordoned nodes, one at a time: each gives its place back and takes a new one
    # if there is one, else keeps its place (so a move never takes what another one holds).
    for key, (spec, kept) in sorted(moving.items()):
        _give_back(spec, kept, free, in_group)
        hosts_used = Counter(
            by_name[n].host
            for k, p in placed.items()
            if p.deployment == spec.name and k != key
            for n in p.nodes
        )
        chosen = _choose(spec, key[1], by_name, free, in_group, hosts_used, kept)
        taken = _take(spec, key[1], chosen or kept, free, in_group)
        leaving = tuple(n for n in kept if by_name[n].cordoned and chosen and n not in chosen)
        placed[key] = msgspec.structs.replace(taken, leaving=leaving)

    pending: list[Pending] = []
    for spec in ordered:
        hosts_used = Counter(
            by_name[n].host for p in placed.values() if p.deployment == spec.name for n in p.nodes
        )
        for replica in range(spec.replicas):
            if (spec.name, replica) in placed:
                continue
            previous = tuple(current.get((spec.name, replica), _NO_NODES))
            chosen = _choose(spec, replica, by_name, free, in_group, hosts_used, previous)
            if chosen is None:
                pending.append(
                    Pending(
                        deployment=spec.name,
                        replica=replica,
                        reason=_reason(spec, by_name, free, in_group),
                    )
                )
                continue
            # Both copies of a moving replica claim it until the old one retires.
            leaving = tuple(
                n for n in previous if n in by_name and by_name[n].cordoned and n not in chosen
            )
            placed[(spec.name, replica)] = msgspec.structs.replace(
                _take(spec, replica, chosen, free, in_group), leaving=leaving
            )
            hosts_used.update(by_name[n].host for n in chosen)

    return Assignment(placed=tuple(placed[k] for k in sorted(placed)), pending=tuple(pending))


def _unique(nodes: Iterable[NodeView]) -> dict[str, NodeView]:
    by_name: dict[str, NodeView] = {}
    for node in nodes:
        if node.name in by_name:
            raise PlacementError(f"node {node.name!r} appears twice in the membership view")
        if node.gpus < 0:
            raise PlacementError(f"node {node.name!r}: negative GPU count {node.gpus}")
        by_name[node.name] = node
    return by_name


def _matches(spec: DeploymentSpec, node: NodeView) -> bool:
    return all(node.labels.get(k) == want for k, want in spec.selector.items())


def _fits(
    spec: DeploymentSpec,
    node: NodeView | None,
    free: Mapping[str, int],
    in_group: set[str],
    *,
    cordoned_ok: bool = False,
) -> bool:
    if node is None or not _matches(spec, node) or free[node.name] < spec.gpus_per_node:
        return False
    if node.cordoned and not cordoned_ok:
        return False
    return not (spec.nodes_per_replica > 1 and node.name in in_group)


def _give_back(
    spec: DeploymentSpec, nodes: tuple[str, ...], free: dict[str, int], in_group: set[str]
) -> None:
    for name in nodes:
        free[name] += spec.gpus_per_node
        if spec.nodes_per_replica > 1:
            in_group.discard(name)


def _take(
    spec: DeploymentSpec,
    replica: int,
    chosen: tuple[str, ...],
    free: dict[str, int],
    in_group: set[str],
) -> Placed:
    for name in chosen:
        free[name] -= spec.gpus_per_node
        if spec.nodes_per_replica > 1:
            in_group.add(name)
    return Placed(
        deployment=spec.name, replica=replica, nodes=chosen, gpus_per_node=spec.gpus_per_node
    )


def _choose(
    spec: DeploymentSpec,
    replica: int,
    by_name: Mapping[str, NodeView],
    free: dict[str, int],
    in_group: set[str],
    hosts_used: Counter[str],
    previous: tuple[str, ...],
) -> tuple[str, ...] | None:
    candidates = [n for n in by_name.values() if _fits(spec, n, free, in_group)]
    if len(candidates) < spec.nodes_per_replica:
        return None
    chosen: list[str] = []
    used = Counter(hosts_used)
    # Multi-node replicas are exclusive, so one node cannot be picked twice; single-node
    # replicas pick one node. Greedy: previous nodes first and in their old order (so a kept
    # rank 0 stays rank 0), then fewest of this deployment on the host, then the hash; nodes
    # that refuse the deployment only after every other.
    for _ in range(spec.nodes_per_replica):
        best = min(
            (n for n in candidates if n.name not in chosen),
            key=lambda n: (
                spec.name in n.refuses,
                previous.index(n.name) if n.name in previous else len(previous),
                used[n.host],
                -score(spec.name, replica, n.name),
                n.name,
            ),
        )
        chosen.append(best.name)
        used[best.host] += 1
    return tuple(chosen)


def _reason(
    spec: DeploymentSpec, by_name: Mapping[str, NodeView], free: dict[str, int], in_group: set[str]
) -> str:
    available = sum(1 for n in by_name.values() if _fits(spec, n, free, in_group))
    grouped = sum(1 for n in by_name.values() if _fits(spec, n, free, set())) - available
    n = spec.nodes_per_replica
    what = f"{n} node{'s' if n != 1 else ''}"
    if spec.gpus_per_node:
        g = spec.gpus_per_node
        what += f" with {g} free GPU{'s' if g != 1 else ''}"
    if spec.selector:
        labels = ", ".join(f"{k}={v}" for k, v in spec.selector.items())
        what += f" matching {{{labels}}}"
    held = f" ({grouped} more are in other multi-node replicas)" if grouped else ""
    return f"needs {what}; {available} available{held}"


def node_views(
    members: Iterable[Member], me: str, own_tags: Tags | None, verified: Callable[[str], bool]
) -> list[NodeView]:
    """The nodes placement may use: alive, health passing (or warning), verified unless it is
    this node (``me``, whose ``own_tags`` are current), with the count of its healthy GPUs."""
    views = []
    for member in members:
        tags = own_tags if member.name == me else member.tags
        if not member.alive or tags is None or tags.hl not in ("passing", "warning"):
            continue
        if member.name != me and not verified(member.name):
            continue
        # `gpu` counts the healthy GPUs; a node whose verdict is unknown or unhealthy
        # offers none (it may still run replicas that need no GPU).
        gpus = tags.gpu if tags.gh in ("healthy", "degraded") else 0
        views.append(NodeView(name=member.name, host=member.addr, gpus=gpus, cordoned=tags.cd))
    return views


def may_roll(replica: int, others: Mapping[int, tuple[str, bool]], new_spec: str) -> bool:
    """Whether ``replica`` may restart with the new spec now (pure): only once every other
    placed replica with a lower index runs the new spec and is ready, so a spec change takes
    down one replica at a time, and a new spec that never gets ready stops the roll at the
    first replica. ``others``: replica index -> (spec it announces, ready)."""
    return all(spec == new_spec and ready for j, (spec, ready) in others.items() if j < replica)
