"""Request signing for the peer API: only gpuds holding the cluster's peer-API key get answers.

A request carries its sender's node name, a timestamp, a random nonce and an HMAC-SHA256 over
method, path, node, timestamp, nonce and the SHA-256 of the body. The verifier rejects missing
or wrong signatures, timestamps outside the freshness window and nonces it has seen before.

Replay state cannot be frozen, and no nonce is forgotten while it could still pass. A nonce is
refused while it is remembered, whichever address replays it, and it is remembered until its
stamp is too old to pass the timestamp check. Memory is bounded per sender: a member of the
cluster sending from its own gossip address (the TCP handshake proves the address, gossip names
who is there) has its own quota under its name; any other request counts against its source
address (which a sender cannot choose freely once the handshake is done). A sender holding
NONCES_PER_SENDER live nonces is refused until they age out. All senders together share
NONCE_CACHE_SIZE; once that is full only members below HONEST_NONCES are still served, so no
flood, even of valid requests from many addresses, can push an honest member out: it throttles
only the flooders, and for at most the window after they stop. Stamps more than MAX_FUTURE_S
ahead are refused outright (they would stay in memory longest).
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
# Nonces remembered per sender (a member, or a source address): a peer sends a few requests
# per probe interval (~2 s) and the head's probes every 0.5 s, a few hundred per window; beyond
# it that sender's own floor takes over.
NONCES_PER_SENDER = 2048
# Nonces remembered in all. Beyond it only members holding fewer than HONEST_NONCES are served
# (the overrun is bounded by the members' count), everyone else is refused until stamps age out.
NONCE_CACHE_SIZE = 65536
HONEST_NONCES = 1024
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
    """Checks signed requests and remembers nonces per sender, in bounded memory.

    ``member_at(node, source)``: is ``node`` a member whose gossip address is ``source``? Such a
    sender's replay state is its own; everyone else's is its source address's."""

    def __init__(
        self,
        keys: Keys,
        *,
        member_at: Callable[[str, str], bool] = lambda node, source: False,
        max_skew_s: float = MAX_CLOCK_SKEW_S,
        max_future_s: float = MAX_FUTURE_S,
        per_sender: int = NONCES_PER_SENDER,
        cache_size: int = NONCE_CACHE_SIZE,
        honest: int = HONEST_NONCES,
    ) -> None:
        if callable(keys):
            self._keys = keys
        else:
            fixed = [keys] if isinstance(keys, bytes) else list(keys)
            self._keys = lambda: fixed
        self._member_at = member_at
        self._max_skew_s = max_skew_s
        self._max_future_s = max_future_s
        self._per_sender = per_sender
        self._cache_size = cache_size
        self._honest = honest
        # Per sender (("member", name) or ("source", address)): (stamp, nonce) of its live
        # nonces, a heap (oldest stamp first).
        self._senders: dict[tuple[str, str], list[tuple[float, str]]] = {}
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

        ``source`` is the address the request came from (see ``member_at``)."""
        now = time.time() if now is None else now
        node, stamp, nonce, signature, sent = self._headers(headers)
        if not any(
            hmac.compare_digest(_mac(key, method, path, node, stamp, nonce, body), signature)
            for key in self._keys()
        ):
            raise AuthError("bad signature (not signed with this cluster's key)")
        self._check_fresh(sent, now)
        if nonce in self._all:
            raise AuthError("replayed request (nonce already used)")
        self._remember(node, source, nonce, sent, now)
        return node

    def precheck(self, headers: Mapping[str, str], *, now: float | None = None) -> None:
        """What can be refused before the body is read (the signature covers the body):
        missing or malformed headers, a stale or future stamp. Raises AuthError."""
        sent = self._headers(headers)[4]
        self._check_fresh(sent, time.time() if now is None else now)

    @staticmethod
    def _headers(headers: Mapping[str, str]) -> tuple[str, str, str, str, float]:
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
        return node, stamp, nonce, signature, sent

    def _check_fresh(self, sent: float, now: float) -> None:
        # Also refuses NaN: no comparison with it holds.
        if not now - self._max_skew_s <= sent <= now + self._max_future_s:
            raise AuthError(
                f"timestamp {sent - now:+.0f} s off (accepted: -{self._max_skew_s:g} to "
                f"+{self._max_future_s:g} s; clock skew or a stale request: sync clocks with NTP)"
            )

    def _remember(self, node: str, source: str, nonce: str, sent: float, now: float) -> None:
        member = self._member_at(node, source)
        sender = ("member", node) if member else ("source", source)
        # Not stored until a nonce is: refused senders (any number of addresses) cost nothing.
        heap = self._senders.get(sender, [])
        self._expire(heap, now)
        if len(self._all) >= self._cache_size:
            self._forget_stale(now)
            if len(self._all) >= self._cache_size and not (member and len(heap) < self._honest):
                raise AuthError("too many requests from too many senders; retry shortly")
        if len(heap) >= self._per_sender:
            who = f"member {node!r}" if member else (source or "this source")
            raise AuthError(
                f"too many requests from {who} "
                f"({self._per_sender} within {self._max_skew_s:g} s); slow down"
            )
        heapq.heappush(heap, (sent, nonce))
        self._senders[sender] = heap
        self._all.add(nonce)

    def _expire(self, heap: list[tuple[float, str]], now: float) -> None:
        """Forget nonces whose stamps can no longer pass the timestamp check."""
        while heap and heap[0][0] < now - self._max_skew_s:
            self._all.discard(heapq.heappop(heap)[1])

    def _forget_stale(self, now: float) -> None:
        for sender in list(self._senders):
            heap = self._senders[sender]
            self._expire(heap, now)
            if not heap:
                del self._senders[sender]

    @property
    def remembered(self) -> int:
        return len(self._all)

    def held(self, source: str) -> int:
        """Live nonces remembered for requests from ``source`` by non-members."""
        return len(self._senders.get(("source", source), ()))

    def held_by_member(self, node: str) -> int:
        """Live nonces remembered for member ``node`` (sending from its own address)."""
        return len(self._senders.get(("member", node), ()))
