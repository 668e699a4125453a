"""The shipped monitoring mixin against a real Prometheus scraping three real gpuds.

Three gpud + serf hosts with Ray (h0 the only node that may lead, so a blocked GCS does not move
the head), two fake GPUs each and one deployment run in the namespace harness; Debian's
`prometheus` runs on a fourth host of the same bridge, scrapes every node's `[metrics] listen`
over TCP each second and evaluates a copy of packaging/monitoring/gpud-rules.yml whose only
change is shorter ``for:`` (checked line by line).

- A peer pair partitioned (gossip through the third node keeps both alive): GpudPeerUnreachable
  fires for both sides within its ``for`` plus two scrapes of gpud reporting it; meanwhile
  every shipped rule evaluates without error and every dashboard query has data; it clears
  after the heal.
- The Ray head's GCS port blocked: GpudRayGcsUnreachable fires for both workers, same bound.
- A peer isolated (serf declares it failed): GpudPeerUnreachable fires on every side.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gpud.client import exchange
from gpud.deployments import authority
from tests.harness import fake_nvml, faults
from tests.harness.deployments import spec_text
from tests.harness.gpud_node import Cluster, GpudNode, wait_for
from tests.harness.netns import cleanup_leftovers
from tests.harness.prometheus import (
    PROMETHEUS,
    PROMTOOL,
    Prometheus,
    monitor_host,
    promtool,
    shortened_rules,
)
from tests.harness.ray_cluster import RAY_EXECUTABLE, agreed_head, ray_node_names, ray_overrides

pytestmark = [
    pytest.mark.skipif(
        not (Path(PROMETHEUS).exists() and Path(PROMTOOL).exists()),
        reason="no prometheus/promtool (Debian package prometheus; scripts/setup.sh installs it)",
    ),
    pytest.mark.timeout(180),
]
# The tests that share the monitored cluster.
IN_CLUSTER = (
    pytest.mark.netns,
    pytest.mark.ray,
    pytest.mark.skipif(not Path(RAY_EXECUTABLE).exists(), reason=f"no {RAY_EXECUTABLE}"),
)


def in_cluster(test: Callable[..., None]) -> Callable[..., None]:
    for mark in IN_CLUSTER:
        test = mark(test)
    return test


MONITORING = Path(__file__).resolve().parents[2] / "packaging" / "monitoring"
RULES = MONITORING / "gpud-rules.yml"
DASHBOARD = MONITORING / "gpud-dashboard.json"
METRICS_PORT = 7949
SCRAPE_S = 1
FOR_S = 3
# Within `for` plus two scrapes of gpud first reporting the fault (the bound).
FIRE_BOUND_S = FOR_S + 2 * SCRAPE_S
# Resolved at the first evaluation after a scrape of gpud reporting it passing again.
CLEAR_BOUND_S = 2 * SCRAPE_S + SCRAPE_S
STEADY_S = 100.0
DIAGNOSE_S = 30.0
PREFER = {"ray": {"head": "prefer"}}
NEVER = {"ray": {"head": "never"}}


class Monitored(msgspec.Struct):
    cluster: Cluster
    prometheus: Prometheus
    deployment: str


def instance(node: GpudNode) -> str:
    return f"{node.addr}:{METRICS_PORT}"


def gpud_samples(node: GpudNode, name: str) -> list[tuple[dict[str, str], float]]:
    """``name``'s samples as gpud serves them right now (its socket's /metrics)."""
    text = exchange(node.socket, "GET", "/metrics", timeout=5.0).body.decode()
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def describe(m: Monitored) -> str:
    lines = []
    for node in m.cluster:
        try:
            status = node.api("/v1/status")
            codes = [p["code"] for p in status["problems"]]
            lines.append(f"{node.name}: ray {status['ray']['summary']!r}, problems {codes}")
        except Exception as exc:
            lines.append(f"{node.name}: <{exc}>")
    with contextlib.suppress(Exception):
        lines.append(f"alerts: {[(a['labels'], a['state']) for a in m.prometheus.alerts()]}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitored]:
    work = tmp_path_factory.mktemp("prom")
    nvml = work / "nvml.json"
    fake_nvml.write_state(nvml, fake_nvml.node(2))
    private, public = authority.keygen()
    key_file = work / "operator.key"
    key_file.write_text(private + "\n")
    key_file.chmod(0o600)
    ray_root = tempfile.mkdtemp(prefix="gpm-")  # short: Ray's socket paths live under it
    overrides = ray_overrides(ray_root) | {
        "gpus": {"nvml_module": "tests.harness.fake_nvml", "poll_interval_s": 1.0},
        "deployments": {"operators": [public], "command_allow": [sys.executable]},
    }
    cleanup_leftovers()
    cluster = Cluster(
        3,
        workdir=work / "cluster",
        overrides=overrides,
        node_overrides={0: PREFER, 1: NEVER, 2: NEVER},
    )
    prometheus: Prometheus | None = None
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(fake_nvml.ENV, str(nvml))
            cluster.start()
        rules = shortened_rules(RULES, work / "gpud-rules.yml", FOR_S)
        prometheus = Prometheus(
            monitor_host(cluster.network),
            work / "prometheus",
            [instance(n) for n in cluster],
            rules,
            interval_s=SCRAPE_S,
        ).start()
        m = Monitored(cluster, prometheus, "metrics-demo")
        nodes = list(cluster)
        names = {n.name for n in nodes}
        wait_for(
            lambda: agreed_head(nodes) and ray_node_names(nodes[0]) == names,
            STEADY_S,
            1.0,
            what="one Ray cluster headed by h0",
            describe=lambda: describe(m),
        )
        cluster.wait_placeable(timeout=DIAGNOSE_S)
        spec = work / "spec.toml"
        spec.write_text(spec_text(m.deployment, replicas=1))
        nodes[0].cli("deploy", "apply", str(spec), "--key", str(key_file))
        wait_for(prometheus.targets_up, DIAGNOSE_S, 0.5, what="every gpud scraped and up")
        yield m
    finally:
        try:
            if prometheus is not None:
                prometheus.close()
        finally:
            cluster.close()
            shutil.rmtree(ray_root, ignore_errors=True)
            cleanup_leftovers()


def test_the_rules_copy_changes_only_the_for_durations(tmp_path: Path) -> None:
    assert promtool("check", "rules", str(RULES)).returncode == 0
    copy = shortened_rules(RULES, tmp_path / "rules.yml", FOR_S)
    checked = promtool("check", "rules", str(copy))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    shipped, shortened = (yaml.safe_load(p.read_text()) for p in (RULES, copy))
    rules = [r for g in shipped["groups"] for r in g["rules"]]
    short = [r for g in shortened["groups"] for r in g["rules"]]
    assert [r.get("for") for r in short] == [f"{FOR_S}s"] * len(rules)
    for before, after in zip(rules, short, strict=True):
        assert {k: v for k, v in before.items() if k != "for"} == {
            k: v for k, v in after.items() if k != "for"
        }
    assert {g["name"] for g in shipped["groups"]} == {g["name"] for g in shortened["groups"]}
    # Line by line too (comments and layout): only `for:` lines differ.
    lines = list(zip(RULES.read_text().splitlines(), copy.read_text().splitlines(), strict=True))
    changed = [(a, b) for a, b in lines if a != b]
    assert len(changed) == len(rules)
    for a, b in changed:
        indent = re.match(r"^(\s*)for: \S+$", a)
        assert indent and b == f"{indent.group(1)}for: {FOR_S}s", (a, b)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target in the shipped dashboard, rows' panels included."""
    board = json.loads(DASHBOARD.read_text())
    panels = list(board["panels"])
    for panel in list(panels):
        panels.extend(panel.get("panels", []))
    return [(p.get("title", ""), t["expr"]) for p in panels for t in p.get("targets", [])]


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's ``$var`` / ``${var}`` replaced as a dashboard would; an unknown one fails."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise AssertionError(f"dashboard variable ${name} has no test value: {expr}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def wait_reported(nodes: list[GpudNode], name: str, value: float) -> dict[str, float]:
    """{node name: unix time} when each node's own /metrics first showed a ``name`` sample
    equal to ``value`` (polled every 0.1 s)."""
    seen: dict[str, float] = {}

    def all_seen() -> bool:
        for node in nodes:
            if node.name not in seen and any(v == value for _l, v in gpud_samples(node, name)):
                seen[node.name] = time.time()
        return len(seen) == len(nodes)

    wait_for(all_seen, DIAGNOSE_S, 0.1, what=f"{name} == {value:g} on {[n.name for n in nodes]}")
    return seen


