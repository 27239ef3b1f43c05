"""XKS Proxy API v1 (spec 1.0.3) wire models, error names, and the AAD/CDIV helpers.

Both sides import this module: the EKM simulator parses requests and renders responses with
it, and the KMS front's XKS client builds requests and parses responses with it. Wire names
(``requestMetadata``, ``ciphertextMetadata`` ...) exist only here and in the edges.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re
import struct
from base64 import b64decode, b64encode
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

__all__ = [
    "CDIV_ALGORITHM",
    "ENCRYPTION_ALGORITHM",
    "EXTERNAL_KEY_ID",
    "IV_LENGTHS",
    "MAX_AAD_BYTES",
    "MAX_CTM_BYTES",
    "MIN_AAD_BYTES",
    "MIN_PLAINTEXT_BYTES",
    "STATUS",
    "TAG_LENGTH",
    "DecryptRequest",
    "EncryptRequest",
    "EncryptResponse",
    "ErrorName",
    "FleetEntry",
    "HealthResponse",
    "HealthStatus",
    "KeyMetadataResponse",
    "RequestMetadata",
    "XKSError",
    "b64",
    "bind_aad",
    "cdiv",
    "dumps",
    "parse_decrypt",
    "parse_decrypt_response",
    "parse_encrypt",
    "parse_health",
    "parse_health_response",
    "parse_key_metadata_response",
    "parse_metadata",
]

# Spec "Encrypt"/"Decrypt": a proxy MUST handle at least these sizes (spec L261-263, L392-395).
MIN_PLAINTEXT_BYTES: Final = 4300
MIN_AAD_BYTES: Final = 8192
# The AAD binding prefixes the AAD with a 2-byte length, so binary AAD cannot exceed this.
MAX_AAD_BYTES: Final = 0xFFFF
# "ciphertextMetadata ... MUST NOT exceed 20 bytes" before Base64 (spec 1.0.2).
MAX_CTM_BYTES: Final = 20
TAG_LENGTH: Final = 16
IV_LENGTHS: Final = frozenset({12, 16})
# "externalKeyId ... 1-128 characters of [A-Za-z0-9-._]" (XKS section 3). It is a segment of
# the URL path (/keys/<id>/encrypt), where "." and ".." are dot segments that clients and
# servers remove (RFC 3986 5.2.4): such a key could never be reached, so neither is an id.
EXTERNAL_KEY_ID: Final = re.compile(r"(?!\.\.?$)[A-Za-z0-9._-]{1,128}")
ENCRYPTION_ALGORITHM: Final = "AES_GCM"
CDIV_ALGORITHM: Final = "SHA_256"
# "errorMessage ... less than 512 characters" of printable ASCII (spec L602-606).
_MAX_ERROR_MESSAGE: Final = 511
_NON_PRINTABLE = re.compile(r"[^\x20-\x7e]")


class ErrorName(StrEnum):
    """The spec's error names (spec L608-621)."""

    VALIDATION = "ValidationException"
    INVALID_STATE = "InvalidStateException"
    INVALID_CIPHERTEXT = "InvalidCiphertextException"
    INVALID_KEY_USAGE = "InvalidKeyUsageException"
    AUTHENTICATION_FAILED = "AuthenticationFailedException"
    ACCESS_DENIED = "AccessDeniedException"
    KEY_NOT_FOUND = "KeyNotFoundException"
    INVALID_URI_PATH = "InvalidUriPathException"
    THROTTLING = "ThrottlingException"
    INTERNAL = "InternalException"
    UNSUPPORTED_OPERATION = "UnsupportedOperationException"
    DEPENDENCY_TIMEOUT = "DependencyTimeoutException"


# Each name's HTTP status, written once (spec error table).
STATUS: Final[Mapping[ErrorName, int]] = {
    ErrorName.VALIDATION: 400,
    ErrorName.INVALID_STATE: 400,
    ErrorName.INVALID_CIPHERTEXT: 400,
    ErrorName.INVALID_KEY_USAGE: 400,
    ErrorName.AUTHENTICATION_FAILED: 401,
    ErrorName.ACCESS_DENIED: 403,
    ErrorName.KEY_NOT_FOUND: 404,
    ErrorName.INVALID_URI_PATH: 404,
    ErrorName.THROTTLING: 429,
    ErrorName.INTERNAL: 500,
    ErrorName.UNSUPPORTED_OPERATION: 501,
    ErrorName.DEPENDENCY_TIMEOUT: 503,
}


