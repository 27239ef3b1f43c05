"""The hardware key backend against a real SoftHSM2 token: both storage mechanisms, every
spec it holds, results checked independently with ``cryptography``, and the proof that key
material never leaves the token in the clear."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import uuid
from dataclasses import replace
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e

from ekm_sim.admin import init_token
from ekm_sim.config import HSMConfig
from kms_proxy.backends.base import KeyBackend
from kms_proxy.backends.hsm import HSMBackend, _eme_oaep_sha256_decode, _mgf1_sha256, _xor
from kms_proxy.core.errors import (
    DependencyUnavailable,
    InvalidCiphertext,
    InvalidParameter,
    Throttled,
    UnsupportedOperation,
)
from kms_proxy.core.model import CallInfo, KeySpec, KeyStorageMechanism, KeyVersion
from shared.pkcs11pool import DispatchMode, PKCS11Pool, SessionContext

WRAP_LABEL = "kms-proxy.wrap"
CALL = CallInfo(request_id="req-1", principal_arn="acs:ram::1:user/alice",
                operation="Encrypt", key_arn="acs:kms:cn-hangzhou:1:key/key-test")
STORAGES = list(KeyStorageMechanism)
INTERNAL = KeyStorageMechanism.HSM_INTERNAL
DATABASE = KeyStorageMechanism.HSM_ENCRYPTED_DATABASE
SYMMETRIC = [KeySpec.AES_256, KeySpec.AES_128]
SIGNING = [(KeySpec.RSA_2048, "RSA_PSS_SHA_256"), (KeySpec.RSA_2048, "RSA_PKCS1_SHA_256"),
           (KeySpec.RSA_3072, "RSA_PSS_SHA_256"), (KeySpec.RSA_3072, "RSA_PKCS1_SHA_256"),
           (KeySpec.EC_P256, "ECDSA_SHA_256")]
OAEP = [(spec, algorithm) for spec in (KeySpec.RSA_2048, KeySpec.RSA_3072)
        for algorithm in ("RSAES_OAEP_SHA_256", "RSAES_OAEP_SHA_1")]
OAEP_HASH = {"RSAES_OAEP_SHA_256": hashes.SHA256, "RSAES_OAEP_SHA_1": hashes.SHA1}


@pytest.fixture
def backend(hsm: HSMBackend) -> HSMBackend:
    return hsm


async def new_version(backend: HSMBackend, spec: KeySpec,
                      storage: KeyStorageMechanism | None) -> KeyVersion:
    version_id = str(uuid.uuid4())
    material = await backend.generate(version_id=version_id, spec=spec, storage=storage,
                                      call=CALL)
    return KeyVersion("key-test", version_id, "2024-01-01T00:00:00Z", material)


def public_key(pem: bytes) -> Any:
    return serialization.load_pem_public_key(pem)


def oaep(algorithm: str) -> padding.OAEP:
    digest = OAEP_HASH[algorithm]()
    return padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None)


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def token_objects(**attrs: Any) -> Any:
    """A pool callable listing token or session objects matching ``attrs``."""
    def find(ctx: SessionContext) -> list[Any]:
        return list(ctx.session.get_objects({getattr(Attribute, k): v
                                             for k, v in attrs.items()}))
    return find


def test_it_is_a_key_backend(backend: HSMBackend) -> None:
    checked: KeyBackend = backend
    assert checked.name == "hsm"


# -- symmetric ---------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("spec", SYMMETRIC)
async def test_seal_round_trip_and_every_fault_is_invalid_ciphertext(
        backend: HSMBackend, spec: KeySpec, storage: KeyStorageMechanism) -> None:
    version = await new_version(backend, spec, storage)
    other = await new_version(backend, spec, storage)
    for plaintext in (b"", b"x", os.urandom(64), os.urandom(6144)):
        sealed = await backend.seal(version, spec, plaintext, b"ctx", call=CALL)
        assert len(sealed) == 12 + len(plaintext) + 16
        assert await backend.unseal(version, spec, sealed, b"ctx", call=CALL) == plaintext
    sealed = await backend.seal(version, spec, b"secret data", b"ctx", call=CALL)
    assert sealed != await backend.seal(version, spec, b"secret data", b"ctx", call=CALL)

    faults = [flip(sealed, 0), flip(sealed, 12), flip(sealed, len(sealed) - 1),
              sealed[:-1], sealed[:27], b"", sealed + b"\0"]
    for bad in faults:
        with pytest.raises(InvalidCiphertext):
            await backend.unseal(version, spec, bad, b"ctx", call=CALL)
    for aad in (b"", b"ctx2", b"ct"):
        with pytest.raises(InvalidCiphertext):
            await backend.unseal(version, spec, sealed, aad, call=CALL)
    with pytest.raises(InvalidCiphertext):
        await backend.unseal(other, spec, sealed, b"ctx", call=CALL)
    # The sessions survived all of that.
    assert await backend.unseal(version, spec, sealed, b"ctx", call=CALL) == b"secret data"


async def test_symmetric_keys_refuse_asymmetric_calls(backend: HSMBackend) -> None:
    version = await new_version(backend, KeySpec.AES_256, INTERNAL)
    with pytest.raises(UnsupportedOperation):
        await backend.sign(version, KeySpec.AES_256, "RSA_PSS_SHA_256", bytes(32))
    with pytest.raises(UnsupportedOperation):
        await backend.public_key_pem(version, KeySpec.AES_256)
    rsa_version = await new_version(backend, KeySpec.RSA_2048, INTERNAL)
    with pytest.raises(UnsupportedOperation):
        await backend.seal(rsa_version, KeySpec.RSA_2048, b"x", b"", call=CALL)


# -- signatures --------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize(("spec", "algorithm"), SIGNING)
async def test_signatures_verify_independently(backend: HSMBackend, spec: KeySpec,
                                               algorithm: str,
                                               storage: KeyStorageMechanism) -> None:
    version = await new_version(backend, spec, storage)
    digest = hashlib.sha256(b"message").digest()
    signature = await backend.sign(version, spec, algorithm, digest)
    public = public_key(await backend.public_key_pem(version, spec))
    prehashed = Prehashed(hashes.SHA256())
    if algorithm == "RSA_PSS_SHA_256":
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(signature, digest,
                      padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                      prehashed)
        # PSS is randomised.
        assert signature != await backend.sign(version, spec, algorithm, digest)
    elif algorithm == "RSA_PKCS1_SHA_256":
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(signature, digest, padding.PKCS1v15(), prehashed)
        assert signature == await backend.sign(version, spec, algorithm, digest)
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP256R1)
        public.verify(signature, digest, ec.ECDSA(prehashed))

    assert await backend.verify(version, spec, algorithm, digest, signature) is True
    other_digest = hashlib.sha256(b"other").digest()
    assert await backend.verify(version, spec, algorithm, other_digest, signature) is False
    for bad in (flip(signature, len(signature) // 2), signature[:-1], b"", b"\0" * 10,
                b"\xff" * len(signature), os.urandom(len(signature))):
        assert await backend.verify(version, spec, algorithm, digest, bad) is False
    other = await new_version(backend, spec, storage)
    assert await backend.verify(other, spec, algorithm, digest, signature) is False


async def test_short_ecdsa_components_verify(backend: HSMBackend) -> None:
    # A DER signature whose r and s are both short must still reach the token as 32 + 32
    # bytes (asn1crypto's to_p1363 would shrink both).
    version = await new_version(backend, KeySpec.EC_P256, INTERNAL)
    tiny = encode_dss_signature(1, 1)
    assert await backend.verify(version, KeySpec.EC_P256, "ECDSA_SHA_256", bytes(32),
                                tiny) is False


async def test_sign_checks_its_inputs(backend: HSMBackend) -> None:
    version = await new_version(backend, KeySpec.RSA_2048, INTERNAL)
    with pytest.raises(InvalidParameter, match="Digest"):
        await backend.sign(version, KeySpec.RSA_2048, "RSA_PSS_SHA_256", bytes(31))
    with pytest.raises(InvalidParameter, match="Digest"):
        await backend.verify(version, KeySpec.RSA_2048, "RSA_PSS_SHA_256", bytes(33), b"s")
    with pytest.raises(InvalidParameter, match="Algorithm"):
        await backend.sign(version, KeySpec.RSA_2048, "ECDSA_SHA_256", bytes(32))
    with pytest.raises(InvalidParameter, match="Algorithm"):
        await backend.asymmetric_decrypt(version, KeySpec.RSA_2048, "SM2PKE", bytes(256))


# -- RSA-OAEP ----------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize(("spec", "algorithm"), OAEP)
async def test_oaep_decrypts_what_cryptography_encrypts(backend: HSMBackend, spec: KeySpec,
                                                        algorithm: str,
                                                        storage: KeyStorageMechanism) -> None:
    version = await new_version(backend, spec, storage)
    public = public_key(await backend.public_key_pem(version, spec))
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == int(spec.value.split("_")[1])
    for plaintext in (b"\0", b"data key", os.urandom(190)):
        local = public.encrypt(plaintext, oaep(algorithm))
        assert await backend.asymmetric_decrypt(version, spec, algorithm, local) == plaintext
        remote = await backend.asymmetric_encrypt(version, spec, algorithm, plaintext)
        assert remote != local
        assert await backend.asymmetric_decrypt(version, spec, algorithm, remote) == plaintext

    local = public.encrypt(b"data key", oaep(algorithm))
    other_algorithm = next(a for a in OAEP_HASH if a != algorithm)
    other = await new_version(backend, spec, storage)
    faults = [(version, algorithm, flip(local, 5)), (version, algorithm, local[:-1]),
              (version, algorithm, local + b"\0"), (version, algorithm, b"\xff" * len(local)),
              (version, algorithm, bytes(len(local))), (version, other_algorithm, local),
              (other, algorithm, local)]
    for target, alg, bad in faults:
        with pytest.raises(InvalidCiphertext):
            await backend.asymmetric_decrypt(target, spec, alg, bad)
    assert await backend.asymmetric_decrypt(version, spec, algorithm, local) == b"data key"


def _oaep_encode(message: bytes, k: int, *, first: int = 0, label_hash: bytes | None = None,
                 separator: int = 1, ps_byte: int = 0) -> bytes:
    """RFC 8017 EME-OAEP encoding with SHA-256, with knobs to break each part."""
    h = 32
    ps = bytes([ps_byte]) + bytes(k - len(message) - 2 * h - 3)
    db = (label_hash or hashlib.sha256(b"").digest()) + ps + bytes([separator]) + message
    seed = os.urandom(h)
    masked_db = _xor(db, _mgf1_sha256(seed, k - h - 1))
    masked_seed = _xor(seed, _mgf1_sha256(masked_db, h))
    return bytes([first]) + masked_seed + masked_db


def test_eme_oaep_decoding_rejects_each_broken_part() -> None:
    assert _eme_oaep_sha256_decode(_oaep_encode(b"hi", 256), 256) == b"hi"
    assert _eme_oaep_sha256_decode(_oaep_encode(b"", 256), 256) == b""
    # Raw RSA output without its leading zero byte is padded back.
    assert _eme_oaep_sha256_decode(_oaep_encode(b"hi", 256)[1:], 256) == b"hi"
    for broken in (_oaep_encode(b"hi", 256, first=1),
                   _oaep_encode(b"hi", 256, label_hash=bytes(32)),
                   _oaep_encode(b"hi", 256, separator=2),
                   _oaep_encode(b"hi", 256, ps_byte=7),
                   bytes(256), b"\0" * 257):
        assert _eme_oaep_sha256_decode(broken, 256) is None


# -- the proof: material never leaves the token ------------------------------------------------


def _aes_windows(blobs: list[bytes]) -> list[bytes]:
    """Every 16- and 32-byte window of ``blobs``: where a leaked AES key would sit."""
    return [blob[i:i + size] for blob in blobs for size in (16, 32)
            for i in range(len(blob) - size + 1)]


def _assert_no_window_opens(sealed: bytes, aad: bytes, blobs: list[bytes]) -> None:
    iv, body = sealed[:12], sealed[12:]
    for window in _aes_windows(blobs):
        with pytest.raises(InvalidTag):
            AESGCM(window).decrypt(iv, body, aad)


@pytest.mark.parametrize("spec", [KeySpec.AES_256, KeySpec.AES_128, KeySpec.RSA_2048,
                                  KeySpec.EC_P256])
async def test_hsm_internal_material_never_leaves_the_token(
        pool: PKCS11Pool, backend: HSMBackend, spec: KeySpec,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    version = await new_version(backend, spec, INTERNAL)
    # What the database keeps is a reference, derived from the version id alone.
    assert version.material == b"internal:" + version.version_id.encode()

    symmetric = spec in SYMMETRIC
    if symmetric:
        sealed = await backend.seal(version, spec, b"plaintext", b"aad", call=CALL)
        await backend.unseal(version, spec, sealed, b"aad", call=CALL)
    else:
        algorithm = "ECDSA_SHA_256" if spec is KeySpec.EC_P256 else "RSA_PSS_SHA_256"
        await backend.sign(version, spec, algorithm, bytes(32))

    cls = ObjectClass.SECRET_KEY if symmetric else ObjectClass.PRIVATE_KEY
    secret_attr = {KeySpec.RSA_2048: Attribute.PRIVATE_EXPONENT}.get(spec, Attribute.VALUE)
    wrap_label = WRAP_LABEL

    def inspect(ctx: SessionContext) -> dict[str, Any]:
        found = list(ctx.session.get_objects({Attribute.CLASS: cls,
                                              Attribute.LABEL: version.version_id}))
        assert len(found) == 1
        key = found[0]
        facts = {a.name: key[a] for a in (Attribute.TOKEN, Attribute.SENSITIVE,
                                          Attribute.EXTRACTABLE, Attribute.ALWAYS_SENSITIVE,
                                          Attribute.NEVER_EXTRACTABLE)}
        with pytest.raises(p11e.AttributeSensitive):
            key[secret_attr]
        # Not even the token's own wrapping key can take it out.
        wrapping = ctx.secret_key(wrap_label, wrap_label.encode())
        with pytest.raises(p11e.KeyUnextractable):
            wrapping.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        return facts

    facts = await pool.run(inspect)
    assert facts == {"TOKEN": True, "SENSITIVE": True, "EXTRACTABLE": False,
                     "ALWAYS_SENSITIVE": True, "NEVER_EXTRACTABLE": True}
    logged = [r.getMessage().encode() for r in caplog.records]
    if symmetric:
        # No 16- or 32-byte window of the stored record or of any log line is the key.
        _assert_no_window_opens(sealed, b"aad", [version.material, *logged])


@pytest.mark.parametrize("spec", SYMMETRIC)
async def test_encrypted_database_keeps_only_a_wrapped_blob(
        hsm_config: HSMConfig, spec: KeySpec, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # Both tokens exist before any pool opens, so one module (re)initialisation sees both.
    other_config = replace(hsm_config, token_label=f"o-{uuid.uuid4().hex[:12]}")
    init_token(other_config)
    async with PKCS11Pool(hsm_config.pool()) as pool, \
            PKCS11Pool(other_config.pool()) as other_pool:
        backend = HSMBackend(pool, wrapping_key_label=WRAP_LABEL)
        await backend.ensure_token_keys()
        version = await new_version(backend, spec, DATABASE)
        key_bytes = 32 if spec is KeySpec.AES_256 else 16
        assert version.material.startswith(b"wrapped.v2:")
        # The 32-byte binding tag, then RFC 5649: the key plus one 8-byte integrity block.
        assert len(version.material) == len(b"wrapped.v2:") + 32 + key_bytes + 8
        sealed = await backend.seal(version, spec, b"plaintext", b"aad", call=CALL)
        assert await backend.unseal(version, spec, sealed, b"aad", call=CALL) == b"plaintext"

        # The token keeps no object for the version; the unwrapped copy is a sensitive,
        # non-extractable session object.
        assert await pool.run(token_objects(LABEL=version.version_id)) == []

        def session_copies(ctx: SessionContext) -> list[tuple[bool, bool]]:
            found = list(ctx.session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                                  Attribute.TOKEN: False}))
            for key in found:
                with pytest.raises(p11e.AttributeSensitive):
                    key[Attribute.VALUE]
            return [(key[Attribute.SENSITIVE], key[Attribute.EXTRACTABLE]) for key in found]

        assert await pool.run(session_copies) == [(True, False)]

        # Neither the stored blob nor any log line holds the key.
        logged = [r.getMessage().encode() for r in caplog.records]
        _assert_no_window_opens(sealed, b"aad", [version.material, *logged])

        # Another token, with its own wrapping and binding keys, refuses the record: the tag
        # does not verify there, so the blob is never unwrapped.
        stranger = HSMBackend(other_pool, wrapping_key_label=WRAP_LABEL)
        assert await stranger.ensure_token_keys()
        with pytest.raises(DependencyUnavailable, match="binding tag does not verify"):
            await stranger.unseal(version, spec, sealed, b"aad", call=CALL)
        with pytest.raises(DependencyUnavailable, match="binding tag does not verify"):
            await stranger.seal(version, spec, b"x", b"", call=CALL)


@pytest.mark.parametrize("spec", [KeySpec.RSA_2048, KeySpec.EC_P256])
async def test_encrypted_database_pairs_keep_a_wrapped_private_key(
        pool: PKCS11Pool, backend: HSMBackend, spec: KeySpec) -> None:
    version = await new_version(backend, spec, DATABASE)
    assert version.material.startswith(b"wrapped-pair.v2:")
    body = version.material[len(b"wrapped-pair.v2:") + 32:]
    length = int.from_bytes(body[:2], "big")
    stored_public = serialization.load_der_public_key(body[2:2 + length])
    pem = await backend.public_key_pem(version, spec)
    assert stored_public.public_bytes(serialization.Encoding.PEM,
                                      serialization.PublicFormat.SubjectPublicKeyInfo) == pem
    # The rest is the wrapped private key: it is not a private key anyone can load.
    with pytest.raises(ValueError):
        serialization.load_der_private_key(body[2 + length:], password=None)
    algorithm = "ECDSA_SHA_256" if spec is KeySpec.EC_P256 else "RSA_PKCS1_SHA_256"
    await backend.sign(version, spec, algorithm, bytes(32))
    assert await pool.run(token_objects(LABEL=version.version_id)) == []

    def private_copies(ctx: SessionContext) -> list[tuple[bool, bool]]:
        found = list(ctx.session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                              Attribute.TOKEN: False}))
        return [(key[Attribute.SENSITIVE], key[Attribute.EXTRACTABLE]) for key in found]

    assert await pool.run(private_copies) == [(True, False)]


async def test_corrupt_stored_material_is_a_dependency_fault(backend: HSMBackend) -> None:
    spec = KeySpec.AES_256
    version = await new_version(backend, spec, DATABASE)
    sealed = await backend.seal(version, spec, b"x", b"", call=CALL)
    broken = replace(version, version_id=str(uuid.uuid4()),
                     material=flip(version.material, 12))
    # Not InvalidCiphertext: the caller's input is fine, the stored record is not.
    with pytest.raises(DependencyUnavailable):
        await backend.unseal(broken, spec, sealed, b"", call=CALL)
    for material in (b"", b"internal:", b"nonsense", b"wrapped-pair:\0\5abc"):
        with pytest.raises(DependencyUnavailable):
            await backend.seal(replace(version, material=material), spec, b"x", b"",
                               call=CALL)
    missing_id = str(uuid.uuid4())
    missing = replace(version, version_id=missing_id, material=b"internal:" + missing_id.encode())
    with pytest.raises(DependencyUnavailable):
        await backend.seal(missing, spec, b"x", b"", call=CALL)
    assert await backend.unseal(version, spec, sealed, b"", call=CALL) == b"x"


# -- records are bound to their version -------------------------------------------------------


async def test_a_wrapped_record_moved_to_another_version_is_refused(
        pool: PKCS11Pool, backend: HSMBackend) -> None:
    spec = KeySpec.AES_256
    first, second = [await new_version(backend, spec, DATABASE) for _ in range(2)]
    sealed = await backend.seal(first, spec, b"first's data", b"", call=CALL)
    await backend.seal(second, spec, b"used once", b"", call=CALL)
    # The second key's row now holds the first's blob (its tag and all): RFC 5649 alone would
    # unwrap it, and the second key would decrypt the first one's ciphertexts. A fresh
    # backend has no session copy of the second key to fall back on.
    backend = HSMBackend(pool, wrapping_key_label=WRAP_LABEL)
    moved = replace(second, material=first.material)
    with pytest.raises(DependencyUnavailable, match="binding tag does not verify"):
        await backend.unseal(moved, spec, sealed, b"", call=CALL)
    with pytest.raises(DependencyUnavailable, match="binding tag does not verify"):
        await backend.seal(moved, spec, b"x", b"", call=CALL)
    # A tag moved alone does not help either.
    tag = slice(len(b"wrapped.v2:"), len(b"wrapped.v2:") + 32)
    grafted = bytearray(first.material)
    grafted[tag] = second.material[tag]
    with pytest.raises(DependencyUnavailable, match="binding tag does not verify"):
        await backend.seal(replace(first, version_id=str(uuid.uuid4()),
                                   material=bytes(grafted)), spec, b"x", b"", call=CALL)
    # Both keys still work from their own records.
    assert await backend.unseal(first, spec, sealed, b"", call=CALL) == b"first's data"
    assert await backend.unseal(second, spec, await backend.seal(second, spec, b"y", b"",
                                                                  call=CALL),
                                b"", call=CALL) == b"y"


async def test_a_pair_record_moved_or_with_another_public_key_is_refused(
        backend: HSMBackend) -> None:
    spec = KeySpec.RSA_2048
    first, second = [await new_version(backend, spec, DATABASE) for _ in range(2)]
    moved = replace(second, material=first.material)
    # The public key is checked too: otherwise AsymmetricEncrypt would encrypt to a key
    # whoever wrote the row chose.
    body_at = len(b"wrapped-pair.v2:") + 32
    length = int.from_bytes(first.material[body_at:body_at + 2], "big")
    foreign = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    foreign_spki = foreign.public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    assert len(foreign_spki) == length
    swapped_public = replace(first, material=(
        first.material[:body_at + 2] + foreign_spki + first.material[body_at + 2 + length:]))
    for bad in (moved, swapped_public):
        with pytest.raises(DependencyUnavailable, match="binding tag does not verify"):
            await backend.public_key_pem(bad, spec)
        with pytest.raises(DependencyUnavailable, match="binding tag does not verify"):
            await backend.asymmetric_encrypt(bad, spec, "RSAES_OAEP_SHA_256", b"secret")
        with pytest.raises(DependencyUnavailable, match="binding tag does not verify"):
            await backend.sign(bad, spec, "RSA_PSS_SHA_256", bytes(32))
    await backend.sign(first, spec, "RSA_PSS_SHA_256", bytes(32))


async def test_unbound_and_misdirected_records_are_refused(backend: HSMBackend) -> None:
    spec = KeySpec.AES_256
    version = await new_version(backend, spec, DATABASE)
    # A record in the format from before the binding: the same blob, without its tag.
    blob = version.material[len(b"wrapped.v2:") + 32:]
    with pytest.raises(DependencyUnavailable, match="before records were bound"):
        await backend.seal(replace(version, material=b"wrapped:" + blob), spec, b"x", b"",
                           call=CALL)
    # An HsmInternal record naming another version's token objects.
    other = await new_version(backend, spec, INTERNAL)
    with pytest.raises(DependencyUnavailable, match="no usable"):
        await backend.seal(replace(version, material=other.material), spec, b"x", b"",
                           call=CALL)
    # A record too short to hold its tag.
    with pytest.raises(DependencyUnavailable, match="no usable"):
        await backend.seal(replace(version, material=b"wrapped.v2:" + bytes(32)), spec, b"x",
                           b"", call=CALL)
    # Destroying a version whose record is refused does not stall on it.
    await backend.destroy(replace(version, material=b"wrapped:" + blob), spec)


async def test_destroy_follows_the_version_not_its_record(pool: PKCS11Pool,
                                                          backend: HSMBackend) -> None:
    spec = KeySpec.AES_256
    first, second = [await new_version(backend, spec, INTERNAL) for _ in range(2)]
    # The second version's row was altered to name the first one's objects: destroying the
    # second must remove the second's objects and leave the first's.
    await backend.destroy(replace(second, material=first.material), spec)
    assert await pool.run(token_objects(LABEL=second.version_id)) == []
    assert len(await pool.run(token_objects(LABEL=first.version_id))) == 1
    sealed = await backend.seal(first, spec, b"still here", b"", call=CALL)
    assert await backend.unseal(first, spec, sealed, b"", call=CALL) == b"still here"


async def test_a_bound_blob_this_token_cannot_unwrap_is_a_dependency_fault(
        pool: PKCS11Pool, backend: HSMBackend) -> None:
    spec = KeySpec.AES_256
    version = await new_version(backend, spec, DATABASE)
    blob = version.material[len(b"wrapped.v2:") + 32:]
    # A correctly bound record (the token's own tag) over a blob that does not unwrap: the
    # tag passes, RFC 5649's integrity check fails.
    record = await pool.run(lambda ctx: backend._bound_record(
        ctx, version.version_id, b"wrapped.v2:", flip(blob, 3)))
    with pytest.raises(DependencyUnavailable, match="does not unwrap"):
        await backend.seal(replace(version, material=record), spec, b"x", b"", call=CALL)


async def test_the_binding_key(pool: PKCS11Pool, backend: HSMBackend) -> None:
    label = f"{WRAP_LABEL}.bind"

    def facts(ctx: SessionContext) -> tuple[Any, ...]:
        key = ctx.secret_key(label, label.encode())
        with pytest.raises(p11e.AttributeSensitive):
            key[Attribute.VALUE]
        return tuple(key[a] for a in (Attribute.SIGN, Attribute.VERIFY, Attribute.SENSITIVE,
                                      Attribute.EXTRACTABLE, Attribute.TOKEN,
                                      Attribute.ENCRYPT, Attribute.WRAP, Attribute.KEY_TYPE))

    assert await pool.run(facts) == (True, True, True, False, True, False, False,
                                     KeyType.GENERIC_SECRET)


async def test_a_token_from_before_the_binding_gets_its_binding_key(pool: PKCS11Pool) -> None:
    # A token that has a wrapping key only, as older versions left it.
    def plant(ctx: SessionContext) -> None:
        ctx.session.generate_key(KeyType.AES, 256, label="old", id=b"old", store=True,
                                 capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
                                 template={Attribute.SENSITIVE: True,
                                           Attribute.EXTRACTABLE: False})

    await pool.run(plant)
    backend = HSMBackend(pool, wrapping_key_label="old")
    assert await backend.ensure_token_keys() is False  # the wrapping key was there
    assert len(await pool.run(token_objects(LABEL="old.bind"))) == 1
    version = await new_version(backend, KeySpec.AES_256, DATABASE)
    sealed = await backend.seal(version, KeySpec.AES_256, b"x", b"", call=CALL)
    assert await backend.unseal(version, KeySpec.AES_256, sealed, b"", call=CALL) == b"x"


async def test_an_unfit_binding_key_is_refused(pool: PKCS11Pool) -> None:
    def plant(ctx: SessionContext) -> None:
        ctx.session.generate_key(KeyType.GENERIC_SECRET, 256, label="weak2.bind",
                                 id=b"weak2.bind", store=True,
                                 capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                                 template={Attribute.EXTRACTABLE: True})

    await pool.run(plant)
    with pytest.raises(DependencyUnavailable, match="not a sensitive, non-extractable binding"):
        await HSMBackend(pool, wrapping_key_label="weak2").ensure_token_keys()


# -- generation and set-up ---------------------------------------------------------------------


async def test_generate_refusals_and_default_storage(backend: HSMBackend) -> None:
    with pytest.raises(InvalidParameter, match="ExternalKeyId"):
        await backend.generate(version_id=str(uuid.uuid4()), spec=KeySpec.AES_256,
                               storage=INTERNAL, external_key_id="ext-1", call=CALL)
    for spec in (KeySpec.SM4, KeySpec.EC_P256K, KeySpec.EC_SM2):
        for storage in STORAGES:
            with pytest.raises(UnsupportedOperation):
                await new_version(backend, spec, storage)
    version = await new_version(backend, KeySpec.AES_256, None)
    assert version.material.startswith(b"internal:")


async def test_wrapping_key(pool: PKCS11Pool, backend: HSMBackend) -> None:
    assert await backend.ensure_token_keys() is False
    found = await pool.run(token_objects(LABEL=WRAP_LABEL))
    assert len(found) == 1

    def facts(ctx: SessionContext) -> tuple[Any, ...]:
        key = ctx.secret_key(WRAP_LABEL, WRAP_LABEL.encode())
        return tuple(key[a] for a in (Attribute.WRAP, Attribute.UNWRAP, Attribute.SENSITIVE,
                                      Attribute.EXTRACTABLE, Attribute.TOKEN,
                                      Attribute.ENCRYPT, Attribute.VALUE_LEN))

    assert await pool.run(facts) == (True, True, True, False, True, False, 32)


async def test_an_unfit_wrapping_key_is_refused(pool: PKCS11Pool) -> None:
    def plant(ctx: SessionContext) -> None:
        ctx.session.generate_key(KeyType.AES, 256, label="weak", id=b"weak", store=True,
                                 capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
                                 template={Attribute.EXTRACTABLE: True})

    await pool.run(plant)
    with pytest.raises(DependencyUnavailable, match="not a sensitive"):
        await HSMBackend(pool, wrapping_key_label="weak").ensure_token_keys()


async def test_without_a_wrapping_key_the_database_mechanism_fails(pool: PKCS11Pool) -> None:
    backend = HSMBackend(pool, wrapping_key_label=WRAP_LABEL)
    with pytest.raises(DependencyUnavailable):
        await new_version(backend, KeySpec.AES_256, DATABASE)
    # HsmInternal needs no wrapping key.
    await new_version(backend, KeySpec.AES_256, INTERNAL)


# -- sessions and dispatch ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", [DispatchMode.INLINE, DispatchMode.THREADS])
async def test_round_trips_in_both_dispatch_modes(hsm_config: HSMConfig,
                                                  mode: DispatchMode) -> None:
    # One worker: python-pkcs11 0.10 calls C_Initialize(NULL), which tells SoftHSM2 the
    # application is single-threaded, so it runs without its mutexes; two threads inside it
    # at once corrupt its memory (softhsm/SoftHSMv2#688). One worker still keeps the token
    # off the event loop.
    async with PKCS11Pool(replace(hsm_config, mode=mode, workers=1).pool()) as pool:
        backend = HSMBackend(pool, wrapping_key_label=WRAP_LABEL)
        await backend.ensure_token_keys()
        versions = [await new_version(backend, KeySpec.AES_256, storage)
                    for storage in STORAGES]
        pair = await new_version(backend, KeySpec.RSA_2048, DATABASE)

        async def round_trip(i: int) -> None:
            version = versions[i % 2]
            data = os.urandom(i + 1)
            sealed = await backend.seal(version, KeySpec.AES_256, data, b"a", call=CALL)
            assert await backend.unseal(version, KeySpec.AES_256, sealed, b"a",
                                        call=CALL) == data
            digest = hashlib.sha256(data).digest()
            signature = await backend.sign(pair, KeySpec.RSA_2048, "RSA_PSS_SHA_256", digest)
            assert await backend.verify(pair, KeySpec.RSA_2048, "RSA_PSS_SHA_256", digest,
                                        signature)

        await asyncio.gather(*(round_trip(i) for i in range(40)))


async def test_session_copies_are_bounded_and_destroyed(pool: PKCS11Pool) -> None:
    backend = HSMBackend(pool, wrapping_key_label=WRAP_LABEL, session_cache_size=1)
    await backend.ensure_token_keys()
    versions = [await new_version(backend, KeySpec.AES_256, DATABASE) for _ in range(3)]
    for _ in range(2):
        for version in versions:
            sealed = await backend.seal(version, KeySpec.AES_256, b"x", b"", call=CALL)
            assert await backend.unseal(version, KeySpec.AES_256, sealed, b"",
                                        call=CALL) == b"x"
    copies = await pool.run(token_objects(CLASS=ObjectClass.SECRET_KEY, TOKEN=False))
    assert len(copies) == 1


async def test_pool_exhaustion_is_throttling(hsm_config: HSMConfig) -> None:
    config = replace(hsm_config, mode=DispatchMode.THREADS, workers=1, max_pending=1)
    async with PKCS11Pool(config.pool()) as pool:
        backend = HSMBackend(pool, wrapping_key_label=WRAP_LABEL)
        version = await new_version(backend, KeySpec.AES_256, INTERNAL)
        release = threading.Event()

        def block(ctx: SessionContext) -> None:
            release.wait(5)

        blocked = asyncio.ensure_future(pool.run(block))
        await asyncio.sleep(0.05)
        with pytest.raises(Throttled):
            await backend.seal(version, KeySpec.AES_256, b"x", b"", call=CALL)
        release.set()
        await blocked
        await backend.seal(version, KeySpec.AES_256, b"x", b"", call=CALL)


async def test_a_copy_destroyed_behind_its_back_costs_one_call(pool: PKCS11Pool,
                                                               backend: HSMBackend) -> None:
    version = await new_version(backend, KeySpec.AES_256, DATABASE)
    sealed = await backend.seal(version, KeySpec.AES_256, b"x", b"", call=CALL)

    def destroy_copies(ctx: SessionContext) -> int:
        found = list(ctx.session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                              Attribute.TOKEN: False}))
        for key in found:
            key.destroy()
        return len(found)

    assert await pool.run(destroy_copies) == 1
    with pytest.raises(DependencyUnavailable):
        await backend.unseal(version, KeySpec.AES_256, sealed, b"", call=CALL)
    assert await backend.unseal(version, KeySpec.AES_256, sealed, b"", call=CALL) == b"x"


def _labelled(label: str) -> Any:
    def find(ctx: SessionContext) -> list[Any]:
        return list(ctx.session.get_objects({Attribute.LABEL: label, Attribute.TOKEN: True}))
    return find


async def test_an_import_retried_after_a_lost_save_leaves_one_object(
        backend: HSMBackend, pool: PKCS11Pool) -> None:
    """An HsmInternal import whose database write failed left its token object behind; the
    retry made a second one, and every use then met two objects for one version."""
    version_id, material = str(uuid.uuid4()), os.urandom(32)
    for _ in range(2):  # The first record is lost with the failed save.
        record = await backend.import_material(version_id=version_id, spec=KeySpec.AES_256,
                                               material=material, storage=INTERNAL)
    assert len(await pool.run(_labelled(version_id))) == 1
    version = KeyVersion("key-test", version_id, "2024-01-01T00:00:00Z", record)
    sealed = await backend.seal(version, KeySpec.AES_256, b"data", b"aad", call=CALL)
    assert await backend.unseal(version, KeySpec.AES_256, sealed, b"aad", call=CALL) == b"data"


async def test_imported_material_may_only_encrypt_and_decrypt(backend: HSMBackend,
                                                              pool: PKCS11Pool) -> None:
    """Material its owner knows must not wrap (export) or unwrap other keys of the token:
    left to SoftHSM's defaults, WRAP, UNWRAP, SIGN and VERIFY were true."""
    version_id = str(uuid.uuid4())
    await backend.import_material(version_id=version_id, spec=KeySpec.AES_256,
                                  material=os.urandom(32), storage=INTERNAL)

    def usages(ctx: SessionContext) -> dict[Attribute, bool]:
        [key] = _labelled(version_id)(ctx)
        return {a: bool(key[a]) for a in (Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.WRAP,
                                          Attribute.UNWRAP, Attribute.SIGN, Attribute.VERIFY,
                                          Attribute.DERIVE, Attribute.SENSITIVE,
                                          Attribute.EXTRACTABLE)}

    assert await pool.run(usages) == {
        Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.WRAP: False,
        Attribute.UNWRAP: False, Attribute.SIGN: False, Attribute.VERIFY: False,
        Attribute.DERIVE: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}


