"""Core errors to Alibaba (Code, HTTP status), in one table, and the error envelope.

Codes and statuses follow the OpenAPI reference section 6.1. ``KeyStateInvalid`` carries its
code from the state table (always 409); ``Unsupported`` its ``Unsupported.<what>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from kms_proxy.core.errors import (
    AccessDenied,
    AliasAlreadyExists,
    AliasNotFound,
    ConcurrentChange,
    DeletionProtected,
    DependencyUnavailable,
    ExpiredImportToken,
    InstanceNotFound,
    InvalidCiphertext,
    InvalidImportToken,
    InvalidKeyMaterial,
    InvalidParameter,
    KeyNotFound,
    KeyStateInvalid,
    KeyVersionNotFound,
    KmsError,
    LimitExceeded,
    MissingParameter,
    Throttled,
    Unsupported,
    UnsupportedOperation,
)

__all__ = ["ERRORS", "ApiError", "error_body", "from_core"]

# Each core error class -> (Code, HTTP status).
ERRORS: Final[Mapping[type[KmsError], tuple[str, int]]] = MappingProxyType({
    InvalidParameter: ("InvalidParameter", 400),
    MissingParameter: ("MissingParameter", 400),
    KeyNotFound: ("Forbidden.KeyNotFound", 404),
    KeyVersionNotFound: ("Forbidden.KeyVersionNotFound", 404),
    AliasNotFound: ("Forbidden.AliasNotFound", 404),
    AliasAlreadyExists: ("AliasAlreadyExists", 400),
    InstanceNotFound: ("Forbidden.DKMSInstanceNotFound", 403),
    UnsupportedOperation: ("Rejected.UnsupportedOperation", 400),
    # Decrypt failures caused by the input: Alibaba documents no dedicated code, and
    # InvalidParameter on CiphertextBlob is what its gateway answers for a bad blob.
    InvalidCiphertext: ("InvalidParameter", 400),
    AccessDenied: ("Forbidden.NoPermission", 403),
    Throttled: ("Rejected.Throttling", 429),
    LimitExceeded: ("Rejected.LimitExceeded", 400),
    DependencyUnavailable: ("ServiceUnavailableTemporary", 503),
    InvalidImportToken: ("InvalidImportToken", 400),
    ExpiredImportToken: ("ExpiredImportToken", 400),
    InvalidKeyMaterial: ("InvalidKeyMaterial", 400),
    # Alibaba documents no code for scheduling a protected key's deletion; the refusal is a
    # permission one (the protection must be lifted first), so the permission code.
    DeletionProtected: ("Forbidden.NoPermission", 403),
    ConcurrentChange: ("Rejected.StateModifiedFailed", 409),
})


class ApiError(Exception):
    """An error already in Alibaba terms (edge-level: signature, unknown action ...)."""

    def __init__(self, code: str, status: int, message: str) -> None:
        super().__init__(message)
        self.code, self.status, self.message = code, status, message


def from_core(error: KmsError) -> ApiError:
    if isinstance(error, KeyStateInvalid):
        return ApiError(error.code, 409, str(error))
    if isinstance(error, Unsupported):
        return ApiError(f"Unsupported.{error.what}", 400, str(error))
    code, status = ERRORS[type(error)]
    return ApiError(code, status, str(error))


def error_body(error: ApiError, request_id: str) -> dict[str, Any]:
    return {"RequestId": request_id, "HttpStatus": error.status, "Code": error.code,
            "Message": error.message}
