"""One shape for every finding gpud reports in status and `gpud doctor`."""

from __future__ import annotations

from typing import Literal

import msgspec

Severity = Literal["warning", "critical"]


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    severity: Severity
    # What it is about: "network", "ports", or a peer's name.
    subject: str = ""
    # What is wrong and why, in words an operator can act on.
    message: str
    fix: str
