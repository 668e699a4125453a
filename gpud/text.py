"""Strings from outside (node names, lease owners, gossiped tags, peer replies) made safe for a
terminal: control characters, ESC sequences and other unprintables are shown as escapes, so a
gossiped name cannot move the cursor, recolour or rewrite an operator's screen."""

from __future__ import annotations


def escape(value: str) -> str:
    """``value`` with every non-printable character as a Python escape (\\x1b, \\n, \\u200b)."""
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)


def duration(seconds: float) -> str:
    """Whole seconds as an operator reads an elapsed time: "45s", "3m12s", "2h0m5s"."""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
