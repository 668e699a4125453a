"""Structured logging: one line per event, ``key=value`` fields, to stderr (the journal)."""

from __future__ import annotations

import logging
import sys
from typing import Any

_FIELDS = "gpud_fields"


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
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
    if value and all(c.isalnum() or c in "._-:/@[],+" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def setup(level: str = "info") -> None:
    """Send gpud's logs to stderr; systemd's journal collects them."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    root = logging.getLogger("gpud")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


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
