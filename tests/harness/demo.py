"""Bring up a small gpud cluster in network namespaces and show what each node sees.

    sudo .venv/bin/python -m tests.harness.demo [--hosts 3] [--keep]

Each host is a network namespace on a private bridge (10.77.x.0/24, connected to nothing
else) running a real gpud with its real serf child. The demo waits until every node sees all
members alive, prints `gpud status` from each host, and tears everything down. With --keep it
leaves the cluster running until Ctrl-C and prints how to get into the namespaces.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from types import FrameType

from tests.harness.gpud_node import Cluster, GpudNode, HarnessError, wait_for
from tests.harness.netns import cleanup_leftovers
from tests.ray_helpers import ray_overrides


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
    overrides = ray_overrides(tempfile.mkdtemp(prefix="gpud-demo-ray-")) if args.ray else {}
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
        for node in cluster.nodes:
            print(f"===== {node.name}  netns {node.host.netns}  addr {node.addr} =====")
            print(node.status_text().rstrip() + "\n", flush=True)
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
