"""Head-election votes: the wire messages and the voter's durable one-vote-per-term record.

A voter persists ``(term, voted_for)`` before it answers, so a crash and restart can never
make it vote twice in one term (that is what keeps two heads from winning the same term).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec

from gpud.errors import GpudError
from gpud.state import Key, StateError, StateStore, Transaction

# The Serf query every gpud answers with its vote.
VOTE_QUERY = "gpud-ray-vote"
# Raft's PreVote: "would you vote for me in this term?", answered from the same rules but
# persisting nothing. A candidate raises its term only after a majority said yes, so a node
# cut off from the majority never climbs terms that would depose the head after a heal.
PRE_VOTE_QUERY = "gpud-ray-prevote"
# Serf's limit on a query or response payload.
MAX_PAYLOAD_BYTES = 1024
NODE_NAME_MAX = 200


class VoteState(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What one voter has promised: the highest term it knows and whom it voted for in it."""

    term: int = 0
    voted_for: str | None = None


class VoteRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    term: int
    candidate: str
    # Known (not-left) members the candidate counted; a voter that knows more refuses, so a
    # candidate with a shrunken view cannot win with a "majority" of too few members.
    known: int


class VoteReply(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    voter: str
    term: int
    granted: bool
    reason: str = ""
    # A granted vote: vote_signature(voter, candidate, term, known). The candidate keeps the
    # signed votes as its certificate, so nodes that did not vote can check its office.
    sig: str = ""


class KnownView(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The members this node counted toward a majority, with when each was last alive (unix
    seconds): after a restart, before serf has found them again, they still count."""

    members: dict[str, int] = {}


class VoteStateError(GpudError):
    """The vote state cannot be read or written; the node must not vote."""


def decide_vote(
    state: VoteState,
    request: VoteRequest,
    *,
    voter: str,
    own_known: int,
    refusal: str | None,
) -> tuple[VoteState, VoteReply]:
    """Pure vote decision. ``refusal`` is the voter's own objection to the candidate (its view
    says the candidate is not eligible, or an eligible head is still in office), or None.

    Returns the state to persist (unchanged when refused) and the reply to send.
    """

    def refuse(reason: str) -> tuple[VoteState, VoteReply]:
        return state, VoteReply(voter=voter, term=state.term, granted=False, reason=reason)

    if request.term < state.term:
        return refuse(f"stale term {request.term} < {state.term}")
    if request.term == state.term and state.voted_for not in (None, request.candidate):
        return refuse(f"already voted for {state.voted_for} in term {state.term}")
    if request.known < own_known:
        return refuse(f"candidate counts {request.known} members, voter knows {own_known}")
    if refusal is not None:
        return refuse(refusal)
    granted = VoteState(term=request.term, voted_for=request.candidate)
    return granted, VoteReply(voter=voter, term=request.term, granted=True)


def encode_request(request: VoteRequest) -> bytes:
    if len(request.candidate) > NODE_NAME_MAX:
        raise ValueError(f"node name longer than {NODE_NAME_MAX} characters")
    return msgspec.json.encode(request)


def decode_request(payload: bytes) -> VoteRequest:
    """Raises msgspec.ValidationError/DecodeError on malformed payloads."""
    return msgspec.json.decode(payload, type=VoteRequest)


def encode_reply(reply: VoteReply) -> bytes:
    data = msgspec.json.encode(reply)
    if len(data) > MAX_PAYLOAD_BYTES:  # a long refusal reason: keep the verdict, cut the text
        reply = msgspec.structs.replace(reply, reason=reply.reason[:200])
        data = msgspec.json.encode(reply)
    return data


def decode_reply(payload: bytes) -> VoteReply:
    return msgspec.json.decode(payload, type=VoteReply)


# ---- proof of office: signed votes and the head's certificate -----------------------------

# The Serf query a follower asks a head with for its certificate (only that head answers),
# and the peer API route that serves it whole (Serf pages cap it at a few hundred votes).
CERT_QUERY = "gpud-ray-cert"
PATH_CERTIFICATE = "/v1/peer/ray/certificate"
# Signature length: 16 bytes of HMAC-SHA256 (22 characters unpadded) keep certificates small.
SIG_BYTES = 16


class CertificateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    head: str
    term: int
    # A certificate larger than one Serf response comes in pages: the votes from this index
    # on (voters in name order).
    first: int = 0


class VoteCertificate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The signed votes that made ``head`` head of ``term``: voter -> signature. ``known`` is
    the member count the candidate stood with; every vote signs it, so it cannot be shrunk."""

    head: str
    term: int
    known: int
    votes: dict[str, str]


class CertificateReply(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The peer API's answer: the certificate asked for, or None from a node that holds none
    for that head and term."""

    cert: VoteCertificate | None = None


def vote_signature(key: bytes, *, voter: str, candidate: str, term: int, known: int) -> str:
    """The voter's signature on its vote (HMAC under the cluster's vote key)."""
    message = msgspec.json.encode(["gpud-ray-vote/v1", voter, candidate, term, known])
    digest = hmac.new(key, message, hashlib.sha256).digest()[:SIG_BYTES]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def signature_valid(
    keys: Sequence[bytes], sig: str, *, voter: str, candidate: str, term: int, known: int
) -> bool:
    return any(
        hmac.compare_digest(
            sig,
            vote_signature(key, voter=voter, candidate=candidate, term=term, known=known),
        )
        for key in keys
    )


def valid_voters(cert: VoteCertificate, keys: Sequence[bytes]) -> set[str]:
    """The voters whose signatures in ``cert`` check out (pure)."""
    return {
        voter
        for voter, sig in cert.votes.items()
        if signature_valid(
            keys, sig, voter=voter, candidate=cert.head, term=cert.term, known=cert.known
        )
    }


def certificate_page(cert: VoteCertificate, first: int) -> bytes:
    """The votes of ``cert`` from index ``first`` on (voters in name order), as many as fit one
    Serf response; no votes past the end."""
    page = msgspec.structs.replace(cert, votes={})
    for voter in sorted(cert.votes)[first:]:
        more = msgspec.structs.replace(page, votes={**page.votes, voter: cert.votes[voter]})
        if len(msgspec.json.encode(more)) > MAX_PAYLOAD_BYTES:
            break
        page = more
    return msgspec.json.encode(page)


def decode_certificate(payload: bytes) -> VoteCertificate:
    """Raises msgspec.ValidationError/DecodeError on malformed payloads."""
    return msgspec.json.decode(payload, type=VoteCertificate)


# The voter's promise, in the state store.
class Tally(msgspec.Struct, kw_only=True, frozen=True):
    """A candidate's reading of its vote replies."""

    votes: dict[str, str]  # voter -> signature, valid grants for this term only
    refusals: list[str]
    highest_term: int  # the highest term a counted member replied with
    # The highest term a counted member refused in (its own term; -1: no such refusal).
    refused_term: int = -1


def tally(
    replies: Mapping[str, bytes],
    request: VoteRequest,
    names: set[str],
    keys: list[bytes],
    *,
    signed: bool = True,
) -> Tally:
    """Count vote replies (pure): a grant counts only from a counted member, for this term,
    answering as itself, signed with the cluster's key (``signed`` False: pre-votes, which
    carry no signature: they only tell the candidate whether standing is worth a term)."""
    votes: dict[str, str] = {}
    refusals: list[str] = []
    highest, refused = request.term, -1
    for node, payload in replies.items():
        try:
            reply = decode_reply(payload)
        except (msgspec.ValidationError, msgspec.DecodeError):
            refusals.append(f"{node}: malformed reply")
            continue
        if node in names:
            highest = max(highest, reply.term)
            if not reply.granted:
                refused = max(refused, reply.term)
        if reply.granted and reply.term == request.term and reply.voter == node and node in names:
            if not signed:
                votes[node] = ""
            elif signature_valid(
                keys,
                reply.sig,
                voter=node,
                candidate=request.candidate,
                term=request.term,
                known=request.known,
            ):
                votes[node] = reply.sig
            else:
                refusals.append(f"{node}: vote not signed with this cluster's key")
        elif not reply.granted:
            refusals.append(f"{node}: {reply.reason}")
    return Tally(votes=votes, refusals=refusals, highest_term=highest, refused_term=refused)


VOTE = Key("ray.vote", VoteState)
# The certificate of the term this node last won (a restarted head still proves its office).
CERTIFICATE = Key("ray.certificate", VoteCertificate)
# The members counted toward a majority (gpud.ray.election.remember).
KNOWN_VIEW = Key("ray.known", KnownView)
# gpud 0.1.0 kept the vote in a file of its own; imported on first start.
LEGACY_FILE = "ray-vote.json"


class VoteStore:
    """The voter's state in the state store; every change is durable before it is answered."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._lock = asyncio.Lock()
        try:
            store.import_file(store.state_dir / LEGACY_FILE, _import_legacy_file)
            self.state = store.get(VOTE) or VoteState()
            self.certificate = store.get(CERTIFICATE)
            self.known = store.get(KNOWN_VIEW) or KnownView()
        except StateError as exc:
            # Refusing to start beats voting twice: an operator must look at it.
            raise VoteStateError(str(exc)) from None

    def _save(self, state: VoteState) -> None:
        self._store.put(VOTE, state)

    async def vote(
        self, request: VoteRequest, *, voter: str, own_known: int, refusal: str | None
    ) -> VoteReply:
        """Decide, persist if the state changes, then return the reply (in that order)."""
        async with self._lock:
            new, reply = decide_vote(
                self.state, request, voter=voter, own_known=own_known, refusal=refusal
            )
            if new != self.state:
                await asyncio.to_thread(self._save, new)
                self.state = new
            return reply

    async def pre_vote(
        self, request: VoteRequest, *, voter: str, own_known: int, refusal: str | None
    ) -> VoteReply:
        """The reply `vote` would give now, persisting nothing (a pre-vote)."""
        async with self._lock:
            return decide_vote(
                self.state, request, voter=voter, own_known=own_known, refusal=refusal
            )[1]

    async def save_known(self, known: KnownView) -> None:
        async with self._lock:
            await asyncio.to_thread(self._store.put, KNOWN_VIEW, known)
            self.known = known

    async def save_certificate(self, cert: VoteCertificate) -> None:
        async with self._lock:
            await asyncio.to_thread(self._store.put, CERTIFICATE, cert)
            self.certificate = cert

    async def adopt_term(self, term: int) -> None:
        """Move to a higher term seen in gossip, with no vote cast in it yet."""
        async with self._lock:
            if term > self.state.term:
                new = VoteState(term=term)
                await asyncio.to_thread(self._save, new)
                self.state = new


def _import_legacy_file(tx: Transaction, path: Path) -> None:
    try:
        state = msgspec.json.decode(path.read_bytes(), type=VoteState)
    except OSError as exc:
        raise VoteStateError(f"{path}: cannot read: {exc.strerror}") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise VoteStateError(f"{path}: corrupt vote state: {exc}") from None
    tx.put(VOTE, state)
