"""Hardware keys: material in a PKCS#11 token (SoftHSM2 in development), reached through the
shared session pool (``shared.pkcs11pool``).

Two storage mechanisms (CreateKey ``KeyStorageMechanism``):

- ``HsmInternal``: the key is generated inside the token as a token object, ``CKA_SENSITIVE``
  and not ``CKA_EXTRACTABLE``, labelled with the key version id. Every operation with the
  secret or private key runs in the token; the store keeps only ``b"internal:" + version id``.
- ``HsmEncryptedDatabase``: the key is generated in the token as a session object, wrapped
  with the token-resident wrapping key (``CKM_AES_KEY_WRAP_PAD``, RFC 5649) and destroyed; the
  store keeps the wrapped blob. For use, the blob is unwrapped into the token again as a
  sensitive, non-extractable session object, cached per session. Symmetric and asymmetric
  keys are both supported (the reference: "symmetric keys rotate, asymmetric do not").

Stored material records, self-describing by their prefix:

- ``internal:<version id>``: the token objects labelled with the record's own version id;
- ``wrapped.v2:<tag><RFC 5649 wrapped secret key>``
- ``wrapped-pair.v2:<tag><uint16 length><SubjectPublicKeyInfo DER><RFC 5649 wrapped private
  key>``

RFC 5649 proves that a blob is this token's, not whose it is: a blob moved from one version's
row to another's would unwrap, and the second key would then use the first one's material
(or, for a pair, encrypt to a public key someone else chose). So each wrapped record carries
``tag``: HMAC-SHA256, computed in the token with a second token-resident key (the binding
key, ``<wrapping label>.bind``), over the version id, the prefix and the rest of the record.
The token checks it before it unwraps the blob or anything uses the public key, as the
software backend binds the version id into its AES-GCM. Records from before the binding
(``wrapped:``, ``wrapped-pair:``) are refused; accepting them would reopen the hole.

Dispatch (inline on the event loop or on worker threads) is the pool's choice; this module
works with either.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, Final, TypeVar

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.constants import DEFAULT
from pkcs11.util.ec import (
    decode_ec_public_key,
    encode_ec_public_key,
    encode_named_curve_parameters,
)
from pkcs11.util.rsa import decode_rsa_public_key, encode_rsa_public_key

from kms_proxy.core.errors import (
    DependencyUnavailable,
    InvalidCiphertext,
    InvalidParameter,
    Throttled,
    UnsupportedOperation,
)
from kms_proxy.core.model import CallInfo, KeySpec, KeyStorageMechanism, KeyVersion
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

__all__ = ["HSMBackend"]

log = logging.getLogger("kms_proxy.hsm")
T = TypeVar("T")
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

IV_BYTES: Final = 12
TAG_BYTES: Final = 16
DIGEST_BYTES: Final = 32
# RFC 5649 (AES key wrap with padding): wraps secret keys and PKCS#8 private keys of any
# length. SoftHSM2 2.6 implements it next to RFC 3394 CKM_AES_KEY_WRAP.
_WRAP_MECHANISM: Final = Mechanism.AES_KEY_WRAP_PAD

_INTERNAL: Final = b"internal:"
_WRAPPED: Final = b"wrapped.v2:"
_WRAPPED_PAIR: Final = b"wrapped-pair.v2:"
_UNBOUND: Final = (b"wrapped:", b"wrapped-pair:")
_BINDING_CONTEXT: Final = b"kms-proxy hsm material v2|"
_BINDING_MECHANISM: Final = Mechanism.SHA256_HMAC
_TAG_BYTES: Final = 32

_AES_BITS: Final[Mapping[KeySpec, int]] = MappingProxyType({
    KeySpec.AES_256: 256, KeySpec.AES_128: 128})
_RSA_BITS: Final[Mapping[KeySpec, int]] = MappingProxyType({
    KeySpec.RSA_2048: 2048, KeySpec.RSA_3072: 3072})
_EC_CURVES: Final[Mapping[KeySpec, str]] = MappingProxyType({KeySpec.EC_P256: "secp256r1"})

# Usage attributes at the token level. Both RSA usages are allowed here because the core
# enforces the key's KeyUsage before any call reaches a backend.
_CAPABILITIES: Final[Mapping[KeyType, MechanismFlag]] = MappingProxyType({
    KeyType.AES: MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
    KeyType.RSA: (MechanismFlag.SIGN | MechanismFlag.VERIFY
                  | MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT),
    KeyType.EC: MechanismFlag.SIGN | MechanismFlag.VERIFY,
})
# What the key material of every kept object must be: readable by nobody, ever.
_SENSITIVE: Final[Mapping[Attribute, Any]] = MappingProxyType({
    Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True})
# A freshly generated HsmEncryptedDatabase key may leave the token only by wrapping
# (CKA_SENSITIVE stops a plain read); it is destroyed right after.
_WRAPPABLE: Final[Mapping[Attribute, Any]] = MappingProxyType({
    Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True, Attribute.PRIVATE: True})
# python-pkcs11 builds an unwrap template with every usage attribute; a private key has no
# CKA_ENCRYPT/CKA_WRAP/CKA_VERIFY (SoftHSM answers CKR_ATTRIBUTE_TYPE_INVALID), so drop them.
_NOT_FOR_PRIVATE: Final[Mapping[Attribute, Any]] = MappingProxyType({
    Attribute.ENCRYPT: DEFAULT, Attribute.WRAP: DEFAULT, Attribute.VERIFY: DEFAULT})

# RFC 8017 section 9.2, note 1: the DER DigestInfo prefix for SHA-256, which CKM_RSA_PKCS
# (raw PKCS#1 v1.5 signing) needs in front of a precomputed digest.
_SHA256_DIGEST_INFO: Final = bytes.fromhex("3031300d060960864801650304020105000420")


@dataclass(frozen=True, slots=True)
class _Signing:
    key_type: KeyType
    mechanism: Mechanism
    param: Any


_SIGNING: Final[Mapping[str, _Signing]] = MappingProxyType({
    # CKM_RSA_PKCS_PSS signs a precomputed digest; salt = digest length, as Alibaba KMS.
    "RSA_PSS_SHA_256": _Signing(KeyType.RSA, Mechanism.RSA_PKCS_PSS,
                                (Mechanism.SHA256, MGF.SHA256, DIGEST_BYTES)),
    "RSA_PKCS1_SHA_256": _Signing(KeyType.RSA, Mechanism.RSA_PKCS, None),
    # CKM_ECDSA signs the raw digest and answers r || s (PKCS#11 section 2.3.1).
    "ECDSA_SHA_256": _Signing(KeyType.EC, Mechanism.ECDSA, None),
})


@dataclass(frozen=True, slots=True)
class _OAEP:
    hash: Mechanism
    mgf: MGF
    local: type[hashes.HashAlgorithm]


_OAEP_PARAMS: Final[Mapping[str, _OAEP]] = MappingProxyType({
    "RSAES_OAEP_SHA_256": _OAEP(Mechanism.SHA256, MGF.SHA256, hashes.SHA256),
    "RSAES_OAEP_SHA_1": _OAEP(Mechanism.SHA_1, MGF.SHA1, hashes.SHA1),
})


class _Role(Enum):
    """Which object of a version a call needs."""

    SECRET = "secret"  # noqa: S105 - a role name, not a secret.
    PRIVATE = "private"
    PUBLIC = "public"


@dataclass(frozen=True, slots=True)
class _Material:
    """A parsed material record."""

    storage: KeyStorageMechanism
    # HsmInternal: the CKA_LABEL (and, encoded, CKA_ID) of the token objects.
    ref: str = ""
    wrapped: bytes = b""
    spki: bytes = b""
    # HsmEncryptedDatabase: the binding tag and the message it covers.
    tag: bytes = b""
    bound: bytes = b""


class _MaterialUnreadable(HSMError):
    """The wrapping key cannot unwrap a stored blob (another token's, or corrupted), or its
    binding tag is not this version's."""


class _SessionKeys:
    """The key objects one session found or unwrapped, least recently used first.

    Unwrapped copies are session objects owned here and destroyed when they fall out; token
    objects are only forgotten. Only the thread that owns the session touches it.
    """

    def __init__(self, size: int) -> None:
        self._objects: OrderedDict[tuple[str, _Role], tuple[Any, bool]] = OrderedDict()
        self._size = size
        # Set from the event loop when a handle went stale; acted on by the owning thread.
        self.stale = False

    def reset(self) -> None:
        """Forget everything, destroying owned copies as far as they still exist."""
        objects, self._objects, self.stale = self._objects, OrderedDict(), False
        for obj, owned in objects.values():
            if owned:
                try:
                    obj.destroy()
                except p11e.PKCS11Error:
                    # Best effort: the handle may be the stale one; a session object goes
                    # with its session anyway.
                    pass

    def get(self, key: tuple[str, _Role]) -> Any:
        hit = self._objects.get(key)
        if hit is None:
            return None
        self._objects.move_to_end(key)
        return hit[0]

    def put(self, key: tuple[str, _Role], obj: Any, *, owned: bool) -> None:
        self._objects[key] = (obj, owned)
        while len(self._objects) > self._size:
            _, (old, was_owned) = self._objects.popitem(last=False)
            if was_owned:
                old.destroy()


class HSMBackend:
    """Keys whose material never leaves a PKCS#11 token in the clear."""

    name = "hsm"

    def __init__(self, pool: PKCS11Pool, *, wrapping_key_label: str,
                 session_cache_size: int = 1024, public_cache_size: int = 10_000,
                 oaep_sha256_in_token: bool = False) -> None:
        """``pool`` must be open. ``oaep_sha256_in_token`` says the token implements
        CKM_RSA_PKCS_OAEP with SHA-256; SoftHSM2 2.6 takes SHA-1 only (CKR_ARGUMENTS_BAD,
        softhsm/SoftHSMv2#474), so by default RSAES_OAEP_SHA_256 decrypts with the token's
        raw RSA (CKM_RSA_X_509) and decodes EME-OAEP here, and encrypts with the public key
        read from the token."""
        self._pool = pool
        self._wrap_label = wrapping_key_label
        self._wrap_id = wrapping_key_label.encode()
        self._bind_label = f"{wrapping_key_label}.bind"
        self._bind_id = self._bind_label.encode()
        self._session_cache_size = session_cache_size
        self._oaep_sha256_in_token = oaep_sha256_in_token
        # Per-session key caches: python-pkcs11 binds each object to the session that made
        # it, and a session object dies with its session. Weak keys let a closed (evicted)
        # session's cache go with its context.
        self._sessions: weakref.WeakKeyDictionary[SessionContext, _SessionKeys] = (
            weakref.WeakKeyDictionary())
        self._sessions_lock = threading.Lock()
        # Public keys by version id; public data, touched only on the event loop thread.
        self._public: OrderedDict[str, PublicKey] = OrderedDict()
        self._public_cache_size = public_cache_size

    # -- set-up ------------------------------------------------------------------------------

    async def ensure_token_keys(self) -> bool:
        """Create the token-resident AES-256 wrapping key unless it exists, and the binding
        key (HMAC-SHA256) beside it unless that exists; whether the wrapping key was created.

        :raises DependencyUnavailable: if the token fails, or a key with either label exists
            but is not a sensitive, non-extractable key for its one use.
        """
        wrap_label, wrap_id = self._wrap_label, self._wrap_id
        bind_label, bind_id = self._bind_label, self._bind_id

        def ensure(ctx: SessionContext) -> tuple[bool, bool]:
            created_wrap = _ensure_token_key(
                ctx, wrap_label, wrap_id, KeyType.AES, MechanismFlag.WRAP | MechanismFlag.UNWRAP,
                (Attribute.WRAP, Attribute.UNWRAP), "wrapping key")
            created_bind = _ensure_token_key(
                ctx, bind_label, bind_id, KeyType.GENERIC_SECRET,
                MechanismFlag.SIGN | MechanismFlag.VERIFY, (Attribute.SIGN, Attribute.VERIFY),
                "binding key")
            return created_wrap, created_bind

        created_wrap, created_bind = await self._run(ensure)
        for created, label in ((created_wrap, wrap_label), (created_bind, bind_label)):
            if created:
                log.info("created the key %r in token %r", label, self._pool.token_label)
        return created_wrap

    # -- plumbing ----------------------------------------------------------------------------

    async def _run(self, fn: Callable[[SessionContext], T], *, decrypting: bool = False,
                   slow: bool = False) -> T:
        """Run ``fn`` on a pool session and turn HSM errors into the core's.

        With ``decrypting``, input the token rejects is ``InvalidCiphertext``; ``slow`` calls
        (key-pair generation) stay off the event loop (``PKCS11Pool.run``).
        """
        try:
            return await self._pool.run(fn, decrypting=decrypting, slow=slow)
        except HSMDataInvalid:
            if decrypting:
                raise InvalidCiphertext() from None
            raise DependencyUnavailable("hsm", "the token rejected the input") from None
        except HSMPoolExhausted:
            raise Throttled("hsm") from None
        except HSMKeyUsageNotPermitted as exc:
            raise UnsupportedOperation(f"the HSM key refuses it ({exc})") from None
        except _MaterialUnreadable as exc:
            raise DependencyUnavailable("hsm", str(exc)) from None
        except HSMKeyMissing as exc:
            # A cached object handle went stale (the pool said ObjectHandleInvalid) or a key
            # is gone: every session starts its cache afresh on its next call, in its own
            # thread. The labels it names are the token's internals: logged, not answered.
            with self._sessions_lock:
                for keys in self._sessions.values():
                    keys.stale = True
            log.warning("hsm key object missing: %s", exc)
            raise DependencyUnavailable("hsm", "a key object is missing from the token; "
                                               "the call may be retried") from None
        except HSMError as exc:
            # The pool's messages name PKCS#11 return values only, never data.
            raise DependencyUnavailable("hsm", str(exc) or type(exc).__name__) from None

    def _session_keys(self, ctx: SessionContext) -> _SessionKeys:
        with self._sessions_lock:
            keys = self._sessions.get(ctx)
            if keys is None:
                keys = self._sessions[ctx] = _SessionKeys(self._session_cache_size)
            return keys

    def _key(self, ctx: SessionContext, version_id: str, material: _Material, spec: KeySpec,
             role: _Role) -> Any:
        """The usable token object of one role for a version, found or unwrapped once per
        session. Runs on a pool session."""
        keys = self._session_keys(ctx)
        if keys.stale:
            # Every handle this session holds is suspect (an object was destroyed or went
            # stale): the pool's found-key handles as well as our own copies.
            keys.reset()
            ctx.forget_keys()
        cached = keys.get((version_id, role))
        if cached is not None:
            return cached
        owned = material.storage is KeyStorageMechanism.HSM_ENCRYPTED_DATABASE
        if not owned:
            obj = _find_token_key(ctx, material.ref, role)
        else:
            # Before the blob is unwrapped or its public key trusted.
            self._check_binding(ctx, version_id, material)
            if role is _Role.SECRET:
                obj = self._unwrap(ctx, ObjectClass.SECRET_KEY, KeyType.AES, material.wrapped,
                                   version_id, template=dict(_SENSITIVE))
            elif role is _Role.PRIVATE:
                obj = self._unwrap(ctx, ObjectClass.PRIVATE_KEY, _key_type(spec),
                                   material.wrapped, version_id,
                                   template={**_SENSITIVE, **_NOT_FOR_PRIVATE})
            else:
                obj = ctx.session.create_object(_public_attributes(material.spki, spec))
        keys.put((version_id, role), obj, owned=owned)
        return obj

    def _binding_tag(self, ctx: SessionContext, message: bytes) -> bytes:
        bind = ctx.secret_key(self._bind_label, self._bind_id)
        return bytes(bind.sign(message, mechanism=_BINDING_MECHANISM))

    def _check_binding(self, ctx: SessionContext, version_id: str, material: _Material) -> None:
        """Refuse a wrapped record whose tag is not this version's (the token compares)."""
        bind = ctx.secret_key(self._bind_label, self._bind_id)
        if not bind.verify(material.bound, material.tag, mechanism=_BINDING_MECHANISM):
            log.error("key version %s: the stored material's binding tag does not verify "
                      "(moved from another version, altered, or another token's)", version_id)
            raise _MaterialUnreadable("the stored key material is not this key version's in "
                                      "this token (its binding tag does not verify)")

    def _unwrap(self, ctx: SessionContext, object_class: ObjectClass, key_type: KeyType,
                wrapped: bytes, version_id: str, *, template: dict[Attribute, Any]) -> Any:
        wrapping = ctx.secret_key(self._wrap_label, self._wrap_id)
        try:
            return wrapping.unwrap_key(object_class, key_type, wrapped,
                                       mechanism=_WRAP_MECHANISM, store=False,
                                       capabilities=_CAPABILITIES[key_type], template=template)
        except (p11e.GeneralError, p11e.FunctionFailed, p11e.WrappedKeyInvalid,
                p11e.WrappedKeyLenRange):
            # SoftHSMv2 reports a failed RFC 5649 integrity check as CKR_GENERAL_ERROR. Left
            # to the pool, that would evict a healthy session (or, while decrypting, read as
            # a bad ciphertext); it means the stored blob is not this token's.
            log.error("key version %s: the stored material does not unwrap in token %r",
                      version_id, self._pool.token_label)
            raise _MaterialUnreadable("the stored key material does not unwrap with this "
                                      "token's wrapping key") from None

    def _material(self, version: KeyVersion, spec: KeySpec) -> _Material:
        """Parse a material record and check that it fits ``spec``.

        :raises UnsupportedOperation: for a spec this backend does not hold.
        :raises DependencyUnavailable: for a record that is not one of ours.
        """
        if spec not in _AES_BITS and spec not in _RSA_BITS and spec not in _EC_CURVES:
            raise UnsupportedOperation(f"the hsm backend cannot hold {spec} keys")
        raw = version.material
        symmetric = spec in _AES_BITS
        if raw.startswith(_INTERNAL):
            try:
                ref = raw[len(_INTERNAL):].decode("ascii")
            except UnicodeDecodeError:
                ref = ""
            # The objects are labelled with the version's own id: a record naming another
            # version's objects is not this version's.
            if ref and ref == version.version_id:
                return _Material(KeyStorageMechanism.HSM_INTERNAL, ref=ref)
        elif raw.startswith(_WRAPPED) and symmetric:
            tag, wrapped = _split_tag(raw[len(_WRAPPED):])
            if wrapped:
                return _Material(KeyStorageMechanism.HSM_ENCRYPTED_DATABASE, wrapped=wrapped,
                                 tag=tag, bound=_binding_message(version.version_id, _WRAPPED,
                                                                 wrapped))
        elif raw.startswith(_WRAPPED_PAIR) and not symmetric:
            tag, body = _split_tag(raw[len(_WRAPPED_PAIR):])
            length = int.from_bytes(body[:2], "big")
            if len(body) > 2 + length:
                return _Material(KeyStorageMechanism.HSM_ENCRYPTED_DATABASE,
                                 spki=body[2:2 + length], wrapped=body[2 + length:], tag=tag,
                                 bound=_binding_message(version.version_id, _WRAPPED_PAIR,
                                                        body))
        elif raw.startswith(_UNBOUND):
            raise DependencyUnavailable(
                "hsm", f"key version {version.version_id} holds HsmEncryptedDatabase material "
                       "from before records were bound to their version; it is refused")
        raise DependencyUnavailable("hsm", f"key version {version.version_id} has no "
                                           f"usable {spec} material record")

    # -- generation --------------------------------------------------------------------------

    async def generate(self, *, version_id: str, spec: KeySpec,
                       storage: KeyStorageMechanism | None = None,
                       external_key_id: str | None = None, call: CallInfo) -> bytes:
        """Generate a key version in the token; ``storage`` None means ``HsmInternal``
        (Alibaba's default).

        :raises InvalidParameter: for an external key id.
        :raises UnsupportedOperation: for a spec the token cannot hold here.
        :raises DependencyUnavailable: if the token fails.
        """
        if external_key_id is not None:
            raise InvalidParameter("ExternalKeyId", "applies to external keys only")
        if spec not in _AES_BITS and spec not in _RSA_BITS and spec not in _EC_CURVES:
            raise UnsupportedOperation(f"the hsm backend cannot make {spec} keys")
        # Key pairs take the token a while (RSA-3072 with SoftHSM: over a second).
        slow = spec not in _AES_BITS
        if storage is None or storage is KeyStorageMechanism.HSM_INTERNAL:
            await self._run(lambda ctx: _generate_internal(ctx, version_id, spec), slow=slow)
            return _INTERNAL + version_id.encode("ascii")
        if spec in _AES_BITS:
            return await self._run(self._generate_wrapped_secret(version_id, spec))
        return await self._run(self._generate_wrapped_pair(version_id, spec), slow=slow)

    def _bound_record(self, ctx: SessionContext, version_id: str, prefix: bytes,
                      body: bytes) -> bytes:
        """``prefix || tag || body``, the tag binding the record to ``version_id``."""
        tag = self._binding_tag(ctx, _binding_message(version_id, prefix, body))
        return prefix + tag + body

    def _wrap(self, ctx: SessionContext, version_id: str, key: Any) -> bytes:
        """A session key wrapped into a bound ``wrapped.v2:`` record."""
        wrapping = ctx.secret_key(self._wrap_label, self._wrap_id)
        wrapped = bytes(wrapping.wrap_key(key, mechanism=_WRAP_MECHANISM))
        return self._bound_record(ctx, version_id, _WRAPPED, wrapped)

    def _generate_wrapped_secret(self, version_id: str,
                                 spec: KeySpec) -> Callable[[SessionContext], bytes]:
        def make(ctx: SessionContext) -> bytes:
            key = ctx.session.generate_key(
                KeyType.AES, _AES_BITS[spec], store=False,
                capabilities=_CAPABILITIES[KeyType.AES], template=dict(_WRAPPABLE))
            try:
                return self._wrap(ctx, version_id, key)
            finally:
                key.destroy()
        return make

    def _generate_wrapped_pair(self, version_id: str,
                               spec: KeySpec) -> Callable[[SessionContext], bytes]:
        def make(ctx: SessionContext) -> bytes:
            wrapping = ctx.secret_key(self._wrap_label, self._wrap_id)
            public, private = _generate_pair(ctx, spec, store=False,
                                             private_template=dict(_WRAPPABLE))
            try:
                spki = _spki(public)
                wrapped = bytes(wrapping.wrap_key(private, mechanism=_WRAP_MECHANISM))
            finally:
                private.destroy()
                public.destroy()
            body = len(spki).to_bytes(2, "big") + spki + wrapped
            return self._bound_record(ctx, version_id, _WRAPPED_PAIR, body)
        return make

    # -- imported material and destruction ----------------------------------------------------

    async def import_material(self, *, version_id: str, spec: KeySpec, material: bytes,
                              storage: KeyStorageMechanism | None = None) -> bytes:
        """Put BYOK material into the token: as a sensitive, non-extractable token object
        (HsmInternal), or as a session object wrapped at once by the wrapping key and then
        destroyed (HsmEncryptedDatabase). The material crosses this process only on its way
        in, as C_CreateObject's CKA_VALUE.

        :raises UnsupportedOperation: for anything but AES material.
        """
        if spec not in _AES_BITS or len(material) * 8 != _AES_BITS[spec]:
            raise UnsupportedOperation(f"the hsm backend imports AES material only, not {spec}")
        internal = storage is None or storage is KeyStorageMechanism.HSM_INTERNAL
        template: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: material, Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
            # Every other usage off, as a generated key has them: left to the token's
            # defaults, a key whose material its owner knows could wrap (export) or unwrap
            # other keys of the token.
            Attribute.WRAP: False, Attribute.UNWRAP: False, Attribute.SIGN: False,
            Attribute.VERIFY: False, Attribute.DERIVE: False,
            **(_SENSITIVE if internal else _WRAPPABLE), Attribute.TOKEN: internal}
        if internal:
            template.update({Attribute.LABEL: version_id,
                             Attribute.ID: version_id.encode("ascii")})

        def create(ctx: SessionContext) -> bytes:
            if internal:
                # Left by an earlier try whose database write failed: a version without
                # stored material owns no live object (two would make the key unusable).
                _destroy_labelled(ctx, version_id)
            key = ctx.session.create_object(template)
            if internal:
                return _INTERNAL + version_id.encode("ascii")
            try:
                return self._wrap(ctx, version_id, key)
            finally:
                key.destroy()

        return await self._run(create)

    async def destroy(self, version: KeyVersion, spec: KeySpec) -> None:
        """Delete a version's token objects and make every session drop its cached handles
        and unwrapped copies.

        HsmInternal objects are labelled with their own version id, so they are found by
        that id, not by what the stored record says: a record altered to name another
        version's objects must neither keep this version's objects alive nor delete the
        other's. A wrapped version has no token objects and the search finds none.
        """
        with self._sessions_lock:
            for keys in self._sessions.values():
                keys.stale = True
        self._public.pop(version.version_id, None)
        label = version.version_id

        await self._run(lambda ctx: _destroy_labelled(ctx, label))

    # -- symmetric ---------------------------------------------------------------------------

    async def seal(self, version: KeyVersion, spec: KeySpec, plaintext: bytes,
                   aad: bytes, *, call: CallInfo) -> bytes:
        """AES-GCM in the token: IV (12 B, token RNG) || ciphertext || tag (16 B).

        :raises UnsupportedOperation: for an asymmetric spec.
        :raises DependencyUnavailable: if the token fails.
        """
        material = self._symmetric_material(version, spec)

        def seal_(ctx: SessionContext) -> bytes:
            key = self._key(ctx, version.version_id, material, spec, _Role.SECRET)
            iv = bytes(ctx.session.generate_random(IV_BYTES * 8))
            return iv + aes_gcm(key, plaintext, iv=iv, aad=aad, decrypt=False)

        return await self._run(seal_)

    async def unseal(self, version: KeyVersion, spec: KeySpec, sealed: bytes,
                     aad: bytes, *, call: CallInfo) -> bytes:
        """Inverse of ``seal``.

        :raises InvalidCiphertext: for any input fault (length, tag, AAD).
        :raises DependencyUnavailable: if the token fails.
        """
        if len(sealed) < IV_BYTES + TAG_BYTES:
            raise InvalidCiphertext()
        material = self._symmetric_material(version, spec)
        iv, body = sealed[:IV_BYTES], sealed[IV_BYTES:]

        def open_(ctx: SessionContext) -> bytes:
            key = self._key(ctx, version.version_id, material, spec, _Role.SECRET)
            return aes_gcm(key, body, iv=iv, aad=aad, decrypt=True)

        return await self._run(open_, decrypting=True)

    def _symmetric_material(self, version: KeyVersion, spec: KeySpec) -> _Material:
        if spec not in _AES_BITS:
            raise UnsupportedOperation(f"{spec} keys do not seal")
        return self._material(version, spec)

    # -- asymmetric --------------------------------------------------------------------------

    def _signing(self, spec: KeySpec, algorithm: str, digest: bytes) -> tuple[_Signing, bytes]:
        signing = _SIGNING.get(algorithm)
        if signing is None or signing.key_type is not _key_type(spec):
            raise InvalidParameter("Algorithm", f"{algorithm} does not apply to {spec} keys")
        if len(digest) != DIGEST_BYTES:
            raise InvalidParameter("Digest", "must be a 32-byte SHA-256 digest")
        if signing.mechanism is Mechanism.RSA_PKCS:
            return signing, _SHA256_DIGEST_INFO + digest
        return signing, digest

    async def sign(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                   digest: bytes) -> bytes:
        """Sign a 32-byte SHA-256 digest in the token; ECDSA signatures are DER.

        :raises InvalidParameter: for a bad digest or an algorithm the spec lacks.
        :raises DependencyUnavailable: if the token fails.
        """
        material = self._asymmetric_material(version, spec)
        signing, data = self._signing(spec, algorithm, digest)

        def sign_(ctx: SessionContext) -> bytes:
            key = self._key(ctx, version.version_id, material, spec, _Role.PRIVATE)
            return bytes(key.sign(data, mechanism=signing.mechanism,
                                  mechanism_param=signing.param))

        signature = await self._run(sign_)
        if signing.key_type is KeyType.EC:
            half = len(signature) // 2
            return encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                        int.from_bytes(signature[half:], "big"))
        return signature

    async def verify(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                     digest: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is valid for ``digest``, checked by the token. PSS
        signatures must use a 32-byte salt.

        :raises InvalidParameter: for a bad digest or an algorithm the spec lacks.
        :raises DependencyUnavailable: if the token fails.
        """
        material = self._asymmetric_material(version, spec)
        signing, data = self._signing(spec, algorithm, digest)
        if signing.key_type is KeyType.EC:
            raw = _ecdsa_p1363(signature)
            if raw is None:
                return False
            signature = raw

        def verify_(ctx: SessionContext) -> bool:
            key = self._key(ctx, version.version_id, material, spec, _Role.PUBLIC)
            return bool(key.verify(data, signature, mechanism=signing.mechanism,
                                   mechanism_param=signing.param))

        try:
            # python-pkcs11 answers False for CKR_SIGNATURE_INVALID/LEN_RANGE itself; any
            # other data error the token reports about a signature also means "not valid".
            return await self._run(verify_, decrypting=True)
        except InvalidCiphertext:
            return False

    async def asymmetric_encrypt(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                                 plaintext: bytes) -> bytes:
        """RSA-OAEP with the token's public key.

        :raises InvalidParameter: for an algorithm the spec lacks.
        :raises DependencyUnavailable: if the token fails.
        """
        oaep = self._oaep(spec, algorithm)
        material = self._asymmetric_material(version, spec)
        if oaep.hash is Mechanism.SHA256 and not self._oaep_sha256_in_token:
            public = await self._public_key(version, spec, material)
            assert isinstance(public, rsa.RSAPublicKey)
            return public.encrypt(plaintext, padding.OAEP(
                mgf=padding.MGF1(oaep.local()), algorithm=oaep.local(), label=None))

        def encrypt(ctx: SessionContext) -> bytes:
            key = self._key(ctx, version.version_id, material, spec, _Role.PUBLIC)
            return bytes(key.encrypt(plaintext, mechanism=Mechanism.RSA_PKCS_OAEP,
                                     mechanism_param=(oaep.hash, oaep.mgf, None)))

        return await self._run(encrypt)

    async def asymmetric_decrypt(self, version: KeyVersion, spec: KeySpec, algorithm: str,
                                 ciphertext: bytes) -> bytes:
        """RSA-OAEP decryption with the private key in the token.

        :raises InvalidCiphertext: for any input fault.
        :raises InvalidParameter: for an algorithm the spec lacks.
        :raises DependencyUnavailable: if the token fails.
        """
        oaep = self._oaep(spec, algorithm)
        material = self._asymmetric_material(version, spec)
        size = _RSA_BITS[spec] // 8
        if len(ciphertext) != size:
            raise InvalidCiphertext()
        raw = oaep.hash is Mechanism.SHA256 and not self._oaep_sha256_in_token

        def decrypt(ctx: SessionContext) -> bytes:
            key = self._key(ctx, version.version_id, material, spec, _Role.PRIVATE)
            if raw:
                return bytes(key.decrypt(ciphertext, mechanism=Mechanism.RSA_X_509))
            return bytes(key.decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
                                     mechanism_param=(oaep.hash, oaep.mgf, None)))

        out = await self._run(decrypt, decrypting=True)
        if not raw:
            return out
        plaintext = _eme_oaep_sha256_decode(out, size)
        if plaintext is None:
            raise InvalidCiphertext()
        return plaintext

    async def public_key_pem(self, version: KeyVersion, spec: KeySpec) -> bytes:
        """The public key, as the token holds it, in SubjectPublicKeyInfo PEM.

        :raises DependencyUnavailable: if the token fails.
        """
        public = await self._public_key(version, spec,
                                        self._asymmetric_material(version, spec))
        return public.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)

    def _asymmetric_material(self, version: KeyVersion, spec: KeySpec) -> _Material:
        if spec in _AES_BITS:
            raise UnsupportedOperation(f"{spec} keys have no key pair")
        return self._material(version, spec)

    def _oaep(self, spec: KeySpec, algorithm: str) -> _OAEP:
        oaep = _OAEP_PARAMS.get(algorithm)
        if oaep is None or spec not in _RSA_BITS:
            raise InvalidParameter("Algorithm", f"{algorithm} does not apply to {spec} keys")
        return oaep

    async def _public_key(self, version: KeyVersion, spec: KeySpec,
                          material: _Material) -> PublicKey:
        cached = self._public.get(version.version_id)
        if cached is not None:
            self._public.move_to_end(version.version_id)
            return cached
        spki = material.spki
        if spki:
            await self._run(lambda ctx: self._check_binding(ctx, version.version_id, material))
        else:
            def read(ctx: SessionContext) -> bytes:
                return _spki(self._key(ctx, version.version_id, material, spec, _Role.PUBLIC))
            spki = await self._run(read)
        public = serialization.load_der_public_key(spki)
        assert isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        self._public[version.version_id] = public
        if len(self._public) > self._public_cache_size:
            self._public.popitem(last=False)
        return public


# -- token objects ----------------------------------------------------------------------------


def _key_type(spec: KeySpec) -> KeyType:
    if spec in _AES_BITS:
        return KeyType.AES
    return KeyType.RSA if spec in _RSA_BITS else KeyType.EC


_ROLE_CLASS: Final[Mapping[_Role, ObjectClass]] = MappingProxyType({
    _Role.SECRET: ObjectClass.SECRET_KEY, _Role.PRIVATE: ObjectClass.PRIVATE_KEY,
    _Role.PUBLIC: ObjectClass.PUBLIC_KEY})


def _ensure_token_key(ctx: SessionContext, label: str, key_id: bytes, key_type: KeyType,
                      capabilities: MechanismFlag, needed: tuple[Attribute, ...],
                      what: str) -> bool:
    """Create a sensitive, non-extractable token key unless one with ``label`` exists; refuse
    one that exists but is unfit. Whether it was created."""
    found = list(ctx.session.get_objects({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label,
        Attribute.TOKEN: True}))
    if len(found) > 1:
        raise DependencyUnavailable("hsm", f"{len(found)} keys are labelled {label!r}")
    if found:
        key = found[0]
        if not (all(key[a] for a in needed) and key[Attribute.SENSITIVE]
                and not key[Attribute.EXTRACTABLE] and key[Attribute.ID] == key_id
                and key[Attribute.KEY_TYPE] == key_type):
            raise DependencyUnavailable(
                "hsm", f"the key labelled {label!r} is not a sensitive, non-extractable "
                       f"{what}")
        return False
    ctx.session.generate_key(key_type, 256, label=label, id=key_id, store=True,
                             capabilities=capabilities, template=dict(_SENSITIVE))
    return True


def _split_tag(body: bytes) -> tuple[bytes, bytes]:
    """A bound record's tag and the rest (empty when too short to hold a tag)."""
    if len(body) <= _TAG_BYTES:
        return b"", b""
    return body[:_TAG_BYTES], body[_TAG_BYTES:]


def _binding_message(version_id: str, prefix: bytes, body: bytes) -> bytes:
    """What a record's tag covers: a context string, the version id, the record's prefix and
    everything after the tag."""
    return _BINDING_CONTEXT + version_id.encode() + b"|" + prefix + body


def _find_token_key(ctx: SessionContext, ref: str, role: _Role) -> Any:
    """The token object of one role labelled ``ref``. :raises HSMKeyMissing:"""
    if role is _Role.SECRET:
        return ctx.secret_key(ref, ref.encode("ascii"))
    found = list(ctx.session.get_objects({
        Attribute.CLASS: _ROLE_CLASS[role], Attribute.LABEL: ref,
        Attribute.ID: ref.encode("ascii"), Attribute.TOKEN: True}))
    if len(found) != 1:
        raise HSMKeyMissing(f"{len(found)} token {role.value} keys match label {ref!r}")
    return found[0]


def _destroy_labelled(ctx: SessionContext, label: str) -> None:
    """Destroy the token objects labelled ``label`` (a version id)."""
    for obj in list(ctx.session.get_objects({Attribute.LABEL: label, Attribute.TOKEN: True})):
        obj.destroy()


def _generate_internal(ctx: SessionContext, version_id: str, spec: KeySpec) -> None:
    key_id = version_id.encode("ascii")
    if spec in _AES_BITS:
        ctx.session.generate_key(KeyType.AES, _AES_BITS[spec], label=version_id, id=key_id,
                                 store=True, capabilities=_CAPABILITIES[KeyType.AES],
                                 template=dict(_SENSITIVE))
    else:
        _generate_pair(ctx, spec, store=True, label=version_id, key_id=key_id,
                       private_template=dict(_SENSITIVE))


def _generate_pair(ctx: SessionContext, spec: KeySpec, *, store: bool,
                   private_template: dict[Attribute, Any], label: str | None = None,
                   key_id: bytes | None = None) -> tuple[Any, Any]:
    key_type = _key_type(spec)
    public_template: dict[Attribute, Any] = {}
    bits = _RSA_BITS.get(spec)
    if key_type is KeyType.EC:
        public_template[Attribute.EC_PARAMS] = encode_named_curve_parameters(_EC_CURVES[spec])
    public, private = ctx.session.generate_keypair(
        key_type, bits, label=label, id=key_id, store=store,
        capabilities=_CAPABILITIES[key_type], public_template=public_template,
        private_template=private_template)
    return public, private


def _spki(public: Any) -> bytes:
    """SubjectPublicKeyInfo DER of a token public key."""
    if public.key_type == KeyType.EC:
        return bytes(encode_ec_public_key(public))
    # python-pkcs11 encodes RSA keys as PKCS#1 RSAPublicKey; re-encode as SPKI.
    loaded = serialization.load_der_public_key(encode_rsa_public_key(public))
    return loaded.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def _public_attributes(spki: bytes, spec: KeySpec) -> dict[Attribute, Any]:
    """A session public key object's template for a stored SubjectPublicKeyInfo."""
    if _key_type(spec) is KeyType.EC:
        attrs = decode_ec_public_key(spki)
        attrs[Attribute.VERIFY] = True
    else:
        public = serialization.load_der_public_key(spki)
        pkcs1 = public.public_bytes(serialization.Encoding.DER,
                                    serialization.PublicFormat.PKCS1)
        attrs = decode_rsa_public_key(pkcs1, MechanismFlag.ENCRYPT | MechanismFlag.VERIFY)
    attrs[Attribute.TOKEN] = False
    return attrs


# -- encodings --------------------------------------------------------------------------------


def _ecdsa_p1363(signature: bytes) -> bytes | None:
    """A DER ECDSA-Sig-Value as PKCS#11's r || s (32 bytes each), or None if it is not one.

    Not ``pkcs11.util.ec.decode_ecdsa_signature``: asn1crypto sizes r and s by the larger
    of the two, so a signature whose r and s both have a leading zero byte comes out short.
    """
    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        return None
    if not (0 < r < 1 << 256 and 0 < s < 1 << 256):
        return None
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


_SHA256_EMPTY: Final = hashlib.sha256(b"").digest()


def _mgf1_sha256(seed: bytes, length: int) -> bytes:
    blocks = (hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
              for counter in range(-(-length // 32)))
    return b"".join(blocks)[:length]


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _eme_oaep_sha256_decode(em: bytes, k: int) -> bytes | None:
    """EME-OAEP decoding with SHA-256, MGF1-SHA-256 and an empty label (RFC 8017 section
    7.1.2, step 3) of a raw RSA output; None if it is not a valid encoding.

    Every check runs to the end and the caller sees one failure, so the steps do not tell
    apart why (Manger, CRYPTO 2001; RFC 8017 section 7.1.2 note). Python gives no
    constant-time guarantee; this is the shape, as close as the language allows.
    """
    h = len(_SHA256_EMPTY)
    if len(em) > k or k < 2 * h + 2:
        return None
    em = em.rjust(k, b"\0")
    masked_seed, masked_db = em[1:1 + h], em[1 + h:]
    seed = _xor(masked_seed, _mgf1_sha256(masked_db, h))
    db = _xor(masked_db, _mgf1_sha256(seed, k - h - 1))
    bad = int(em[0] != 0) | int(not hmac.compare_digest(db[:h], _SHA256_EMPTY))
    looking, index = 1, 0
    for i in range(h, len(db)):
        is_zero, is_one = int(db[i] == 0), int(db[i] == 1)
        index |= i * (looking & is_one)
        bad |= looking & (1 - is_zero) & (1 - is_one)
        looking &= 1 - is_one
    if bad | looking:
        return None
    return db[index + 1:]
