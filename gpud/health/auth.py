"""Request signing for the peer API: only gpuds holding the cluster's peer-API key get answers.

A request carries its sender's node name, a timestamp, a random nonce and an HMAC-SHA256 over
method, path, node, timestamp, nonce and the SHA-256 of the body. The verifier rejects missing
or wrong signatures, timestamps outside the allowed clock skew and nonces it has seen before.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping

H_NODE = "X-Gpud-Node"
H_TIME = "X-Gpud-Timestamp"
H_NONCE = "X-Gpud-Nonce"
H_SIGNATURE = "X-Gpud-Signature"

# Generous: NTP-less hosts drift, and a peer with a skewed clock should still be probed.
MAX_CLOCK_SKEW_S = 120.0
# Enough for ~130 requests/s over the skew window; beyond it the floor below takes over.
NONCE_CACHE_SIZE = 32768
_MAX_NODE_NAME = 128
_NONCE_HEX = 32


class AuthError(Exception):
    """The request is not from a gpud of this cluster (the message says why)."""


def _mac(key: bytes, method: str, path: str, node: str, stamp: str, nonce: str, body: bytes) -> str:
    message = "\n".join(
        (method.upper(), path, node, stamp, nonce, hashlib.sha256(body).hexdigest())
    )
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def sign(
    key: bytes, node: str, method: str, path: str, body: bytes, *, now: float | None = None
) -> dict[str, str]:
    """Headers that authenticate one request from ``node``."""
    stamp = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(_NONCE_HEX // 2)
    return {
        H_NODE: node,
        H_TIME: stamp,
        H_NONCE: nonce,
        H_SIGNATURE: _mac(key, method, path, node, stamp, nonce, body),
    }


class Verifier:
    """Checks signed requests and remembers nonces, in bounded memory.

    When the nonce cache is full the oldest nonce is dropped and its timestamp becomes a floor:
    requests stamped at or before it are refused, so a dropped nonce can never be replayed.
    """

    def __init__(
        self,
        key: bytes,
        *,
        max_skew_s: float = MAX_CLOCK_SKEW_S,
        cache_size: int = NONCE_CACHE_SIZE,
    ) -> None:
        self._key = key
        self._max_skew_s = max_skew_s
        self._cache_size = cache_size
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._floor = float("-inf")

    def verify(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        now: float | None = None,
    ) -> str:
        """The sender's node name; raises AuthError. Only a valid request consumes its nonce."""
        now = time.time() if now is None else now
        node, stamp, nonce, signature = (
            headers.get(h) for h in (H_NODE, H_TIME, H_NONCE, H_SIGNATURE)
        )
        if node is None or stamp is None or nonce is None or signature is None:
            raise AuthError("missing authentication headers")
        if not node or len(node) > _MAX_NODE_NAME or len(nonce) != _NONCE_HEX:
            raise AuthError("malformed authentication headers")
        try:
            sent = float(stamp)
        except ValueError:
            raise AuthError("malformed timestamp") from None
        expected = _mac(self._key, method, path, node, stamp, nonce, body)
        if not hmac.compare_digest(expected, signature):
            raise AuthError("bad signature (not signed with this cluster's key)")
        if not abs(now - sent) <= self._max_skew_s:
            raise AuthError(f"timestamp {now - sent:+.0f} s off (clock skew or a stale request)")
        if nonce in self._seen or sent <= self._floor:
            raise AuthError("replayed request (nonce already used)")
        self._remember(nonce, sent, now)
        return node

    def _remember(self, nonce: str, sent: float, now: float) -> None:
        # Nonces older than the skew window cannot pass the timestamp check again: forget them.
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at <= self._max_skew_s and len(self._seen) < self._cache_size:
                break
            del self._seen[oldest]
            if now - at <= self._max_skew_s:
                self._floor = max(self._floor, at)
        self._seen[nonce] = sent
