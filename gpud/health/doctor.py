"""`gpud doctor`'s report: each problem with its severity, cause and fix."""

from __future__ import annotations

import msgspec

from gpud.health.verdict import NatVerdict, PairVerdict
from gpud.problems import Problem


class DoctorReport(msgspec.Struct):
    node: str
    peers_checked: int
    ok: bool
    # True when any problem is critical: `gpud doctor` exits non-zero then.
    critical: bool
    problems: list[Problem]

    @classmethod
    def of(cls, node: str, peers_checked: int, problems: list[Problem]) -> DoctorReport:
        return cls(
            node=node,
            peers_checked=peers_checked,
            ok=not problems,
            critical=any(p.severity == "critical" for p in problems),
            problems=problems,
        )


def nat_problem(nat: NatVerdict) -> Problem:
    return Problem(
        severity="critical",
        subject="network",
        message=nat.message,
        fix="run gpud and Ray with host networking (docker run --network host), or map every port "
        "1:1 and set node.advertise to the address peers reach",
    )


def pair_problem(peer: str, verdict: PairVerdict) -> Problem | None:
    """A problem for a pair that is warning or critical; None when passing or not yet known."""
    if verdict.state not in ("warning", "critical"):
        return None
    return Problem(severity=verdict.state, subject=peer, message=verdict.message, fix=verdict.fix)