class XKSError(Exception):
    """An XKS protocol error: an ``errorName`` with its status and a safe message.

    The message goes on the wire, so it must never contain plaintext, keys or secrets.
    """

    def __init__(self, name: ErrorName, message: str = "") -> None:
        super().__init__(f"{name}: {message}" if message else str(name))
        self.name = name
        self.message = _NON_PRINTABLE.sub("?", message)[:_MAX_ERROR_MESSAGE]

    @property
    def status(self) -> int:
        return STATUS[self.name]

    def body(self) -> dict[str, str]:
        out = {"errorName": str(self.name)}
        if self.message:
            out["errorMessage"] = self.message
        return out

    @classmethod
    def from_body(cls, status: int, body: bytes) -> XKSError:
        """Rebuild an error from a proxy's error response (client side).

        :raises XKSError: never; an unreadable body yields an ``InternalException``.
        """
        try:
            data = json.loads(body)
            name = ErrorName(data["errorName"])
            message = data.get("errorMessage", "")
            return cls(name, message if isinstance(message, str) else "")
        except (ValueError, KeyError, TypeError, RecursionError):
            return cls(ErrorName.INTERNAL, f"unreadable error response with HTTP {status}")


def _invalid(message: str) -> XKSError:
    return XKSError(ErrorName.VALIDATION, message)


def dumps(obj: Mapping[str, Any]) -> bytes:
    """Single-line compact JSON: the public test client reads the body from the last line."""
    return json.dumps(obj, separators=(",", ":")).encode()


def b64(data: bytes) -> str:
    """Standard (not URL-safe) Base64, as the spec requires since 1.0.2."""
    return b64encode(data).decode("ascii")


def _b64field(body: Mapping[str, Any], name: str, *, required: bool) -> bytes | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _invalid(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a Base64 string")
    try:
        # validate=True refuses URL-safe alphabets and stray characters.
        return b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"{name} is not valid standard Base64") from None


