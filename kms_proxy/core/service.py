"""The one place where every action happens.

Each public method is a whole action: resolve the key, consult the capability and state
tables, call the backend and the store. The edge only parses and serialises. The principal
is always explicit; keys of another account are reachable only by ARN and, until key
policies exist, refused with ``AccessDenied``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kms_proxy.backends.base import KeyBackend
from kms_proxy.core.blob import blob_aad, join_blob, split_blob
from kms_proxy.core.calls import RESOLVED_KEY, RESOLVED_KEYS, current_request_id
from kms_proxy.core.capabilities import KIND_INSTANCE, Op, require, spec_info
from kms_proxy.core.errors import (
    AccessDenied,
    AliasAlreadyExists,
    AliasNotFound,
    ConcurrentChange,
    DependencyUnavailable,
    InstanceNotFound,
    InvalidCiphertext,
    InvalidParameter,
    KeyNotFound,
    KeyVersionNotFound,
    LimitExceeded,
    MissingParameter,
    Throttled,
    Unsupported,
    UnsupportedOperation,
)
from kms_proxy.core.keylocks import KeyLocks
from kms_proxy.core.lifecycle import KeyLifecycle, SystemEvent, format_time, system_principal
from kms_proxy.core.model import (
    Alias,
    CallInfo,
    Instance,
    Key,
    KeyKind,
    KeySpec,
    KeyState,
    KeyStorageMechanism,
    KeyUsage,
    KeyVersion,
    Origin,
    Principal,
    PrincipalKind,
    ProtectionLevel,
)
from kms_proxy.core.paging import Page, page
from kms_proxy.core.quotas import GatewayQuotas
from kms_proxy.core.states import require_state
from kms_proxy.store.base import Store, StoreConflict
from shared.ratelimit import TokenBucket

__all__ = ["CryptoResult", "DataKey", "InstanceView", "KeyService", "Page", "ServiceConfig"]

MAX_PLAINTEXT_BYTES: Final = 6 * 1024
# Service keys are reached by alias/acs/<product> (reserved: users cannot create these).
SERVICE_ALIAS_PREFIX: Final = "alias/acs/"
MAX_TAGS: Final = 20
_ALIAS: Final = re.compile(r"alias/[A-Za-z0-9_/-]{1,255}")
# Tag keys and values: letters, digits and / \ _ - . + = : @ (reference section 5).
_TAG_CHARS: Final = re.compile(r"[A-Za-z0-9/\\_\-.+=:@]{1,128}")
_TAG_VALUE_CHARS: Final = re.compile(r"[A-Za-z0-9/\\_\-.+=:@]{0,128}")
_ARN: Final = re.compile(
    r"acs:kms:(?P<region>[^:]+):(?P<account>[^:]+):(?P<kind>key|alias)/(?P<rest>.+)")
_DATA_KEY_SPECS: Final = {"AES_256": 32, "AES_128": 16}
_WRAPPING: Final = {"RSAES_OAEP_SHA_256": hashes.SHA256, "RSAES_OAEP_SHA_1": hashes.SHA1}


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    region: str
    regions: tuple[str, ...]
    # Account id -> the instance CreateKey uses when DKMSInstanceId is not given.
    default_instances: Mapping[str, str]
    # Accounts with the paid rotation add-on (default and service keys may rotate).
    rotation_addon: frozenset[str] = frozenset()
    # Accounts whose default master key waits, at its first enabling, for imported
    # material (Origin EXTERNAL, PendingImport) instead of KMS-generated material.
    imported_default_keys: frozenset[str] = frozenset()
    # The seed's quota for default keys (the default master key and service keys
    # together), per account: 1000 ops/s, not upgradable.
    default_keys_qps: int = 1000
    # The shared gateway's per-account QPS limits (core.quotas); off by default.
    gateway_quotas: bool = False


@dataclass(frozen=True, slots=True)
class CryptoResult:
    key_id: str
    version_id: str
    blob: bytes = b""
    plaintext: bytes = dataclasses.field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class DataKey:
    key_id: str
    version_id: str
    blob: bytes
    # The data key as Base64 text: what GenerateDataKey returns and Decrypt gives back.
    plaintext_b64: str = dataclasses.field(repr=False)
    exported: bytes = b""


@dataclass(frozen=True, slots=True)
class InstanceView:
    instance: Instance
    # Key versions held: what the instance's key quota counts.
    versions_used: int
    status: str


# Alibaba's key ids start with a short region code (key-hzz... for cn-hangzhou).
_REGION_CODES: Final = {"cn-hangzhou": "hzz", "cn-shanghai": "shz", "cn-beijing": "bjz",
                        "cn-shenzhen": "szz", "cn-guangzhou": "gzz", "cn-hongkong": "hkz"}


def _region_code(region: str) -> str:
    return _REGION_CODES.get(region) or f"{region.split('-')[-1][:2]}z"


def _service_key_owner_ok(principal: Principal, key: Key) -> bool:
    """A service key belongs to one cloud product (its creator): another product's service
    principal may not use it."""
    return not (key.kind is KeyKind.SERVICE and principal.kind is PrincipalKind.SERVICE
                and principal.product != key.creator)


def _check_service_key_owner(principal: Principal, key: Key) -> None:
    """:raises AccessDenied: if ``principal`` is another product than the service key's."""
    if not _service_key_owner_ok(principal, key):
        raise AccessDenied(principal.arn, "use another product's service key")


def _check_tags(tags: Mapping[str, str], param: str = "Tags") -> None:
    if len(tags) > MAX_TAGS:
        raise InvalidParameter(param, f"a key has at most {MAX_TAGS} tags")
    for key, value in tags.items():
        if not _TAG_CHARS.fullmatch(key) or key.startswith(("aliyun", "acs:")):
            raise InvalidParameter(param, f"tag key {key!r} is not allowed")
        if not _TAG_VALUE_CHARS.fullmatch(value):
            raise InvalidParameter(param, f"the value of tag {key!r} is not allowed")


