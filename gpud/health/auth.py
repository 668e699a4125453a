"""Request signing for the peer API: only gpuds holding the cluster's peer-API key get answers.

A request carries its sender's node name, a timestamp, a random nonce and an HMAC-SHA256 over
method, path, node, timestamp, nonce and the SHA-256 of the body. The verifier rejects missing
or wrong signatures, timestamps outside the freshness window and nonces it has seen before.

Replay state cannot be frozen, and no nonce is forgotten while it could still pass. A nonce is
refused while it is remembered, whichever address replays it, and it is remembered until its
stamp is too old to pass the timestamp check. Memory is bounded per source address (the TCP
peer, which a sender cannot choose freely once the handshake is done): a source that holds
NONCES_PER_SOURCE live nonces is refused until they age out. So a flood, even of valid requests,
throttles only the flooder's own address, never another node's, and for at most the window
after it stops; stamps more than MAX_FUTURE_S ahead are refused outright (they would stay in
memory longest). An honest peer sends far fewer requests than that per window.
While rotating the cluster key the verifier accepts a signature by any installed key.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import secrets
import time
from collections.abc import Callable, Mapping, Sequence

H_NODE = "X-Gpud-Node"
H_TIME = "X-Gpud-Timestamp"
H_NONCE = "X-Gpud-Nonce"
H_SIGNATURE = "X-Gpud-Signature"

# Generous into the past: a request in flight, or from a peer whose clock runs behind.
MAX_CLOCK_SKEW_S = 120.0
# Tight into the future: a peer whose clock runs more ahead than this must fix its clock; a
# future stamp would otherwise stay replayable, and in memory, longest.
MAX_FUTURE_S = 15.0
# Nonces remembered per source: a peer sends a few requests per probe interval (~2 s), so this
# covers the whole window many times over; beyond it that source's own floor takes over.
NONCES_PER_SOURCE = 2048
# Nonces remembered in all. A source beyond it is refused ("busy") until stamps age out; one
# flooding source can never reach it alone.
NONCE_CACHE_SIZE = 65536
_MAX_NODE_NAME = 128
_NONCE_HEX = 32

Keys = bytes | Sequence[bytes] | Callable[[], Sequence[bytes]]


def signing_key(keys: Keys) -> bytes:
    """The key to sign with: the only one, or the keyring's primary (its first)."""
    if isinstance(keys, bytes):
        return keys
    return (keys() if callable(keys) else keys)[0]


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
    """Checks signed requests and remembers nonces per source address, in bounded memory."""

    def __init__(
        self,
        keys: Keys,
        *,
        max_skew_s: float = MAX_CLOCK_SKEW_S,
        max_future_s: float = MAX_FUTURE_S,
        per_source: int = NONCES_PER_SOURCE,
        cache_size: int = NONCE_CACHE_SIZE,
    ) -> None:
        if callable(keys):
            self._keys = keys
        else:
            fixed = [keys] if isinstance(keys, bytes) else list(keys)
            self._keys = lambda: fixed
        self._max_skew_s = max_skew_s
        self._max_future_s = max_future_s
        self._per_source = per_source
        self._cache_size = cache_size
        # Per source address: (stamp, nonce) of its live nonces, a heap (oldest stamp first).
        self._sources: dict[str, list[tuple[float, str]]] = {}
        # Every remembered nonce, whichever source used it (a replay may come from anywhere).
        self._all: set[str] = set()

    def verify(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        source: str = "",
        now: float | None = None,
    ) -> str:
        """The sender's node name; raises AuthError. Only a valid request consumes its nonce.

        ``source`` is the address the request came from (its replay state is kept apart)."""
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
        if not any(
            hmac.compare_digest(_mac(key, method, path, node, stamp, nonce, body), signature)
            for key in self._keys()
        ):
            raise AuthError("bad signature (not signed with this cluster's key)")
        if not now - self._max_skew_s <= sent <= now + self._max_future_s:
            raise AuthError(
                f"timestamp {sent - now:+.0f} s off (accepted: -{self._max_skew_s:g} to "
                f"+{self._max_future_s:g} s; clock skew or a stale request: sync clocks with NTP)"
            )
        if nonce in self._all:
            raise AuthError("replayed request (nonce already used)")
        self._remember(source, nonce, sent, now)
        return node

    def _remember(self, source: str, nonce: str, sent: float, now: float) -> None:
        if len(self._all) >= self._cache_size:
            self._forget_stale(now)
            if len(self._all) >= self._cache_size:
                raise AuthError("too many requests from too many sources; retry shortly")
        heap = self._sources.setdefault(source, [])
        self._expire(heap, now)
        if len(heap) >= self._per_source:
            raise AuthError(
                f"too many requests from {source or 'this source'} "
                f"({self._per_source} within {self._max_skew_s:g} s); slow down"
            )
        heapq.heappush(heap, (sent, nonce))
        self._all.add(nonce)

    def _expire(self, heap: list[tuple[float, str]], now: float) -> None:
        """Forget nonces whose stamps can no longer pass the timestamp check."""
        while heap and heap[0][0] < now - self._max_skew_s:
            self._all.discard(heapq.heappop(heap)[1])

    def _forget_stale(self, now: float) -> None:
        for source in list(self._sources):
            heap = self._sources[source]
            self._expire(heap, now)
            if not heap:
                del self._sources[source]

    @property
    def remembered(self) -> int:
        return len(self._all)

    def held(self, source: str) -> int:
        """Live nonces remembered for ``source``."""
        return len(self._sources.get(source, ()))