def first_firing(prom: Prometheus, alert: str, node: GpudNode, since: float) -> float:
    """Prometheus' own time (unix s) of the first evaluation after ``since`` that found
    ``alert`` firing for ``node`` (its ALERTS series), once it fires."""
    selector = f'ALERTS{{alertname="{alert}",alertstate="firing",instance="{instance(node)}"}}'

    def fired() -> list[float]:
        series = prom.query(f"{selector}[2m]")
        return [float(ts) for s in series for ts, _v in s["values"] if float(ts) >= since]

    return min(wait_for(fired, DIAGNOSE_S, 0.2, what=f"{alert} for {node.name}"))


def fires_and_clears(
    m: Monitored,
    alert: str,
    metric: str,
    subject: str,
    nodes: list[GpudNode],
    fault: Callable[[], faults.Fault],
    expected: set[tuple[str, str]],
    while_firing: Callable[[list[dict[str, Any]]], None],
) -> None:
    """With ``fault`` in place, ``alert`` fires for each of ``nodes`` within FIRE_BOUND_S of
    that node reporting ``metric`` 0, until it fires for exactly the ``expected`` (instance,
    subject) pairs, where ``while_firing(alerts)`` runs; after the heal the nodes report 1
    again and the alert clears within two scrapes and an evaluation of that."""
    prom = m.prometheus
    assert prom.alerts(alert) == [], prom.alerts(alert)
    injected = time.time()
    with fault():
        reported = wait_reported(nodes, metric, 0.0)
        for node in nodes:
            took = first_firing(prom, alert, node, injected) - reported[node.name]
            print(f"{alert} for {node.name}: fired {took:.2f} s after gpud reported it")
            assert took <= FIRE_BOUND_S, (alert, node.name, took, describe(m))

        def firing() -> list[dict[str, Any]] | None:
            alerts = [a for a in prom.alerts(alert) if a["state"] == "firing"]
            pairs = {(a["labels"]["instance"], a["labels"][subject]) for a in alerts}
            return alerts if pairs == expected else None

        while_firing(wait_for(firing, DIAGNOSE_S, 0.2, what=f"{alert} for {sorted(expected)}"))
    healed = time.time()

    def passing() -> bool:
        return all(
            (samples := gpud_samples(n, metric)) and all(v == 1.0 for _l, v in samples)
            for n in nodes
        )

    wait_for(passing, DIAGNOSE_S, 0.1, what=f"{metric} back to 1", describe=lambda: describe(m))
    passed = time.time()
    wait_for(
        lambda: prom.alerts(alert) == [],
        CLEAR_BOUND_S,
        0.1,
        what=f"{alert} cleared",
        describe=lambda: describe(m),
    )
    print(
        f"{alert}: gpud passing {passed - healed:.2f} s after the heal, "
        f"cleared {time.time() - passed:.2f} s after that"
    )


