"""The key store's domain errors. The XKS edge maps each to an error name in one table."""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "EKMError",
    "HSMFailure",
    "InvalidCiphertext",
    "KeyDisabled",
    "KeyNotFound",
    "KeyUsageNotPermitted",
    "Overloaded",
    "TooLarge",
]


class EKMError(Exception):
    """Base of the key store's errors. Messages are safe to show to the caller."""


class KeyNotFound(EKMError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"key {key_id!r} is not in this key store")
        self.key_id = key_id


class AccessDenied(EKMError):
    def __init__(self, principal: str | None) -> None:
        super().__init__("the caller is not allowed to use this key")
        self.principal = principal


class TooLarge(EKMError):
    def __init__(self, field: str, size: int, maximum: int) -> None:
        super().__init__(f"{field} is {size} bytes; this proxy accepts at most {maximum}")
        self.field, self.size, self.maximum = field, size, maximum


class KeyDisabled(EKMError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"key {key_id!r} is disabled")
        self.key_id = key_id


class KeyUsageNotPermitted(EKMError):
    def __init__(self, key_id: str, operation: str) -> None:
        super().__init__(f"key {key_id!r} does not permit {operation}")
        self.key_id, self.operation = key_id, operation


class InvalidCiphertext(EKMError):
    """Any decrypt failure caused by the input: wrong tag, AAD, IV, metadata or version."""

    def __init__(self) -> None:
        super().__init__("the ciphertext, IV, tag, AAD or ciphertext metadata is not valid")


class Overloaded(EKMError):
    """The key store or its HSM has no capacity left for this request."""


class HSMFailure(EKMError):
    """The HSM failed for a reason the caller cannot fix."""
