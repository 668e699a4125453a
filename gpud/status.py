"""The typed documents of `/v1/status` and `/v1/doctor`, shared by the agent, the CLI and
systemd's `STATUS=` line.

`/v1/status` is a ``StatusDocument`` with every component's own section beside it under the
component's name (``health``, ``ports``, ...). Readers that only need the overview (the CLI,
the STATUS= line) decode ``StatusDocument`` and ignore the sections; readers of a section decode
it with that component's struct.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from gpud.component import Component, Problem, without_superseded
from gpud.context import Member
from gpud.tags import Tags


class NodeSection(msgspec.Struct, kw_only=True):
    name: str
    addr: str
    version: str
    pid: int
    uptime_s: float
    tags: Tags


class StatusDocument(msgspec.Struct, kw_only=True):
    node: NodeSection
    members: list[Member]
    # Component name -> its one-line summary, in the agent's order.
    summaries: dict[str, str]
    # Every component's current problems, critical first.
    problems: list[Problem]


class DoctorReport(msgspec.Struct, kw_only=True):
    node: str
    peers_checked: int
    ok: bool
    # True when any problem is critical: `gpud doctor` exits non-zero then.
    critical: bool
    problems: list[Problem]


def collect(problems: Iterable[Problem]) -> list[Problem]:
    """One report's problems: superseded ones dropped, critical first, then by code (pure)."""
    kept = without_superseded(list(problems))
    return sorted(kept, key=lambda p: (p.severity != "critical", p.code, p.subject))


def doctor_report(node: str, peers_checked: int, problems: Iterable[Problem]) -> DoctorReport:
    found = collect(problems)
    return DoctorReport(
        node=node,
        peers_checked=peers_checked,
        ok=not found,
        critical=any(p.severity == "critical" for p in found),
        problems=found,
    )


def encode(document: StatusDocument, components: Iterable[Component]) -> dict[str, Any]:
    """The `/v1/status` body: the document with each component's section beside it."""
    body: dict[str, Any] = {c.name: c.status() for c in components}
    body.update(msgspec.structs.asdict(document))
    return body


def one_line(document: StatusDocument) -> str:
    """systemd's STATUS=: members, then each component's summary, then the worst problem."""
    alive = sum(1 for m in document.members if m.alive)
    parts = [f"{alive}/{len(document.members)} members alive"]
    parts += [f"{name} {text}" for name, text in document.summaries.items()]
    line = "; ".join(parts)
    if document.problems:
        worst = document.problems[0]
        line += f"; {len(document.problems)} problem(s), first: {worst.message}"
    return line
