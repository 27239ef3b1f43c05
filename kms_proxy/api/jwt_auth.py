"""Service principals: cloud products authenticate with a JWT (``Authorization: Bearer``).

The front trusts configured issuers, each with its public keys (a JWKS file or one PEM) and
the asymmetric algorithms it signs with. A token names the product (``product``), the
account it acts for (``account``), and must carry ``iss``, ``aud``, ``exp`` and ``iat``.

Refused: an unknown issuer, a wrong audience, an expired or not-yet-valid token, ``alg:
none``, any HMAC algorithm (a public key used as an HMAC secret is the classic HS/RS
confusion), an algorithm the issuer was not configured for, a key id the JWKS lacks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt

__all__ = ["ServiceClaims", "TokenError", "TokenVerifier", "TrustedIssuer"]

# Asymmetric algorithms only: HS* would let a published public key act as an HMAC secret.
ASYMMETRIC_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384",
                                          "PS512", "ES256", "ES384", "ES512", "EdDSA"})
_PRODUCT: Final = re.compile(r"[a-z][a-z0-9-]{1,31}")
_ACCOUNT: Final = re.compile(r"[0-9]{6,20}")


class TokenError(Exception):
    """A bearer token was refused. ``code``/``status`` go on the wire; the message is safe
    (it never repeats the token)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.status, self.message = code, 400, message


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    issuer: str
    audience: str
    algorithms: frozenset[str]
    # Public keys by key id ("" for a single PEM key without a kid).
    keys: Mapping[str, Any]

    @classmethod
    def from_files(cls, *, issuer: str, audience: str, algorithms: Iterable[str],
                   jwks_file: Path | None = None, pem_file: Path | None = None
                   ) -> TrustedIssuer:
        """:raises ValueError: for symmetric algorithms, no key source, or unreadable keys."""
        algs = frozenset(algorithms)
        if not algs or not algs <= ASYMMETRIC_ALGORITHMS:
            raise ValueError(f"algorithms must be a non-empty subset of "
                             f"{sorted(ASYMMETRIC_ALGORITHMS)}")
        keys: dict[str, Any] = {}
        if jwks_file is not None:
            for jwk in jwt.PyJWKSet.from_dict(json.loads(jwks_file.read_text())).keys:
                keys[jwk.key_id or ""] = jwk.key
        if pem_file is not None:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            keys[""] = load_pem_public_key(pem_file.read_bytes())
        if not keys:
            raise ValueError("an issuer needs jwks_file or pem_file")
        return cls(issuer=issuer, audience=audience, algorithms=algs, keys=keys)


@dataclass(frozen=True, slots=True)
class ServiceClaims:
    issuer: str
    product: str
    account_id: str


class TokenVerifier:
    """Verify service tokens against the trusted issuers."""

    def __init__(self, issuers: Iterable[TrustedIssuer], *, leeway_seconds: int = 30) -> None:
        # pyjwt checks exp/nbf/iat against its own clock (it takes no clock parameter);
        # tests make tokens relative to the real time instead of pinning it.
        self._issuers = {i.issuer: i for i in issuers}
        self._leeway = leeway_seconds

    def verify(self, token: str) -> ServiceClaims:
        """:raises TokenError: ``InvalidSecurityToken.Expired`` or ``.Malformed``."""
        try:
            unverified_header = jwt.get_unverified_header(token)
            unverified_claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenError("InvalidSecurityToken.Malformed",
                             "The bearer token is not a well-formed JWT.") from None
        issuer = self._issuers.get(str(unverified_claims.get("iss")))
        if issuer is None:
            raise TokenError("InvalidSecurityToken.Malformed",
                             "The bearer token's issuer is not trusted.")
        algorithm = unverified_header.get("alg")
        # A JSON header may hold any value here (a list or object is not even hashable).
        if not isinstance(algorithm, str) or algorithm not in issuer.algorithms:
            raise TokenError("InvalidSecurityToken.Malformed",
                             f"The bearer token's algorithm {str(algorithm)[:16]!r} is not "
                             "accepted for its issuer.")
        key = issuer.keys.get(str(unverified_header.get("kid") or ""))
        if key is None and len(issuer.keys) == 1 and not unverified_header.get("kid"):
            key = next(iter(issuer.keys.values()))
        if key is None:
            raise TokenError("InvalidSecurityToken.Malformed",
                             "The bearer token's key id is unknown.")
        try:
            claims = jwt.decode(
                token, key=key, algorithms=[algorithm], audience=issuer.audience,
                issuer=issuer.issuer, leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise TokenError("InvalidSecurityToken.Expired",
                             "The bearer token has expired.") from None
        except jwt.PyJWTError as exc:
            raise TokenError("InvalidSecurityToken.Malformed",
                             f"The bearer token was refused: {type(exc).__name__}.") from None
        product, account = claims.get("product"), claims.get("account")
        if not isinstance(product, str) or not _PRODUCT.fullmatch(product):
            raise TokenError("InvalidSecurityToken.Malformed",
                             "The bearer token names no valid product.")
        if not isinstance(account, str) or not _ACCOUNT.fullmatch(account):
            raise TokenError("InvalidSecurityToken.Malformed",
                             "The bearer token names no valid account.")
        return ServiceClaims(issuer=issuer.issuer, product=product, account_id=account)