def _string(body: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _invalid(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a string")
    if required and not value:
        raise _invalid(f"{name} must not be empty")
    return value


@dataclass(frozen=True, slots=True)
class RequestMetadata:
    """``requestMetadata``: who asks and why. Opaque beyond the required fields (spec L150)."""

    kms_request_id: str
    kms_operation: str
    aws_principal_arn: str | None = None
    kms_key_arn: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out["kmsRequestId"] = self.kms_request_id
        out["kmsOperation"] = self.kms_operation
        if self.aws_principal_arn is not None:
            out["awsPrincipalArn"] = self.aws_principal_arn
        if self.kms_key_arn is not None:
            out["kmsKeyArn"] = self.kms_key_arn
        return out


_KNOWN_METADATA = frozenset({"kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn"})


# Opaque to the proxy: "MUST NOT perform any validation on its structure" (kmsRequestId) and
# "MUST NOT reject ... a kmsOperation other than those listed": an empty string is one too.
_OPAQUE_METADATA = frozenset({"kmsRequestId", "kmsOperation"})


def _metadata(body: Mapping[str, Any], required: tuple[str, ...]) -> RequestMetadata:
    """``requestMetadata`` with the fields this API defines (``required``) checked. The
    others, known names included (``kmsKeyArn`` is no GetKeyMetadata field in 1.0.3), are
    kept as sent and not judged: KMS may add fields (Appendix B)."""
    raw = body.get("requestMetadata")
    if not isinstance(raw, dict):
        raise _invalid("requestMetadata is required and must be an object")
    values: dict[str, str | None] = {}
    for name in required:
        value = raw.get(name)
        if name in _OPAQUE_METADATA and isinstance(value, str):
            values[name] = value
        else:
            values[name] = _string(raw, name, required=True)
    for name in _KNOWN_METADATA - set(required):
        value = raw.get(name)
        values[name] = value if isinstance(value, str) else None
    # Unknown fields (awsSourceVpc, kmsViaService, future Appendix B fields) and known ones
    # this API does not define are kept, not refused.
    extra = {k: v for k, v in raw.items()
             if k not in _KNOWN_METADATA or (k not in required and values.get(k) is None)}
    return RequestMetadata(
        kms_request_id=values.get("kmsRequestId") or "",
        kms_operation=values.get("kmsOperation") or "",
        aws_principal_arn=values.get("awsPrincipalArn"),
        kms_key_arn=values.get("kmsKeyArn"),
        extra=extra,
    )


def _object(body: object) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    return body


def _algorithm(body: Mapping[str, Any]) -> None:
    if _string(body, "encryptionAlgorithm", required=True) != ENCRYPTION_ALGORITHM:
        raise _invalid(f"encryptionAlgorithm must be {ENCRYPTION_ALGORITHM}")


def parse_health(body: object) -> RequestMetadata:
    """Validate a GetHealthStatus body.

    The spec's table excludes GetHealthStatus from ``ValidationException``, but the public
    test client expects it for ``{}`` and empty metadata, and KMS always sends both fields.

    :raises XKSError: ``ValidationException``.
    """
    return _metadata(_object(body), ("kmsRequestId", "kmsOperation"))


def parse_metadata(body: object) -> RequestMetadata:
    """Validate a GetKeyMetadata body. :raises XKSError: ``ValidationException``."""
    return _metadata(_object(body), ("kmsRequestId", "kmsOperation", "awsPrincipalArn"))


_CRYPTO_METADATA: Final = ("kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn")


@dataclass(frozen=True, slots=True)
class EncryptRequest:
    metadata: RequestMetadata
    plaintext: bytes = field(repr=False)
    aad: bytes | None = None
    want_cdiv: bool = False

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requestMetadata": self.metadata.to_wire(),
            "plaintext": b64(self.plaintext),
            "encryptionAlgorithm": ENCRYPTION_ALGORITHM,
        }
        if self.aad is not None:
            out["additionalAuthenticatedData"] = b64(self.aad)
        if self.want_cdiv:
            out["ciphertextDataIntegrityValueAlgorithm"] = CDIV_ALGORITHM
        return out


def parse_encrypt(body: object) -> EncryptRequest:
    """Validate an Encrypt body. :raises XKSError: ``ValidationException``."""
    body = _object(body)
    metadata = _metadata(body, _CRYPTO_METADATA)
    plaintext = _b64field(body, "plaintext", required=True)
    assert plaintext is not None
    if not plaintext:
        raise _invalid("plaintext must not be empty")
    _algorithm(body)
    cdiv_algorithm = _string(body, "ciphertextDataIntegrityValueAlgorithm", required=False)
    if cdiv_algorithm is not None and cdiv_algorithm != CDIV_ALGORITHM:
        raise _invalid(f"ciphertextDataIntegrityValueAlgorithm must be {CDIV_ALGORITHM}")
    return EncryptRequest(
        metadata=metadata,
        plaintext=plaintext,
        aad=_b64field(body, "additionalAuthenticatedData", required=False),
        want_cdiv=cdiv_algorithm is not None,
    )


@dataclass(frozen=True, slots=True)
class EncryptResponse:
    ciphertext: bytes
    iv: bytes
    tag: bytes
    ciphertext_metadata: bytes | None = None
    cdiv: bytes | None = None

    def to_wire(self) -> dict[str, str]:
        out = {
            "authenticationTag": b64(self.tag),
            "ciphertext": b64(self.ciphertext),
            "initializationVector": b64(self.iv),
        }
        if self.ciphertext_metadata is not None:
            out["ciphertextMetadata"] = b64(self.ciphertext_metadata)
        if self.cdiv is not None:
            out["ciphertextDataIntegrityValue"] = b64(self.cdiv)
        return out

    @classmethod
    def from_wire(cls, body: object) -> EncryptResponse:
        """Parse a proxy's Encrypt response (client side). :raises XKSError: on a bad body."""
        body = _object(body)
        ciphertext = _b64field(body, "ciphertext", required=True)
        iv = _b64field(body, "initializationVector", required=True)
        tag = _b64field(body, "authenticationTag", required=True)
        assert ciphertext is not None and iv is not None and tag is not None
        ctm = _b64field(body, "ciphertextMetadata", required=False)
        if len(iv) not in IV_LENGTHS or len(tag) != TAG_LENGTH:
            raise _invalid("initializationVector or authenticationTag has a wrong length")
        if ctm is not None and len(ctm) > MAX_CTM_BYTES:
            raise _invalid(f"ciphertextMetadata is longer than {MAX_CTM_BYTES} bytes")
        integrity = _b64field(body, "ciphertextDataIntegrityValue", required=False)
        if integrity is not None and len(integrity) != hashlib.sha256().digest_size:
            raise _invalid("ciphertextDataIntegrityValue is not a SHA-256 digest")
        return cls(ciphertext, iv, tag, ctm, integrity)


@dataclass(frozen=True, slots=True)
class DecryptRequest:
    metadata: RequestMetadata
    ciphertext: bytes
    iv: bytes
    tag: bytes
    aad: bytes | None = None
    ciphertext_metadata: bytes | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requestMetadata": self.metadata.to_wire(),
            "ciphertext": b64(self.ciphertext),
            "encryptionAlgorithm": ENCRYPTION_ALGORITHM,
            "initializationVector": b64(self.iv),
            "authenticationTag": b64(self.tag),
        }
        if self.aad is not None:
            out["additionalAuthenticatedData"] = b64(self.aad)
        if self.ciphertext_metadata is not None:
            out["ciphertextMetadata"] = b64(self.ciphertext_metadata)
        return out


