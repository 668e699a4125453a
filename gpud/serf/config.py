"""Serf's configuration as gpud writes it: the JSON config for one start, the keyring seeded
from the cluster key, the binary to run, and what serf's output says about undecryptable
gossip (serf keeps the same concerns in its config.go).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal

from gpud.config import Config
from gpud.hostport import split_host_port
from gpud.secret import keyring_keys
from gpud.tags import Tags, encode

# Where the packages install their own serf (not on PATH, so it never meets a stand-alone one).
PACKAGED_SERF = "/usr/libexec/gpud/serf"


_SERF_LOG_LEVELS = {"debug": "debug", "info": "info", "warning": "warn", "error": "err"}
# memberlist's words when gossip is encrypted with a key this node lacks: a peer's message
# ("failed to receive: ... from=ADDR:PORT", "Decrypt packet failed: ... from=ADDR:PORT"), or
# this node's own join ("Failed to join ADDR: ...", a continuation line of "Join failed").
_NO_KEY = "No installed keys could decrypt the message"
_FROM = re.compile(re.escape(_NO_KEY) + r".*?\bfrom=(?P<addr>\S+)")
_JOIN = re.compile(r"Failed to join (?P<addr>\S+?): " + re.escape(_NO_KEY))


def serf_config(
    config: Config,
    *,
    node_name: str,
    advertise_addr: str,
    tags: Tags,
    rpc_auth: str,
    keyring_file: str | None,
    snapshot_path: str,
    advertise_is_local: bool = True,
) -> dict[str, Any]:
    """Serf's JSON configuration for one start (pure).

    Behind NAT or port mapping the advertised address is not on a local interface, so serf
    binds all addresses and still advertises the mapped one.
    """
    serf = config.serf
    gossip = f"{advertise_addr}:{serf.bind_port}"
    bind_addr = advertise_addr if advertise_is_local else "0.0.0.0"
    result: dict[str, Any] = {
        "node_name": node_name,
        "bind": f"{bind_addr}:{serf.bind_port}",
        "advertise": gossip,
        "rpc_addr": f"127.0.0.1:{serf.rpc_port}",
        "rpc_auth": rpc_auth,
        "tags": encode(tags),
        "log_level": _SERF_LOG_LEVELS[config.log_level],
        "snapshot_path": snapshot_path,
        # After our own graceful leave a restarted gpud should still rejoin from the snapshot.
        "rejoin_after_leave": True,
        # An entry without a port means gpud's gossip port, not serf's default 7946.
        "retry_join": [join_address(entry, serf.bind_port) for entry in serf.retry_join],
        "retry_interval": f"{serf.retry_interval_s}s",
        # gpud leaves gracefully over RPC on SIGTERM; a signal to serf is never a leave.
        "leave_on_terminate": False,
        "skip_leave_on_interrupt": True,
        # Failed nodes are retried for a working day, left nodes dropped after an hour.
        "reconnect_timeout": "8h",
        "tombstone_timeout": "1h",
    }
    if keyring_file is not None:
        result["keyring_file"] = keyring_file
    return result


def undecryptable(line: str) -> tuple[Literal["join", "from"], str] | None:
    """From one line of serf's output: gossip it could not decrypt, as ("join", address it
    failed to join) or ("from", address that sent it), without the port (pure)."""
    if _NO_KEY not in line:
        return None
    match = _JOIN.search(line)
    if match:
        return "join", match["addr"]
    match = _FROM.search(line)
    if match:
        host, _ = split_host_port(match["addr"])
        return "from", host
    return None


def key_fingerprint(key: bytes) -> str:
    """A name for a key that does not reveal it (pure)."""
    return hashlib.sha256(b"gpud-keyring-seed:" + key).hexdigest()


def keep_keyring(existing: list[bytes], key: bytes, seeded: str) -> bool:
    """Whether serf's keyring (``existing``, primary first) survives a start with cluster key
    ``key`` (pure). It does when it holds the key (a rotation under way, or finished and the key
    file updated), or when it was seeded from this very key and rotated since (only serf,
    through `gpud keys`, changes it). A changed cluster.key_file otherwise wins."""
    if not existing:
        return False
    return key in existing or seeded == key_fingerprint(key)


def join_address(entry: str, default_port: int) -> str:
    """``entry`` ("ip", "ip:port", "[v6]:port") as serf's "host:port" (pure)."""
    host, port = split_host_port(entry)
    return f"[{host}]:{port or default_port}" if ":" in host else f"{host}:{port or default_port}"


def write_private(path: Path, data: str) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only (0600)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def serf_binary(configured: str) -> str | None:
    """The serf to run: ``serf.binary`` if set, else the packaged one, else `serf` on PATH."""
    if configured:
        return shutil.which(configured)
    if os.access(PACKAGED_SERF, os.X_OK):
        return PACKAGED_SERF
    return shutil.which("serf")


def seed_keyring(keyring_file: Path, seed_file: Path, key: bytes) -> bool:
    """Write the cluster key as serf's keyring, unless the keyring there must be kept: it
    holds the key, or it was rotated (`gpud keys`) since gpud seeded it from this key
    (``seed_file`` holds that key's fingerprint). Returns True when it kept a rotated keyring
    that no longer holds ``key`` (cluster.key_file is behind: the operator should update it)."""
    existing = keyring_keys(keyring_file)
    try:
        seeded = seed_file.read_text().strip()
    except OSError:
        seeded = ""
    if keep_keyring(existing, key, seeded):
        return key not in existing
    write_private(keyring_file, json.dumps([base64.b64encode(key).decode()]))
    write_private(seed_file, key_fingerprint(key) + "\n")
    return False
