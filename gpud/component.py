"""The one contract every component of a running agent implements.

The agent builds `/v1/status`, `/v1/doctor`, `/metrics` and systemd's `STATUS=` line by
iterating over its components; it names a component only where it constructs it. A new
component therefore touches its own package and the one line in `agent.py` that builds it.

Each component provides:
- ``name``: its section's key in `/v1/status` (and the label of its summary);
- ``status()``: its section, a msgspec Struct;
- ``summary()``: one line for `gpud status` and `STATUS=`;
- ``problems()``: what is wrong now, each with a stable ``code``;
- ``diagnose()``: the same after fresh checks (what `gpud doctor` shows);
- ``metrics()``: its Prometheus families;
- ``routes()``: its local API routes;
- ``reconfigure(config)``: apply the live settings of a reloaded config (SIGHUP);
- ``run()``: its work, until cancelled.

``ComponentBase`` supplies the defaults (no problems, no metrics, no routes, diagnose =
problems) so a component overrides only what it has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

import msgspec

if TYPE_CHECKING:
    from aiohttp import web

    from gpud.config import Config

Severity = Literal["warning", "critical"]
MetricKind = Literal["gauge", "counter", "histogram"]


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """One finding, in status and `gpud doctor`.

    ``code`` is stable and machine-readable (``<component>.<what>``, e.g.
    ``ports.block_exhausted``): tooling and other components match problems by it, never by
    their text. ``message`` is the cause in words an operator can act on, ``fix`` the remedy.
    """

    code: str
    severity: Severity
    # What it is about: a component, a peer's name, a port.
    subject: str = ""
    message: str
    fix: str
    # Codes of problems this one explains better (the same cause seen with more evidence):
    # those are left out of the report wherever this one appears.
    supersedes: frozenset[str] = frozenset()


def without_superseded(problems: list[Problem]) -> list[Problem]:
    """``problems`` less those another problem in the list supersedes (pure)."""
    dropped: set[str] = set()
    for problem in problems:
        dropped |= problem.supersedes
    return [p for p in problems if p.code not in dropped]


class Metric(msgspec.Struct, frozen=True, kw_only=True):
    """One Prometheus family: ``samples`` are (labels, value) pairs.

    Names follow Prometheus' conventions: base units (``_seconds``, ``_bytes``) and a counter
    ends in ``_total``; `gpud.metrics` renders the families through prometheus-client."""

    name: str
    help: str
    # A histogram's samples are its cumulative ``_bucket`` counts, each with an ``le`` label
    # ("+Inf" last in each label set); its ``_count`` is the "+Inf" bucket.
    samples: list[tuple[dict[str, str], float]]
    kind: MetricKind = "gauge"
    # A histogram's ``_sum`` by label set (no ``le``).
    sums: list[tuple[dict[str, str], float]] = []

    def __post_init__(self) -> None:
        # A component bug, caught where the family is made rather than by a dashboard.
        if (self.kind == "counter") != self.name.endswith("_total"):
            raise ValueError(f"metric {self.name}: a counter's name, and only its, ends in _total")
        if self.kind == "histogram" and not all("le" in labels for labels, _ in self.samples):
            raise ValueError(f"metric {self.name}: every sample of a histogram has an le label")


def gauge(name: str, help_text: str, value: float, **labels: str) -> Metric:
    """A family with a single sample."""
    return Metric(name=name, help=help_text, samples=[(labels, float(value))])


class Component(Protocol):
    """A long-running part of the agent (see the module docstring)."""

    name: str

    async def run(self) -> None: ...

    def status(self) -> msgspec.Struct: ...

    def summary(self) -> str: ...

    def problems(self) -> list[Problem]: ...

    async def diagnose(self) -> list[Problem]: ...

    def metrics(self) -> list[Metric]: ...

    def routes(self) -> list[web.RouteDef]: ...

    def reconfigure(self, config: Config) -> None: ...


class ComponentBase:
    """Defaults for the optional parts of the contract."""

    name: str

    def problems(self) -> list[Problem]:
        return []

    async def diagnose(self) -> list[Problem]:
        return self.problems()

    def metrics(self) -> list[Metric]:
        return []

    def routes(self) -> list[web.RouteDef]:
        return []

    def reconfigure(self, config: Config) -> None:
        """Nothing of this component changes live (the default)."""


class DisabledSection(msgspec.Struct, kw_only=True):
    state: str = "disabled"
    summary: str


class Disabled(ComponentBase):
    """A component switched off in the config: its section says so, and it does nothing."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self._section = DisabledSection(summary=f"disabled ({reason})")

    async def run(self) -> None:
        # Runs like any component (the agent stops when one ends), doing nothing.
        import asyncio  # here: the CLI decodes Problem without loading asyncio

        await asyncio.Event().wait()

    def status(self) -> DisabledSection:
        return self._section

    def summary(self) -> str:
        return self._section.summary
