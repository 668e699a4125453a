"""Strings from outside (node names, lease owners, gossiped tags, peer replies) made safe for a
terminal: control characters, ESC sequences and other unprintables are shown as escapes, so a
gossiped name cannot move the cursor, recolour or rewrite an operator's screen."""

from __future__ import annotations


def escape(value: str) -> str:
    """``value`` with every non-printable character as a Python escape (\\x1b, \\n, \\u200b)."""
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)
