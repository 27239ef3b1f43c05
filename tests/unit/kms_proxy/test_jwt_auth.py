"""Service-principal tokens: real pyjwt-signed tokens, every refusal the issue names."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from kms_proxy.api.jwt_auth import (
    ASYMMETRIC_ALGORITHMS,
    TokenError,
    TokenVerifier,
    TrustedIssuer,
    key_fits,
)

ISSUER = "https://sts.dev.test"
AUDIENCE = "kms-proxy"


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"ec": ec.generate_private_key(ec.SECP256R1()),
            "other_ec": ec.generate_private_key(ec.SECP256R1()),
            "rsa": rsa.generate_private_key(65537, 2048)}


@pytest.fixture
def verifier(tmp_path: Path, keys: dict[str, Any]) -> TokenVerifier:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(keys["ec"].public_key()))
    jwk.update(kid="k1", alg="ES256", use="sig")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    return TokenVerifier([TrustedIssuer.from_files(issuer=ISSUER, audience=AUDIENCE,
                                                   algorithms=["ES256"], jwks_file=jwks)])


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300,
            "product": "oss", "account": "1234567890123456"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def token(key: Any, algorithm: str = "ES256", kid: str | None = "k1", **overrides: Any) -> str:
    headers = {"kid": kid} if kid else {}
    return jwt.encode(claims(**overrides), key, algorithm=algorithm, headers=headers)


def test_a_valid_token(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    got = verifier.verify(token(keys["ec"]))
    assert (got.product, got.account_id, got.issuer) == ("oss", "1234567890123456", ISSUER)


@pytest.mark.parametrize(("change", "code"), [
    ({"exp": int(time.time()) - 120}, "InvalidSecurityToken.Expired"),
    ({"aud": "someone-else"}, "InvalidSecurityToken.Malformed"),
    ({"iss": "https://evil.test"}, "InvalidSecurityToken.Malformed"),
    ({"exp": None}, "InvalidSecurityToken.Malformed"),
    ({"product": None}, "InvalidSecurityToken.Malformed"),
    ({"account": "not-digits"}, "InvalidSecurityToken.Malformed"),
    ({"nbf": int(time.time()) + 3600}, "InvalidSecurityToken.Malformed"),
])
def test_bad_claims(verifier: TokenVerifier, keys: dict[str, Any], change: dict[str, Any],
                    code: str) -> None:
    with pytest.raises(TokenError) as caught:
        verifier.verify(token(keys["ec"], **change))
    assert caught.value.code == code and caught.value.status == 400


def test_wrong_signing_key(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    with pytest.raises(TokenError, match="refused"):
        verifier.verify(token(keys["other_ec"]))


def test_unknown_key_id(verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    with pytest.raises(TokenError, match="key id"):
        verifier.verify(token(keys["ec"], kid="k2"))


def test_alg_none_is_refused(verifier: TokenVerifier) -> None:
    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    unsigned = f"{b64({'alg': 'none', 'kid': 'k1'})}.{b64(claims())}."
    with pytest.raises(TokenError, match="algorithm"):
        verifier.verify(unsigned)


def test_hs256_with_the_public_key_as_secret_is_refused(
        verifier: TokenVerifier, keys: dict[str, Any]) -> None:
    # The classic confusion: an HMAC "signed" with the issuer's published public key.
    public_pem = keys["ec"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "kid": "k1", "typ": "JWT"}

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    import hashlib
    import hmac

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(TokenError, match="algorithm"):
        verifier.verify(f"{signing_input}.{b64(mac)}")


def test_an_algorithm_the_issuer_does_not_use(verifier: TokenVerifier,
                                              keys: dict[str, Any]) -> None:
    with pytest.raises(TokenError, match="algorithm"):
        verifier.verify(token(keys["rsa"], algorithm="RS256"))


def test_garbage(verifier: TokenVerifier) -> None:
    for bad in ("", "abc", "a.b.c", "x" * 10_000):
        with pytest.raises(TokenError):
            verifier.verify(bad)


def test_symmetric_algorithms_cannot_be_configured(tmp_path: Path,
                                                   keys: dict[str, Any]) -> None:
    pem = tmp_path / "k.pem"
    pem.write_bytes(keys["ec"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ValueError, match="subset"):
        TrustedIssuer.from_files(issuer=ISSUER, audience=AUDIENCE, algorithms=["HS256"],
                                 pem_file=pem)
    issuer = TrustedIssuer.from_files(issuer=ISSUER, audience=AUDIENCE,
                                      algorithms=["ES256"], pem_file=pem)
    assert TokenVerifier([issuer]).verify(token(keys["ec"], kid=None)).product == "oss"


def _jwk(private: Any, kid: str, **members: str) -> dict[str, Any]:
    public = private.public_key()
    algorithm = (jwt.algorithms.RSAAlgorithm if isinstance(public, rsa.RSAPublicKey)
                 else jwt.algorithms.OKPAlgorithm if isinstance(public, ed25519.Ed25519PublicKey)
                 else jwt.algorithms.ECAlgorithm)
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(public))
    jwk.update(kid=kid, **members)
    return jwk


@pytest.fixture
def mixed(tmp_path: Path, keys: dict[str, Any]) -> tuple[TokenVerifier, dict[str, Any]]:
    """An issuer in the middle of a key-family rollover: EC, RSA and Ed25519 keys, every
    asymmetric algorithm allowed, no "alg" member on the JWKs."""
    ed = ed25519.Ed25519PrivateKey.generate()
    ec384 = ec.generate_private_key(ec.SECP384R1())
    by_kid = {"ec-1": keys["ec"], "rsa-1": keys["rsa"], "ed-1": ed, "ec384-1": ec384}
    jwks = tmp_path / "mixed.json"
    jwks.write_text(json.dumps({"keys": [_jwk(k, kid) for kid, k in by_kid.items()]}))
    issuer = TrustedIssuer.from_files(issuer=ISSUER, audience=AUDIENCE,
                                      algorithms=ASYMMETRIC_ALGORITHMS, jwks_file=jwks)
    return TokenVerifier([issuer]), by_kid


def _forged(algorithm: str, kid: str) -> str:
    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': algorithm, 'kid': kid})}.{b64(claims())}.AAAA"


@pytest.mark.parametrize("algorithm", sorted(ASYMMETRIC_ALGORITHMS))
def test_an_algorithm_its_key_cannot_do_is_a_typed_refusal(
        mixed: tuple[TokenVerifier, dict[str, Any]], algorithm: str) -> None:
    """pyjwt raises a bare TypeError for an RS256 header on an EC key (and so on): that
    reached the client as a 500 before any signature was checked."""
    verifier, by_kid = mixed
    for kid, key in by_kid.items():
        if key_fits(algorithm, key.public_key()):
            continue
        with pytest.raises(TokenError) as caught:
            verifier.verify(_forged(algorithm, kid))
        assert caught.value.code == "InvalidSecurityToken.Malformed", (algorithm, kid)
        assert "does not fit" in caught.value.message


@pytest.mark.parametrize(("algorithm", "kid"), [
    ("ES256", "ec-1"), ("RS256", "rsa-1"), ("PS384", "rsa-1"), ("EdDSA", "ed-1"),
    ("ES384", "ec384-1")])
def test_each_family_still_verifies(mixed: tuple[TokenVerifier, dict[str, Any]],
                                    algorithm: str, kid: str) -> None:
    verifier, by_kid = mixed
    assert verifier.verify(token(by_kid[kid], algorithm=algorithm, kid=kid)).product == "oss"


def test_a_jwk_alg_member_binds_its_key(tmp_path: Path, keys: dict[str, Any]) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [_jwk(keys["rsa"], "r", alg="PS256")]}))
    verifier = TokenVerifier([TrustedIssuer.from_files(
        issuer=ISSUER, audience=AUDIENCE, algorithms=["RS256", "PS256"], jwks_file=jwks)])
    assert verifier.verify(token(keys["rsa"], algorithm="PS256", kid="r")).product == "oss"
    with pytest.raises(TokenError, match="does not fit"):
        verifier.verify(token(keys["rsa"], algorithm="RS256", kid="r"))
    # Leaving the kid out picks the issuer's one key, and its alg still binds it.
    with pytest.raises(TokenError, match="does not fit"):
        verifier.verify(token(keys["rsa"], algorithm="RS256", kid=None))
    assert verifier.verify(token(keys["rsa"], algorithm="PS256", kid=None)).product == "oss"


def test_a_private_jwk_is_refused_when_loaded(tmp_path: Path, keys: dict[str, Any]) -> None:
    private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys["rsa"]))
    private["kid"] = "r"
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [private]}))
    with pytest.raises(ValueError, match="private key"):
        TrustedIssuer.from_files(issuer=ISSUER, audience=AUDIENCE, algorithms=["RS256"],
                                 jwks_file=jwks)


def test_the_product_kms_is_the_fronts_own(verifier: TokenVerifier,
                                           keys: dict[str, Any]) -> None:
    """The lifecycle sweep is audited as service/kms: no token may act under that name."""
    with pytest.raises(TokenError, match="no valid product"):
        verifier.verify(token(keys["ec"], product="kms"))


def test_lifetime_and_products_per_issuer(tmp_path: Path, keys: dict[str, Any]) -> None:
    pem = tmp_path / "k.pem"
    pem.write_bytes(keys["ec"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    verifier = TokenVerifier([TrustedIssuer.from_files(
        issuer=ISSUER, audience=AUDIENCE, algorithms=["ES256"], pem_file=pem,
        max_lifetime_s=600, products=["oss", "rds"])])
    now = int(time.time())
    assert verifier.verify(token(keys["ec"], kid=None, exp=now + 600)).product == "oss"
    with pytest.raises(TokenError, match="lifetime"):
        verifier.verify(token(keys["ec"], kid=None, exp=now + 601))
    with pytest.raises(TokenError, match="may not act for"):
        verifier.verify(token(keys["ec"], kid=None, product="ecs"))
    # The default maximum is a day.
    default = TokenVerifier([TrustedIssuer.from_files(
        issuer=ISSUER, audience=AUDIENCE, algorithms=["ES256"], pem_file=pem)])
    with pytest.raises(TokenError, match="lifetime"):
        default.verify(token(keys["ec"], kid=None, exp=now + 10**9))
    with pytest.raises(ValueError, match="products"):
        TrustedIssuer.from_files(issuer=ISSUER, audience=AUDIENCE, algorithms=["ES256"],
                                 pem_file=pem, products=["kms"])
