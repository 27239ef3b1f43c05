"""TLS contexts for both services and for their clients.

TLS 1.2 or newer only, with forward-secret AEAD suites that include the ones the XKS spec
lists (spec L94). Client-certificate subjects are checked by the edges after the handshake,
because Python's ``ssl`` can check the chain but not a subject allow-list.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

__all__ = ["client_context", "names_allowed", "peer_names", "server_context"]

# TLS 1.2 suites; TLS 1.3 suites are OpenSSL's defaults and all AEAD. Includes
# ECDHE-RSA/ECDSA-AES256-GCM-SHA384, which the XKS spec names.
_TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_context(
    *,
    cert: Path,
    key: Path,
    client_ca: Path | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """A server context; with ``require_client_cert`` the handshake fails without a client
    certificate that chains to ``client_ca``.

    :raises ValueError: if a client certificate is required but no CA is given.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.load_cert_chain(str(cert), str(key))
    if require_client_cert:
        if client_ca is None:
            raise ValueError("a client CA is required to require client certificates")
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(client_ca))
    return ctx


def client_context(
    *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A client context that trusts ``ca`` (or the system store) and may present a cert."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def peer_names(peercert: dict[str, Any] | None) -> set[str]:
    """The subject CN(s) and DNS/IP SANs of a verified peer certificate (``getpeercert()``)."""
    if not peercert:
        return set()
    names: set[str] = set()
    for rdn in peercert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                names.add(value)
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in ("DNS", "IP Address", "URI"):
            names.add(value)
    return names


def names_allowed(names: Iterable[str], allowed: Iterable[str]) -> bool:
    """Whether any of a peer's names is on the allow-list (exact match)."""
    return not set(names).isdisjoint(allowed)
