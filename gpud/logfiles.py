"""The children's output files under ``state_dir/logs`` as `gpud deploy logs` and `gpud ray logs`
read them: the last lines of a file, then (``-f``) what it gained since, through the local API.

The files are written by the children themselves (gpud.process: a child that outlives gpud
writes to its file, never to a pipe), rotated by gpud to "<file>.1" when large. A reader never
writes or rotates them. Every reply is bounded (MAX_LINES, MAX_BYTES), so a 16 MiB log costs
the daemon one bounded read per request. The file is only ever named by gpud (a validated
deployment name and replica index, or the Ray node's fixed name), never by a path from the
request.

Stdlib and msgspec only: the CLI imports this module (gpud.client's rule).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import msgspec

from gpud.client import EXIT_OK, EXIT_USAGE, api_exchange
from gpud.errors import ApiError
from gpud.text import escape

LOG_DIR = "logs"
# The cluster-wide Ray node's output file (gpud.ray.service writes it there).
RAY_LOG = "ray.log"
DEFAULT_LINES = 100
MAX_LINES = 10_000
# The most one reply carries: a reader of a busy log catches up over several requests.
MAX_BYTES = 1 << 20
# How often `-f` asks for what the file gained.
FOLLOW_INTERVAL_S = 0.5


class LogChunk(msgspec.Struct, kw_only=True):
    """One reply of a logs endpoint: part of one file, and where the next read starts."""

    # The file's name under state_dir/logs.
    file: str
    text: str
    # Where the next read (`-f`, ``offset=``) starts: the end of what ``text`` holds.
    offset: int
    # The byte bound cut the lines asked for: the first of them are left out.
    truncated: bool = False
    # The file holds more past ``offset`` already: ask again at once.
    more: bool = False
    # The replica the file is of (deploy logs); None for the Ray node's.
    replica: int | None = None


def tail(data: bytes, lines: int) -> bytes:
    """The last ``lines`` lines of ``data`` (a last line without its newline counts as one)."""
    if lines <= 0:
        return b""
    # A trailing newline ends the last line; it does not start another.
    pos = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(lines):
        pos = data.rfind(b"\n", 0, pos)
        if pos < 0:
            return data
    return data[pos + 1 :]


def read_tail(path: Path, lines: int, max_bytes: int = MAX_BYTES) -> tuple[bytes, int, bool]:
    """The last ``lines`` lines of ``path`` within its last ``max_bytes`` bytes, the file's end
    offset, and whether the bound cut lines off (then the partial first line is dropped)."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        start = max(0, size - max_bytes)
        f.seek(start)
        data = f.read(size - start)
    text = tail(data, lines)
    if start > 0 and len(text) == len(data):
        cut = data.find(b"\n")
        return (data[cut + 1 :] if cut >= 0 else b""), start + len(data), True
    return text, start + len(data), False


def read_since(path: Path, offset: int, max_bytes: int = MAX_BYTES) -> tuple[bytes, int, bool]:
    """What ``path`` gained past ``offset`` in whole lines (a line still being written waits for
    its newline, unless it is all there is); the next offset; whether the bound left more there
    already. A file smaller than ``offset`` was rotated (emptied by gpud): read from its start."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < offset:
            offset = 0
        f.seek(offset)
        data = f.read(min(max_bytes, size - offset))
    bounded = offset + len(data) < size
    if (cut := data.rfind(b"\n")) >= 0:
        data = data[: cut + 1]
    return data, offset + len(data), bounded


def _int(query: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = query.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{key} must be a whole number, not {raw[:32]!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"{key} must be from {low} to {high}, not {value}")
    return value


def answer(query: Mapping[str, str], path: Path, missing: str) -> LogChunk:
    """The reply to ``?lines=N`` (the last N lines) or ``?offset=B`` (what followed byte B) of
    ``path``; ApiError(404, ``missing``) when there is no such file. Blocking: run it in a
    thread."""
    lines = _int(query, "lines", DEFAULT_LINES, 1, MAX_LINES)
    offset = _int(query, "offset", -1, 0, 1 << 62)
    try:
        if offset >= 0:
            data, end, more = read_since(path, offset)
            truncated = False
        else:
            data, end, truncated = read_tail(path, lines)
            more = False
    except FileNotFoundError:
        raise ApiError(404, missing) from None
    except OSError as exc:
        raise ApiError(500, f"cannot read {path.name}: {exc.strerror}") from None
    return LogChunk(
        file=path.name,
        text=data.decode(errors="replace"),
        offset=end,
        truncated=truncated,
        more=more,
    )


# ---- the CLI side --------------------------------------------------------------------------


def add_options(parser: argparse.ArgumentParser) -> None:
    """`-f` and `-n LINES`, as tail(1) has them."""
    parser.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C"
    )
    parser.add_argument(
        "-n",
        "--lines",
        type=int,
        default=DEFAULT_LINES,
        metavar="LINES",
        help=f"how many of the last lines to print (default {DEFAULT_LINES}, at most {MAX_LINES})",
    )


def show(args: argparse.Namespace, path: str, query: Mapping[str, str]) -> int:
    """Print the last ``args.lines`` lines from the logs endpoint ``path``, then with
    ``args.follow`` what follows, until Ctrl-C. Control characters are shown escaped, so a
    log cannot drive the terminal."""
    if not 1 <= args.lines <= MAX_LINES:
        print(f"gpud: -n must be from 1 to {MAX_LINES}", file=sys.stderr)
        return EXIT_USAGE
    ask = {**query, "lines": str(args.lines)}
    try:
        while True:
            chunk, raw = api_exchange(
                args, "GET", f"{path}?{urllib.parse.urlencode(ask)}", None, LogChunk
            )
            if args.json:
                sys.stdout.write(raw.decode() + "\n")
            else:
                if chunk.truncated:
                    print(f"[... earlier lines left out: more than {MAX_BYTES} bytes ...]")
                # Split on newlines only: a carriage return is shown escaped like any control.
                for line in chunk.text.removesuffix("\n").split("\n") if chunk.text else []:
                    print(escape(line))
            sys.stdout.flush()
            if not args.follow:
                return EXIT_OK
            # The same file from here on, even when the replica was picked by the daemon.
            ask = {**query, "offset": str(chunk.offset)}
            if chunk.replica is not None:
                ask["replica"] = str(chunk.replica)
            if not chunk.more:
                time.sleep(FOLLOW_INTERVAL_S)
    except KeyboardInterrupt:
        return EXIT_OK
