"""Prometheus exposition: families through prometheus-client (values, escaping, naming), and a
real agent serving the same families on the socket and on TCP (`[metrics] listen`)."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from gpud import client, metrics
from gpud.client import exchange
from gpud.component import Metric, gauge
from gpud.gpus.signals import GPU_METRICS, GpuReadings
from tests.harness.agent import solo_config
from tests.harness.config import to_toml
from tests.harness.netns import children_of
from tests.harness.serf import free_ports
from tests.harness.wait import wait_for

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def scrape(families: list[Metric], accept: str | None = None) -> dict[str, dict]:
    """family name -> {"type", "help", "samples": {(sample name, labels): value}}, parsed back
    by prometheus-client's own parser for the format the Accept header chose."""
    body, content_type = metrics.exposition(metrics.registry(lambda: families), accept)
    parse = parse_om if content_type.startswith("application/openmetrics") else parse_text
    out: dict[str, dict] = {}
    for family in parse(body.decode()):
        out[family.name] = {
            "type": family.type,
            "help": family.documentation,
            "samples": {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples},
        }
    return out


def test_families_keep_help_type_and_samples_in_both_formats() -> None:
    families = [
        gauge("gpud_up", "1 while the agent runs.", 1),
        Metric(
            name="gpud_members",
            help="Cluster members by Serf status.",
            samples=[({"status": "alive"}, 2), ({"status": "failed"}, 1)],
        ),
        Metric(name="gpud_ray_restarts_total", help="Restarts.", samples=[({}, 3)], kind="counter"),
    ]
    for accept in (None, OPENMETRICS):
        parsed = scrape(families, accept)
        assert parsed["gpud_up"]["samples"] == {("gpud_up", ()): 1}
        assert parsed["gpud_members"]["samples"] == {
            ("gpud_members", (("status", "alive"),)): 2,
            ("gpud_members", (("status", "failed"),)): 1,
        }
        # A counter is its name less _total in both formats; the sample keeps _total.
        assert parsed["gpud_ray_restarts"]["type"] == "counter"
        assert parsed["gpud_ray_restarts"]["samples"] == {("gpud_ray_restarts_total", ()): 3}
        # gpud's process metrics come along (memory, CPU, open files of the agent itself).
        assert "process_resident_memory_bytes" in parsed or "process_cpu_seconds" in parsed


def test_the_old_g_formatting_loss_is_gone() -> None:
    """`{value:g}` turned 1234567 into 1.23457e+06: what is scraped now is what was meant."""
    for value in (1234567, 2**24 + 1, 2**31 + 7, 2**53 - 1, 0.1, 1e-9):
        family = gauge("gpud_x", "x", value)
        for accept in (None, OPENMETRICS):
            assert scrape([family], accept)["gpud_x"]["samples"][("gpud_x", ())] == value


@given(
    value=st.one_of(
        st.integers(min_value=-(2**53), max_value=2**53),
        st.floats(allow_nan=False, allow_infinity=True),
    ),
    label=st.text(),
    # The text parser trims the HELP line (gpud's help texts are fixed sentences).
    help_text=st.text().filter(lambda t: t == t.strip() and "\r" not in t),
)
def test_values_labels_and_help_round_trip_exactly(
    value: float, label: str, help_text: str
) -> None:
    family = Metric(name="gpud_x", help=help_text, samples=[({"peer": label}, value)])
    parsed = scrape([family])["gpud_x"]
    assert parsed["help"] == help_text
    ((_, labels), got), *rest = parsed["samples"].items()
    assert not rest and labels == (("peer", label),)
    assert got == value and (not isinstance(value, int) or got == int(value))


def test_a_counter_is_named_total_and_nothing_else_is() -> None:
    with pytest.raises(ValueError, match="_total"):
        Metric(name="gpud_restarts", help="h", samples=[], kind="counter")
    with pytest.raises(ValueError, match="_total"):
        Metric(name="gpud_restarts_total", help="h", samples=[])


def test_gpu_table_names_are_gpuds_own_with_base_units_and_real_readings() -> None:
    names = [m.name for m in GPU_METRICS]
    assert len(set(names)) == len(names)
    fields = set(GpuReadings.__struct_fields__)
    for m in GPU_METRICS:
        assert m.name.startswith("gpud_gpu_") and m.reading in fields
        Metric(name=m.name, help=m.help, samples=[], kind=m.kind)  # the naming rule holds
    kinds = {m.name: m.kind for m in GPU_METRICS}
    # Error counts are counters (dcgm-exporter's types: a rate() over them must work).
    for name in (
        "gpud_gpu_ecc_uncorrected_volatile_total",
        "gpud_gpu_ecc_uncorrected_aggregate_total",
        "gpud_gpu_retired_pages_sbe_total",
        "gpud_gpu_retired_pages_dbe_total",
        "gpud_gpu_pcie_replays_total",
        "gpud_gpu_nvlink_errors_total",
    ):
        assert kinds[name] == "counter"


# ---- a real agent ----------------------------------------------------------------------


