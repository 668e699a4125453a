"""The vote certificates that prove a head's office: a head serves the one it won its term
with (whole over the signed peer API, or in Serf query pages), and a follower fetches a head's.
What a certificate proves is judged elsewhere (gpud.ray.election.proof_refusal)."""

from __future__ import annotations

import msgspec

from gpud import log
from gpud.context import NodeContext
from gpud.deployments.peers import PeerNetwork
from gpud.health.peer_api import PeerCallError
from gpud.ray.election import quorum
from gpud.ray.transport import QueryTransport
from gpud.ray.votes import (
    CERT_QUERY,
    PATH_CERTIFICATE,
    CertificateReply,
    CertificateRequest,
    VoteCertificate,
    VoteStore,
    certificate_page,
    decode_certificate,
)

_log = log.get("ray")

# A head without the peer API route sends its certificate in at most this many Serf pages
# (a page holds about 20-40 votes); over the peer API it comes in one call of any size (a
# majority of 5,000 members is some 150 KB).
CERT_PAGES_MAX = 16


class Certificates:
    """This node's side of the certificate exchange: it answers for its own certificate and
    fetches a head's."""

    def __init__(
        self,
        ctx: NodeContext,
        serf: QueryTransport,
        store: VoteStore,
        peers: PeerNetwork | None,
        vote_timeout_s: float | None,
    ) -> None:
        self._ctx = ctx
        self._serf = serf
        self._store = store
        self._peers = peers
        self._vote_timeout_s = vote_timeout_s
        serf.on_query(CERT_QUERY, self._on_certificate)
        if peers is not None:
            peers.add_route(PATH_CERTIFICATE, self._on_peer_certificate)

    async def fetch(self, head: str, term: int) -> VoteCertificate | None:
        """``head``'s certificate for ``term``: whole, over the peer API; from a head that
        does not serve it there, in Serf pages. None when it sends nothing. What it proves is
        judged by the caller (`proof_refusal`), whichever way it came."""
        member = self._ctx.members.get(head)
        if self._peers is not None and member is not None and member.tags and member.tags.pp:
            request = CertificateRequest(head=head, term=term)
            try:
                reply = await self._peers.call(
                    member.addr, member.tags.pp, PATH_CERTIFICATE, request, CertificateReply
                )
            except (PeerCallError, msgspec.ValidationError) as exc:
                log.info(
                    _log, "certificate not served over the peer API", head=head, error=str(exc)
                )
            else:
                return reply.cert
        return await self._certificate_pages(head, term)

    async def _certificate_pages(self, head: str, term: int) -> VoteCertificate | None:
        """``head``'s certificate for ``term``, page by page until it holds a majority of the
        members it counted (or the head sends no more); None when it sends nothing."""
        cert: VoteCertificate | None = None
        for _ in range(CERT_PAGES_MAX):
            first = len(cert.votes) if cert is not None else 0
            request = msgspec.json.encode(CertificateRequest(head=head, term=term, first=first))
            try:
                replies = await self._serf.query(
                    CERT_QUERY, request, timeout_s=self._vote_timeout_s
                )
                page = decode_certificate(replies[head])
            except KeyError:  # the head did not answer
                break
            except (msgspec.ValidationError, msgspec.DecodeError):
                break
            except Exception as exc:  # serf down or restarting: ask again later
                log.warning(_log, "certificate query failed", error=str(exc))
                break
            if (page.head, page.term) != (head, term) or not page.votes:
                break
            votes = {**(cert.votes if cert is not None else {}), **page.votes}
            cert = msgspec.structs.replace(page, votes=votes)
            if len(votes) >= quorum(cert.known):
                break
        return cert

    def _own(self, request: CertificateRequest) -> VoteCertificate | None:
        """The certificate ``request`` asks of this node: the one it won the asked term with."""
        cert = self._store.certificate
        me = self._ctx.node_name
        if cert is None or request.head != me or (cert.head, cert.term) != (me, request.term):
            return None
        return cert

    async def _on_certificate(self, from_node: str, payload: bytes) -> bytes | None:
        """The head answers with its certificate for the asked term; everyone else stays
        silent."""
        try:
            request = msgspec.json.decode(payload, type=CertificateRequest)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        cert = self._own(request)
        return None if cert is None else certificate_page(cert, request.first)

    async def _on_peer_certificate(self, body: bytes) -> bytes:
        """The whole certificate over the peer API (malformed requests: a 400 there)."""
        request = msgspec.json.decode(body, type=CertificateRequest)
        return msgspec.json.encode(CertificateReply(cert=self._own(request)))