class KeyService:
    """Keys, versions, aliases, tags, instances and crypto for one region (the lifecycle
    actions are in ``KeyLifecycle``)."""

    def __init__(self, *, store: Store, backends: Mapping[KeyKind, KeyBackend],
                 config: ServiceConfig,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._store = store
        self._backends = backends
        self._config = config
        self._clock = clock
        # Keys and versions are read on every crypto call; this process is the only
        # writer, so caching them and dropping an entry on each write keeps them exact.
        self._keys: dict[str, Key] = {}
        self._versions: dict[str, KeyVersion] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._default_key_buckets: dict[str, TokenBucket] = {}
        self.gateway = GatewayQuotas(enabled=config.gateway_quotas)
        self._quota_locks: dict[str, asyncio.Lock] = {}
        # Backends bound to one instance (each external instance has its own EKM
        # connection); they take precedence over the per-kind backends.
        self._instance_backends: dict[str, KeyBackend] = {}
        self._instance_status: dict[str, Callable[[], str]] = {}
        self._system_key_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.key_locks = KeyLocks()
        self.lifecycle = KeyLifecycle(self, rotation_addon=config.rotation_addon)

    def attach_instance_backend(self, instance_id: str, backend: KeyBackend,
                                status: Callable[[], str] | None = None) -> None:
        """Serve the keys of ``instance_id`` with ``backend``; ``status`` reports the
        instance's connection state (GetKmsInstance ``Status``)."""
        self._instance_backends[instance_id] = backend
        if status is not None:
            self._instance_status[instance_id] = status

    def _backend(self, kind: KeyKind, instance_id: str | None) -> KeyBackend:
        backend = (self._instance_backends.get(instance_id) if instance_id else None) \
            or self._backends.get(kind)
        if backend is None:
            raise DependencyUnavailable(kind.value, "no backend is configured for it")
        return backend

    @property
    def region(self) -> str:
        return self._config.region

    @property
    def clock(self) -> Callable[[], datetime]:
        return self._clock

    # -- lookups ---------------------------------------------------------------------

    async def _key(self, key_id: str) -> Key | None:
        key = self._keys.get(key_id)
        if key is None:
            key = await self._store.get_key(key_id)
            if key is not None:
                self._keys[key_id] = key
        return key

    async def _save(self, key: Key, versions: Sequence[KeyVersion] = ()) -> Key:
        """Save ``key`` (a changed copy of the key as read) as the next revision.

        :raises ConcurrentChange: if the stored key is no longer the one read; call under
            ``changing`` so that it is.
        """
        saved = dataclasses.replace(key, revision=key.revision + 1)
        try:
            await self._store.update_key(saved, versions, expected_revision=key.revision)
        except StoreConflict:
            self._keys.pop(key.key_id, None)
            raise ConcurrentChange(key.key_id) from None
        self._keys[key.key_id] = saved
        for version in versions:
            self._versions[version.version_id] = version
        return saved

    @contextlib.asynccontextmanager
    async def changing(self, principal: Principal, key_ref: str,
                       op: Op | None = None) -> AsyncIterator[Key]:
        """The key as it is now, held against every other change to it until the block
        ends, so that a ``_save`` in the block builds on it (``core.keylocks``). With
        ``op``, the kind and state checks run on this copy, not on an earlier read."""
        key = await self.resolve(principal, key_ref)
        async with self.key_locks.hold(key.key_id):
            key = await self.resolve(principal, key.key_id)
            if op is not None:
                require(key.kind, op, principal.kind)
                require_state(key.state, op)
            yield key

    @contextlib.asynccontextmanager
    async def adding_versions(self, instance_id: str | None, count: int
                              ) -> AsyncIterator[None]:
        """Room for ``count`` more key versions in the instance's key quota, held until
        the block (which stores them) ends: one writer per instance at a time, so two
        CreateKeys at the edge cannot both pass. Keys outside instances have no quota.

        :raises LimitExceeded:"""
        if instance_id is None:
            yield
            return
        async with self._quota_locks.setdefault(instance_id, asyncio.Lock()):
            instance = await self._store.get_instance(instance_id)
            quota = instance.key_quota if instance is not None else 0
            used = await self._store.count_instance_versions(instance_id)
            if used + count > quota:
                raise LimitExceeded(f"the key quota of instance {instance_id} ({used} of "
                                    f"{quota} key versions used)")
            yield

    async def _version(self, version_id: str) -> KeyVersion | None:
        version = self._versions.get(version_id)
        if version is None:
            version = await self._store.get_version(version_id)
            if version is not None:
                self._versions[version_id] = version
        return version

    async def resolve(self, principal: Principal, key_ref: str) -> Key:
        """A key by id, alias, key ARN or alias ARN, as the principal may see it.

        :raises KeyNotFound: :raises AliasNotFound: :raises AccessDenied:
        """
        account, region = principal.account_id, self.region
        match = _ARN.fullmatch(key_ref)
        if match is not None:
            if match["region"] != region:
                raise KeyNotFound(key_ref)
            account = match["account"]
            key_ref = match["rest"] if match["kind"] == "key" else f"alias/{match['rest']}"
        if account != principal.account_id:
            # Cross-account use needs a key policy granting it; none exists yet.
            raise AccessDenied(principal.arn, "use a key of another account")
        if key_ref.startswith("alias/"):
            alias = await self._store.get_alias(account, region, key_ref)
            if alias is None and key_ref.startswith(SERVICE_ALIAS_PREFIX):
                alias = await self._service_key_alias(principal, key_ref)
            if alias is None:
                raise AliasNotFound(key_ref)
            key_ref = alias.key_id
        key = await self._key(key_ref)
        if key is None or key.account_id != account or key.region != region:
            raise KeyNotFound(key_ref)
        # Named in the audit line from here on, refused or not: it is the caller's own.
        RESOLVED_KEY.set(key)
        _check_service_key_owner(principal, key)
        key = await self.lifecycle.settled(key, key_ref)
        RESOLVED_KEY.set(key)
        return key

    @staticmethod
    def _call(principal: Principal, op: Op, key_arn: str) -> CallInfo:
        return CallInfo(request_id=current_request_id(), principal_arn=principal.arn,
                        operation=op.value, key_arn=key_arn)

    async def _usable(self, principal: Principal, key_ref: str, op: Op) -> Key:
        key = await self.resolve(principal, key_ref)
        require(key.kind, op, principal.kind)
        require_state(key.state, op)
        return key

    def _throttle(self, key: Key) -> None:
        if key.instance_id is not None:
            bucket = self._buckets.get(key.instance_id)
            if bucket is not None and not bucket.take():
                raise Throttled(f"instance {key.instance_id}")
            return
        # Keys outside instances (default and service keys) share their account's quota.
        bucket = self._default_key_buckets.get(key.account_id)
        if bucket is None:
            rate = self._config.default_keys_qps
            bucket = self._default_key_buckets[key.account_id] = TokenBucket(rate=rate,
                                                                             burst=rate)
        if not bucket.take():
            raise Throttled(f"default keys of account {key.account_id}")

    async def _backend_version(self, key: Key, version_id: str | None = None
                               ) -> tuple[KeyBackend, KeyVersion]:
        wanted = version_id or key.primary_version_id
        version = await self._version(wanted)
        if version is None or version.key_id != key.key_id:
            raise KeyVersionNotFound(wanted)
        return self._backend(key.kind, key.instance_id), version

    # -- default keys, service keys, migrated keys ---------------------------------------

    async def _system_key(self, account_id: str, kind: KeyKind, *, creator: str,
                          description: str, imported: bool = False,
                          alias: str | None = None) -> Key:
        """A KMS-managed AES-256 key (default master key or service key), stored in one
        transaction with its ``alias`` (a failure between the two would leave a second
        service key for the product) and audited as made by KMS; with ``imported``, one
        that waits in PendingImport for BYOK material."""
        key_id = str(uuid.uuid4())
        version_id = str(uuid.uuid4())
        arn = f"acs:kms:{self.region}:{account_id}:key/{key_id}"
        system = system_principal(account_id)
        material = b"" if imported else await self._backend(kind, None).generate(
            version_id=version_id, spec=KeySpec.AES_256,
            call=self._call(system, Op.CREATE_KEY, arn))
        created = format_time(self._clock())
        key = Key(key_id=key_id, account_id=account_id, region=self.region, kind=kind,
                  spec=KeySpec.AES_256, usage=KeyUsage.ENCRYPT_DECRYPT,
                  state=KeyState.PENDING_IMPORT if imported else KeyState.ENABLED,
                  origin=Origin.EXTERNAL if imported else Origin.ALIYUN_KMS,
                  protection_level=ProtectionLevel.SOFTWARE, instance_id=None,
                  description=description, creator=creator, created=created,
                  primary_version_id=version_id)
        aliases = [Alias(alias, key_id, account_id, self.region)] if alias else []
        await self._store.create_key(key, [KeyVersion(key_id, version_id, created, material)],
                                     {}, aliases=aliases)
        self.lifecycle.announce(SystemEvent("CreateKey", key, alias=alias))
        return key

    async def provision_default_key(self, account_id: str) -> Key:
        """The account's one default master key in this region, created by the system the
        first time and again when its deletion window ends (CreateKey never makes one). An
        account configured for it gets a key that is first enabled by importing material."""
        async with self._system_key_locks.setdefault((account_id, ""), asyncio.Lock()):
            for key in await self._store.list_keys(account_id, self.region):
                if key.kind is KeyKind.DEFAULT_MASTER:
                    return key
            return await self._system_key(
                account_id, KeyKind.DEFAULT_MASTER, creator="Aliyun",
                description="Default master key",
                imported=account_id in self._config.imported_default_keys)

    async def _service_key_alias(self, principal: Principal, alias_name: str) -> Alias | None:
        """Create a product's service key the first time that product's service principal
        uses ``alias/acs/<product>``; exactly one per product, account and region."""
        product = alias_name[len(SERVICE_ALIAS_PREFIX):]
        if principal.kind is not PrincipalKind.SERVICE or principal.product != product:
            return None
        # Concurrent first uses must not make two keys: one creator at a time, and the
        # others find its alias. (This process is the store's only writer.)
        lock = self._system_key_locks.setdefault((principal.account_id, product),
                                                 asyncio.Lock())
        async with lock:
            existing = await self._store.get_alias(principal.account_id, self.region,
                                                   alias_name)
            if existing is not None:
                return existing
            key = await self._system_key(principal.account_id, KeyKind.SERVICE,
                                         creator=product,
                                         description=f"Service key of {product}",
                                         alias=alias_name)
            return Alias(alias_name, key.key_id, principal.account_id, self.region)

    async def import_migrated_key(self, account_id: str, *, key_id: str, spec: KeySpec,
                                  description: str, created: str) -> Key:
        """Record a key migrated from KMS 1.0 as read-only metadata (no material).

        :raises InvalidParameter: for a taken key id.
        """
        version_id = str(uuid.uuid4())
        key = Key(key_id=key_id, account_id=account_id, region=self.region,
                  kind=KeyKind.MIGRATED, spec=spec, usage=spec_info(spec).default_usage,
                  state=KeyState.ENABLED, origin=Origin.ALIYUN_KMS,
                  protection_level=ProtectionLevel.SOFTWARE, instance_id=None,
                  description=description, creator=account_id, created=created,
                  primary_version_id=version_id)
        try:
            await self._store.create_key(key, [KeyVersion(key_id, version_id, created, b"")],
                                         {})
        except StoreConflict:
            raise InvalidParameter("KeyId", f"{key_id} exists already") from None
        return key

    # -- instances -------------------------------------------------------------------

    async def add_instance(self, instance: Instance) -> None:
        """Register (or update) a KMS instance; its QPS spec becomes its quota."""
        await self._store.put_instance(instance)
        self._buckets[instance.instance_id] = TokenBucket(rate=instance.spec_qps,
                                                          burst=instance.spec_qps)

    async def list_kms_instances(self, principal: Principal, *, page_number: int,
                                 page_size: int) -> Page[Instance]:
        instances = await self._store.list_instances(principal.account_id, self.region)
        return page(list(instances), page_number, page_size)

    async def get_kms_instance(self, principal: Principal, instance_id: str) -> InstanceView:
        """:raises InstanceNotFound:"""
        instance = await self._store.get_instance(instance_id)
        if instance is None or instance.account_id != principal.account_id:
            raise InstanceNotFound(instance_id)
        used = await self._store.count_instance_versions(instance_id)
        status = self._instance_status.get(instance_id, lambda: "Connected")()
        return InstanceView(instance=instance, versions_used=used, status=status)

    def default_instance_id(self, principal: Principal) -> str | None:
        """The instance CreateKey uses when none is named (GetDefaultKmsInstance)."""
        return self._config.default_instances.get(principal.account_id)

    def describe_regions(self) -> Sequence[str]:
        return self._config.regions

    # -- key lifecycle ---------------------------------------------------------------

    async def create_key(self, principal: Principal, *, spec: KeySpec,
                         usage: KeyUsage | None, origin: Origin,
                         instance_id: str | None, description: str,
                         tags: Mapping[str, str],
                         storage: KeyStorageMechanism | None = None,
                         external_key_id: str | None = None,
                         rotation: bool = False, rotation_interval: int | None = None,
                         protection_level: ProtectionLevel | None = None) -> Key:
        """Create a user master key in a KMS instance (the default one if none is named).
        With Origin EXTERNAL the key waits in PendingImport for BYOK material; with
        ``rotation`` it rotates automatically every ``rotation_interval`` seconds.
        ``protection_level`` is ignored with a named instance (its type decides, as the API
        says); without one, it must be what the account's default instance gives.

        :raises InstanceNotFound: :raises UnsupportedOperation: :raises InvalidParameter:
        :raises Unsupported:
        """
        named = instance_id is not None
        instance_id = instance_id or self._config.default_instances.get(principal.account_id)
        if instance_id is None:
            raise MissingParameter("DKMSInstanceId")
        instance = await self._store.get_instance(instance_id)
        if instance is None or instance.account_id != principal.account_id:
            raise InstanceNotFound(instance_id)
        kind = KIND_INSTANCE[instance.type]
        level = ProtectionLevel.HSM if kind is KeyKind.HARDWARE else ProtectionLevel.SOFTWARE
        if not named and protection_level is not None and protection_level is not level:
            # Never a silent downgrade: an HSM key asked for must not come back SOFTWARE.
            raise Unsupported("ProtectionLevel", f"the account's default instance "
                              f"{instance_id} is a {instance.type} instance; name an "
                              f"instance of the right type with DKMSInstanceId")
        info = spec_info(spec)
        if info.unsupported_reason:
            raise UnsupportedOperation(info.unsupported_reason)
        if instance.type not in info.instance_types:
            raise UnsupportedOperation(f"{spec} keys cannot live in {instance.type} instances")
        usage = usage or info.default_usage
        if usage not in info.usages:
            raise InvalidParameter("KeyUsage", f"{spec} keys support "
                                   f"{', '.join(sorted(info.usages))}")
        # The seed lists BYOK for software and hardware keys (the CreateKey API text says
        # software-instance keys take only Aliyun_KMS; the seed's table decides here).
        if origin is Origin.EXTERNAL and kind is KeyKind.EXTERNAL:
            raise Unsupported("Origin", "external (XKI) keys cannot take imported material")
        if origin is Origin.EXTERNAL and not info.symmetric:
            raise UnsupportedOperation("importing asymmetric key material is not implemented")
        if len(description) > 8192:
            raise InvalidParameter("Description", "at most 8192 characters")
        _check_tags(tags)
        if kind is KeyKind.HARDWARE:
            storage = storage or KeyStorageMechanism.HSM_INTERNAL
        elif storage is not None:
            raise InvalidParameter("KeyStorageMechanism", "applies to hardware keys only")
        if (kind is KeyKind.EXTERNAL) != (external_key_id is not None):
            raise (MissingParameter("ExternalKeyId") if kind is KeyKind.EXTERNAL else
                   InvalidParameter("ExternalKeyId", "applies to external keys only"))
        key_id = f"key-{_region_code(self.region)}{secrets.token_hex(10)}"
        version_id = str(uuid.uuid4())
        created = format_time(self._clock())
        imported = origin is Origin.EXTERNAL
        key = Key(key_id=key_id, account_id=principal.account_id, region=self.region,
                  kind=kind, spec=spec, usage=usage,
                  state=KeyState.PENDING_IMPORT if imported else KeyState.ENABLED,
                  origin=origin,
                  protection_level=level, instance_id=instance_id, description=description,
                  creator=principal.account_id, created=created,
                  primary_version_id=version_id, storage_mechanism=storage,
                  external_key_id=external_key_id)
        if rotation:
            # Checked before any material exists, so a refusal leaves nothing behind.
            key = dataclasses.replace(key, rotation_interval=self.lifecycle.check_rotation_interval(
                key, rotation_interval, principal.kind))
        elif rotation_interval is not None:
            raise InvalidParameter("RotationInterval",
                                   "applies only with EnableAutomaticRotation true")
        async with self.adding_versions(instance_id, 1):
            material = b"" if imported else await self._backend(kind, instance_id).generate(
                version_id=version_id, spec=spec, storage=storage,
                external_key_id=external_key_id,
                call=self._call(principal, Op.CREATE_KEY, key.arn))
            await self._store.create_key(
                key, [KeyVersion(key_id, version_id, created, material)], tags)
        return key

    async def describe_key(self, principal: Principal, key_ref: str) -> Key:
        return await self.resolve(principal, key_ref)

    async def list_keys(self, principal: Principal, *,
                        filters: Sequence[tuple[str, Sequence[str]]],
                        page_number: int, page_size: int) -> Page[Key]:
        """Keys of the principal's account; filters AND across names, OR within values.

        :raises InvalidParameter: for an unknown filter name.
        """
        keys = await self._current_keys(principal)
        for name, values in filters:
            keys = [k for k in keys if await self._matches(k, name, set(values))]
        return page(keys, page_number, page_size)

    async def _current_keys(self, principal: Principal) -> list[Key]:
        """Every key of the principal's account and region that it could name one by one,
        as it stands now: deleted keys and other cloud products' service keys left out."""
        keys = []
        for key in await self._store.list_keys(principal.account_id, self.region):
            if not _service_key_owner_ok(principal, key):
                continue
            try:
                current = await self.lifecycle.current(key)
            except DependencyUnavailable:
                # Its deletion or expiry is due but its backend is down: listed as stored
                # (the sweep carries it out later), not a failure of the whole listing.
                current = key
            if current is not None:
                keys.append(current)
        return keys

    async def _matches(self, key: Key, name: str, values: set[str]) -> bool:
        simple = {"KeyState": key.state.value, "KeySpec": key.spec.value,
                  "KeyUsage": key.usage.value, "ProtectionLevel": key.protection_level.value,
                  "DKMSInstanceId": key.instance_id or "", "keyId": key.key_id,
                  "Creator": key.creator,
                  "CreatorType": "Service" if key.kind is KeyKind.SERVICE else "User"}
        if name in simple:
            return simple[name] in values
        if name == "AliasName":
            aliases = await self._store.list_aliases(key.account_id, key.region, key.key_id)
            return any(a.name in values for a in aliases)
        if name in ("TagKey", "TagValue"):
            tags = await self._store.get_tags(key.key_id)
            return bool(values & set(tags if name == "TagKey" else tags.values()))
        raise InvalidParameter("Filters", f"unknown filter key {name!r}")

    async def set_enabled(self, principal: Principal, key_ref: str, enabled: bool) -> Key:
        op = Op.ENABLE_KEY if enabled else Op.DISABLE_KEY
        state = KeyState.ENABLED if enabled else KeyState.DISABLED
        async with self.changing(principal, key_ref, op) as key:
            return key if key.state is state else await self._save(
                dataclasses.replace(key, state=state))

    async def update_key_description(self, principal: Principal, key_ref: str,
                                     description: str) -> Key:
        if len(description) > 8192:
            raise InvalidParameter("Description", "at most 8192 characters")
        async with self.changing(principal, key_ref, Op.UPDATE_KEY_DESCRIPTION) as key:
            return await self._save(dataclasses.replace(key, description=description))

    # -- aliases ---------------------------------------------------------------------

    @staticmethod
    def _check_alias(name: str) -> None:
        if not _ALIAS.fullmatch(name):
            raise InvalidParameter("AliasName", "alias/ then 1-255 of [A-Za-z0-9_/-]")
        if name.startswith("alias/acs"):
            raise Unsupported("Alias", "alias/acs is reserved for service keys")

    async def create_alias(self, principal: Principal, name: str, key_ref: str) -> Alias:
        """:raises AliasAlreadyExists: :raises Unsupported: for reserved names."""
        self._check_alias(name)
        key = await self._usable(principal, key_ref, Op.CREATE_ALIAS)
        alias = Alias(name, key.key_id, key.account_id, key.region)
        try:
            await self._store.create_alias(alias)
        except StoreConflict:
            raise AliasAlreadyExists(name) from None
        return alias

    async def update_alias(self, principal: Principal, name: str, key_ref: str) -> Alias:
        self._check_alias(name)
        key = await self._usable(principal, key_ref, Op.UPDATE_ALIAS)
        alias = Alias(name, key.key_id, key.account_id, key.region)
        if not await self._store.update_alias(alias):
            raise AliasNotFound(name)
        return alias

    async def delete_alias(self, principal: Principal, name: str) -> None:
        if name.startswith(SERVICE_ALIAS_PREFIX):
            raise Unsupported("Alias", "service key aliases are managed by KMS")
        alias = await self._store.get_alias(principal.account_id, self.region, name)
        if alias is None:
            raise AliasNotFound(name)
        key = await self._key(alias.key_id)
        if key is not None:
            require(key.kind, Op.DELETE_ALIAS, principal.kind)
        await self._store.delete_alias(principal.account_id, self.region, name)

    async def list_aliases(self, principal: Principal, *, page_number: int, page_size: int,
                           key_ref: str | None = None) -> Page[Alias]:
        key_id = (await self.resolve(principal, key_ref)).key_id if key_ref else None
        aliases = list(await self._store.list_aliases(principal.account_id, self.region,
                                                      key_id))
        if principal.kind is PrincipalKind.SERVICE:
            # As in ListKeys: not another cloud product's service key (nor its alias).
            aliases = [a for a in aliases
                       if (key := await self._key(a.key_id)) is None
                       or _service_key_owner_ok(principal, key)]
        return page(aliases, page_number, page_size)

    # -- tags ------------------------------------------------------------------------

    async def tag_resource(self, principal: Principal, key_ref: str,
                           tags: Mapping[str, str]) -> None:
        await self.tag_resources(principal, [key_ref], tags, op=Op.TAG_RESOURCE, param="Tags")

    async def tag_resources(self, principal: Principal, key_refs: Sequence[str],
                            tags: Mapping[str, str], *, op: Op = Op.TAG_RESOURCES,
                            param: str = "Tag") -> None:
        """The same tags on every key named, all or none: a key that cannot be tagged, or
        that would have more than ``MAX_TAGS``, fails the whole call and changes nothing."""
        _check_tags(tags, param)
        async with self._holding_each(principal, key_refs, op) as keys:
            over = await self._store.set_tags_many(keys, tags, limit=MAX_TAGS)
        if over is not None:
            raise InvalidParameter(param, f"a key has at most {MAX_TAGS} tags ({over} would "
                                          "have more)")

    async def untag_resource(self, principal: Principal, key_ref: str,
                             tag_keys: Sequence[str]) -> None:
        await self.untag_resources(principal, [key_ref], tag_keys, op=Op.UNTAG_RESOURCE)

    async def untag_resources(self, principal: Principal, key_refs: Sequence[str],
                              tag_keys: Sequence[str] | None, *,
                              op: Op = Op.UNTAG_RESOURCES) -> None:
        """``tag_keys`` (every tag when None) off every key named, all or none. A tag a key
        does not have is no error."""
        async with self._holding_each(principal, key_refs, op) as keys:
            await self._store.remove_tags_many(keys, tag_keys)

    async def list_resource_tags(self, principal: Principal, key_ref: str
                                 ) -> tuple[Key, Mapping[str, str]]:
        key = await self.resolve(principal, key_ref)
        return key, await self._store.get_tags(key.key_id)

    async def list_tag_resources(self, principal: Principal, key_refs: Sequence[str],
                                 wanted: Mapping[str, str | None], *,
                                 after: tuple[str, str] | None, limit: int
                                 ) -> tuple[list[tuple[str, str, str]], tuple[str, str] | None]:
        """A page of (key id, tag key, tag value) rows, in that order, of the keys named
        (every key of the account when none is) that carry every ``wanted`` tag (with its
        value, when one is given); rows after ``after`` only. Also where the next page
        starts (None on the last): a position, not an offset, so that tags added or
        removed between two pages neither repeat nor skip a row."""
        if key_refs:
            key_ids = await self._each(principal, key_refs, Op.LIST_TAG_RESOURCES)
        else:
            key_ids = [k.key_id for k in await self._current_keys(principal)]
        tags = await self._store.get_tags_many(key_ids)
        rows = []
        for key_id in sorted(tags):
            have = tags[key_id]
            if all(name in have and value in (None, have[name])
                   for name, value in wanted.items()):
                rows += [(key_id, name, value) for name, value in sorted(have.items())
                         if after is None or (key_id, name) > after]
        shown = rows[:limit]
        return shown, (shown[-1][0], shown[-1][1]) if len(rows) > limit else None

    async def _each(self, principal: Principal, key_refs: Sequence[str], op: Op) -> list[str]:
        """The ids of the keys ``key_refs`` name (by id, alias or ARN), each checked for
        ``op``, once each. The audit line of a batch lists them all: by id once all are
        found, else as the caller named them, with the one refused as its key when it
        was found (a key not found is not confused with the one before it)."""
        batch = len(key_refs) > 1
        if batch:
            RESOLVED_KEYS.set(tuple(ref[:256] for ref in key_refs))
        key_ids: dict[str, None] = {}
        for ref in key_refs:
            if batch:
                RESOLVED_KEY.set(None)
            key_ids[(await self._usable(principal, ref, op)).key_id] = None
        if batch:
            RESOLVED_KEYS.set(tuple(key_ids))
            if len(key_ids) > 1:
                RESOLVED_KEY.set(None)
        return list(key_ids)

    @contextlib.asynccontextmanager
    async def _holding_each(self, principal: Principal, key_refs: Sequence[str],
                            op: Op) -> AsyncIterator[list[str]]:
        """``_each``, with every key held against other changes until the block ends and
        checked again once held: a key cannot become PendingDeletion between its check
        and the block's write. Held in key-id order, so two batches never wait on each
        other in a cycle (every other holder takes one key lock at a time)."""
        key_ids = await self._each(principal, key_refs, op)
        async with contextlib.AsyncExitStack() as held:
            for key_id in sorted(key_ids):
                await held.enter_async_context(self.key_locks.hold(key_id))
            yield await self._each(principal, key_ids, op)

    # -- symmetric crypto --------------------------------------------------------------

    async def _symmetric(self, principal: Principal, key_ref: str, op: Op) -> Key:
        key = await self._usable(principal, key_ref, op)
        if not spec_info(key.spec).symmetric or key.usage is not KeyUsage.ENCRYPT_DECRYPT:
            raise UnsupportedOperation(f"{op} needs a symmetric ENCRYPT/DECRYPT key, "
                                       f"not {key.spec} {key.usage}")
        self._throttle(key)
        return key

    async def _seal(self, principal: Principal, op: Op, key: Key, plaintext: bytes,
                    context: Mapping[str, str] | None) -> CryptoResult:
        backend, version = await self._backend_version(key)
        sealed = await backend.seal(version, key.spec, plaintext,
                                    blob_aad(version.version_id, context),
                                    call=self._call(principal, op, key.arn))
        return CryptoResult(key.key_id, version.version_id, join_blob(version.version_id,
                                                                      sealed))

    async def encrypt(self, principal: Principal, key_ref: str, plaintext: bytes,
                      context: Mapping[str, str] | None) -> CryptoResult:
        """Encrypt up to 6 KB under the key's primary version.

        :raises InvalidParameter: :raises KeyStateInvalid: :raises UnsupportedOperation:
        """
        if not plaintext or len(plaintext) > MAX_PLAINTEXT_BYTES:
            raise InvalidParameter("Plaintext", f"1 to {MAX_PLAINTEXT_BYTES} bytes")
        key = await self._symmetric(principal, key_ref, Op.ENCRYPT)
        return await self._seal(principal, Op.ENCRYPT, key, plaintext, context)

    async def _open(self, principal: Principal, blob: bytes,
                    context: Mapping[str, str] | None, op: Op) -> CryptoResult:
        version_id, sealed = split_blob(blob)
        version = await self._version(version_id)
        if version is None:
            raise InvalidCiphertext()
        key = await self._key(version.key_id)
        # A blob naming a version of an asymmetric key (whose ids are public) is as invalid
        # as one naming no key at all.
        if (key is None or key.region != self.region or not spec_info(key.spec).symmetric
                or key.usage is not KeyUsage.ENCRYPT_DECRYPT):
            raise InvalidCiphertext()
        if key.account_id != principal.account_id:
            raise AccessDenied(principal.arn, "decrypt with a key of another account")
        RESOLVED_KEY.set(key)
        _check_service_key_owner(principal, key)
        try:
            key = await self.lifecycle.settled(key, key.key_id)
        except KeyNotFound:
            raise InvalidCiphertext() from None
        RESOLVED_KEY.set(key)
        require(key.kind, op, principal.kind)
        require_state(key.state, op)
        self._throttle(key)
        plaintext = await self._backend(key.kind, key.instance_id).unseal(
            version, key.spec, sealed, blob_aad(version.version_id, context),
            call=self._call(principal, op, key.arn))
        return CryptoResult(key.key_id, version.version_id, plaintext=plaintext)

    async def decrypt(self, principal: Principal, blob: bytes,
                      context: Mapping[str, str] | None) -> CryptoResult:
        """The key comes from the blob. :raises InvalidCiphertext: for any input fault."""
        return await self._open(principal, blob, context, Op.DECRYPT)

    async def generate_data_key(self, principal: Principal, key_ref: str, *,
                                number_of_bytes: int | None, key_spec: str | None,
                                context: Mapping[str, str] | None,
                                with_plaintext: bool = True) -> DataKey:
        """A random data key, returned as Base64 text and encrypted as that text (so that
        Decrypt returns what GenerateDataKey returned, as Alibaba's clients expect)."""
        size = self._data_key_size(number_of_bytes, key_spec)
        op = Op.GENERATE_DATA_KEY if with_plaintext else Op.GENERATE_DATA_KEY_WITHOUT_PLAINTEXT
        key = await self._symmetric(principal, key_ref, op)
        text = base64.b64encode(os.urandom(size)).decode()
        sealed = await self._seal(principal, op, key, text.encode(), context)
        return DataKey(key.key_id, sealed.version_id, sealed.blob,
                       text if with_plaintext else "")

    @staticmethod
    def _data_key_size(number_of_bytes: int | None, key_spec: str | None) -> int:
        if number_of_bytes is not None:
            if not 1 <= number_of_bytes <= 1024:
                raise InvalidParameter("NumberOfBytes", "1 to 1024")
            return number_of_bytes
        if key_spec is None:
            return 32
        if key_spec not in _DATA_KEY_SPECS:
            raise InvalidParameter("KeySpec", "AES_256 or AES_128")
        return _DATA_KEY_SPECS[key_spec]

    async def re_encrypt(self, principal: Principal, blob: bytes, destination_ref: str, *,
                         source_context: Mapping[str, str] | None,
                         destination_context: Mapping[str, str] | None) -> CryptoResult:
        opened = await self._open(principal, blob, source_context, Op.RE_ENCRYPT)
        # The call's key is the destination: a failure to find it must not name the source.
        RESOLVED_KEY.set(None)
        key = await self._symmetric(principal, destination_ref, Op.RE_ENCRYPT)
        return await self._seal(principal, Op.RE_ENCRYPT, key, opened.plaintext,
                                destination_context)

    # -- data key export ---------------------------------------------------------------

    @staticmethod
    def _wrap_for_export(public_key_der: bytes, wrapping_spec: str, algorithm: str,
                         data_key: bytes) -> bytes:
        if wrapping_spec != "RSA_2048":
            raise UnsupportedOperation(f"WrappingKeySpec {wrapping_spec} (only RSA_2048; "
                                       "EC_SM2 is not implemented)")
        if algorithm not in _WRAPPING:
            raise InvalidParameter("WrappingAlgorithm", ", ".join(sorted(_WRAPPING)))
        try:
            public = serialization.load_der_public_key(public_key_der)
        except (ValueError, UnsupportedAlgorithm):
            raise InvalidParameter("PublicKeyBlob", "not a DER SubjectPublicKeyInfo") from None
        if not isinstance(public, rsa.RSAPublicKey) or public.key_size != 2048:
            raise InvalidParameter("PublicKeyBlob", "must be an RSA 2048-bit public key")
        digest = _WRAPPING[algorithm]()
        # RSA-OAEP takes at most k - 2*hLen - 2 bytes (RFC 8017 section 7.1.1).
        limit = public.key_size // 8 - 2 * digest.digest_size - 2
        if len(data_key) > limit:
            raise InvalidParameter("NumberOfBytes", f"a data key wrapped with {algorithm} "
                                   f"under RSA_2048 has at most {limit} bytes")
        return public.encrypt(data_key, padding.OAEP(mgf=padding.MGF1(digest),
                                                      algorithm=digest, label=None))

    async def generate_and_export_data_key(
        self, principal: Principal, key_ref: str, *, number_of_bytes: int | None,
        key_spec: str | None, context: Mapping[str, str] | None, public_key_der: bytes,
        wrapping_spec: str, wrapping_algorithm: str,
    ) -> DataKey:
        """A data key encrypted under the KMS key and, separately, under a caller's public
        key (RSA-OAEP of the raw data key bytes)."""
        size = self._data_key_size(number_of_bytes, key_spec)
        # Check the wrapping inputs (and that a key of this size can be wrapped) before any
        # key material is made.
        self._wrap_for_export(public_key_der, wrapping_spec, wrapping_algorithm, bytes(size))
        key = await self._symmetric(principal, key_ref, Op.GENERATE_AND_EXPORT_DATA_KEY)
        raw = os.urandom(size)
        sealed = await self._seal(principal, Op.GENERATE_AND_EXPORT_DATA_KEY, key,
                                  base64.b64encode(raw), context)
        exported = self._wrap_for_export(public_key_der, wrapping_spec, wrapping_algorithm,
                                         raw)
        return DataKey(key.key_id, sealed.version_id, sealed.blob, "", exported)

    async def export_data_key(self, principal: Principal, blob: bytes, *,
                              context: Mapping[str, str] | None, public_key_der: bytes,
                              wrapping_spec: str, wrapping_algorithm: str) -> DataKey:
        """Re-wrap a data key made by GenerateDataKey under a caller's public key."""
        self._wrap_for_export(public_key_der, wrapping_spec, wrapping_algorithm, b"\0")
        opened = await self._open(principal, blob, context, Op.EXPORT_DATA_KEY)
        try:
            raw = base64.b64decode(opened.plaintext, validate=True)
        except ValueError:
            raise InvalidParameter("CiphertextBlob", "does not hold a data key") from None
        exported = self._wrap_for_export(public_key_der, wrapping_spec, wrapping_algorithm,
                                         raw)
        return DataKey(opened.key_id, opened.version_id, b"", "", exported)

    # -- asymmetric ------------------------------------------------------------------

    async def _asymmetric(self, principal: Principal, key_ref: str, version_id: str | None,
                          op: Op, usage: KeyUsage | None
                          ) -> tuple[Key, KeyBackend, KeyVersion]:
        key = await self._usable(principal, key_ref, op)
        if spec_info(key.spec).symmetric:
            raise UnsupportedOperation(f"{op} needs an asymmetric key, not {key.spec}")
        if usage is not None and key.usage is not usage:
            raise UnsupportedOperation(f"{op} needs a {usage} key; this key is {key.usage}")
        self._throttle(key)
        backend, version = await self._backend_version(key, version_id)
        return key, backend, version

    def _sign_algorithm(self, key: Key, algorithm: str) -> None:
        if algorithm not in spec_info(key.spec).sign_algorithms:
            raise InvalidParameter("Algorithm", f"{key.spec} signs with "
                                   f"{', '.join(sorted(spec_info(key.spec).sign_algorithms))}")

    async def asymmetric_sign(self, principal: Principal, key_ref: str, version_id: str,
                              algorithm: str, digest: bytes) -> CryptoResult:
        key, backend, version = await self._asymmetric(
            principal, key_ref, version_id, Op.ASYMMETRIC_SIGN, KeyUsage.SIGN_VERIFY)
        self._sign_algorithm(key, algorithm)
        signature = await backend.sign(version, key.spec, algorithm, digest)
        return CryptoResult(key.key_id, version.version_id, plaintext=signature)

    async def asymmetric_verify(self, principal: Principal, key_ref: str, version_id: str,
                                algorithm: str, digest: bytes, signature: bytes
                                ) -> tuple[CryptoResult, bool]:
        key, backend, version = await self._asymmetric(
            principal, key_ref, version_id, Op.ASYMMETRIC_VERIFY, KeyUsage.SIGN_VERIFY)
        self._sign_algorithm(key, algorithm)
        valid = await backend.verify(version, key.spec, algorithm, digest, signature)
        return CryptoResult(key.key_id, version.version_id), valid

    def _encrypt_algorithm(self, key: Key, algorithm: str) -> int:
        limits = spec_info(key.spec).encrypt_algorithms
        if algorithm not in limits:
            raise InvalidParameter("Algorithm", f"{key.spec} encrypts with "
                                   f"{', '.join(sorted(limits))}")
        return limits[algorithm]

    async def asymmetric_encrypt(self, principal: Principal, key_ref: str, version_id: str,
                                 algorithm: str, plaintext: bytes) -> CryptoResult:
        key, backend, version = await self._asymmetric(
            principal, key_ref, version_id, Op.ASYMMETRIC_ENCRYPT, KeyUsage.ENCRYPT_DECRYPT)
        limit = self._encrypt_algorithm(key, algorithm)
        if not 1 <= len(plaintext) <= limit:
            raise InvalidParameter("Plaintext", f"1 to {limit} bytes for {algorithm}")
        blob = await backend.asymmetric_encrypt(version, key.spec, algorithm, plaintext)
        return CryptoResult(key.key_id, version.version_id, blob)

    async def asymmetric_decrypt(self, principal: Principal, key_ref: str, version_id: str,
                                 algorithm: str, ciphertext: bytes) -> CryptoResult:
        key, backend, version = await self._asymmetric(
            principal, key_ref, version_id, Op.ASYMMETRIC_DECRYPT, KeyUsage.ENCRYPT_DECRYPT)
        self._encrypt_algorithm(key, algorithm)
        plaintext = await backend.asymmetric_decrypt(version, key.spec, algorithm, ciphertext)
        return CryptoResult(key.key_id, version.version_id, plaintext=plaintext)

    async def get_public_key(self, principal: Principal, key_ref: str,
                             version_id: str | None) -> CryptoResult:
        key, backend, version = await self._asymmetric(
            principal, key_ref, version_id, Op.GET_PUBLIC_KEY, None)
        pem = await backend.public_key_pem(version, key.spec)
        return CryptoResult(key.key_id, version.version_id, plaintext=pem)