class Agent:
    """`gpud agent` on loopback with the metrics listener on a free port."""

    def __init__(self, tmp: Path, metrics_port: int | None = None) -> None:
        serf_port, rpc_port, peer_port, free = free_ports(4)
        self.metrics_port = metrics_port or free
        self.socket = str(tmp / "run" / "gpud.sock")
        cfg = tmp / "gpud.toml"
        metrics = {"listen": f"127.0.0.1:{self.metrics_port}"}
        cfg.write_text(to_toml(solo_config(tmp, (serf_port, rpc_port, peer_port), metrics=metrics)))
        self.log = open(tmp / "agent.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpud", "agent", "--config", str(cfg)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def status(self) -> dict:
        return client.request(self.socket, "GET", "/v1/status", None, timeout=5)

    def ready(self) -> bool:
        assert self.proc.poll() is None, Path(self.log.name).read_text()[-3000:]
        try:
            return self.status()["gpus"]["polled_at"] is not None
        except OSError:
            return False

    def socket_metrics(self) -> str:
        response = exchange(self.socket, "GET", "/metrics", timeout=10)
        assert response.status == 200
        return response.body.decode()

    def tcp_metrics(self, accept: str | None = None) -> tuple[str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
            response = conn.getresponse()
            assert response.status == 200
            return response.read().decode(), response.getheader("Content-Type", "")
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            # A graceful stop leaves serf running for the next gpud: stopped here too.
            children = {os.getpgid(pid) for pid in children_of(self.proc.pid)}
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            for group in children - {self.proc.pid}:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
        self.log.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    running = Agent(tmp_path)
    try:
        wait_for(running.ready, 40, 0.2, what="agent polled")
        yield running
    finally:
        running.stop()


def _families(text: str) -> dict[str, object]:
    return {f.name: f for f in parse_text(text)}


def test_agent_serves_the_same_families_on_the_socket_and_tcp(agent: Agent) -> None:
    wait_for(
        lambda: agent.status()["metrics"]["state"] == "serving", 20, 0.2, what="metrics serving"
    )
    on_socket = _families(agent.socket_metrics())
    text, content_type = agent.tcp_metrics()
    on_tcp = _families(text)
    assert content_type.startswith("text/plain")
    assert set(on_socket) == set(on_tcp)
    om_text, om_type = agent.tcp_metrics(OPENMETRICS)
    assert om_type.startswith("application/openmetrics-text")
    assert {f.name for f in parse_om(om_text)} == set(on_tcp)

    names = set(on_tcp)
    assert {"gpud_up", "gpud_build_info", "gpud_members", "gpud_problems", "gpud_gpus"} <= names
    from gpud import __version__

    [build] = on_tcp["gpud_build_info"].samples  # type: ignore[attr-defined]
    assert build.labels == {"version": __version__} and build.value == 1
    assert not any(n.startswith("DCGM_") or "millisecond" in n for n in names)
    for family in on_tcp.values():
        if family.type == "counter":  # type: ignore[attr-defined]
            assert all(s.name.endswith("_total") for s in family.samples)  # type: ignore[attr-defined]

    # One gpud_problem series per current problem, labelled like `gpud status` lists it
    # (compared until both reads see the same moment: problems come and go while it starts).
    def same() -> bool:
        problems = {(p["code"], p["severity"], p["subject"]) for p in agent.status()["problems"]}
        scraped = _families(agent.socket_metrics())
        series = {
            (s.labels["code"], s.labels["severity"], s.labels["subject"])
            for s in scraped["gpud_problem"].samples  # type: ignore[attr-defined]
        }
        total = sum(s.value for s in scraped["gpud_problems"].samples)  # type: ignore[attr-defined]
        return series == problems and total == len(problems)

    wait_for(same, 20, 0.5, what="gpud_problem series = the problems in /v1/status")


def test_a_taken_metrics_port_is_a_problem_not_a_dead_agent(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        running = Agent(tmp_path, metrics_port=squatter.getsockname()[1])
        try:
            wait_for(running.ready, 40, 0.2, what="agent polled")
            status = running.status()
            assert status["metrics"]["state"].startswith("not listening")
            [problem] = [p for p in status["problems"] if p["code"] == "metrics.listen_failed"]
            assert problem["severity"] == "warning"
            assert f"127.0.0.1:{running.metrics_port}" in problem["message"]
            assert "metrics" in problem["fix"] and "listen" in problem["fix"]
            assert "gpud_up 1.0" in running.socket_metrics().splitlines()
        finally:
            running.stop()


def test_every_name_the_mixin_queries_is_one_gpud_exports(tmp_path: Path) -> None:
    """The shipped rules and dashboard name only families gpud makes (a rename must carry
    into them), and every dashboard query parses as PromQL (promtool, as recording rules)."""
    import json
    import re
    import shutil

    root = Path(__file__).resolve().parents[2]
    source = "\n".join(p.read_text() for p in (root / "gpud").rglob("*.py"))
    made = set(re.findall(r'"(gpud_[a-z0-9_]+)"', source)) | {m.name for m in GPU_METRICS}
    rules = (root / "packaging/monitoring/gpud-rules.yml").read_text()
    dashboard = json.loads((root / "packaging/monitoring/gpud-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set(re.findall(r"\b(gpud_[a-z0-9_]+)", rules + "\n".join(exprs)))
    assert used and used <= made, used - made
    if shutil.which("promtool") is None:
        pytest.skip("needs promtool (scripts/setup.sh installs prometheus)")
    as_rules = tmp_path / "dashboard-rules.yml"
    records = [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(exprs)]
    as_rules.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": records}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(as_rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
