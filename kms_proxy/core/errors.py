"""The core's error hierarchy. Each error carries structured fields; the Alibaba edge maps
each class to (Code, HTTP status) in one table (``kms_proxy.api.errors``)."""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "AliasAlreadyExists",
    "AliasNotFound",
    "ConcurrentChange",
    "DeletionProtected",
    "DependencyUnavailable",
    "ExpiredImportToken",
    "InstanceNotFound",
    "InvalidCiphertext",
    "InvalidImportToken",
    "InvalidKeyMaterial",
    "InvalidParameter",
    "KeyNotFound",
    "KeyStateInvalid",
    "KeyVersionNotFound",
    "KmsError",
    "LimitExceeded",
    "MissingParameter",
    "Throttled",
    "Unsupported",
    "UnsupportedOperation",
]


class KmsError(Exception):
    """Base of every error the core raises. Messages are safe to show to the caller."""


class InvalidParameter(KmsError):
    def __init__(self, name: str, reason: str = "") -> None:
        super().__init__(f'The specified parameter "{name}" is not valid.'
                         + (f" {reason}" if reason else ""))
        self.name, self.reason = name, reason


class MissingParameter(KmsError):
    def __init__(self, name: str) -> None:
        super().__init__(f'The parameter "{name}" is needed but not provided.')
        self.name = name


class KeyNotFound(KmsError):
    def __init__(self, key_ref: str) -> None:
        super().__init__(f"The specified key {key_ref!r} is not found.")
        self.key_ref = key_ref


class KeyVersionNotFound(KmsError):
    def __init__(self, version_id: str) -> None:
        super().__init__(f"The specified key version {version_id!r} is not found.")
        self.version_id = version_id


class AliasNotFound(KmsError):
    def __init__(self, alias: str) -> None:
        super().__init__(f"The specified alias {alias!r} is not found.")
        self.alias = alias


class AliasAlreadyExists(KmsError):
    def __init__(self, alias: str) -> None:
        super().__init__("AliasName Already Exists.")
        self.alias = alias


class InstanceNotFound(KmsError):
    def __init__(self, instance_id: str) -> None:
        super().__init__(f"The specified KMS instance {instance_id!r} is not found.")
        self.instance_id = instance_id


class KeyStateInvalid(KmsError):
    """The key's state forbids the action; ``code`` is the Alibaba rejection from the
    state table (``Rejected.Disabled``, ``Rejected.StateModifiedFailed`` ...)."""

    def __init__(self, state: str, action: str, code: str, reason: str = "") -> None:
        super().__init__(f"The request was rejected because the key state is {state}."
                         + (f" {reason}" if reason else ""))
        self.state, self.action, self.code = state, action, code


class ConcurrentChange(KmsError):
    """The key changed after this request read it; retrying reads it again. Every change
    holds the key's lock (``core.keylocks``), so this is a safety net, not a path."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"The key {key_id} was changed by a concurrent request; retry.")
        self.key_id = key_id


class UnsupportedOperation(KmsError):
    """The key's kind, spec or usage cannot do this (the seed's capability tables)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"This action is not supported: {reason}")
        self.reason = reason


class Unsupported(KmsError):
    """A parameter value valid in general but not here (``Unsupported.<what>``: Origin,
    Alias, ProtectionLevel)."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"The specified {what} is not supported: {reason}")
        self.what, self.reason = what, reason


class InvalidCiphertext(KmsError):
    """Any decrypt failure caused by the input: a malformed or tampered blob, a wrong
    encryption context, an unknown key version. Deliberately one error (no oracle)."""

    def __init__(self) -> None:
        super().__init__("The CiphertextBlob is invalid or does not match the "
                         "EncryptionContext.")


class AccessDenied(KmsError):
    def __init__(self, principal: str, action: str, reason: str = "") -> None:
        super().__init__(f"This action is forbidden by the permission system for {principal}."
                         + (f" {reason}" if reason else ""))
        self.principal, self.action = principal, action


class Throttled(KmsError):
    def __init__(self, quota: str) -> None:
        super().__init__("QPS Limit Exceeded.")
        self.quota = quota


class LimitExceeded(KmsError):
    def __init__(self, what: str) -> None:
        super().__init__(f"The resource limit is exceeded: {what}")
        self.what = what


class DependencyUnavailable(KmsError):
    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"The {backend} key backend is unavailable: {reason}")
        self.backend, self.reason = backend, reason


class DeletionProtected(KmsError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"The key {key_id} has deletion protection enabled; disable it "
                         "with SetDeletionProtection before scheduling its deletion.")
        self.key_id = key_id


class InvalidImportToken(KmsError):
    """The token is unknown, belongs to another key, or does not decrypt the material."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"The ImportToken is invalid: {reason}")
        self.reason = reason


class ExpiredImportToken(KmsError):
    def __init__(self) -> None:
        super().__init__("The ImportToken has expired; call GetParametersForImport again.")


class InvalidKeyMaterial(KmsError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"The key material is invalid: {reason}")
        self.reason = reason
