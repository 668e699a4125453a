"""The router's metric families, as gpud `Metric`s.

Latency and time to first byte are prometheus-client Histograms (not registered anywhere:
like every component's families they reach the scrape through `metrics()`), exposed with
the histogram type so ``histogram_quantile`` works on them.
"""

from __future__ import annotations

from collections import Counter

import prometheus_client

from gpud.component import Metric

# Seconds: from the router's own overhead (sub-millisecond) to a long generation.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0, 60.0, 120.0, 300.0)  # fmt: skip

# Label of requests refused before a deployment was known (auth, bad body, unknown model).
NO_DEPLOYMENT = "none"


def _histogram(name: str, help_text: str) -> prometheus_client.Histogram:
    return prometheus_client.Histogram(
        name, help_text, ["deployment"], buckets=BUCKETS, registry=None
    )


def _family(histogram: prometheus_client.Histogram) -> Metric:
    (family,) = histogram.collect()
    return Metric(
        name=family.name,
        help=family.documentation,
        kind="histogram",
        samples=[(s.labels, s.value) for s in family.samples if s.name.endswith("_bucket")],
        sums=[(s.labels, s.value) for s in family.samples if s.name.endswith("_sum")],
    )


class RouterStats:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (deployment, HTTP status)
        self.errors: Counter[tuple[str, str]] = Counter()  # (deployment, error code)
        self.retries: Counter[str] = Counter()  # deployment
        self.in_flight: Counter[str] = Counter()  # upstream url
        self.latency = _histogram(
            "gpud_router_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by deployment.",
        )
        self.ttfb = _histogram(
            "gpud_router_time_to_first_byte_seconds",
            "Time from a request's arrival to the first response byte from a replica.",
        )

    def families(self, upstreams: dict[str, str]) -> list[Metric]:
        """``upstreams``: the ready upstreams' urls and deployments, each reported with its
        outstanding count (0 included, so a series does not vanish when it drains)."""
        outstanding = dict.fromkeys(upstreams, 0) | dict(self.in_flight)
        return [
            Metric(
                name="gpud_router_requests_total",
                help="Requests answered, by deployment and HTTP status.",
                samples=[
                    ({"deployment": d, "code": str(c)}, n)
                    for (d, c), n in sorted(self.requests.items())
                ],
                kind="counter",
            ),
            Metric(
                name="gpud_router_errors_total",
                help="Requests the router answered with its own error, by deployment and code.",
                samples=[
                    ({"deployment": d, "code": c}, n) for (d, c), n in sorted(self.errors.items())
                ],
                kind="counter",
            ),
            Metric(
                name="gpud_router_retries_total",
                help="Attempts sent to another replica because the request did not reach one.",
                samples=[({"deployment": d}, n) for d, n in sorted(self.retries.items())],
                kind="counter",
            ),
            Metric(
                name="gpud_router_outstanding_requests",
                help="Requests this router has in flight to each upstream (replica server).",
                samples=[
                    ({"upstream": u, "deployment": upstreams.get(u, "")}, n)
                    for u, n in sorted(outstanding.items())
                ],
            ),
            _family(self.latency),
            _family(self.ttfb),
        ]
