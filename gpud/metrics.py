"""Prometheus exposition of the components' metric families, and the TCP scrape endpoint.

Components describe their families as plain `Metric` values; a prometheus-client collector
turns them into the library's families at each scrape, so escaping, number formatting (an
integer above 2**24 stays that integer) and content negotiation (text format 0.0.4 or
OpenMetrics, as the scraper asks) are the library's. The local socket's `/metrics` and the
TCP listener (`[metrics] listen`) serve the same registry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator

import msgspec
from aiohttp import web
from prometheus_client import ProcessCollector
from prometheus_client import metrics_core as pc
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from gpud import api, log
from gpud.component import ComponentBase, Metric, Problem
from gpud.config import Config, metrics_listen

_log = log.get("metrics")

# How long a listener that could not bind waits before it tries again.
BIND_RETRY_S = 30.0


def _family(metric: Metric) -> pc.Metric:
    if metric.kind == "histogram":
        return _histogram(metric)
    # Counters carry their name without _total; the sample gets it back (both formats).
    base = metric.name.removesuffix("_total") if metric.kind == "counter" else metric.name
    family = pc.Metric(base, metric.help, metric.kind)
    for labels, value in metric.samples:
        family.add_sample(metric.name, dict(labels), value)
    return family


def _histogram(metric: Metric) -> pc.HistogramMetricFamily:
    keys = sorted({k for labels, _ in metric.samples for k in labels} - {"le"})
    family = pc.HistogramMetricFamily(metric.name, metric.help, labels=keys)
    buckets: dict[tuple[str, ...], list[tuple[str, float]]] = {}
    for labels, value in metric.samples:
        values = tuple(labels.get(k, "") for k in keys)
        buckets.setdefault(values, []).append((labels["le"], value))
    sums = {tuple(labels.get(k, "") for k in keys): value for labels, value in metric.sums}
    for values, series in buckets.items():
        family.add_metric(list(values), series, sums.get(values, 0.0))
    return family


class FamiliesCollector(Collector):
    """Collects ``families()`` afresh at every scrape."""

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterator[pc.Metric]:
        for metric in self._families():
            yield _family(metric)


def registry(families: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    """gpud's families plus gpud's own process_* metrics (memory, CPU, open files)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FamiliesCollector(families))
    ProcessCollector(registry=reg)
    return reg


def exposition(reg: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The scrape body and its content type for a request's Accept header."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(reg), content_type


def handler(reg: CollectorRegistry) -> Callable[[web.Request], object]:
    async def get_metrics(request: web.Request) -> web.Response:
        body, content_type = exposition(reg, request.headers.get("Accept"))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    return get_metrics


class MetricsSection(msgspec.Struct, kw_only=True):
    """The `metrics` section of gpud status."""

    # "ip:port" from metrics.listen; "" when the TCP listener is off.
    listen: str
    # "serving", "disabled", "starting", or why it is not listening (it retries).
    state: str


class MetricsEndpoint(ComponentBase):
    """Serves the registry over TCP at ``metrics.listen``. A port it cannot bind is a warning
    problem and a retry, not a failed agent: GPU health and the cluster do not depend on it."""

    name = "metrics"

    def __init__(self, config: Config, reg: CollectorRegistry) -> None:
        self._listen = metrics_listen(config)
        self._registry = reg
        self._state = "starting" if self._listen else "disabled"
        self._error = ""

    def _where(self) -> str:
        if self._listen is None:
            return ""
        host, port = self._listen
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def run(self) -> None:
        if self._listen is None:
            await asyncio.Event().wait()
            return
        host, port = self._listen
        app = web.Application()
        app.add_routes([web.get("/metrics", handler(self._registry))])
        server = api.GuardedServer(app, api.peer_limits(api.fd_limit()), name="metrics")
        await server.setup()
        try:
            while True:
                try:
                    await server.listen_tcp(host, port)
                except OSError as exc:
                    self._error = exc.strerror or str(exc)
                    self._state = f"not listening: {self._error}"
                    log.warning(_log, "cannot listen", listen=self._where(), error=self._error)
                    await asyncio.sleep(BIND_RETRY_S)
                    continue
                self._state, self._error = "serving", ""
                log.info(_log, "serving /metrics", listen=self._where())
                await asyncio.Event().wait()
        finally:
            await server.cleanup()

    def status(self) -> MetricsSection:
        return MetricsSection(listen=self._where(), state=self._state)

    def summary(self) -> str:
        if self._state == "serving":
            return f"serving on {self._where()}"
        return self._state

    def problems(self) -> list[Problem]:
        if not self._error:
            return []
        return [
            Problem(
                code="metrics.listen_failed",
                severity="warning",
                subject=self._where(),
                message=f"Prometheus cannot scrape this node: cannot listen on {self._where()} "
                f"({self._error}); retrying every {BIND_RETRY_S:g} s",
                fix="free that port (`ss -ltnp`), or set [metrics] listen to another ip:port "
                '("" turns it off) and restart gpud',
            )
        ]
