"""Who may make a host run a deployment: operators, by Ed25519 signature of the spec.

A spec makes every matching host run a command, so holding the cluster key (enough to gossip
and to answer the peer API) is not enough: a node runs a spec only if it verifies the
signature of one of the operator public keys in its own config (`[deployments] operators`).
The signature covers the canonical JSON of the spec (`spec.encode`), which every node
recomputes from the record it holds, so it survives any number of hops unchanged. A delete is
signed too: the signature covers the tombstone's name and version (`delete_message`), so a
signed delete cannot be replayed against a later apply of the same name.

Keys are raw Ed25519 keys in base64: a private key file holds one line, a public key is one
short string to paste into every host's config.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import TYPE_CHECKING

from gpud.deployments.spec import DeploymentSpec, encode
from gpud.deployments.version import SpecVersion
from gpud.errors import GpudError

# cryptography is imported where a key is used, not here: it is 7.5 MiB of every agent's RSS,
# and a node only needs it once a signed spec or delete reaches it (bench.idle).
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


class AuthorityError(GpudError):
    """A key or signature that cannot be used (malformed), with the reason."""


def keygen() -> tuple[str, str]:
    """A new (private, public) key pair, both base64 of the raw 32-byte keys."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    raw_private = private.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    return _b64(raw_private), public_of(private)


def public_of(private: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return _b64(raw)


def load_private(text: str) -> Ed25519PrivateKey:
    """A private key file: the base64 key alone, or `gpud deploy keygen`'s output as is."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    found = [w[-1] for w in lines if len(w) == 1 or (len(w) == 2 and w[0] == "private")]
    if len(found) != 1:
        raise AuthorityError("expected one private key (the line `private KEY`, or KEY alone)")
    raw = _unb64(found[0], 32, "private key")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(raw)


def sign(spec: DeploymentSpec, private: Ed25519PrivateKey) -> tuple[str, str]:
    """(operator public key, signature) for ``spec``."""
    return public_of(private), _b64(private.sign(encode(spec)))


def delete_message(name: str, version: SpecVersion) -> bytes:
    """What an operator signs to delete ``name``: its tombstone's name and version. The prefix
    keeps it apart from a spec's canonical JSON."""
    return f"gpud-deploy-delete\0{name}\0{version.lamport}\0{version.origin}".encode()


def sign_delete(name: str, version: SpecVersion, private: Ed25519PrivateKey) -> tuple[str, str]:
    """(operator public key, signature) for the tombstone of ``name`` at ``version``."""
    return public_of(private), _b64(private.sign(delete_message(name, version)))


def refusal(
    spec: DeploymentSpec,
    operator: str,
    signature: str,
    trusted: Iterable[str],
    *,
    verified: bool = False,
) -> str:
    """Why this node must not run ``spec`` ("" when a trusted operator signed it). Pure.
    ``verified``: the caller already checked the signature (`signature_refusal`), so only
    whether the operator is trusted is left to judge."""
    if not operator or not signature:
        return "not signed by an operator; apply it with `gpud deploy apply --key FILE`"
    untrusted = _untrusted(operator, trusted)
    if untrusted or verified:
        return untrusted
    return _bad_signature(encode(spec), operator, signature)


def signature_refusal(spec: DeploymentSpec, operator: str, signature: str) -> str:
    """Why ``signature`` is not ``operator``'s signature of ``spec`` ("" when it is), whether
    or not this host trusts that operator. Pure."""
    return _bad_signature(encode(spec), operator, signature)


def delete_refusal(
    name: str,
    version: SpecVersion,
    operator: str,
    signature: str,
    trusted: Iterable[str],
    *,
    verified: bool = False,
) -> str:
    """Why this node must not apply the tombstone of ``name`` at ``version`` ("" when a trusted
    operator signed it). Pure. ``verified``: as for `refusal`."""
    if not operator or not signature:
        return (
            "the delete is not signed by an operator; delete it with "
            f"`gpud deploy delete {name} --key FILE`"
        )
    untrusted = _untrusted(operator, trusted)
    if untrusted or verified:
        return untrusted
    return _bad_signature(delete_message(name, version), operator, signature)


def delete_signature_refusal(name: str, version: SpecVersion, operator: str, signature: str) -> str:
    """Why ``signature`` is not ``operator``'s signature of the tombstone of ``name`` at
    ``version`` ("" when it is), whether or not this host trusts that operator. Pure."""
    return _bad_signature(delete_message(name, version), operator, signature)


def _untrusted(operator: str, trusted: Iterable[str]) -> str:
    if operator in set(trusted):
        return ""
    return (
        f"signed by operator key {operator[:12]}..., which is not in this host's "
        "[deployments] operators"
    )


def _bad_signature(message: bytes, operator: str, signature: str) -> str:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        public = Ed25519PublicKey.from_public_bytes(_unb64(operator, 32, "operator key"))
        public.verify(_unb64(signature, 64, "signature"), message)
    except (AuthorityError, InvalidSignature, ValueError):
        return f"the signature does not verify with operator key {operator[:12]}..."
    return ""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise AuthorityError(f"{what} is not base64") from None
    if len(raw) != size:
        raise AuthorityError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw
