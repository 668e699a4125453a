"""The cluster secret: one random key that encrypts gossip and authenticates the peer API.

`gpud keygen` prints a new key (base64 of 32 random bytes, which Serf also accepts as an
AES-256 gossip key). Purpose-specific keys are derived from it with HMAC-SHA256 so that the
gossip key never doubles as the peer-API key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from gpud.errors import ConfigError

if TYPE_CHECKING:
    from gpud.config import Config

KEY_BYTES = 32


def keygen() -> str:
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def parse_key(text: str, *, source: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{source}: not base64 (make one with `gpud keygen`)") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"{source}: key is {len(key)} bytes, expected {KEY_BYTES} (`gpud keygen`)"
        )
    return key


def cluster_key(config: Config) -> bytes | None:
    """The cluster secret from cluster.key_file, or None when no key file is configured."""
    path = config.cluster.key_file
    if not path:
        return None
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cluster.key_file: cannot read {path}: {exc.strerror}") from None
    return parse_key(text, source=f"cluster.key_file {path}")


def _derive(base: bytes, purpose: str) -> bytes:
    return hmac.new(base, f"gpud/{purpose}/v1".encode(), hashlib.sha256).digest()


def derive(config: Config, purpose: str) -> bytes:
    """A key for one purpose. Without a key file it derives from the cluster name only, which
    keeps test clusters apart but is no protection; the agent warns about that."""
    base = (
        cluster_key(config)
        or hashlib.sha256(b"gpud-unkeyed:" + config.cluster.name.encode()).digest()
    )
    return _derive(base, purpose)


def keyring_keys(path: Path) -> list[bytes]:
    """The gossip keys in Serf's keyring file, primary first (Serf writes them in that order).
    [] when the file is missing or unreadable (the caller falls back to the cluster key)."""
    try:
        texts = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(texts, list):
        return []
    keys = []
    for text in texts:
        try:
            keys.append(parse_key(str(text), source=str(path)))
        except ConfigError:
            continue
    return keys


class PeerApiKeys:
    """The peer-API keys, one derived from each gossip key in Serf's keyring, primary first.

    While a rotation is under way (``gpud keys install`` / ``use`` / ``remove``) the keyring
    holds the old and the new key: peers accept both and sign with the primary, so a node that
    already uses the new key and one that does not yet still talk. Re-read when the file
    changes (Serf rewrites it on every keyring change)."""

    def __init__(
        self, config: Config, keyring_file: Path | None, purpose: str = "peer-api"
    ) -> None:
        # ``purpose``: "peer-api", or "vote" (Ray head election votes, same rotation rules).
        self._purpose = purpose
        self._fallback = derive(config, purpose)
        self._file = keyring_file
        self._stamp: tuple[int, int] | None = None
        self._keys = [self._fallback]

    def __call__(self) -> list[bytes]:
        if self._file is None:
            return self._keys
        try:
            st = self._file.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp
            keys = [_derive(k, self._purpose) for k in keyring_keys(self._file)]
            self._keys = keys or [self._fallback]
        return self._keys
