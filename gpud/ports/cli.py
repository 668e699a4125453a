"""`gpud ports` commands (placeholder registration; the ports component fills it in)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_commands(sub: Any, client_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Register `gpud ports ...` on the top-level subparsers."""
