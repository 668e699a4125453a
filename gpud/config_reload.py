"""`systemctl reload gpud` (SIGHUP): which changed settings apply at once and which wait for
a restart (pure)."""

from __future__ import annotations

import msgspec

from gpud.config import Config

# What `systemctl reload gpud` (SIGHUP) applies without a restart; every other change waits
# for one (a restart is a leave and a rejoin, so reload avoids it where it can).
LIVE_FIELDS = ("log_level", "health", "serf.retry_join", "ray.priority")


class ReloadPlan(msgspec.Struct, frozen=True, kw_only=True):
    # The config to run with now: the old one with the live fields taken from the new one.
    config: Config
    live: list[str]  # changed fields applied now
    restart: list[str]  # changed fields that wait for `systemctl restart gpud`


def changed_fields(old: msgspec.Struct, new: msgspec.Struct, prefix: str = "") -> list[str]:
    """Dotted paths of the leaf fields that differ between ``old`` and ``new`` (pure)."""
    changed: list[str] = []
    for field in msgspec.structs.fields(old):
        a, b = getattr(old, field.name), getattr(new, field.name)
        path = f"{prefix}{field.name}"
        if isinstance(a, msgspec.Struct) and type(a) is type(b):
            changed += changed_fields(a, b, f"{path}.")
        elif a != b:
            changed.append(path)
    return changed


def _is_live(path: str) -> bool:
    return any(path == live or path.startswith(f"{live}.") for live in LIVE_FIELDS)


def reload_plan(old: Config, new: Config) -> ReloadPlan:
    """What a reload from ``old`` to ``new`` does (pure)."""
    changed = changed_fields(old, new)
    merged = msgspec.structs.replace(
        old,
        log_level=new.log_level,
        health=new.health,
        serf=msgspec.structs.replace(old.serf, retry_join=new.serf.retry_join),
        ray=msgspec.structs.replace(old.ray, priority=new.ray.priority),
    )
    return ReloadPlan(
        config=merged,
        live=[p for p in changed if _is_live(p)],
        restart=[p for p in changed if not _is_live(p)],
    )