def parse_decrypt(body: object) -> DecryptRequest:
    """Validate a Decrypt body.

    The spec's Decrypt row: "the specified ciphertext, initialization vector, additional
    authenticated data or authentication tag is corrupted, missing, or otherwise invalid"
    is ``InvalidCiphertextException``, so those four fields, missing or not Base64, are
    refused as that (their lengths the key store judges the same way). Everything else
    (the body's shape, requestMetadata, encryptionAlgorithm, ciphertextMetadata) is
    ``ValidationException``.

    :raises XKSError: ``ValidationException`` or ``InvalidCiphertextException``.
    """
    body = _object(body)
    metadata = _metadata(body, _CRYPTO_METADATA)
    _algorithm(body)
    try:
        ciphertext = _b64field(body, "ciphertext", required=True)
        iv = _b64field(body, "initializationVector", required=True)
        tag = _b64field(body, "authenticationTag", required=True)
        aad = _b64field(body, "additionalAuthenticatedData", required=False)
    except XKSError as exc:
        raise XKSError(ErrorName.INVALID_CIPHERTEXT, exc.message) from None
    assert ciphertext is not None and iv is not None and tag is not None
    ctm = _b64field(body, "ciphertextMetadata", required=False)
    if ctm is not None and len(ctm) > MAX_CTM_BYTES:
        raise _invalid(f"ciphertextMetadata is longer than {MAX_CTM_BYTES} bytes")
    return DecryptRequest(
        metadata=metadata,
        ciphertext=ciphertext,
        iv=iv,
        tag=tag,
        aad=aad,
        ciphertext_metadata=ctm,
    )


@dataclass(frozen=True, slots=True)
class KeyMetadataResponse:
    key_spec: str
    key_usage: tuple[str, ...]
    key_status: str

    def to_wire(self) -> dict[str, Any]:
        return {"keySpec": self.key_spec, "keyUsage": list(self.key_usage),
                "keyStatus": self.key_status}


def parse_key_metadata_response(body: object) -> KeyMetadataResponse:
    """A proxy's GetKeyMetadata answer (client side). :raises XKSError: if malformed."""
    data = _object(body)
    spec, usage, status = data.get("keySpec"), data.get("keyUsage"), data.get("keyStatus")
    if (not isinstance(spec, str) or not isinstance(status, str) or not isinstance(usage, list)
            or not all(isinstance(u, str) for u in usage)):
        raise _invalid("GetKeyMetadata response needs keySpec, keyUsage (a list of strings) "
                       "and keyStatus")
    return KeyMetadataResponse(key_spec=spec, key_usage=tuple(usage), key_status=status)