@in_cluster
def test_partitioned_peers_fire_peer_unreachable_and_every_dashboard_query_has_data(
    monitored: Monitored,
) -> None:
    m = monitored
    _h0, h1, h2 = m.cluster
    queries = dashboard_queries()
    assert len(queries) >= 20

    def check(alerts: list[dict[str, Any]]) -> None:
        # The partition is also a current problem, so the problems table has rows too.
        wait_for(
            lambda: m.prometheus.query('gpud_problem{job="gpud"} == 1'),
            DIAGNOSE_S,
            0.5,
            what="a current problem scraped",
        )
        # Every shipped rule evaluates cleanly on real data (no matching or type errors).
        groups = m.prometheus.api("rules", type="alert")["groups"]
        health = {
            r["name"]: (r["health"], r.get("lastError") or "") for g in groups for r in g["rules"]
        }
        assert len(health) == 9 and set(health.values()) == {("ok", "")}, health
        variables = {"job": "gpud", "instance": instance(h1), "node": h1.name}
        empty = [
            f"{title}: {expr}"
            for title, expr in queries
            if not m.prometheus.query(substitute(expr, variables))
        ]
        assert empty == [], "dashboard queries without data:\n" + "\n".join(empty)

    fires_and_clears(
        m,
        "GpudPeerUnreachable",
        "gpud_peer_reachable",
        "peer",
        [h1, h2],
        lambda: faults.partition(h1.host, h2.host),
        # h1 and h2 each name the other, and nobody names h0.
        {(instance(h1), h2.name), (instance(h2), h1.name)},
        check,
    )


@in_cluster
def test_blocked_gcs_port_fires_ray_gcs_unreachable_for_both_workers(
    monitored: Monitored,
) -> None:
    m = monitored
    h0, h1, h2 = m.cluster
    _head, _term, gcs = wait_for(
        lambda: agreed_head(list(m.cluster)), STEADY_S, 1.0, what="the Ray head"
    )

    def check(alerts: list[dict[str, Any]]) -> None:
        for alert in alerts:
            assert alert["labels"]["address"] == f"{h0.addr}:{gcs}", alert
        # A fault of the workload's port, not of the head's gpud: it is still scraped.
        assert m.prometheus.query('sum(gpud_ray_head{job="gpud"}) == 1')

    fires_and_clears(
        m,
        "GpudRayGcsUnreachable",
        "gpud_ray_gcs_reachable",
        "head",
        [h1, h2],
        lambda: faults.block_port(h0.host, gcs),
        {(instance(h1), h0.name), (instance(h2), h0.name)},
        check,
    )


@in_cluster
def test_isolated_peer_fires_peer_unreachable_on_every_side(monitored: Monitored) -> None:
    # Last in the module: h2's Ray may not survive being cut off from its head.
    m = monitored
    h0, h1, h2 = m.cluster

    fires_and_clears(
        m,
        "GpudPeerUnreachable",
        "gpud_peer_reachable",
        "peer",
        [h0, h1, h2],
        lambda: faults.partition_groups([h2.host], [h0.host, h1.host]),
        # Serf declares h2 failed; the data path is still reported (0), on both sides.
        {(instance(h0), h2.name), (instance(h1), h2.name)}
        | {(instance(h2), h0.name), (instance(h2), h1.name)},
        lambda _alerts: None,
    )
