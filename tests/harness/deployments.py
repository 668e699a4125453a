"""Deployments for tests: an in-process deployments component, and for namespace clusters the
stand-in server, a spec running it, and "every node sees the same ready endpoints"."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from gpud.context import Member, NodeContext
from gpud.deployments import authority
from gpud.deployments.peers import PeerLinks
from gpud.deployments.service import DeploymentService
from gpud.gpus.service import GpuService
from gpud.health.service import HealthService
from gpud.ports.service import PortsService
from gpud.state import StateStore
from tests.harness import fake_nvml
from tests.harness.config import config_for
from tests.harness.gpud_node import Cluster, GpudNode

# The `command` engine's stand-in server (run by gpud with the interpreter as argv[0]).
SERVER = str(Path(__file__).resolve().parent / "deploy_server.py")
# Apply to every replica ready on 2 busy cores.
READY_S = 90.0
# [gpus] of a namespace node on the fake NVML (its state file: fake_nvml.ENV).
FAKE_GPUS = {"nvml_module": "tests.harness.fake_nvml", "poll_interval_s": 0.5}


def spec_text(name: str, *, replicas: int = 2, argv0: str = sys.executable) -> str:
    """An unsigned `command` spec running SERVER, one GPU per replica."""
    command = [argv0, SERVER, "--port", "{port}", "--host", "{host_ip}", "--model", "{model}"]
    return (
        f'name = "{name}"\nengine = "command"\nmodel = "test-model"\nreplicas = {replicas}\n'
        f"gpus_per_node = 1\ncommand = {json.dumps(command)}\n"
    )


def operated_cluster(
    cluster: Any,
    tmp_path: Path,
    size: int,
    deployments: dict[str, Any],
    **sections: dict[str, Any],
) -> tuple[Cluster, Path]:
    """A converged, placeable namespace cluster (``cluster``: the fixture) of ``size`` nodes
    on the fake NVML, whose [deployments] trust a fresh operator key: the cluster and that
    key's file (``--key`` of `gpud deploy apply`). ``deployments``: the other [deployments]
    settings; ``sections``: other config sections. The caller writes the fake NVML state."""
    private, public = authority.keygen()
    key_file = tmp_path / "operator.key"
    key_file.write_text(private + "\n")
    c: Cluster = cluster(
        size,
        overrides={
            "gpus": FAKE_GPUS,
            "deployments": {"operators": [public], **deployments},
            **sections,
        },
    )
    c.wait_converged()
    c.wait_placeable()
    return c, key_file


def endpoints(node: GpudNode, name: str) -> list[dict[str, Any]]:
    return node.api(f"/v1/deployments/{name}/endpoints")["endpoints"]


def ready_everywhere(nodes: list[GpudNode], name: str, replicas: int) -> dict[str, Any]:
    """Every node lists ``replicas`` ready endpoints on distinct nodes, all the same."""
    seen = [sorted((e["node"], e["port"]) for e in endpoints(n, name)) for n in nodes]
    first = seen[0]
    ok = len(first) == replicas and len({e[0] for e in first}) == replicas
    return ok and all(s == first for s in seen) and {"endpoints": first}


def deployment_service(
    tmp_path: Path, store: StateStore, **deployments: object
) -> DeploymentService:
    """An in-process deployments component of node "n1", alone and alive, with fake GPUs;
    ``deployments`` are its [deployments] settings."""
    cfg = config_for("n1", tmp_path / "state", {"deployments": deployments})
    ctx = NodeContext(cfg, "127.0.0.1")
    ctx.members = {"n1": Member(name="n1", addr="127.0.0.1", port=7946, status="alive")}
    health = HealthService(ctx)
    return DeploymentService(
        ctx,
        ports=PortsService(ctx),
        gpus=GpuService(ctx, fake_nvml, store=store),
        peers=PeerLinks(health.client, health.server.add_route, health.prober.verified),
        store=store,
    )
