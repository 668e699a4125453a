"""Structured logging: one line per event, ``key=value`` fields, to stderr (the journal).

When stderr is the journal (systemd sets ``JOURNAL_STREAM`` to its device and inode), each line
starts with its syslog priority in sd-daemon's ``<N>`` form, so ``journalctl -p err`` shows
gpud's errors; anywhere else lines are plain. Children's output (serf's Go log lines) is parsed
into the same structured lines at the child's own level.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

from gpud.text import escape

_FIELDS = "gpud_fields"
# Go's log package as serf and memberlist use it: "2026/11/23 21:00:00 [WARN] memberlist: ...".
_GO_LOG = re.compile(
    r"^\s*(?:\d{4}/\d\d/\d\d \d\d:\d\d:\d\d(?:\.\d+)? )?\[(?P<level>[A-Z]+)\] ?"
    r"(?:(?P<source>[a-z][\w.-]*): )?(?P<msg>.*)$"
)
_GO_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERR": logging.ERROR,
    "ERROR": logging.ERROR,
}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level, as sd-daemon(3) prefixes it: <2> crit, <3> err,
    <4> warning, <6> info, <7> debug (pure)."""
    if levelno >= logging.ERROR:
        return 3 if levelno < logging.CRITICAL else 2
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


def stderr_is_journal(env: dict[str, str] | None = None, fd: int = 2) -> bool:
    """True when ``fd`` is the journal stream systemd connected (JOURNAL_STREAM=dev:inode)."""
    stream = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, _, inode = stream.partition(":")
    if not (dev.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(inode))


def parse_child_line(line: str) -> tuple[int, str, dict[str, str]] | None:
    """(level, message, fields) of one line of a child's output; None for a blank line (pure).

    Go log lines keep their level and drop their timestamp (the journal has one); serf's
    "==> " banner lines are info, or error when they report one; anything else is info.
    """
    text = line.rstrip()
    if not text.strip():
        return None
    match = _GO_LOG.match(text)
    if match and match["level"] in _GO_LEVELS:
        fields = {"source": match["source"]} if match["source"] else {}
        return _GO_LEVELS[match["level"]], match["msg"].strip(), fields
    banner = text.strip().removeprefix("==> ")
    # serf reports a failed start as a banner: "==> Error starting agent: ...".
    return logging.ERROR if banner.startswith("Error") else logging.INFO, banner, {}


class _KeyValueFormatter(logging.Formatter):
    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = self._format(record)
        return f"<{priority(record.levelno)}>{line}" if self.journal else line

    def _format(self, record: logging.LogRecord) -> str:
        parts = [
            f"level={record.levelname.lower()}",
            f"component={record.name.removeprefix('gpud.')}",
        ]
        parts.append(f"msg={_quote(record.getMessage())}")
        for key, value in getattr(record, _FIELDS, {}).items():
            parts.append(f"{key}={_quote(str(value))}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def _quote(value: str) -> str:
    """One field value (or message) on one line: plain when it is a simple token, else quoted
    with backslashes and quotes escaped and every unprintable character (newline, ESC, other
    control characters) written as an escape, so text from outside (gossiped names, lease
    owners, serf's output) can neither split a line nor drive the terminal that shows it."""
    if value and all(c.isalnum() or c in "._-:/@[],+" for c in value):
        return value
    return '"' + escape(value.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def setup(level: str = "info") -> None:
    """Send gpud's logs to stderr; systemd's journal collects them (with priorities)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter(journal=stderr_is_journal()))
    root = logging.getLogger("gpud")
    root.handlers[:] = [handler]
    set_level(level)
    root.propagate = False


def set_level(level: str) -> None:
    """Change gpud's log level (at start, and live on reload)."""
    logging.getLogger("gpud").setLevel(level.upper())


def get(component: str) -> logging.Logger:
    return logging.getLogger(f"gpud.{component}")


def event(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    """Log ``msg`` with structured ``fields``."""
    logger.log(level, msg, extra={_FIELDS: fields})


def info(logger: logging.Logger, msg: str, **fields: Any) -> None:
    event(logger, logging.INFO, msg, **fields)


def warning(logger: logging.Logger, msg: str, **fields: Any) -> None:
    event(logger, logging.WARNING, msg, **fields)


def error(logger: logging.Logger, msg: str, **fields: Any) -> None:
    event(logger, logging.ERROR, msg, **fields)


def child_output(logger: logging.Logger, line: str) -> None:
    """Log one line of a child's output at the level the child gave it."""
    parsed = parse_child_line(line)
    if parsed is not None:
        level, msg, fields = parsed
        event(logger, level, msg, **fields)
