"""Software keys: material encrypted at rest in the store, crypto with ``cryptography``.

Envelope: a 256-bit root key (from a file or an environment variable, never stored with the
data) wraps every key version's material with AES-256-GCM, the version id bound as AAD so a
wrapped blob cannot be moved to another version. The store only ever sees wrapped material.

Symmetric crypto runs inline: AES-GCM on a few KB costs microseconds, less than a hop to a
thread. RSA private-key operations and key generation take milliseconds, so they run in a
worker thread (``asyncio.to_thread``); ``cryptography`` releases the GIL around them.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms_proxy.core.errors import InvalidCiphertext, InvalidParameter, UnsupportedOperation
from kms_proxy.core.model import CallInfo, KeySpec, KeyStorageMechanism, KeyVersion

__all__ = ["SoftwareBackend"]

IV_BYTES: Final = 12
TAG_BYTES: Final = 16
_WRAP_AAD: Final = b"kms-proxy software key v1|"
_BACKUP_AAD: Final = b"kms-proxy key backup v1"
_SYMMETRIC_BYTES: Final = {KeySpec.AES_256: 32, KeySpec.AES_128: 16, KeySpec.SM4: 16}
_OAEP_HASH: Final = {"RSAES_OAEP_SHA_256": hashes.SHA256, "RSAES_OAEP_SHA_1": hashes.SHA1}


def _oaep(algorithm: str) -> padding.OAEP:
    digest = _OAEP_HASH[algorithm]()
    return padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None)


class SoftwareBackend:
    """Keys whose material lives, wrapped by the root key, in the metadata store."""

    name = "software"

    def __init__(self, root_key: bytes, *, cache_size: int = 10_000) -> None:
        if len(root_key) != 32:
            raise ValueError("the root key must be 32 bytes")
        self._root = AESGCM(root_key)
        # Unwrapped key objects by version id; bounded, least recently used goes first.
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size

    # -- material ----------------------------------------------------------------------

    def _wrap(self, version_id: str, raw: bytes) -> bytes:
        nonce = os.urandom(IV_BYTES)
        return nonce + self._root.encrypt(nonce, raw, _WRAP_AAD + version_id.encode())

    def _unwrap(self, version: KeyVersion) -> bytes:
        nonce, wrapped = version.material[:IV_BYTES], version.material[IV_BYTES:]
        return self._root.decrypt(nonce, wrapped, _WRAP_AAD + version.version_id.encode())

    def _key(self, version: KeyVersion, spec: KeySpec) -> Any:
        """The usable key object for a version (an AEAD, raw SM4 bytes, or a private key)."""
        key = self._cache.get(version.version_id)
        if key is not None:
            self._cache.move_to_end(version.version_id)
            return key
        raw = self._unwrap(version)
        if spec is KeySpec.SM4:
            key = raw
        elif spec in _SYMMETRIC_BYTES:
            key = AESGCM(raw)
        else:
            key = serialization.load_der_private_key(raw, password=None)
        self._cache[version.version_id] = key
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return key

    async def generate(self, *, version_id: str, spec: KeySpec,
                       storage: KeyStorageMechanism | None = None,
                       external_key_id: str | None = None, call: CallInfo) -> bytes:
        if storage is not None or external_key_id is not None:
            raise InvalidParameter("KeyStorageMechanism" if storage else "ExternalKeyId",
                                    "applies to hardware or external keys only")
        if spec in _SYMMETRIC_BYTES:
            return self._wrap(version_id, os.urandom(_SYMMETRIC_BYTES[spec]))
        return self._wrap(version_id, await asyncio.to_thread(_new_private_key_der, spec))

    async def import_material(self, *, version_id: str, spec: KeySpec, material: bytes,
                              storage: KeyStorageMechanism | None = None) -> bytes:
        if storage is not None:
            raise InvalidParameter("KeyStorageMechanism", "applies to hardware keys only")
        if spec not in _SYMMETRIC_BYTES:
            raise UnsupportedOperation(f"importing {spec} material is not implemented")
        return self._wrap(version_id, material)

    async def destroy(self, version: KeyVersion, spec: KeySpec) -> None:
        # The wrapped material lives only in the store; forget the unwrapped copy.
        self._cache.pop(version.version_id, None)

    # -- backups ---------------------------------------------------------------------------

    def seal_backup(self, data: bytes) -> bytes:
        nonce = os.urandom(IV_BYTES)
        return nonce + self._root.encrypt(nonce, data, _BACKUP_AAD)

    def open_backup(self, blob: bytes) -> bytes:
        try:
            return self._root.decrypt(blob[:IV_BYTES], blob[IV_BYTES:], _BACKUP_AAD)
        except (InvalidTag, ValueError):
            raise InvalidParameter("KeyBackup", "not a backup made by this service, or "
                                                "altered") from None

    # -- symmetric -----------------------------------------------------------------------

    async def seal(self, version: KeyVersion, spec: KeySpec, plaintext: bytes,
                   aad: bytes, *, call: CallInfo) -> bytes:
        key = self._key(version, spec)
        iv = os.urandom(IV_BYTES)
        if spec is KeySpec.SM4:
            encryptor = Cipher(algorithms.SM4(key), modes.GCM(iv)).encryptor()
            encryptor.authenticate_additional_data(aad)
            body = encryptor.update(plaintext) + encryptor.finalize()
            return iv + body + encryptor.tag
        return iv + bytes(key.encrypt(iv, plaintext, aad))

    async def unseal(self, version: KeyVersion, spec: KeySpec, sealed: bytes,
                     aad: bytes, *, call: CallInfo) -> bytes:
        if len(sealed) < IV_BYTES + TAG_BYTES:
            raise InvalidCiphertext()
        key = self._key(version, spec)
        iv, body = sealed[:IV_BYTES], sealed[IV_BYTES:]
        try:
            if spec is KeySpec.SM4:
                decryptor = Cipher(algorithms.SM4(key),
                                   modes.GCM(iv, body[-TAG_BYTES:])).decryptor()
                decryptor.authenticate_additional_data(aad)
                return decryptor.update(body[:-TAG_BYTES]) + decryptor.finalize()
            return bytes(key.decrypt(iv, body, aad))
        except InvalidTag:
            raise InvalidCiphertext() from None

    # -- asymmetric ----------------------------------------------------------------------

    async def sign(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                   digest: bytes) -> bytes:
        if len(digest) != 32:
            raise InvalidParameter("Digest", "must be a 32-byte SHA-256 digest")
        key = self._key(version, spec)
        prehashed = Prehashed(hashes.SHA256())
        if isinstance(key, rsa.RSAPrivateKey):
            pad = (padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                               salt_length=padding.PSS.DIGEST_LENGTH)
                   if algorithm == "RSA_PSS_SHA_256" else padding.PKCS1v15())
            return await asyncio.to_thread(key.sign, digest, pad, prehashed)
        return bytes(key.sign(digest, ec.ECDSA(prehashed)))

    async def verify(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                     digest: bytes, signature: bytes) -> bool:
        if len(digest) != 32:
            raise InvalidParameter("Digest", "must be a 32-byte SHA-256 digest")
        public = self._key(version, spec).public_key()
        prehashed = Prehashed(hashes.SHA256())
        try:
            if isinstance(public, rsa.RSAPublicKey):
                # PSS verification accepts any salt length, as signers may choose one.
                pad = (padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                   salt_length=padding.PSS.AUTO)
                       if algorithm == "RSA_PSS_SHA_256" else padding.PKCS1v15())
                public.verify(signature, digest, pad, prehashed)
            else:
                public.verify(signature, digest, ec.ECDSA(prehashed))
        except InvalidSignature:
            return False
        return True

    async def asymmetric_encrypt(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                                 plaintext: bytes) -> bytes:
        public = self._key(version, spec).public_key()
        return bytes(public.encrypt(plaintext, _oaep(algorithm)))

    async def asymmetric_decrypt(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                                 ciphertext: bytes) -> bytes:
        key = self._key(version, spec)
        try:
            return bytes(await asyncio.to_thread(key.decrypt, ciphertext, _oaep(algorithm)))
        except ValueError:
            raise InvalidCiphertext() from None

    async def public_key_pem(self, version: KeyVersion, spec: KeySpec) -> bytes:
        return bytes(self._key(version, spec).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _new_private_key_der(spec: KeySpec) -> bytes:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if spec is KeySpec.RSA_2048:
        key = rsa.generate_private_key(65537, 2048)
    elif spec is KeySpec.RSA_3072:
        key = rsa.generate_private_key(65537, 3072)
    elif spec is KeySpec.EC_P256:
        key = ec.generate_private_key(ec.SECP256R1())
    elif spec is KeySpec.EC_P256K:
        key = ec.generate_private_key(ec.SECP256K1())
    else:
        raise UnsupportedOperation(f"the software backend cannot make {spec} keys")
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