@pytest.mark.parametrize("mode", [DispatchMode.INLINE, DispatchMode.THREADS])
async def test_keys_work_again_after_the_token_lost_its_sessions(
        hsm_config: HSMConfig, mode: DispatchMode) -> None:
    """A token restart or failover ends every session and the login. Threads mode reopened
    worker sessions without logging in again, so every private object stayed invisible
    (503 for good) until the process restarted."""
    async with PKCS11Pool(replace(hsm_config, mode=mode, workers=1).pool()) as pool:
        hsm = HSMBackend(pool, wrapping_key_label=WRAP_LABEL)
        await hsm.ensure_token_keys()
        versions = [await new_version(hsm, KeySpec.AES_256, storage) for storage in STORAGES]
        for version in versions:
            await hsm.seal(version, KeySpec.AES_256, b"x", b"", call=CALL)
        with pool._module_lock:
            pool._lib.reinitialize()
        for version in versions:
            outcomes = []
            for _ in range(3):
                try:
                    await hsm.seal(version, KeySpec.AES_256, b"x", b"", call=CALL)
                    outcomes.append("ok")
                except DependencyUnavailable as exc:
                    outcomes.append(f"unavailable: {exc}")
            # At most the call that met the dead session fails; the next ones work.
            assert outcomes[1:] == ["ok", "ok"], (mode, version.material[:9], outcomes)


