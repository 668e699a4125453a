"""Inputs and invariants for the placement tests: specs and node views in one line each, and
the properties every assignment must hold."""

from __future__ import annotations

from collections import Counter

from gpud.deployments.placement import Assignment, NodeView
from gpud.deployments.spec import DeploymentSpec, load_spec


def spec(name: str, r: int, n: int = 1, g: int = 1, selector: str = "") -> DeploymentSpec:
    """A `command` deployment of ``r`` replicas, each on ``n`` nodes with ``g`` GPUs."""
    text = (
        f'name = "{name}"\nengine = "command"\nreplicas = {r}\nnodes_per_replica = {n}\n'
        f'gpus_per_node = {g}\ncommand = ["/bin/srv", "--port", "{{port}}"]\n'
    )
    if selector:
        text += f"selector = {selector}\n"
    return load_spec(text.encode())


def node(name: str, gpus: int = 2, host: str = "", **labels: str) -> NodeView:
    return NodeView(name=name, host=host or f"h-{name}", gpus=gpus, labels=labels)


def check_invariants(specs: list[DeploymentSpec], nodes: list[NodeView], a: Assignment) -> None:
    """What every assignment must hold, whatever the inputs."""
    by_name = {n.name: n for n in nodes}
    by_spec = {s.name: s for s in specs}
    used: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    keys = set()
    for p in a.placed:
        s = by_spec[p.deployment]
        assert 0 <= p.replica < s.replicas
        assert len(p.nodes) == s.nodes_per_replica, "a replica has exactly N nodes"
        assert len(set(p.nodes)) == len(p.nodes), "N distinct nodes per replica"
        for n in p.nodes:
            assert n in by_name, "only eligible nodes"
            assert all(by_name[n].labels.get(k) == v for k, v in s.selector.items())
            used[n] += s.gpus_per_node
            if s.nodes_per_replica > 1:
                groups[n] += 1
        keys.add(p.key)
    for n, count in used.items():
        assert count <= by_name[n].gpus, f"{n}: {count} GPUs assigned, {by_name[n].gpus} free"
    assert all(c == 1 for c in groups.values()), "a node is in at most one multi-node replica"
    pending = {(p.deployment, p.replica) for p in a.pending}
    assert not keys & pending
    wanted = {(s.name, i) for s in specs for i in range(s.replicas)}
    assert keys | pending == wanted, "every replica is placed or pending, nothing else"
