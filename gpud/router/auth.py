"""Bearer API keys for the router, stored hashed.

``router.api_keys_file`` holds one key per line as ``sha256:<64 hex digits>`` (the SHA-256 of
the key a client sends as ``Authorization: Bearer <key>``), optionally followed by a label;
blank lines and ``#`` comments are ignored. Keys are random tokens, not passwords, so a plain
SHA-256 is enough: the file reveals no key, and a client's key is checked by hashing it.

    key=$(openssl rand -hex 32); printf 'sha256:%s alice\n' "$(printf %s "$key" | sha256sum | cut -d' ' -f1)"

The file decides who may use every model on the cluster, so one that others may write is
refused (like a cluster key others may read, it gives the cluster away); one others may read
is a warning. It is re-read when it changes, so keys are added and revoked without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
from pathlib import Path

from gpud.errors import ConfigError

_LINE = re.compile(r"^sha256:([0-9a-f]{64})(?:\s+\S.*)?$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(text: str, *, source: str) -> frozenset[str]:
    """The hex digests in a keys file (pure); ConfigError naming the first bad line."""
    digests = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ConfigError(
                f"{source}:{number}: not `sha256:<64 lowercase hex digits> [label]` "
                "(store the SHA-256 of each key, never the key)"
            )
        digests.add(match.group(1))
    return frozenset(digests)


def mode_refusal(path: str, mode: int) -> str | None:
    """Why a keys file with ``mode`` must not be trusted (pure): others may write it."""
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"router.api_keys_file {path} is writable by group or others (mode "
            f"{mode & 0o777:04o}): anyone who can write it can add a key; chmod 0600 it"
        )
    return None


def mode_warning(path: str, mode: int) -> str | None:
    """A keys file every user may read (pure): hashes of random keys, but still nobody's
    business beyond root and the service."""
    if mode & stat.S_IROTH:
        return f"router.api_keys_file {path} is readable by every user (mode {mode & 0o777:04o})"
    return None


class ApiKeys:
    """The accepted key digests, re-read when the file changes (`load`). No file configured:
    no authentication (`allows` accepts everything); a file that never loaded: no key is
    accepted, so nothing reaches an engine unauthenticated."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._digests: frozenset[str] = frozenset()
        self.warning: str | None = None

    @property
    def required(self) -> bool:
        return bool(self.path)

    @property
    def loaded(self) -> bool:
        return self._stamp is not None

    def load(self) -> None:
        """Read the file (again, if it changed); ConfigError if it is unreadable, malformed or
        writable by others: the keys in use stay as they were."""
        try:
            st = os.stat(self.path)
            text = Path(self.path).read_text()
        except OSError as exc:
            raise ConfigError(
                f"router.api_keys_file: cannot read {self.path}: {exc.strerror}"
            ) from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_mode)
        if stamp == self._stamp:
            return
        if (refusal := mode_refusal(self.path, st.st_mode)) is not None:
            raise ConfigError(refusal)
        self._digests = parse_keys(text, source=f"router.api_keys_file {self.path}")
        self.warning = mode_warning(self.path, st.st_mode)
        self._stamp = stamp

    def allows(self, authorization: str | None) -> bool:
        if not self.required:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = hash_key(token.strip())
        # Constant-time per digest: no timing hint of how close a guess came.
        return any(hmac.compare_digest(digest, d) for d in self._digests)
