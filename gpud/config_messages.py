"""msgspec's validation errors as an operator reads them, for the config file: the key's
path, the value given, and what is allowed (enum values, the nearest known key)."""

from __future__ import annotations

import json
import re
import typing
from typing import Any, Literal

import msgspec


def field_message(message: str, data: dict[str, Any], root: type[msgspec.Struct]) -> str:
    """msgspec's "Expected `int` >= 8 - at `$.ports.block_size`" as an operator reads it: the
    key first, then the value given, then what is allowed (an enum's values; for an unknown
    key the nearest known one). ``root`` is the type ``data`` was decoded into."""
    text, sep, where = message.rpartition(" - at `$.")
    path = where.rstrip("`") if sep else ""
    if not sep:
        text = message
    if unknown := _UNKNOWN_KEY.fullmatch(text):
        return _unknown_key(root, path, unknown.group(1))
    if not path:
        return text
    value = _rendered(_value_at(data, path))
    shown = f"{path} = {value}" if value is not None else path
    kind = _type_at(root, path)
    if typing.get_origin(kind) is Literal:
        allowed = ", ".join(json.dumps(v) for v in typing.get_args(kind))
        return f"{shown}: not one of {allowed}"
    return f"{shown}: {text}"


_UNKNOWN_KEY = re.compile(r"Object contains unknown field `(.*)`")
# "retry_join[3]": a key and the list indices after it, as in msgspec's paths.
_PATH_PART = re.compile(r"([^\[\]]+)((?:\[\d+\])*)")


def _keys_of(kind: Any) -> dict[str, Any]:
    """The keys of a config table (a Struct type) and their types; {} for anything else."""
    if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
        return {}
    return {f.encode_name: f.type for f in msgspec.structs.fields(kind)}


def _type_at(root: type[msgspec.Struct], path: str) -> Any:
    kind: Any = root
    for part in path.split(".") if path else []:
        keys = _keys_of(kind)
        if part not in keys:
            return None
        kind = keys[part]
    return kind


def _value_at(data: Any, path: str) -> Any:
    for part in path.split("."):
        match = _PATH_PART.fullmatch(part)
        if match is None or not isinstance(data, dict) or match.group(1) not in data:
            return None
        data = data[match.group(1)]
        for index in re.findall(r"\d+", match.group(2)):
            if not isinstance(data, list) or int(index) >= len(data):
                return None
            data = data[int(index)]
    return data


def _rendered(value: Any) -> str | None:
    """A scalar as TOML writes it, on one line and short; None for tables and arrays."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        text = repr(value)
    elif isinstance(value, str):
        text = json.dumps(value)  # escapes newlines and control characters
    else:
        return None
    return text if len(text) <= 80 else f"{text[:76]}..."


def _unknown_key(root: type[msgspec.Struct], table: str, name: str) -> str:
    """The line for an unknown key (pure): "node.nmae: unknown key; did you mean `node.name`?",
    the nearest key of the same table, else a key of that name in another table."""
    import difflib  # only for a bad file: client commands read the config and start fast

    key = f"{table}.{name}" if table else name
    known = list(_keys_of(_type_at(root, table)))
    if close := difflib.get_close_matches(name, known, n=1):
        return f"{key}: unknown key; did you mean `{table + '.' if table else ''}{close[0]}`?"
    elsewhere = [
        f"{section}.{name}"
        for section, kind in _keys_of(root).items()
        if name in _keys_of(kind) and section != table
    ]
    if elsewhere:
        return f"{key}: unknown key; did you mean `{elsewhere[0]}`?"
    where = f"[{table}]" if table else "the top level"
    return f"{key}: unknown key; the keys of {where} are {', '.join(known)}"
