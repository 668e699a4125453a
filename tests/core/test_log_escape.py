"""Clean output: text from outside never reaches a terminal raw. Every log field
value and message, and lease owners in `gpud ports`, show control characters and ESC
sequences as escapes, and a log event stays one line."""

from __future__ import annotations

import logging

from hypothesis import given
from hypothesis import strategies as st

from gpud import log
from gpud.log import _KeyValueFormatter
from gpud.ports.cli import render_leases
from gpud.ports.leases import Lease

ESC_TITLE = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x1b[0m"


def formatted(msg: str, **fields: object) -> str:
    record = logging.LogRecord("gpud.test", logging.WARNING, __file__, 1, msg, None, None)
    record.gpud_fields = fields
    return _KeyValueFormatter().format(record)


def test_escape_sequences_in_fields_and_messages_are_escaped() -> None:
    line = formatted(f"joined {ESC_TITLE}", member=ESC_TITLE, owner="a\nlevel=error fake")
    assert "\x1b" not in line and "\x07" not in line and "\n" not in line
    assert "\\x1b]0;pwned\\x07" in line
    assert 'owner="a\\nlevel=error fake"' in line


def test_serf_output_with_escapes_is_escaped() -> None:
    parsed = log.parse_child_line(f"2026/11/23 21:00:00 [WARN] memberlist: name {ESC_TITLE}")
    assert parsed is not None
    level, msg, fields = parsed
    line = formatted(msg, **fields)
    assert level == logging.WARNING and "\x1b" not in line and "\\x1b[2J" in line


@given(st.text(max_size=40), st.text(max_size=40))
def test_every_line_is_printable_and_keeps_what_it_said(msg: str, value: str) -> None:
    line = formatted(msg, field=value)
    assert line.isprintable()
    # The value is still there, readable: quoted with escapes, or as it was.
    assert f"field={log._quote(value)}" in line


def test_lease_owners_are_escaped_in_gpud_ports() -> None:
    table = render_leases(
        [Lease(id="abc", owner=f"job {ESC_TITLE}", pid=12, ports=[21200, 21201, 21205], created=0)]
    )
    assert "\x1b" not in table and "\x07" not in table
    assert "job \\x1b]0;pwned\\x07" in table
    assert "21200-21201,21205" in table
