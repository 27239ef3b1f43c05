"""External keys (XKI): the key material stays in an external key manager (EKM) behind an
XKS Proxy API v1 endpoint; the front keeps only the external key id and forwards crypto.

``generate`` links a new key version to an existing external key after checking it with
GetKeyMetadata (AES_256, ENCRYPT and DECRYPT, ENABLED; XKS section 4.2); the version's
material is the external key id in ASCII, nothing secret. ``seal``/``unseal`` are XKS
Encrypt/Decrypt with ``requestMetadata`` from the call (principal ARN, key ARN, operation,
request id), the core's AAD (the key version id, then the canonical encryption context)
as the XKS AAD, and a ciphertext data integrity value (CDIV) requested on every Encrypt
and checked by the client.

Sealed layout (what the core puts after the key version id in the ciphertext blob)::

    0x01                      format version of this layout
    u8  len(iv)               12 or 16 (XKS section 4.3)
    iv
    u8  len(ctm)              0 to 20; 0 when the EKM returned no ciphertextMetadata
    ctm                       the EKM's ciphertextMetadata (e.g. its key version)
    tag                       16 bytes, the AES-GCM authentication tag
    ciphertext                the rest; as long as the plaintext (at least 1 byte)

Everything the EKM needs to decrypt is in the blob, so rotation inside the EKM (a new
version behind the same external key id, named by ``ctm``) keeps old blobs decryptable.
The ctm is authenticated by the EKM (XKS section 4.4), so this layout adds no MAC of its
own; a malformed layout is ``InvalidCiphertext`` before any call, and a tampered field is
``InvalidCiphertext`` from the EKM.

Failures become the core's errors in one table (``_REJECTIONS``); an unreachable or slow
EKM is ``DependencyUnavailable`` (503-class), a key disabled in the EKM is
``KeyStateInvalid`` with ``Rejected.Disabled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from kms_proxy.backends.xks_client import (
    XKSClient,
    XKSClientError,
    XKSInvalidResponse,
    XKSRejected,
    XKSUnavailable,
)
from kms_proxy.core.blob import VERSION_ID_LENGTH
from kms_proxy.core.errors import (
    AccessDenied,
    DependencyUnavailable,
    InvalidCiphertext,
    InvalidParameter,
    KeyNotFound,
    KeyStateInvalid,
    KmsError,
    Throttled,
    UnsupportedOperation,
)
from kms_proxy.core.model import CallInfo, KeySpec, KeyStorageMechanism, KeyVersion
from shared.xks import (
    EXTERNAL_KEY_ID,
    IV_LENGTHS,
    MAX_AAD_BYTES,
    MAX_CTM_BYTES,
    TAG_LENGTH,
    DecryptRequest,
    EncryptRequest,
    ErrorName,
    HealthStatus,
    KeyMetadataResponse,
    RequestMetadata,
)

__all__ = ["ConnectionState", "ExternalBackend", "HealthProbe", "pack_sealed",
           "unpack_sealed"]

FORMAT_V1: Final = 1
BACKEND: Final = "external"
_SYMMETRIC_ONLY: Final = "external keys are symmetric only (AES-256 in the external key manager)"

log = logging.getLogger("kms_proxy.xks")


# -- the sealed layout -------------------------------------------------------------------


def pack_sealed(iv: bytes, ctm: bytes | None, tag: bytes, ciphertext: bytes) -> bytes:
    """The sealed bytes for one XKS Encrypt response (layout in the module docstring)."""
    ctm = ctm or b""
    assert len(iv) in IV_LENGTHS and len(ctm) <= MAX_CTM_BYTES and len(tag) == TAG_LENGTH
    return (struct.pack(">BB", FORMAT_V1, len(iv)) + iv + struct.pack(">B", len(ctm)) + ctm
            + tag + ciphertext)


def unpack_sealed(sealed: bytes) -> tuple[bytes, bytes | None, bytes, bytes]:
    """``(iv, ctm or None, tag, ciphertext)``. :raises InvalidCiphertext: if malformed."""
    if len(sealed) < 2 or sealed[0] != FORMAT_V1 or sealed[1] not in IV_LENGTHS:
        raise InvalidCiphertext()
    iv_end = 2 + sealed[1]
    if len(sealed) <= iv_end:
        raise InvalidCiphertext()
    ctm_len = sealed[iv_end]
    ctm_end = iv_end + 1 + ctm_len
    if ctm_len > MAX_CTM_BYTES or len(sealed) < ctm_end + TAG_LENGTH + 1:
        raise InvalidCiphertext()
    iv, ctm = sealed[2:iv_end], sealed[iv_end + 1:ctm_end]
    tag, ciphertext = sealed[ctm_end:ctm_end + TAG_LENGTH], sealed[ctm_end + TAG_LENGTH:]
    return iv, ctm or None, tag, ciphertext


# -- XKS failures as core errors ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Failure:
    """What a mapping needs to say who was refused what."""

    call: CallInfo
    external_key_id: str
    decrypting: bool

    @property
    def verb(self) -> str:
        return "decryption" if self.decrypting else "encryption"


def _disabled(f: _Failure) -> KmsError:
    # The front's own key state is Enabled; say where the key is disabled.
    return KeyStateInvalid("Disabled", f.call.operation, "Rejected.Disabled",
                           f"The external key {f.external_key_id!r} is disabled in the "
                           "external key manager.")


def _unavailable(reason: str) -> Callable[[_Failure], KmsError]:
    return lambda f: DependencyUnavailable(BACKEND, reason)


# XKS errorName -> core error, for Encrypt and Decrypt (XKS section 5). The EKM's
# errorMessage is logged, never shown: like AWS KMS, the front does not pass it on.
_REJECTIONS: Final[Mapping[ErrorName, Callable[[_Failure], KmsError]]] = MappingProxyType({
    ErrorName.INVALID_STATE: _disabled,
    ErrorName.KEY_NOT_FOUND: lambda f: KeyNotFound(
        f"{f.external_key_id} (no longer in the external key manager)"),
    ErrorName.INVALID_KEY_USAGE: lambda f: UnsupportedOperation(
        f"the external key manager does not permit {f.verb} with external key "
        f"{f.external_key_id!r}"),
    ErrorName.ACCESS_DENIED: lambda f: AccessDenied(
        f.call.principal_arn, f.call.operation,
        "The external key manager's authorization policy denied this request."),
    ErrorName.THROTTLING: lambda f: Throttled("external key manager"),
    ErrorName.UNSUPPORTED_OPERATION: lambda f: UnsupportedOperation(
        "the external key manager cannot handle this request (an input may be larger "
        "than it accepts)"),
    ErrorName.AUTHENTICATION_FAILED: _unavailable(
        "the external key manager refused the front's SigV4 credentials; check the XKI "
        "access key id and secret"),
    ErrorName.INVALID_URI_PATH: _unavailable(
        "the external key manager has no XKS API at the configured URI path prefix"),
    ErrorName.VALIDATION: _unavailable(
        "the external key manager refused the request as malformed"),
    ErrorName.INVALID_CIPHERTEXT: _unavailable(
        "the external key manager reported an invalid ciphertext on encryption"),
    ErrorName.INTERNAL: _unavailable("the external key manager reported an internal error"),
    ErrorName.DEPENDENCY_TIMEOUT: _unavailable(
        "the external key manager timed out calling its own key store"),
})
# Per-operation overrides: a bad ciphertext is the caller's input only on Decrypt.
_DECRYPT_REJECTIONS: Final[Mapping[ErrorName, Callable[[_Failure], KmsError]]] = \
    MappingProxyType({ErrorName.INVALID_CIPHERTEXT: lambda f: InvalidCiphertext()})


def _core_error(exc: XKSClientError, failure: _Failure) -> KmsError:
    """One XKS client failure as the core error a user understands."""
    if isinstance(exc, XKSRejected):
        name = exc.error.name
        mapping = (_DECRYPT_REJECTIONS.get(name) if failure.decrypting else None) \
            or _REJECTIONS[name]
        return mapping(failure)
    if isinstance(exc, XKSUnavailable):
        log.warning("external key manager unavailable (request %s, %s): %s",
                    failure.call.request_id, exc.kind, exc.reason)
        return DependencyUnavailable(BACKEND, f"the external key manager is unreachable or "
                                              f"too slow: {exc.reason}")
    assert isinstance(exc, XKSInvalidResponse)
    log.warning("external key manager sent an invalid response (request %s): %s",
                failure.call.request_id, exc)
    return DependencyUnavailable(BACKEND, f"the external key manager sent an invalid "
                                          f"response: {exc}")


# -- the backend ---------------------------------------------------------------------------


def _metadata(call: CallInfo, *, with_key_arn: bool = True) -> RequestMetadata:
    # GetKeyMetadata lost kmsKeyArn in XKS 1.0.3 (section 4.1); crypto calls require it.
    return RequestMetadata(kms_request_id=call.request_id, kms_operation=call.operation,
                           aws_principal_arn=call.principal_arn,
                           kms_key_arn=call.key_arn if with_key_arn else None)


def _shown(value: str) -> str:
    """The EKM's text as an API caller may see it: printable ASCII, at most 64 characters
    (a proxy's answer is not trusted to be either)."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in value[:64])
    return cleaned + ("..." if len(value) > 64 else "")


def _metadata_problems(meta: KeyMetadataResponse) -> list[str]:
    """Why an external key cannot back a KMS key (XKS section 4.2: what AWS KMS checks)."""
    problems = []
    if meta.key_spec != "AES_256":
        problems.append(f"its key spec is {_shown(meta.key_spec)}, not AES_256")
    missing = [u for u in ("ENCRYPT", "DECRYPT") if u not in meta.key_usage]
    if missing:
        usage = ", ".join(_shown(u) for u in meta.key_usage[:8]) or "none"
        problems.append(f"its key usage lacks {' and '.join(missing)} (it has {usage})")
    if meta.key_status != "ENABLED":
        problems.append(f"it is {_shown(meta.key_status)} in the external key manager, "
                        "not ENABLED")
    return problems


def _external_key_id(version: KeyVersion) -> str:
    return version.material.decode("ascii")


class ExternalBackend:
    """Keys whose material lives in an external key manager, reached through XKS."""

    name = "external"

    def __init__(self, client: XKSClient, probe: HealthProbe | None = None) -> None:
        """``probe``: the instance's health probe, told what each call learnt about the
        link, so that GetKmsInstance shows an outage at once, not at the next probe."""
        self._client = client
        self._probe = probe

    def _observe(self, error: XKSClientError | None) -> None:
        if self._probe is not None:
            self._probe.observe(error)

    async def import_material(self, *, version_id: str, spec: KeySpec, material: bytes,
                              storage: KeyStorageMechanism | None = None) -> bytes:
        # The seed: no BYOK for external keys (the capability table refuses first).
        raise UnsupportedOperation("external keys cannot take imported material")

    async def destroy(self, version: KeyVersion, spec: KeySpec) -> None:
        """Nothing to do: the material is the external key manager's, and deleting a key
        here deletes only this service's metadata (the EKM's key stays)."""

    async def generate(self, *, version_id: str, spec: KeySpec,
                       storage: KeyStorageMechanism | None = None,
                       external_key_id: str | None = None, call: CallInfo) -> bytes:
        """Check the external key with GetKeyMetadata and link it; store only its id.

        :raises InvalidParameter: for a missing, malformed or unusable external key.
        :raises UnsupportedOperation: for a spec other than AES-256.
        :raises DependencyUnavailable: if the external key manager cannot be reached.
        """
        if storage is not None:
            raise InvalidParameter("KeyStorageMechanism", "applies to hardware keys only")
        if external_key_id is None:
            raise InvalidParameter("ExternalKeyId", "is required for an external key")
        if not EXTERNAL_KEY_ID.fullmatch(external_key_id):
            raise InvalidParameter("ExternalKeyId", "must be 1 to 128 characters of "
                                                    "A-Z a-z 0-9 . _ -, and not . or ..")
        if spec is not KeySpec.AES_256:
            raise UnsupportedOperation(f"external keys are {KeySpec.AES_256} only, "
                                       f"not {spec}")
        try:
            meta = await self._client.get_key_metadata(
                external_key_id, _metadata(call, with_key_arn=False))
            self._observe(None)
        except XKSRejected as exc:
            self._observe(exc)
            # CreateKey: what AWS KMS reports as XksKeyNotFound / XksKeyInvalidConfiguration
            # (XKS section 5.2) is a bad ExternalKeyId for the caller.
            reason = {
                ErrorName.KEY_NOT_FOUND: "the external key manager has no such key",
                ErrorName.INVALID_STATE: "the external key manager reports the key as "
                                         "disabled or blocked",
                ErrorName.INVALID_KEY_USAGE: "the external key manager does not permit "
                                             "this key's use",
            }.get(exc.error.name)
            if reason is not None:
                raise InvalidParameter("ExternalKeyId",
                                       f"{external_key_id!r}: {reason}.") from None
            raise _core_error(exc, _Failure(call, external_key_id, False)) from None
        except XKSClientError as exc:
            self._observe(exc)
            raise _core_error(exc, _Failure(call, external_key_id, False)) from None
        problems = _metadata_problems(meta)
        if problems:
            raise InvalidParameter(
                "ExternalKeyId", f"{external_key_id!r} cannot back a KMS key: "
                                 f"{'; '.join(problems)}. External keys must be AES_256, "
                                 "permit ENCRYPT and DECRYPT, and be ENABLED.")
        return external_key_id.encode("ascii")

    async def seal(self, version: KeyVersion, spec: KeySpec, plaintext: bytes,
                   aad: bytes, *, call: CallInfo) -> bytes:
        """XKS Encrypt with a checked CDIV.

        :raises DependencyUnavailable: :raises KeyStateInvalid: if disabled in the EKM.
        :raises InvalidParameter: for an encryption context too large for XKS.
        """
        if len(aad) > MAX_AAD_BYTES:
            raise InvalidParameter("EncryptionContext", "must be at most "
                                   f"{MAX_AAD_BYTES - VERSION_ID_LENGTH} bytes (as compact "
                                   "JSON) for an external key")
        external_key_id = _external_key_id(version)
        request = EncryptRequest(metadata=_metadata(call), plaintext=plaintext,
                                 aad=aad or None, want_cdiv=True)
        try:
            response = await self._client.encrypt(external_key_id, request)
        except XKSClientError as exc:
            self._observe(exc)
            raise _core_error(exc, _Failure(call, external_key_id, False)) from None
        self._observe(None)
        return pack_sealed(response.iv, response.ciphertext_metadata, response.tag,
                           response.ciphertext)

    async def unseal(self, version: KeyVersion, spec: KeySpec, sealed: bytes,
                     aad: bytes, *, call: CallInfo) -> bytes:
        """XKS Decrypt of a sealed blob.

        :raises InvalidCiphertext: for a malformed blob or the EKM's
            InvalidCiphertextException. :raises DependencyUnavailable:
        :raises KeyStateInvalid: if the key is disabled in the EKM.
        """
        iv, ctm, tag, ciphertext = unpack_sealed(sealed)
        if len(aad) > MAX_AAD_BYTES:
            raise InvalidCiphertext()
        external_key_id = _external_key_id(version)
        request = DecryptRequest(metadata=_metadata(call), ciphertext=ciphertext, iv=iv,
                                 tag=tag, aad=aad or None, ciphertext_metadata=ctm)
        try:
            plaintext = await self._client.decrypt(external_key_id, request)
        except XKSClientError as exc:
            self._observe(exc)
            raise _core_error(exc, _Failure(call, external_key_id, True)) from None
        self._observe(None)
        return plaintext

    async def sign(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                   digest: bytes) -> bytes:
        raise UnsupportedOperation(_SYMMETRIC_ONLY)

    async def verify(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                     digest: bytes, signature: bytes) -> bool:
        raise UnsupportedOperation(_SYMMETRIC_ONLY)

    async def asymmetric_encrypt(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                                 plaintext: bytes) -> bytes:
        raise UnsupportedOperation(_SYMMETRIC_ONLY)

    async def asymmetric_decrypt(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                                 ciphertext: bytes) -> bytes:
        raise UnsupportedOperation(_SYMMETRIC_ONLY)

    async def public_key_pem(self, version: KeyVersion, spec: KeySpec) -> bytes:
        raise UnsupportedOperation(_SYMMETRIC_ONLY)


# -- connection state ------------------------------------------------------------------------


# XKS errors that answer for one key or request: the link itself works.
_KEY_LEVEL_REFUSALS: Final = frozenset({
    ErrorName.VALIDATION, ErrorName.INVALID_STATE, ErrorName.INVALID_CIPHERTEXT,
    ErrorName.INVALID_KEY_USAGE, ErrorName.KEY_NOT_FOUND, ErrorName.ACCESS_DENIED,
    ErrorName.UNSUPPORTED_OPERATION})


class ConnectionState(StrEnum):
    """An external instance's link to its EKM, as the instance reports it."""

    CONNECTED = "Connected"
    DISCONNECTED = "Disconnected"


class HealthProbe:
    """Poll GetHealthStatus (``KmsHealthCheck``) every ``interval`` seconds and keep the
    instance's connection state. Connected needs an answer within the client's budget with
    at least one EKM not ``UNAVAILABLE`` (XKS section 4.7).

    An async context manager: entering probes once (at most one budget) and starts the
    background task; leaving stops it.
    """

    def __init__(self, client: XKSClient, *, interval: float = 30.0) -> None:
        if interval <= 0:
            raise ValueError("the health probe interval must be positive")
        self._client = client
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.status = ConnectionState.DISCONNECTED
        self.last_error: str | None = "not probed yet"
        # time.monotonic() of the last finished probe.
        self.last_checked: float | None = None

    def status_text(self) -> str:
        """The instance's connection state as GetKmsInstance reports it."""
        return str(self.status)

    async def check(self) -> ConnectionState:
        """Probe once now and return the new state (never raises for EKM failures)."""
        try:
            health = await self._client.health()
        except XKSClientError as exc:
            self._set(ConnectionState.DISCONNECTED, str(exc))
        else:
            if all(e.health_status is HealthStatus.UNAVAILABLE for e in health.ekm_fleet):
                self._set(ConnectionState.DISCONNECTED,
                          "the external key manager reports every EKM as UNAVAILABLE")
            else:
                self._set(ConnectionState.CONNECTED, None)
        self.last_checked = time.monotonic()
        return self.status

    def observe(self, error: XKSClientError | None) -> None:
        """What a crypto or metadata call learnt about the link, between probes.

        Connected: a success, or a refusal about the key or the request (the proxy
        authenticated the call and looked at the key). Disconnected, as ``check`` would
        decide: no answer in time (``XKSUnavailable``), or a refusal of the link itself
        (credentials, URI prefix, the proxy's or its EKM's failure). Unchanged: throttling
        and an unreadable answer, which say nothing either way."""
        if error is None or (isinstance(error, XKSRejected)
                             and error.error.name in _KEY_LEVEL_REFUSALS):
            if self.status is not ConnectionState.CONNECTED:
                self._set(ConnectionState.CONNECTED, None)
        elif isinstance(error, XKSUnavailable) or (
                isinstance(error, XKSRejected)
                and error.error.name is not ErrorName.THROTTLING):
            self._set(ConnectionState.DISCONNECTED, str(error))

    def _set(self, status: ConnectionState, error: str | None) -> None:
        if status is not self.status:
            if status is ConnectionState.CONNECTED:
                log.info("external key manager %s: Connected", self._client.connection.endpoint)
            else:
                log.warning("external key manager %s: Disconnected (%s)",
                            self._client.connection.endpoint, error)
        self.status, self.last_error = status, error

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:
                # A bug here must not end the probe and freeze a stale state.
                log.exception("health probe failed unexpectedly")
                self._set(ConnectionState.DISCONNECTED, "health probe failed unexpectedly")

    async def __aenter__(self) -> HealthProbe:
        try:
            await self.check()
        except Exception:
            # One instance's EKM, however broken its answer, must not stop the front from
            # starting (software and hardware keys do not need it).
            log.exception("first health probe failed unexpectedly")
            self._set(ConnectionState.DISCONNECTED, "health probe failed unexpectedly")
        self._task = asyncio.create_task(self._run(), name="xks-health-probe")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