async def test_a_missing_object_is_reported_without_token_internals(
        backend: HSMBackend, pool: PKCS11Pool) -> None:
    version = await new_version(backend, KeySpec.AES_256, INTERNAL)
    await pool.run(lambda ctx: [o.destroy() for o in _labelled(version.version_id)(ctx)])
    with pytest.raises(DependencyUnavailable) as caught:
        await backend.seal(version, KeySpec.AES_256, b"x", b"", call=CALL)
    assert version.version_id not in str(caught.value) and "label" not in str(caught.value)


@pytest.mark.parametrize(("spec", "storage"), [(KeySpec.RSA_3072, INTERNAL),
                                               (KeySpec.EC_P256, DATABASE)])
async def test_key_pairs_are_generated_off_the_event_loop(
        backend: HSMBackend, monkeypatch: pytest.MonkeyPatch, spec: KeySpec,
        storage: KeyStorageMechanism) -> None:
    """Inline mode (the default) ran C_GenerateKeyPair on the event loop: an RSA-3072
    CreateKey (over a second in SoftHSM) stalled every request of every key kind."""
    import kms_proxy.backends.hsm as hsm_module

    threads: list[int] = []
    real = hsm_module._generate_pair

    def recorded(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(hsm_module, "_generate_pair", recorded)
    version = await new_version(backend, spec, storage)
    assert threads and threading.get_ident() not in threads
    assert await backend.public_key_pem(version, spec)
    # Symmetric work stays inline: cheaper than a hop to a thread.
    aes = await new_version(backend, KeySpec.AES_256, INTERNAL)
    where: list[int] = []
    await backend._run(lambda ctx: where.append(threading.get_ident()))
    assert where == [threading.get_ident()] and aes.material
