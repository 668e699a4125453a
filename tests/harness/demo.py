"""Bring up a small gpud cluster in network namespaces, serve a model replica, and show what
each node sees.

    sudo .venv/bin/python -m tests.harness.demo [--hosts 3] [--ray] [--keep]

Each host is a network namespace on a private bridge (10.77.x.0/24, connected to nothing
else) running a real gpud with its real serf child, and two GPUs from the test suite's fake NVML
(this machine has none). The demo waits until every node sees all members alive, applies a
deployment signed with a fresh operator key (the `command` engine running the test suite's small
OpenAI-style server on one leased GPU and a leased port), waits until its replicas are ready,
prints `gpud status` and `gpud deploy status` from each host, sends `/v1/models` and a
completion through the router (`[router]`, on for every host here) of a host that runs no
replica (or, with every host running one, another host than the first replica's), and tears
everything down. With --keep it leaves the cluster running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from gpud.deployments import authority
from tests.harness import fake_nvml
from tests.harness.deployments import SERVER
from tests.harness.gpud_node import Cluster, GpudNode, HarnessError, wait_for
from tests.harness.netns import cleanup_leftovers
from tests.harness.ray_cluster import ray_overrides

DEPLOYMENT = "demo-model"
MODEL = "demo/tiny"
ROUTER_PORT = 7950


def _settled(node: GpudNode) -> bool:
    status = node.api("/v1/status")
    return status["ports"]["state"] == "confirmed" and status["health"]["state"] != "unknown"


def _ray_joined(nodes: list[GpudNode]) -> bool:
    rays = [node.api("/v1/ray") for node in nodes]
    heads = [ray for ray in rays if ray["role"] == "head"]
    if len(heads) != 1 or any(ray["role"] != "worker" for ray in rays if ray not in heads):
        return False
    seen = heads[0]["ray_nodes"]["nodes"] or []
    return len(seen) == len(nodes)


def _spec(replicas: int) -> str:
    command = [
        sys.executable,
        SERVER,
        "--port",
        "{port}",
        "--host",
        "{host_ip}",
        "--model",
        "{model}",
    ]
    return (
        f'name = "{DEPLOYMENT}"\nengine = "command"\nmodel = "{MODEL}"\n'
        f'replicas = {replicas}\ngpus_per_node = 1\nhealth_path = "/health"\n'
        f"command = {json.dumps(command)}\n"
    )


def _ready_endpoints(nodes: list[GpudNode], replicas: int) -> list[dict[str, object]] | None:
    """The ready endpoints, once every node lists the same ``replicas`` of them."""
    seen = [n.api(f"/v1/deployments/{DEPLOYMENT}/endpoints")["endpoints"] for n in nodes]
    keys = [sorted((e["node"], e["port"]) for e in endpoints) for endpoints in seen]
    if len(keys[0]) != replicas or any(k != keys[0] for k in keys):
        return None
    return seen[0]


def _router_request(node: GpudNode, url: str, body: dict[str, object] | None = None) -> object:
    """One request from inside ``node``'s namespace (a client there), its JSON reply."""
    data = json.dumps(body).encode() if body is not None else None
    code = (
        "import urllib.request;"
        f"r=urllib.request.Request({url!r},data={data!r},headers={{'Content-Type':'application/json'}});"
        "print(urllib.request.urlopen(r,timeout=10).read().decode())"
    )
    return json.loads(node.host.run([sys.executable, "-c", code]).stdout)


def _router_models(node: GpudNode, base: str) -> list[str] | None:
    models = [m["id"] for m in _router_request(node, f"{base}/models")["data"]]
    return models if MODEL in models else None


