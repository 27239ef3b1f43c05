"""The simulator's core: keys, versions, usage, and AES-256-GCM in the PKCS#11 token.

It speaks its own vocabulary (key ids, versions, bytes) and raises ``ekm_sim.errors``; the
XKS edge translates. Checks run in the order the reference proxy uses (spec section 5.1 of
our notes): key in store → secondary authorization → size limits → state → crypto.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import os
import struct
import time
from dataclasses import dataclass
from typing import Any, Final

from pkcs11 import Attribute, KeyType

from ekm_sim.config import HealthConfig, LimitsConfig, StoreConfig
from ekm_sim.errors import (
    AccessDenied,
    HSMFailure,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
    KeyUsageNotPermitted,
    Overloaded,
    TooLarge,
)
from ekm_sim.registry import KeyRecord, KeyRegistry
from shared.pkcs11pool import (
    HSMDataInvalid,
    HSMError,
    HSMKeyMissing,
    HSMKeyUsageNotPermitted,
    HSMPoolExhausted,
    PKCS11Pool,
    SessionContext,
    aes_gcm,
)
from shared.xks import bind_aad, cdiv

__all__ = ["Health", "KeyInfo", "KeyStore", "Sealed", "key_version_id", "parse_ctm"]

IV_BYTES: Final = 12
TAG_BYTES: Final = 16
# ciphertextMetadata layout, version 1: b"\x01" || uint32_be(key version). Five bytes, well
# under the spec's 20; bound into the AAD, so a changed version fails authentication.
_CTM_V1: Final = b"\x01"
_CTM_LEN: Final = 5


def key_version_id(version: int) -> bytes:
    """The CKA_ID of one version of a key; versions of a key share its CKA_LABEL."""
    return struct.pack(">I", version)


def make_ctm(version: int) -> bytes:
    return _CTM_V1 + struct.pack(">I", version)


def parse_ctm(ctm: bytes | None) -> int:
    """The key version a ciphertext was made with. :raises InvalidCiphertext: if unreadable."""
    if ctm is None or len(ctm) != _CTM_LEN or ctm[:1] != _CTM_V1:
        raise InvalidCiphertext()
    (version,) = struct.unpack(">I", ctm[1:])
    return int(version)


@dataclass(frozen=True, slots=True)
class Sealed:
    ciphertext: bytes
    iv: bytes
    tag: bytes
    ciphertext_metadata: bytes
    cdiv: bytes | None


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    enabled: bool
    usage: tuple[str, ...]
    versions: tuple[int, ...]
    spec: str


@dataclass(frozen=True, slots=True)
class Health:
    healthy: bool
    degraded: bool
    latency_ms: float
    token: dict[str, str]
    checked_at: float


def _usage(key: Any) -> tuple[str, ...]:
    usage = []
    for attr, name in ((Attribute.ENCRYPT, "ENCRYPT"), (Attribute.DECRYPT, "DECRYPT"),
                       (Attribute.WRAP, "WRAP"), (Attribute.UNWRAP, "UNWRAP")):
        if key[attr]:
            usage.append(name)
    return tuple(usage)


def _spec(key: Any) -> str:
    if key[Attribute.KEY_TYPE] == KeyType.AES:
        return f"AES_{key[Attribute.VALUE_LEN] * 8}"
    return "UNSUPPORTED"


class KeyStore:
    """Encrypt, decrypt, describe and health-check keys of one token."""

    def __init__(self, *, pool: PKCS11Pool, registry: KeyRegistry, limits: LimitsConfig,
                 health: HealthConfig, iv_from_hsm: bool) -> None:
        self._pool = pool
        self._registry = registry
        self._limits = limits
        self._health_config = health
        self._iv_from_hsm = iv_from_hsm
        self._health: Health | None = None
        self._health_lock = asyncio.Lock()

    # -- lookups ---------------------------------------------------------------------------

    def _record(self, store: StoreConfig, key_id: str, principal: str | None) -> KeyRecord:
        allowed = store.allows_key(key_id) and key_id != self._health_config.test_key
        record = self._registry.get(key_id) if allowed else None
        if record is None and allowed:
            # Another process (the CLI) may have just made it: look at the file now rather
            # than after the refresh interval.
            record = self._registry.reload().get(key_id)
        if record is None:
            raise KeyNotFound(key_id)
        if store.allowed_principals and not any(
            fnmatch.fnmatchcase(principal or "", p) for p in store.allowed_principals
        ):
            raise AccessDenied(principal)
        return record

    async def _run(self, key_id: str, fn: Any, *, operation: str,
                   decrypting: bool = False) -> Any:
        """Run ``fn`` on a session and turn HSM errors into key store errors."""
        try:
            try:
                return await self._pool.run(fn, decrypting=decrypting)
            except HSMKeyMissing:
                # A cached object handle may be stale (the key was deleted and made again by
                # the CLI); the pool has dropped every session's cached handles: look again.
                return await self._pool.run(fn, decrypting=decrypting)
        except HSMKeyMissing:
            raise KeyNotFound(key_id) from None
        except HSMPoolExhausted as exc:
            raise Overloaded(str(exc)) from None
        except HSMDataInvalid:
            raise InvalidCiphertext() from None
        except HSMKeyUsageNotPermitted:
            raise KeyUsageNotPermitted(key_id, operation) from None
        except HSMError as exc:
            raise HSMFailure(f"the HSM failed: {exc}") from None

    # -- operations ------------------------------------------------------------------------

    async def describe(self, store: StoreConfig, key_id: str, *, principal: str | None
                       ) -> KeyInfo:
        """Usage, state and spec of a key.

        :raises KeyNotFound: :raises AccessDenied: :raises HSMFailure:
        """
        record = self._record(store, key_id, principal)
        label, version = key_id, key_version_id(record.current_version)

        def read(ctx: SessionContext) -> tuple[tuple[str, ...], str]:
            key = ctx.secret_key(label, version)
            return _usage(key), _spec(key)

        usage, spec = await self._run(key_id, read, operation="GetKeyMetadata")
        return KeyInfo(key_id=key_id, enabled=record.enabled, usage=usage,
                       versions=record.versions, spec=spec)

    def _check_sizes(self, *, data: bytes, aad: bytes | None, data_field: str) -> None:
        if len(data) > self._limits.max_plaintext_bytes:
            raise TooLarge(data_field, len(data), self._limits.max_plaintext_bytes)
        if aad is not None and len(aad) > self._limits.max_aad_bytes:
            raise TooLarge("additionalAuthenticatedData", len(aad), self._limits.max_aad_bytes)

    async def encrypt(self, store: StoreConfig, key_id: str, plaintext: bytes,
                      aad: bytes | None, *, want_cdiv: bool, principal: str | None) -> Sealed:
        """AES-256-GCM under the key's newest version.

        With ``want_cdiv`` the CDIV is computed, then the result is decrypted again to prove
        it (spec Appendix C); a key that may not decrypt fails that step.

        :raises KeyNotFound: :raises AccessDenied: :raises TooLarge: :raises KeyDisabled:
        :raises KeyUsageNotPermitted: :raises Overloaded: :raises HSMFailure:
        """
        record = self._record(store, key_id, principal)
        self._check_sizes(data=plaintext, aad=aad, data_field="plaintext")
        if not record.enabled:
            raise KeyDisabled(key_id)
        version = record.current_version
        ctm = make_ctm(version)
        bound = bind_aad(aad, ctm)
        iv_from_hsm = self._iv_from_hsm

        def seal(ctx: SessionContext) -> Sealed:
            key = ctx.secret_key(key_id, key_version_id(version))
            iv = ctx.session.generate_random(IV_BYTES * 8) if iv_from_hsm else os.urandom(IV_BYTES)
            out = aes_gcm(key, plaintext, iv=iv, aad=bound, decrypt=False)
            ciphertext, tag = out[:-TAG_BYTES], out[-TAG_BYTES:]
            integrity = None
            if want_cdiv:
                # Computed before the verification decrypt, as Appendix C orders. A failure
                # of the verification (other than usage) is ours, not the caller's: the pool
                # reports it as a general HSM error, not as bad data.
                integrity = cdiv(aad, ctm, iv, ciphertext, tag)
                check = aes_gcm(key, out, iv=iv, aad=bound, decrypt=True)
                if not hmac.compare_digest(check, plaintext):
                    raise HSMError("verification decrypt returned different data")
            return Sealed(ciphertext, iv, tag, ctm, integrity)

        # A usage refusal here is either the encrypt itself or the CDIV verification decrypt
        # on an encrypt-only key; both are InvalidKeyUsage for the caller.
        operation = "encrypt with a CDIV (which needs decrypt)" if want_cdiv else "encrypt"
        return await self._run(key_id, seal, operation=operation)  # type: ignore[no-any-return]

    async def decrypt(self, store: StoreConfig, key_id: str, ciphertext: bytes, *, iv: bytes,
                      tag: bytes, aad: bytes | None, ctm: bytes | None,
                      principal: str | None) -> bytes:
        """AES-256-GCM decryption with the version recorded in ``ctm``.

        Every input fault (IV, tag, AAD, metadata, version) is one ``InvalidCiphertext``.

        :raises KeyNotFound: :raises AccessDenied: :raises TooLarge: :raises KeyDisabled:
        :raises InvalidCiphertext: :raises KeyUsageNotPermitted: :raises HSMFailure:
        """
        record = self._record(store, key_id, principal)
        self._check_sizes(data=ciphertext, aad=aad, data_field="ciphertext")
        if not record.enabled:
            raise KeyDisabled(key_id)
        # Our ciphertexts always carry 12-byte IVs and 16-byte tags (python-pkcs11 accepts
        # GCM IVs of at most 12 bytes); anything else cannot be one of ours.
        if len(iv) != IV_BYTES or len(tag) != TAG_BYTES:
            raise InvalidCiphertext()
        version = parse_ctm(ctm)
        if version not in record.versions:
            # Made by another worker right after a rotation this one has not read yet: an
            # InvalidCiphertext would look permanent to the caller.
            record = self._registry.reload().get(key_id) or record
            if version not in record.versions:
                raise InvalidCiphertext()
        bound = bind_aad(aad, ctm)

        def open_(ctx: SessionContext) -> bytes:
            key = ctx.secret_key(key_id, key_version_id(version))
            return aes_gcm(key, ciphertext + tag, iv=iv, aad=bound, decrypt=True)

        return await self._run(  # type: ignore[no-any-return]
            key_id, open_, operation="decrypt", decrypting=True)

    async def health(self) -> Health:
        """A deep check, cached: a real encrypt and decrypt with the dedicated test key."""
        cached = self._health
        if cached is not None and time.monotonic() - cached.checked_at < (
            self._health_config.cache_seconds
        ):
            return cached
        async with self._health_lock:
            cached = self._health
            if cached is not None and time.monotonic() - cached.checked_at < (
                self._health_config.cache_seconds
            ):
                return cached
            self._health = await self._probe()
            return self._health

    async def _probe(self) -> Health:
        label = self._health_config.test_key
        probe = os.urandom(32)

        def round_trip(ctx: SessionContext) -> bool:
            key = ctx.secret_key(label, key_version_id(1))
            iv = ctx.session.generate_random(IV_BYTES * 8)
            out = aes_gcm(key, probe, iv=iv, aad=b"ekm-sim health", decrypt=False)
            back = aes_gcm(key, out, iv=iv, aad=b"ekm-sim health", decrypt=True)
            return hmac.compare_digest(back, probe)

        started = time.perf_counter()
        try:
            ok = bool(await self._pool.run(round_trip))
        except HSMError:
            ok = False
        latency_ms = (time.perf_counter() - started) * 1000
        try:
            token = self._pool.token_info()
        except Exception:
            token = {"label": self._pool.token_label, "model": "unknown",
                     "manufacturer": "unknown", "serial": ""}
        return Health(healthy=ok, degraded=latency_ms > self._health_config.degraded_after_ms,
                      latency_ms=latency_ms, token=token, checked_at=time.monotonic())
