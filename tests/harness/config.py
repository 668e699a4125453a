"""The one way to build a test config: a dict of TOML sections, merged with overrides.

Tests that start a real gpud write it to a file (`to_toml`); in-process tests turn it into a
`Config` through gpud's own parser (`parse_config` for any dict, `config_for` for an unkeyed
test node with its name and state dir), so both pass gpud's own validation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpud.config import Config, parse


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{"
            + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
            + "}"
        )
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def to_toml(config: Mapping[str, Any]) -> str:
    """Top-level scalars, then one [section] per mapping value (gpud's config is two levels).
    A None value is left out (TOML has no null): the field keeps gpud's default."""
    lines = [
        f"{k} = {_toml_value(v)}"
        for k, v in config.items()
        if v is not None and not isinstance(v, Mapping)
    ]
    for section, values in config.items():
        if isinstance(values, Mapping):
            lines.append(f"\n[{section}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None)
    return "\n".join(lines) + "\n"


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_config(config: Mapping[str, Any], source: str = "test config") -> Config:
    """``config`` (a dict of TOML sections, as is: no base added) as gpud reads it: written
    with `to_toml` and parsed by `gpud.config.parse`, validation included. ``source`` names
    it in a ConfigError."""
    return parse(to_toml(config), source=source)


def config_for(
    name: str, state_dir: Path | str, overrides: Mapping[str, Any] | None = None
) -> Config:
    """An unkeyed in-process node's Config: its name and state dir, plus ``overrides``."""
    # Unkeyed on purpose (in-process test clusters): say so, as a test cluster must.
    base = {
        "node": {"name": name},
        "cluster": {"insecure": True},
        "paths": {"state_dir": str(state_dir)},
    }
    return parse_config(merge(base, overrides or {}), source=f"test config of {name}")