def _router_completion(node: GpudNode, base: str) -> dict[str, object]:
    return _router_request(node, f"{base}/completions", {"model": MODEL, "prompt": "hello"})


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.harness.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the cluster up until Ctrl-C")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for convergence"
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="also run Ray (the .venv's `ray`): elect a head and join every host to it",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.hosts <= 50:
        parser.error("--hosts must be 1..50")
    # SIGTERM tears down like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    cleanup_leftovers()
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="gpud-demo-"))
    overrides = ray_overrides(str(scratch / "ray")) if args.ray else {}
    # Two fake GPUs per host (every gpud reads the same fake NVML state file).
    nvml = scratch / "nvml.json"
    fake_nvml.write_state(nvml, fake_nvml.node(2))
    os.environ[fake_nvml.ENV] = str(nvml)
    private, public = authority.keygen()
    key_file = scratch / "operator.key"
    key_file.write_text(private + "\n")
    key_file.chmod(0o600)
    overrides |= {
        "gpus": {"nvml_module": "tests.harness.fake_nvml", "poll_interval_s": 1.0},
        "deployments": {"operators": [public], "command_allow": [sys.executable]},
        "router": {"enabled": True, "port": ROUTER_PORT},
    }
    replicas = min(2, args.hosts)
    cluster = Cluster(args.hosts, keep_workdir=args.keep, overrides=overrides)
    try:
        print(f"starting {args.hosts} gpud nodes in network namespaces ...", flush=True)
        cluster.start()
        print(
            f"subnet {cluster.network.subnet}, nodes up in {time.monotonic() - started:.1f}s",
            flush=True,
        )
        cluster.wait_converged(timeout=args.timeout)
        print(
            f"converged: every node sees {args.hosts} alive members after {time.monotonic() - started:.1f}s\n"
        )
        # Let block claims confirm and the first health verdicts come in (bounded).
        wait_for(
            lambda: all(_settled(node) for node in cluster.nodes),
            args.timeout,
            0.5,
            what="block claims confirmed and health verdicts on every node",
        )
        if args.ray:
            print("electing a Ray head and starting Ray on every host ...", flush=True)
            wait_for(
                lambda: _ray_joined(cluster.nodes),
                args.timeout + 120,
                1.0,
                what="one Ray head whose GCS lists every host",
            )
        cluster.wait_placeable(timeout=args.timeout)
        print(f"deploying {DEPLOYMENT}: {replicas} replica(s) of 1 node with 1 GPU ...", flush=True)
        spec = scratch / f"{DEPLOYMENT}.toml"
        spec.write_text(_spec(replicas))
        cluster.nodes[0].cli("deploy", "apply", str(spec), "--key", str(key_file))
        endpoints = wait_for(
            lambda: _ready_endpoints(cluster.nodes, replicas),
            args.timeout + 60,
            1.0,
            what=f"{replicas} ready replica(s) of {DEPLOYMENT} listed by every node",
        )
        for node in cluster.nodes:
            print(f"===== {node.name}  netns {node.host.netns}  addr {node.addr} =====")
            print(node.status_text().rstrip() + "\n", flush=True)
            print(node.cli("deploy", "status", DEPLOYMENT).stdout.rstrip() + "\n", flush=True)
        # Through the router of a host that runs no replica (the first replica's, not, if every
        # host runs one): the router finds a ready replica anywhere in the cluster.
        runners = {e["node"] for e in endpoints}
        asker = next(
            (n for n in cluster.nodes if n.name not in runners),
            next((n for n in cluster.nodes if n.name != endpoints[0]["node"]), cluster.nodes[0]),
        )
        base = f"http://{asker.addr}:{ROUTER_PORT}/v1"
        models = wait_for(
            lambda: _router_models(asker, base),
            args.timeout,
            0.5,
            what=f"the router of {asker.name} listing {MODEL}",
        )
        print(f"router of {asker.name}: GET {base}/models -> models {models}", flush=True)
        served = _router_completion(asker, base)
        print(
            f"router of {asker.name}: POST {base}/completions -> {served['choices'][0]['text']!r} "
            f"from replica {served['system_fingerprint']}",
            flush=True,
        )
        if args.keep:
            print("The cluster keeps running. Get in with, for example:")
            for node in cluster.nodes:
                print(
                    f"  ip netns exec {node.host.netns} {sys.executable} -m gpud status --socket {node.socket}"
                )
            print(f"  ip netns exec {cluster.hosts[0].netns} bash")
            print(f"Configs and logs: {cluster.workdir}/<host>/ (gpud.toml, gpud.log)")
            print("Press Ctrl-C to tear it down.", flush=True)
            while True:
                signal.pause()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    except HarnessError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("tearing down ...", file=sys.stderr, flush=True)
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
