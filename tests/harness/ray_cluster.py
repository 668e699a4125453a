"""Ray across namespace hosts (real gpud agents): Ray config overrides, a started cluster, who
each node sees as head, waiting for one steady Ray cluster, sampling which nodes act as head,
and killing a whole host."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import msgspec

from gpud.process_groups import process_start
from tests.harness.gpud_node import Cluster, GpudNode
from tests.harness.netns import cleanup_leftovers
from tests.harness.wait import wait_for

RAY_EXECUTABLE = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "ray")

# Bounds for one wait on 2 busy cores: a Ray node takes ~10-20 s to start there; a raylet
# gives up on an unreachable GCS after ~60 s.
STEADY_S = 180.0
FAILOVER_S = 120.0
# How often a Sampler asks every node whether it acts as head.
SAMPLE_S = 0.5


def ray_overrides(temp_root: str, *, vote_timeout_s: float = 1.0) -> dict[str, object]:
    """Cluster config overrides that turn Ray on, small: one CPU, no dashboard (gpud's
    default), a short vote (a namespace LAN answers in milliseconds)."""
    return {
        "ray": {
            "enabled": True,
            "executable": RAY_EXECUTABLE,
            "num_cpus": 1,
            "temp_root": temp_root,
            "vote_timeout_s": vote_timeout_s,
        }
    }


@contextlib.contextmanager
def running_ray_cluster(hosts: int, prefix: str) -> Iterator[Cluster]:
    """A started cluster of ``hosts`` gpud nodes with Ray (for a module-scoped fixture); it and
    its Ray temp root (short ``prefix``: Ray's socket paths live under it) go away after."""
    temp_root = tempfile.mkdtemp(prefix=prefix)
    cluster = Cluster(hosts, overrides=ray_overrides(temp_root))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(temp_root, ignore_errors=True)
        cleanup_leftovers()


class HeadView(msgspec.Struct, frozen=True):
    """Which members some node's gossip view shows as Ray head: (name, term, gcs port)."""

    observer: str
    heads: tuple[tuple[str, int, int], ...]


def head_views(nodes: Sequence[GpudNode]) -> list[HeadView]:
    """Each running node's view of the heads (from the decoded tags of alive members)."""
    views = []
    for node in nodes:
        if not node.running():
            continue
        heads = tuple(
            sorted(
                (m["name"], m["tags"]["term"], m["tags"]["gcs"])
                for m in node.members()
                if m["status"] == "alive" and m["tags"] and m["tags"]["ray"] == "head"
            )
        )
        views.append(HeadView(node.name, heads))
    return views


def agreed_head(nodes: Sequence[GpudNode]) -> tuple[str, int, int] | None:
    """The one head every given running node sees, with its GCS announced; else None."""
    views = head_views(nodes)
    if not views or any(len(v.heads) != 1 for v in views):
        return None
    first = views[0].heads[0]
    if any(v.heads[0] != first for v in views) or first[2] == 0:
        return None
    return first


def ray_node_names(node: GpudNode) -> set[str] | None:
    """The Ray nodes that ``node``'s /v1/ray last saw alive in GCS (None: not asked yet)."""
    seen = node.api("/v1/ray")["ray_nodes"]["nodes"]
    return None if seen is None else {n["name"] for n in seen}


def describe(nodes: Sequence[GpudNode]) -> Callable[[], str]:
    """For a wait's timeout message: the head views, and each running node's Ray summary and
    problems (code, subject)."""

    def text() -> str:
        lines = [str(head_views(nodes))]
        for node in nodes:
            if not node.running():
                continue
            try:
                status = node.api("/v1/status")
                codes = [(p["code"], p["subject"]) for p in status["problems"]]
                lines.append(f"{node.name}: {status['ray']['summary']} {codes}")
            except Exception as exc:
                lines.append(f"{node.name}: <{exc}>")
        return "\n".join(lines)

    return text


def steady_head(nodes: Sequence[GpudNode]) -> tuple[str, int, int] | None:
    """The head all ``nodes`` agree on once its GCS shows every one of them alive, else None."""
    names = {n.name for n in nodes}
    head = agreed_head(nodes)
    if head is None:
        return None
    by_name = {n.name: n for n in nodes}
    return head if ray_node_names(by_name[head[0]]) == names else None


def one_ray_cluster(nodes: Sequence[GpudNode], timeout: float) -> tuple[str, int, int]:
    """Wait until ``nodes`` form one Ray cluster (see steady_head); its head."""
    return wait_for(
        lambda: steady_head(nodes),
        timeout,
        1.0,
        what=f"one Ray cluster of {sorted(n.name for n in nodes)}",
        describe=describe(nodes),
    )


def acting_head(node: GpudNode) -> bool:
    """Whether ``node`` announces itself head or runs a Ray head process."""
    try:
        ray = node.api("/v1/ray", timeout=2.0)
    except Exception:
        return False  # a node that cannot answer its own API is not announcing anything
    target = ray["process"]["target"]
    running_head = (
        target is not None
        and target["role"] == "head"
        and ray["process"]["process"]["pid"] is not None
    )
    return ray["role"] == "head" or running_head


class Sampler(threading.Thread):
    """Which nodes act as head, every SAMPLE_S, until stopped."""

    def __init__(self, nodes: list[GpudNode]) -> None:
        super().__init__(daemon=True)
        self.nodes = nodes
        self.samples: list[tuple[float, list[str]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        began = time.monotonic()
        while not self.done.is_set():
            heads = [n.name for n in self.nodes if acting_head(n)]
            self.samples.append((round(time.monotonic() - began, 1), heads))
            self.done.wait(SAMPLE_S)


def _live_pids_in(netns: str) -> list[int]:
    listed = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10
    )
    live = []
    for pid in (int(p) for p in listed.stdout.split() if p.isdigit()):
        if process_start(pid) is not None:  # running, not a zombie
            live.append(pid)
    return live


def kill_host(node: GpudNode) -> list[int]:
    """kill -9 everything on the node's host: GpudNode.kill9 (gpud and the process groups of
    all its descendants: serf, Ray), then whatever still lives in the namespace (the harness
    made it, so all of it is ours). Returns the pids that kill9 alone left alive."""
    node.kill9()
    leftovers = _live_pids_in(node.host.netns)
    for _ in range(20):  # SIGKILLed processes may take a moment to exit
        if not leftovers:
            break
        time.sleep(0.1)
        leftovers = _live_pids_in(node.host.netns)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftovers
