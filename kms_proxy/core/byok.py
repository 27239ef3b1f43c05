"""BYOK import parameters: the one-key RSA wrapping keys and tokens of GetParametersForImport,
and the unwrapping ImportKeyMaterial does (OpenAPI reference section 2.5).

Each GetParametersForImport makes a fresh RSA-2048 key pair, valid 24 hours, bound to one key
and one wrapping algorithm. The private half stays in this process's memory (bounded, the
oldest dropped first) and never reaches the store or a log, so a restart of the front makes
outstanding tokens invalid: ask for new parameters then.

The token is ``<id>.<secret>``: the id finds the entry, the secret is compared in constant
time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding

from kms_proxy.core.errors import (
    ExpiredImportToken,
    InvalidImportToken,
    InvalidKeyMaterial,
    InvalidParameter,
    UnsupportedOperation,
)

__all__ = ["REFUSED_WRAPPING_ALGORITHMS", "WRAPPING_ALGORITHMS", "ImportParameters",
           "ImportTokens", "key_check_value"]

TOKEN_LIFETIME: Final = timedelta(hours=24)


def _oaep(digest: type[hashes.HashAlgorithm]) -> Callable[[], AsymmetricPadding]:
    return lambda: padding.OAEP(mgf=padding.MGF1(digest()), algorithm=digest(), label=None)


# Wrapping algorithms for WrappingKeySpec RSA_2048 (reference section 2.5).
WRAPPING_ALGORITHMS: Final[Mapping[str, Callable[[], AsymmetricPadding]]] = MappingProxyType({
    "RSAES_OAEP_SHA_1": _oaep(hashes.SHA1),
    "RSAES_OAEP_SHA_256": _oaep(hashes.SHA256),
})
# The reference also lists RSAES_PKCS1_V1_5. OpenSSL answers a bad PKCS#1 v1.5 padding with
# random bytes ("implicit rejection", the Bleichenbacher defence), so a wrongly wrapped
# import would be taken as some other material about once in 250 tries, and the key then
# held to it for ever. Refused, as AWS KMS stopped taking it for imports.
REFUSED_WRAPPING_ALGORITHMS: Final = {
    "RSAES_PKCS1_V1_5": "PKCS#1 v1.5 unwrapping cannot tell a wrong wrapping from material "
                        "(OpenSSL's implicit rejection); use RSAES_OAEP_SHA_256",
}


def key_check_value(material: bytes) -> str:
    """A one-way check value of key material (8 bytes of HMAC-SHA256 keyed with it), kept so
    that a re-import can be held to the same material."""
    return hmac.new(material, b"kms-proxy key check value", hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class ImportParameters:
    key_id: str
    token: str = field(repr=False)
    public_key_der: bytes
    expires: datetime


@dataclass(frozen=True, slots=True)
class _Entry:
    key_id: str
    owner: str  # The key's account.
    secret: str = field(repr=False)
    algorithm: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    expires: datetime


class ImportTokens:
    """Outstanding import tokens of this process, in memory (each holds an RSA private key).

    Bounded, and fair: a key keeps its newest ``per_key`` tokens; when the whole store is
    full, expired tokens go first, then the oldest token of the account holding the most.
    An account asking in a loop displaces its own tokens first, and another account's only
    once that one holds as many.
    """

    def __init__(self, clock: Callable[[], datetime], *, capacity: int = 1000,
                 per_key: int = 8) -> None:
        self._clock = clock
        self._capacity = capacity
        self._per_key = per_key
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def _make_room(self, key_id: str) -> None:
        own = [t for t, e in self._entries.items() if e.key_id == key_id]
        for token_id in own[:max(0, len(own) - self._per_key + 1)]:
            del self._entries[token_id]
        if len(self._entries) >= self._capacity:
            # Expired tokens only when room is needed: until then they still answer
            # ExpiredImportToken, which says more than "not issued".
            now = self._clock()
            for token_id in [t for t, e in self._entries.items() if e.expires <= now]:
                del self._entries[token_id]
        while len(self._entries) >= self._capacity:
            held = Counter(e.owner for e in self._entries.values())
            heaviest = max(held, key=held.__getitem__)
            del self._entries[next(t for t, e in self._entries.items() if e.owner == heaviest)]

    async def issue(self, key_id: str, wrapping_spec: str, algorithm: str, *, owner: str
                    ) -> ImportParameters:
        """A new wrapping key and token for ``key_id`` of account ``owner``.

        :raises UnsupportedOperation: for EC_SM2. :raises InvalidParameter:
        """
        if wrapping_spec == "EC_SM2":
            raise UnsupportedOperation("WrappingKeySpec EC_SM2 is not implemented "
                                       "(no maintained SM2 library)")
        if wrapping_spec != "RSA_2048":
            raise InvalidParameter("WrappingKeySpec", "RSA_2048 or EC_SM2")
        if algorithm in REFUSED_WRAPPING_ALGORITHMS:
            raise UnsupportedOperation(REFUSED_WRAPPING_ALGORITHMS[algorithm])
        if algorithm not in WRAPPING_ALGORITHMS:
            raise InvalidParameter("WrappingAlgorithm", ", ".join(WRAPPING_ALGORITHMS))
        # RSA key generation takes tens of milliseconds: off the event loop.
        private_key = await asyncio.to_thread(rsa.generate_private_key, 65537, 2048)
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        expires = self._clock() + TOKEN_LIFETIME
        self._make_room(key_id)
        self._entries[token_id] = _Entry(key_id, owner, secret, algorithm, private_key,
                                         expires)
        public = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return ImportParameters(key_id, f"{token_id}.{secret}", public, expires)

    async def unwrap(self, key_id: str, token: str, encrypted: bytes) -> bytes:
        """The material ``encrypted`` holds, wrapped with the token's public key.

        :raises InvalidImportToken: :raises ExpiredImportToken: :raises InvalidKeyMaterial:
        """
        token_id, _, secret = token.partition(".")
        entry = self._entries.get(token_id)
        if entry is None or not hmac.compare_digest(entry.secret.encode(), secret.encode()):
            raise InvalidImportToken("it was not issued by this service (or the service "
                                     "restarted since); call GetParametersForImport")
        if entry.key_id != key_id:
            raise InvalidImportToken("it was issued for another key")
        if self._clock() >= entry.expires:
            raise ExpiredImportToken()
        try:
            return await asyncio.to_thread(entry.private_key.decrypt, encrypted,
                                           WRAPPING_ALGORITHMS[entry.algorithm]())
        except ValueError:
            raise InvalidKeyMaterial(f"it does not decrypt with the token's wrapping key "
                                     f"({entry.algorithm})") from None