def parse_decrypt_response(body: object) -> bytes:
    """A proxy's Decrypt answer: the plaintext (client side). :raises XKSError:"""
    plaintext = _b64field(_object(body), "plaintext", required=True)
    assert plaintext is not None
    return plaintext


class HealthStatus(StrEnum):
    ACTIVE = "ACTIVE"
    DEGRADED = "DEGRADED"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class FleetEntry:
    id: str
    model: str
    health_status: HealthStatus


@dataclass(frozen=True, slots=True)
class HealthResponse:
    fleet_size: int
    proxy_vendor: str
    proxy_model: str
    ekm_vendor: str
    ekm_fleet: tuple[FleetEntry, ...]

    def to_wire(self) -> dict[str, Any]:
        # "ekmFleetDetails ... 1 to 10 entries" (spec L538).
        assert self.fleet_size > 0 and 1 <= len(self.ekm_fleet) <= 10
        return {
            "xksProxyFleetSize": self.fleet_size,
            "xksProxyVendor": self.proxy_vendor,
            "xksProxyModel": self.proxy_model,
            "ekmVendor": self.ekm_vendor,
            "ekmFleetDetails": [
                {"id": e.id, "model": e.model, "healthStatus": str(e.health_status)}
                for e in self.ekm_fleet
            ],
        }


def parse_health_response(body: object) -> HealthResponse:
    """A proxy's GetHealthStatus answer (client side). :raises XKSError: if malformed."""
    data = _object(body)
    try:
        fleet = tuple(
            FleetEntry(id=_text(entry["id"]), model=_text(entry["model"]),
                       health_status=HealthStatus(entry["healthStatus"]))
            for entry in data["ekmFleetDetails"])
        size = data["xksProxyFleetSize"]
        # A positive integer (spec: the number of proxy instances); JSON's 2.0, "3", true
        # or Infinity are not.
        if type(size) is not int or size < 1:
            raise ValueError(size)
        response = HealthResponse(
            fleet_size=size, proxy_vendor=_text(data["xksProxyVendor"]),
            proxy_model=_text(data["xksProxyModel"]), ekm_vendor=_text(data["ekmVendor"]),
            ekm_fleet=fleet)
    except (KeyError, TypeError, ValueError):
        raise _invalid("GetHealthStatus response lacks a required field or has a wrong "
                       "value") from None
    if not 1 <= len(fleet) <= 10:
        raise _invalid("ekmFleetDetails must have 1 to 10 entries")
    return response


def _text(value: object) -> str:
    """A short string field of a proxy's answer. :raises ValueError: if it is not one."""
    if not isinstance(value, str) or len(value) > 1024:
        raise ValueError("not a string of at most 1024 characters")
    return value


def bind_aad(aad: bytes | None, ctm: bytes | None) -> bytes:
    """The AAD given to AES-GCM: ``uint16_be(len(AAD)) || AAD || uint8(len(ctm)) || ctm``.

    The length prefixes stop bytes moving between the AAD and the ciphertext metadata
    (spec L314-315). A missing field counts as length 0.

    :raises ValueError: if the AAD or metadata is too long to prefix.
    """
    aad = aad or b""
    ctm = ctm or b""
    if len(aad) > MAX_AAD_BYTES or len(ctm) > 0xFF:
        raise ValueError("AAD or ciphertext metadata too long for its length prefix")
    return struct.pack(">H", len(aad)) + aad + struct.pack(">B", len(ctm)) + ctm


def cdiv(aad: bytes | None, ctm: bytes | None, iv: bytes, ciphertext: bytes, tag: bytes) -> bytes:
    """The ciphertext data integrity value: SHA-256 over the decoded fields, no lengths.

    Appendix C (spec L825-880): ``SHA-256(AAD || ctm || IV || ciphertext || tag)``, the AAD
    as sent (not the length-prefixed form), absent fields empty.
    """
    digest = hashlib.sha256()
    for part in (aad or b"", ctm or b"", iv, ciphertext, tag):
        digest.update(part)
    return digest.digest()
