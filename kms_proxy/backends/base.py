"""The one interface every key backend implements. Backends return bytes or raise the
core's errors; they never see HTTP, wire formats or key metadata beyond the spec."""

from __future__ import annotations

from typing import Protocol

from kms_proxy.core.model import KeySpec, KeyVersion

__all__ = ["KeyBackend"]


class KeyBackend(Protocol):
    name: str

    async def generate(self, *, version_id: str, spec: KeySpec) -> bytes:
        """Create key material for one version; return what the store keeps to find it.

        :raises UnsupportedOperation: if the backend cannot hold ``spec``.
        """
        ...

    async def seal(self, version: KeyVersion, spec: KeySpec, plaintext: bytes,
                   aad: bytes) -> bytes:
        """Authenticated symmetric encryption. :raises DependencyUnavailable:"""
        ...

    async def unseal(self, version: KeyVersion, spec: KeySpec, sealed: bytes,
                     aad: bytes) -> bytes:
        """Inverse of ``seal``. :raises InvalidCiphertext: for any input fault."""
        ...

    async def sign(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                   digest: bytes) -> bytes:
        """Sign a precomputed digest. :raises InvalidParameter: for a bad digest."""
        ...

    async def verify(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                     digest: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is valid for ``digest`` (the boolean Verify returns)."""
        ...

    async def asymmetric_encrypt(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                                 plaintext: bytes) -> bytes:
        """Encrypt with the public key."""
        ...

    async def asymmetric_decrypt(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                                 ciphertext: bytes) -> bytes:
        """Decrypt with the private key. :raises InvalidCiphertext:"""
        ...

    async def public_key_pem(self, version: KeyVersion, spec: KeySpec) -> bytes:
        """The public key in PEM (SubjectPublicKeyInfo)."""
        ...
