"""The router's metric families, as gpud `Metric`s.

Histograms are written as Prometheus writes them (``_bucket`` with ``le``, ``_sum``,
``_count``) so ``histogram_quantile`` works on them; `Metric` has no histogram kind and keeps
"counter" for ``_total`` names, so each series is a gauge family that only ever grows.
"""

from __future__ import annotations

import bisect
from collections import Counter

from gpud.component import Metric

# Seconds: from the router's own overhead (sub-millisecond) to a long generation.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0, 60.0, 120.0, 300.0)  # fmt: skip


class Histogram:
    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        # label value (deployment) -> per-bucket counts (+Inf last), sum, count
        self._counts: dict[str, list[int]] = {}
        self._sums: Counter[str] = Counter()

    def observe(self, deployment: str, seconds: float) -> None:
        counts = self._counts.setdefault(deployment, [0] * (len(BUCKETS) + 1))
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._sums[deployment] += seconds

    def families(self) -> list[Metric]:
        buckets: list[tuple[dict[str, str], float]] = []
        sums: list[tuple[dict[str, str], float]] = []
        totals: list[tuple[dict[str, str], float]] = []
        for deployment, counts in sorted(self._counts.items()):
            running = 0
            for bound, n in zip((*BUCKETS, float("inf")), counts, strict=True):
                running += n
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                buckets.append(({"deployment": deployment, "le": le}, running))
            sums.append(({"deployment": deployment}, self._sums[deployment]))
            totals.append(({"deployment": deployment}, running))
        return [
            Metric(name=f"{self.name}_bucket", help=self.help, samples=buckets),
            Metric(name=f"{self.name}_sum", help=self.help, samples=sums),
            Metric(name=f"{self.name}_count", help=self.help, samples=totals),
        ]


# Label of requests refused before a deployment was known (auth, bad body, unknown model).
NO_DEPLOYMENT = "none"


class RouterStats:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (deployment, HTTP status)
        self.errors: Counter[tuple[str, str]] = Counter()  # (deployment, error code)
        self.retries: Counter[str] = Counter()  # deployment
        self.in_flight: Counter[str] = Counter()  # upstream url
        self.latency = Histogram(
            "gpud_router_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by deployment.",
        )
        self.ttfb = Histogram(
            "gpud_router_time_to_first_byte_seconds",
            "Time from a request's arrival to the first response byte from a replica.",
        )

    def families(self) -> list[Metric]:
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
                help="Requests this router has in flight to each upstream.",
                samples=[({"upstream": u}, n) for u, n in sorted(self.in_flight.items())],
            ),
            *self.latency.families(),
            *self.ttfb.families(),
        ]
