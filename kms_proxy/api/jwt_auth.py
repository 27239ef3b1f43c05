"""Service principals: cloud products authenticate with a JWT (``Authorization: Bearer``).

The front trusts configured issuers, each with its public keys (a JWKS file or one PEM) and
the asymmetric algorithms it signs with. A token names the product (``product``), the
account it acts for (``account``), and must carry ``iss``, ``aud``, ``exp`` and ``iat``.

Refused: an unknown issuer, a wrong audience, an expired or not-yet-valid token, ``alg:
none``, any HMAC algorithm (a public key used as an HMAC secret is the classic HS/RS
confusion), an algorithm the issuer was not configured for or its key cannot do (an RS256
header on an EC key), a key id the JWKS lacks, a lifetime over the issuer's maximum, a
product the issuer may not speak for, and the product ``kms``: that name is the front's own
(the lifecycle sweep is audited as ``service/kms``), so no token may act as it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

__all__ = ["ACCOUNT_ID", "DEFAULT_MAX_LIFETIME_S", "ServiceClaims", "TokenError", "TokenVerifier",
           "TrustedIssuer", "key_fits", "product_ok"]

# Asymmetric algorithms only: HS* would let a published public key act as an HMAC secret.
ASYMMETRIC_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384",
                                          "PS512", "ES256", "ES384", "ES512", "EdDSA"})
_PRODUCT: Final = re.compile(r"[a-z][a-z0-9-]{1,31}")
ACCOUNT_ID: Final = re.compile(r"[0-9]{6,20}")
# Products no token may name: the front's own identity in audit lines (lifecycle.py).
RESERVED_PRODUCTS: Final = frozenset({"kms"})
# A token's longest accepted lifetime (exp - iat) unless an issuer sets its own.
DEFAULT_MAX_LIFETIME_S: Final = 24 * 3600

# The key type each algorithm needs. pyjwt raises a bare TypeError (not a PyJWTError) when
# handed a key of another family, so the pairing is checked before it is called.
_EC_CURVES: Final[Mapping[str, type[ec.EllipticCurve]]] = {
    "ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


def key_fits(algorithm: str, key: object) -> bool:
    """Whether ``key`` is a public key that ``algorithm`` verifies with."""
    if algorithm[:2] in ("RS", "PS"):
        return isinstance(key, rsa.RSAPublicKey)
    if algorithm in _EC_CURVES:
        return (isinstance(key, ec.EllipticCurvePublicKey)
                and isinstance(key.curve, _EC_CURVES[algorithm]))
    if algorithm == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


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
    # A JWK's own "alg" member, when it has one: the only algorithm that key may verify.
    key_algorithms: Mapping[str, str] = field(default_factory=dict)
    max_lifetime_s: int = DEFAULT_MAX_LIFETIME_S
    # The products this issuer may speak for; None: any well-formed name.
    products: frozenset[str] | None = None

    @classmethod
    def from_files(cls, *, issuer: str, audience: str, algorithms: Iterable[str],
                   jwks_file: Path | None = None, pem_file: Path | None = None,
                   max_lifetime_s: int = DEFAULT_MAX_LIFETIME_S,
                   products: Iterable[str] | None = None) -> TrustedIssuer:
        """:raises ValueError: for symmetric algorithms, no key source, unreadable keys or a
        private key (an issuer's key file holds only what verifies)."""
        algs = frozenset(algorithms)
        if not algs or not algs <= ASYMMETRIC_ALGORITHMS:
            raise ValueError(f"algorithms must be a non-empty subset of "
                             f"{sorted(ASYMMETRIC_ALGORITHMS)}")
        keys: dict[str, Any] = {}
        key_algorithms: dict[str, str] = {}
        if jwks_file is not None:
            document = json.loads(jwks_file.read_text())
            raw_keys = document.get("keys") if isinstance(document, dict) else None
            if not isinstance(raw_keys, list):
                raise ValueError("the JWKS file has no \"keys\" list")
            for raw in raw_keys:
                if not isinstance(raw, dict) or raw.get("use", "sig") != "sig":
                    continue
                if "d" in raw:
                    # A private JWK has no business in a trust store (and pyjwt would then
                    # fail every token with an AttributeError).
                    raise ValueError("the JWKS file holds a private key; give public keys")
                try:
                    jwk = jwt.PyJWK(raw)
                except jwt.PyJWTError as exc:
                    raise ValueError(f"the JWKS file holds an unusable key: {exc}") from None
                kid = jwk.key_id or ""
                keys[kid] = jwk.key
                if isinstance(raw.get("alg"), str):
                    key_algorithms[kid] = raw["alg"]
        if pem_file is not None:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            keys[""] = load_pem_public_key(pem_file.read_bytes())
        if not keys:
            raise ValueError("an issuer needs jwks_file or pem_file")
        if max_lifetime_s <= 0:
            raise ValueError("max_lifetime_s must be positive")
        allowed = None if products is None else frozenset(products)
        if allowed is not None and not all(product_ok(p) for p in allowed):
            raise ValueError(f"products must be names like 'oss' (not "
                             f"{sorted(RESERVED_PRODUCTS)})")
        return cls(issuer=issuer, audience=audience, algorithms=algs, keys=keys,
                   key_algorithms=key_algorithms, max_lifetime_s=max_lifetime_s,
                   products=allowed)


def product_ok(product: object) -> bool:
    return (isinstance(product, str) and _PRODUCT.fullmatch(product) is not None
            and product not in RESERVED_PRODUCTS)


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
        kid = str(unverified_header.get("kid") or "")
        if kid not in issuer.keys and len(issuer.keys) == 1 and not unverified_header.get("kid"):
            kid = next(iter(issuer.keys))  # One key, no kid: that key, with its own rules.
        key = issuer.keys.get(kid)
        if key is None:
            raise TokenError("InvalidSecurityToken.Malformed",
                             "The bearer token's key id is unknown.")
        if not key_fits(algorithm, key) or issuer.key_algorithms.get(kid, algorithm) != algorithm:
            raise TokenError("InvalidSecurityToken.Malformed",
                             f"The bearer token's algorithm {algorithm!r} does not fit the "
                             "issuer's key it names.")
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
        issued, expires = claims["iat"], claims["exp"]
        if (not isinstance(issued, int | float) or not isinstance(expires, int | float)
                or expires - issued > issuer.max_lifetime_s):
            raise TokenError("InvalidSecurityToken.Malformed",
                             f"The bearer token's lifetime exceeds the "
                             f"{issuer.max_lifetime_s} s its issuer may grant.")
        product, account = claims.get("product"), claims.get("account")
        if not product_ok(product):
            raise TokenError("InvalidSecurityToken.Malformed",
                             "The bearer token names no valid product.")
        assert isinstance(product, str)
        if issuer.products is not None and product not in issuer.products:
            raise TokenError("InvalidSecurityToken.Malformed",
                             "The bearer token's issuer may not act for that product.")
        if not isinstance(account, str) or not ACCOUNT_ID.fullmatch(account):
            raise TokenError("InvalidSecurityToken.Malformed",
                             "The bearer token names no valid account.")
        return ServiceClaims(issuer=issuer.issuer, product=product, account_id=account)
