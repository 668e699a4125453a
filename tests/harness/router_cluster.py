"""A routed namespace cluster for the router and drain tests: 3 hosts with 2 fake GPUs each,
the router on every host, R=2 of the stand-in server ready behind every router; and load
through a host's router with the real `openai` client (tests/harness/router_load.py)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.harness import fake_nvml
from tests.harness.deployments import READY_S, SERVER, operated_cluster, ready_everywhere
from tests.harness.gpud_node import Cluster, GpudNode
from tests.harness.wait import wait_for

# Load through one router with the real `openai` client, run inside a harness host.
LOADER = str(Path(__file__).resolve().parent / "router_load.py")
REPO = Path(__file__).resolve().parents[2]
MODEL = "routed-model"
ROUTER_PORT = 7950
# Each completion takes this long in the stand-in, so a kill always finds requests in flight.
DELAY_S = 0.05


def spec_text(name: str, replicas: int = 2, gpus: int = 1) -> str:
    """A `command` spec of MODEL running the stand-in server with DELAY_S per completion."""
    command = [
        sys.executable,
        SERVER,
        "--port",
        "{port}",
        "--host",
        "{host_ip}",
        "--model",
        "{model}",
        "--delay-s",
        str(DELAY_S),
    ]
    return (
        f'name = "{name}"\nengine = "command"\nmodel = "{MODEL}"\nreplicas = {replicas}\n'
        f'gpus_per_node = {gpus}\nhealth_path = "/health"\ncommand = {json.dumps(command)}\n'
    )


def start_load(
    node: GpudNode,
    seconds: float,
    *,
    workers: int = 4,
    session: str = "",
    stop_file: Path | None = None,
) -> subprocess.Popen[str]:
    """The loader in ``node``'s namespace, against that host's router."""
    argv = [sys.executable, LOADER, "--base", f"http://{node.addr}:{ROUTER_PORT}/v1"]
    argv += ["--model", MODEL, "--seconds", str(seconds), "--workers", str(workers)]
    argv += ["--session", session]
    if stop_file is not None:
        argv += ["--stop-file", str(stop_file)]
    return node.host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def results(proc: subprocess.Popen[str], seconds: float, first: str = "") -> list[dict[str, Any]]:
    """The loader's records (``first``: a line already read from it)."""
    out, err = proc.communicate(timeout=seconds + 30)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in (first + out).splitlines()]


@contextlib.contextmanager
def background_load(
    host: Any, bases: Mapping[str, str], work: Path, model: str, workers: int = 2
) -> Iterator[dict[str, Path]]:
    """The loader in ``host``'s namespace (a harness `Host`), one per named base URL, until the
    block ends (at most 600 s); yields each name's file of records (`records`)."""
    stop_file = work / "stop-load"
    stop_file.unlink(missing_ok=True)
    files = {name: work / f"load-{name}.jsonl" for name in bases}
    loads: list[subprocess.Popen[bytes]] = []
    try:
        for name, base in bases.items():
            argv = [sys.executable, LOADER, "--base", base, "--model", model, "--seconds", "600",
                    "--workers", str(workers), "--stop-file", str(stop_file)]  # fmt: skip
            with files[name].open("w") as sink:
                loads.append(host.popen(argv, stdout=sink, cwd=REPO))
        yield files
    finally:
        stop_file.touch()
        for proc in loads:
            try:
                proc.wait(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()


def records(path: Path) -> list[dict[str, Any]]:
    """The loader's records written to ``path``."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load(nodes: list[GpudNode], seconds: float, **kwargs: Any) -> list[dict[str, Any]]:
    """``seconds`` of load through every one of ``nodes``' routers; all their records."""
    procs = [start_load(n, seconds, **kwargs) for n in nodes]
    return [r for p in procs for r in results(p, seconds)]


def routers_ready(nodes: list[GpudNode], upstreams: int) -> bool:
    return all(
        (s := n.api("/v1/status")["router"])["state"] == "serving"
        and s["upstreams"] == upstreams
        and MODEL in s["models"]
        for n in nodes
    )


def routed_cluster(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Cluster, dict[str, Any], Path]:
    """3 hosts with the router on, R=2 ready and every router with both replicas: the
    cluster, the ready endpoints, the operator's key file."""
    nvml = tmp_path / "nvml.json"
    fake_nvml.write_state(nvml, fake_nvml.node(2))
    monkeypatch.setenv(fake_nvml.ENV, str(nvml))
    c, key_file = operated_cluster(
        cluster,
        tmp_path,
        3,
        {"command_allow": [sys.executable]},
        router={"enabled": True, "port": ROUTER_PORT},
    )
    spec = tmp_path / "routed.toml"
    spec.write_text(spec_text("routed"))
    c.nodes[0].cli("deploy", "apply", str(spec), "--key", str(key_file))
    found = wait_for(
        lambda: ready_everywhere(c.nodes, "routed", 2), READY_S, 0.5, what="2 ready replicas"
    )
    wait_for(lambda: routers_ready(c.nodes, 2), 30, 0.5, what="every router with 2 upstreams")
    return c, found, key_file
