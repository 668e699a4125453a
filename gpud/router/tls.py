"""TLS on the router's listener (``router.tls_cert``, ``router.tls_key``).

The private key proves the router's name to every client, so a key file others may read or
anyone but its owner may write is refused (like a keys file others may write): the router then
does not listen at all rather than fall back to plain HTTP. Both files are read again at each
attempt to listen, so a fixed file is taken without a restart.
"""

from __future__ import annotations

import os
import ssl
import stat

from gpud.errors import ConfigError


def key_mode_refusal(path: str, mode: int) -> str | None:
    """Why a TLS private key file with ``mode`` must not be used (pure): every user may read
    it, or group or others may write it. Group read is left to the operator (an ssl-cert
    group is a common convention)."""
    if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        return (
            f"router.tls_key {path} is readable or writable beyond its owner and group (mode "
            f"{mode & 0o777:04o}): anyone who reads it can pose as this router; chmod 0600 it"
        )
    return None


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The listener's TLS context (TLS 1.2 or later); ConfigError naming the file and the
    cause when a file is unreadable, malformed, mismatched or its key file mode is refused."""
    try:
        mode = os.stat(key).st_mode
    except OSError as exc:
        raise ConfigError(f"router.tls_key: cannot read {key}: {exc.strerror}") from None
    if (refusal := key_mode_refusal(key, mode)) is not None:
        raise ConfigError(refusal)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ConfigError(f"router.tls_cert/tls_key: {exc.filename}: not found") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"router.tls_cert {cert} / tls_key {key}: not a PEM certificate chain and its "
            f"private key ({exc})"
        ) from None
    return context
