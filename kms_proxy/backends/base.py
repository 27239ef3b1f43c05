"""The one interface every key backend implements. Backends return bytes or raise the
core's errors; they never see HTTP, wire formats or key metadata beyond the spec."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from kms_proxy.core.model import CallInfo, KeySpec, KeyStorageMechanism, KeyVersion

__all__ = ["BackupSealer", "KeyBackend"]


class KeyBackend(Protocol):
    name: str

    async def generate(self, *, version_id: str, spec: KeySpec,
                       storage: KeyStorageMechanism | None = None,
                       external_key_id: str | None = None, call: CallInfo) -> bytes:
        """Create (or, for an external key, link and check) the material of one version;
        return what the store keeps to find it again.

        :raises UnsupportedOperation: if the backend cannot hold ``spec``.
        :raises InvalidParameter: for a storage mechanism or external key id it cannot use.
        """
        ...

    async def import_material(self, *, version_id: str, spec: KeySpec, material: bytes,
                              storage: KeyStorageMechanism | None = None) -> bytes:
        """Take BYOK material (already unwrapped from the import token) for one version;
        return what the store keeps to find it again.

        :raises UnsupportedOperation: if the backend cannot take imported material.
        """
        ...

    async def destroy(self, version: KeyVersion, spec: KeySpec) -> None:
        """Forget a version's material: drop every cached copy, and delete what the backend
        itself holds (token objects). Called when material is deleted or a key's deletion
        window ends; the store's record goes separately."""
        ...

    async def seal(self, version: KeyVersion, spec: KeySpec, plaintext: bytes,
                   aad: bytes, *, call: CallInfo) -> bytes:
        """Authenticated symmetric encryption under ``aad`` (the core's ``blob_aad``: the
        version id, then the encryption context). :raises DependencyUnavailable:"""
        ...

    async def unseal(self, version: KeyVersion, spec: KeySpec, sealed: bytes,
                     aad: bytes, *, call: CallInfo) -> bytes:
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


@runtime_checkable
class BackupSealer(Protocol):
    """A backend that can protect a key backup (the seed: software keys only)."""

    def seal_backup(self, data: bytes) -> bytes:
        """Encrypt and authenticate a backup document."""
        ...

    def open_backup(self, blob: bytes) -> bytes:
        """Inverse of ``seal_backup``. :raises InvalidParameter: for a foreign or tampered
        backup."""
        ...
