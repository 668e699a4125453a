"""Strings from outside (node names, lease owners, gossiped tags, peer replies) made safe for a
terminal: control characters, ESC sequences and other unprintables are shown as escapes, so a
gossiped name cannot move the cursor, recolour or rewrite an operator's screen."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


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


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> str:
    """Rows under headers, each column as wide as its widest cell, so a long name widens its
    column instead of pushing the others out of line. Cells from outside must already be
    escaped (``escape``): a control character's width is not what a terminal shows. Columns
    in ``right`` (numbers) are right-aligned; the last column is not padded."""
    body = [list(map(str, row)) for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(headers)]
    right = set(right)
    last = len(headers) - 1

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            if i in right:
                out.append(cell.rjust(widths[i]))
            else:
                out.append(cell if i == last else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in body)])
