"""Key lifecycle actions: versions and rotation, scheduled deletion, deletion protection, BYOK
import and backup, and the sweep that carries out what time decides (a deletion window's
end, imported material's expiry, automatic rotation).

``KeyLifecycle`` works on one ``KeyService``'s keys, caches and backends (the service owns
it as ``service.lifecycle``, and this module reaches into its internals as a friend); it has
its own module because these actions share their rules with each other more than with
crypto. Every action checks, in this order: the capability table (and its narrower
rotation/import rules), then the key-state table, then its own parameters against the key.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import uuid
from base64 import b64decode, b64encode
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

from kms_proxy.backends.base import BackupSealer, KeyBackend
from kms_proxy.core.byok import ImportParameters, ImportTokens, key_check_value
from kms_proxy.core.capabilities import Op, require, require_import, require_rotation
from kms_proxy.core.errors import (
    AccessDenied,
    DeletionProtected,
    DependencyUnavailable,
    InstanceNotFound,
    InvalidKeyMaterial,
    InvalidParameter,
    KeyNotFound,
    KeyVersionNotFound,
    KmsError,
    LimitExceeded,
    MissingParameter,
    UnsupportedOperation,
)
from kms_proxy.core.keylocks import KeyLocks
from kms_proxy.core.model import (
    CallInfo,
    Key,
    KeyKind,
    KeySpec,
    KeyState,
    KeyVersion,
    Principal,
    PrincipalKind,
    key_from_record,
)
from kms_proxy.core.paging import Page, page
from kms_proxy.core.states import require_state
from kms_proxy.store.base import Store, StoreConflict

__all__ = ["KeyLifecycle", "ServiceCore", "SystemEvent", "format_time", "next_rotation",
           "parse_time", "system_principal"]

log = logging.getLogger(__name__)

_TIME: Final = "%Y-%m-%dT%H:%M:%SZ"
# Imported material sizes (reference section 2.5: 256 bits for AES-256, 128 for SM4).
_MATERIAL_BYTES: Final = {KeySpec.AES_256: 32, KeySpec.AES_128: 16, KeySpec.SM4: 16}
_BACKUP_FORMAT: Final = "kms-proxy-key-backup/1"
MIN_PENDING_DAYS: Final = 7
MAX_PENDING_DAYS: Final = 366


def format_time(moment: datetime) -> str:
    return moment.strftime(_TIME)


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, _TIME).replace(tzinfo=UTC)


def system_principal(account_id: str) -> Principal:
    """KMS itself, acting for an account: provisioning keys, or on a schedule (automatic
    rotation, deletion)."""
    return Principal(account_id=account_id, name="kms", kind=PrincipalKind.SERVICE,
                     product="kms")


@dataclasses.dataclass(frozen=True, slots=True)
class SystemEvent:
    """One thing KMS did to a key on its own, for the audit trail: provisioning a default
    or service key, or what time decided (a sweep, or a read that found it due)."""

    action: str  # "CreateKey", "DeleteKey", "DeleteKeyMaterial" or "CreateKeyVersion"
    key: Key
    version_id: str | None = None
    alias: str | None = None  # A service key's alias/acs/<product>, made with it.


class ServiceCore(Protocol):
    """What the lifecycle uses of its ``KeyService``: a friend's view of its internals (its
    store and caches, backend choice, key resolution and the checks every action makes)."""

    _store: Store
    _backends: Mapping[KeyKind, KeyBackend]
    _keys: dict[str, Key]
    _versions: dict[str, KeyVersion]
    key_locks: KeyLocks

    @property
    def region(self) -> str: ...

    @property
    def clock(self) -> Callable[[], datetime]: ...

    def _backend(self, kind: KeyKind, instance_id: str | None) -> KeyBackend: ...

    def adding_versions(self, instance_id: str | None,
                        count: int) -> AbstractAsyncContextManager[None]: ...

    def _call(self, principal: Principal, op: Op, key_arn: str) -> CallInfo: ...

    async def _save(self, key: Key, versions: Sequence[KeyVersion] = ()) -> Key: ...

    def changing(self, principal: Principal, key_ref: str,
                 op: Op | None = None) -> AbstractAsyncContextManager[Key]: ...

    async def _key(self, key_id: str) -> Key | None: ...

    async def _version(self, version_id: str) -> KeyVersion | None: ...

    async def _usable(self, principal: Principal, key_ref: str, op: Op) -> Key: ...

    async def resolve(self, principal: Principal, key_ref: str) -> Key: ...

    async def provision_default_key(self, account_id: str) -> Key: ...


class KeyLifecycle:
    """The lifecycle actions of one ``KeyService`` (``service.lifecycle``)."""

    def __init__(self, service: ServiceCore, *, rotation_addon: frozenset[str]) -> None:
        """``rotation_addon``: the accounts with the paid rotation add-on."""
        self._s = service
        self._rotation_addon = rotation_addon
        self._imports = ImportTokens(service.clock)
        # Told of everything done on a schedule, by the sweep or by a request that found it
        # due (the front audits each as done by KMS itself).
        self.on_event: Callable[[SystemEvent], None] | None = None

    def _emit(self, event: SystemEvent, sink: list[SystemEvent] | None) -> None:
        if sink is not None:
            sink.append(event)
        self.announce(event)

    def announce(self, event: SystemEvent) -> None:
        """Tell ``on_event`` (the audit trail) what KMS did on its own."""
        if self.on_event is not None:
            self.on_event(event)

    # -- versions and rotation ---------------------------------------------------------

    def _has_addon(self, key: Key) -> bool:
        return key.account_id in self._rotation_addon

    async def list_key_versions(self, principal: Principal, key_ref: str, *,
                                page_number: int, page_size: int) -> Page[KeyVersion]:
        key = await self._s._usable(principal, key_ref, Op.LIST_KEY_VERSIONS)
        versions = list(await self._s._store.list_versions(key.key_id))
        return page(versions, page_number, page_size)

    async def describe_key_version(self, principal: Principal, key_ref: str,
                                   version_id: str) -> KeyVersion:
        key = await self._s._usable(principal, key_ref, Op.DESCRIBE_KEY_VERSION)
        version = await self._s._version(version_id)
        if version is None or version.key_id != key.key_id:
            raise KeyVersionNotFound(version_id)
        return version

    async def create_key_version(self, principal: Principal,
                                 key_ref: str) -> KeyVersion:
        """Rotate by hand: a new version becomes primary; older ones still decrypt.

        :raises UnsupportedOperation: where the key may not rotate. :raises KeyStateInvalid:
        """
        async with self._s.changing(principal, key_ref) as key:
            require_rotation(key, Op.CREATE_KEY_VERSION, principal.kind,
                             addon=self._has_addon(key))
            require_state(key.state, Op.CREATE_KEY_VERSION)
            return await self._rotate(key, principal)

    async def _rotate(self, key: Key, principal: Principal) -> KeyVersion:
        """:raises LimitExceeded: when the instance's key quota has no room."""
        version_id = str(uuid.uuid4())
        async with self._s.adding_versions(key.instance_id, 1):
            material = await self._s._backend(key.kind, key.instance_id).generate(
                version_id=version_id, spec=key.spec, storage=key.storage_mechanism,
                call=self._s._call(principal, Op.CREATE_KEY_VERSION, key.arn))
            now = format_time(self._s.clock())
            version = KeyVersion(key.key_id, version_id, now, material)
            await self._s._save(dataclasses.replace(key, primary_version_id=version_id,
                                                 last_rotation=now), [version])
        return version

    def check_rotation_interval(self, key: Key, interval: int | None,
                                principal: PrincipalKind) -> int:
        """The interval automatic rotation of ``key`` will use.

        :raises UnsupportedOperation: :raises MissingParameter: :raises InvalidParameter:
        """
        rule = require_rotation(key, Op.UPDATE_ROTATION_POLICY, principal,
                                addon=self._has_addon(key))
        if interval is None:
            if rule.min_interval != rule.max_interval:
                raise MissingParameter("RotationInterval")
            interval = rule.min_interval
        if not rule.min_interval <= interval <= rule.max_interval:
            low, high = rule.min_interval // 86_400, rule.max_interval // 86_400
            every = f"{low} to {high} days" if low != high else f"{low} days"
            label = key.kind.value.replace("_", " ")
            raise InvalidParameter("RotationInterval", f"a {label} key rotates every {every}")
        return interval

    async def update_rotation_policy(self, principal: Principal, key_ref: str,
                                     *, enabled: bool, interval: int | None) -> Key:
        async with self._s.changing(principal, key_ref) as key:
            if not enabled and key.rotation_interval is not None:
                # Turning a policy off needs no add-on: an account that lost it must not be
                # left with a policy it can neither use nor remove.
                require(key.kind, Op.UPDATE_ROTATION_POLICY, principal.kind)
            else:
                require_rotation(key, Op.UPDATE_ROTATION_POLICY, principal.kind,
                                 addon=self._has_addon(key))
            require_state(key.state, Op.UPDATE_ROTATION_POLICY)
            if not enabled:
                return await self._s._save(dataclasses.replace(key, rotation_interval=None))
            interval = self.check_rotation_interval(key, interval, principal.kind)
            return await self._s._save(dataclasses.replace(
                key, rotation_interval=interval,
                last_rotation=key.last_rotation or key.created))

    # -- deletion ------------------------------------------------------------------------

    async def schedule_key_deletion(self, principal: Principal, key_ref: str,
                                    pending_days: int) -> Key:
        """Start the key's deletion window; the sweep deletes it when the window ends.

        :raises DeletionProtected: :raises InvalidParameter: :raises KeyStateInvalid:
        """
        async with self._s.changing(principal, key_ref, Op.SCHEDULE_KEY_DELETION) as key:
            # The key, its kind and state first, then the parameter (the module's order).
            if not MIN_PENDING_DAYS <= pending_days <= MAX_PENDING_DAYS:
                raise InvalidParameter("PendingWindowInDays",
                                       f"{MIN_PENDING_DAYS} to {MAX_PENDING_DAYS} days")
            if key.deletion_protection:
                raise DeletionProtected(key.key_id)
            delete_date = format_time(self._s.clock() + timedelta(days=pending_days))
            return await self._s._save(dataclasses.replace(
                key, state=KeyState.PENDING_DELETION, delete_date=delete_date))

    async def cancel_key_deletion(self, principal: Principal,
                                  key_ref: str) -> Key:
        """Back to Enabled, or to PendingImport for a key that has no material."""
        async with self._s.changing(principal, key_ref, Op.CANCEL_KEY_DELETION) as key:
            version = await self._s._version(key.primary_version_id)
            state = KeyState.ENABLED if version is not None and version.material \
                else KeyState.PENDING_IMPORT
            return await self._s._save(dataclasses.replace(key, state=state,
                                                           delete_date=None))

    async def set_deletion_protection(self, principal: Principal, key_ref: str,
                                      *, enabled: bool, description: str) -> Key:
        async with self._s.changing(principal, key_ref, Op.SET_DELETION_PROTECTION) as key:
            if len(description) > 8192:
                raise InvalidParameter("DeletionProtectionDescription",
                                       "at most 8192 characters")
            return await self._s._save(dataclasses.replace(
                key, deletion_protection=enabled,
                deletion_protection_description=description if enabled else ""))

    async def _delete_now(self, key: Key) -> None:
        """The end of a deletion window: the backend forgets the material, then the store
        drops the key, its versions, aliases and tags."""
        backend = self._s._backend(key.kind, key.instance_id)
        for version in await self._s._store.list_versions(key.key_id):
            # Also a version with no stored material: an import whose save failed can have
            # left its token object (the HSM backend finds objects by the version's label).
            await backend.destroy(version, key.spec)
            self._s._versions.pop(version.version_id, None)
        await self._s._store.delete_key(key.key_id)
        self._s._keys.pop(key.key_id, None)

    # -- BYOK ----------------------------------------------------------------------------

    async def get_parameters_for_import(self, principal: Principal,
                                        key_ref: str, *, wrapping_spec: str,
                                        algorithm: str) -> ImportParameters:
        key = await self._s.resolve(principal, key_ref)
        require_import(key, Op.GET_PARAMETERS_FOR_IMPORT, principal.kind)
        require_state(key.state, Op.GET_PARAMETERS_FOR_IMPORT)
        return await self._imports.issue(key.key_id, wrapping_spec, algorithm,
                                         owner=key.account_id)

    async def import_key_material(self, principal: Principal, key_ref: str, *,
                                  encrypted: bytes, token: str,
                                  expire_unix: int | None) -> Key:
        """Unwrap material with the token's key and give it to the backend; a PendingImport
        key becomes Enabled. A key only ever takes its first material again.

        :raises InvalidImportToken: :raises ExpiredImportToken: :raises InvalidKeyMaterial:
        """
        # Under the key's lock: two concurrent imports into an empty HsmInternal version
        # would each make a token object with the version's label, and a change made while
        # the material is unwrapped (in a worker thread) would be saved over.
        async with self._s.changing(principal, key_ref) as key:
            return await self._import(key, principal, encrypted=encrypted, token=token,
                                      expire_unix=expire_unix)

    async def _import(self, key: Key, principal: Principal, *, encrypted: bytes, token: str,
                      expire_unix: int | None) -> Key:
        require_import(key, Op.IMPORT_KEY_MATERIAL, principal.kind)
        require_state(key.state, Op.IMPORT_KEY_MATERIAL)
        expire = None
        if expire_unix and key.kind is KeyKind.DEFAULT_MASTER:
            # Its material is taken only once, at its first enabling: material that expired
            # could never come back, and neither could the data encrypted under it.
            raise InvalidParameter("KeyMaterialExpireUnix",
                                   "a default master key's material does not expire")
        if expire_unix:
            moment = datetime.fromtimestamp(expire_unix, UTC)
            if moment <= self._s.clock():
                raise InvalidParameter("KeyMaterialExpireUnix", "must be later than now")
            expire = format_time(moment)
        material = await self._imports.unwrap(key.key_id, token, encrypted)
        size = _MATERIAL_BYTES[key.spec]
        if len(material) != size:
            raise InvalidKeyMaterial(f"{key.spec} takes {size * 8}-bit material")
        check = key_check_value(material)
        if key.material_check and not hmac.compare_digest(check, key.material_check):
            raise InvalidKeyMaterial("a key takes only the material first imported into it")
        version = await self._s._version(key.primary_version_id)
        if version is None:
            raise KeyVersionNotFound(key.primary_version_id)
        versions = []
        if not version.material:
            stored = await self._s._backend(key.kind, key.instance_id).import_material(
                version_id=version.version_id, spec=key.spec, material=material,
                storage=key.storage_mechanism)
            versions.append(dataclasses.replace(version, material=stored))
        state = KeyState.ENABLED if key.state is KeyState.PENDING_IMPORT else key.state
        return await self._s._save(dataclasses.replace(key, state=state, material_expire=expire,
                                                    material_check=check), versions)

    async def delete_key_material(self, principal: Principal,
                                  key_ref: str) -> Key:
        """Forget imported material: the key waits in PendingImport for the same material
        (a PendingDeletion key keeps its state and DeleteDate)."""
        async with self._s.changing(principal, key_ref) as key:
            require_import(key, Op.DELETE_KEY_MATERIAL, principal.kind)
            require_state(key.state, Op.DELETE_KEY_MATERIAL)
            return await self._drop_material(key)

    async def _drop_material(self, key: Key) -> Key:
        version = await self._s._version(key.primary_version_id)
        versions = []
        if version is not None:
            # Whatever the record holds (see _delete_now).
            await self._s._backend(key.kind, key.instance_id).destroy(version, key.spec)
            self._s._versions.pop(version.version_id, None)
            if version.material:
                versions.append(dataclasses.replace(version, material=b""))
        state = key.state if key.state is KeyState.PENDING_DELETION \
            else KeyState.PENDING_IMPORT
        return await self._s._save(dataclasses.replace(key, state=state, material_expire=None),
                                versions)

    # -- backup (this project's extension) -------------------------------------------------

    def _sealer(self, key: Key) -> BackupSealer:
        backend = self._s._backend(key.kind, key.instance_id)
        if not isinstance(backend, BackupSealer):
            raise UnsupportedOperation(f"the {backend.name} backend makes no backups")
        return backend

    async def backup_key(self, principal: Principal, key_ref: str) -> tuple[Key, bytes]:
        """The key's metadata, every version's (still wrapped) material and its tags,
        encrypted and authenticated by the backend's root key: restorable only here."""
        key = await self._s._usable(principal, key_ref, Op.BACKUP_KEY)
        versions = await self._s._store.list_versions(key.key_id)
        document = {
            "format": _BACKUP_FORMAT,
            "key": dataclasses.asdict(key),
            "versions": [{"version_id": v.version_id, "created": v.created,
                          "material": b64encode(v.material).decode()} for v in versions],
            "tags": dict(await self._s._store.get_tags(key.key_id)),
        }
        return key, self._sealer(key).seal_backup(json.dumps(document).encode())

    async def restore_key_backup(self, principal: Principal,
                                 backup: bytes) -> Key:
        """Recreate a backed-up key (same id, versions and tags; no aliases) if it does not
        exist. A key backed up while PendingDeletion comes back Disabled."""
        software = self._s._backends.get(KeyKind.SOFTWARE)
        if not isinstance(software, BackupSealer):
            raise DependencyUnavailable("software", "it cannot open backups")
        document = _backup_document(software.open_backup(backup))
        try:
            key = key_from_record(document["key"])
            versions = [KeyVersion(key.key_id, v["version_id"], v["created"],
                                   b64decode(v["material"])) for v in document["versions"]]
            tags: Mapping[str, str] = dict(document["tags"])
        except (KeyError, TypeError, ValueError):
            raise InvalidParameter("KeyBackup", "the backup document is malformed") from None
        if key.account_id != principal.account_id or key.region != self._s.region:
            raise AccessDenied(principal.arn, "restore a key of another account or region")
        require(key.kind, Op.BACKUP_KEY, principal.kind)
        instance = await self._s._store.get_instance(key.instance_id or "")
        if instance is None or instance.account_id != key.account_id:
            raise InstanceNotFound(key.instance_id or "")
        if key.state is KeyState.PENDING_DELETION:
            key = dataclasses.replace(key, state=KeyState.DISABLED, delete_date=None)
        existing = await self._s._store.get_key(key.key_id)
        if existing is not None and await self.current(existing) is not None:
            # Said before the quota is looked at: a full instance is not the reason.
            raise InvalidParameter("KeyBackup", f"the key {key.key_id} exists")
        try:
            async with self._s.adding_versions(key.instance_id, len(versions)):
                await self._s._store.create_key(key, versions, tags)
        except StoreConflict:
            raise InvalidParameter("KeyBackup", f"the key {key.key_id} (or one of its "
                                                "versions) exists") from None
        return key

    # -- what time decides -----------------------------------------------------------------

    async def _settle(self, key: Key, sink: list[SystemEvent] | None = None) -> Key | None:
        """Carry out what is due on ``key`` now: the end of its deletion window (None: the
        key is gone) or its imported material's expiry. Under the key's lock, on the key
        as it is now (``key`` may be an earlier read)."""
        async with self._s.key_locks.hold(key.key_id):
            fresh = await self._s._key(key.key_id)
            return None if fresh is None else await self._settle_held(fresh, sink)

    async def _settle_held(self, key: Key, sink: list[SystemEvent] | None) -> Key | None:
        now = self._s.clock()
        if _deletion_due(key, now):
            await self._delete_now(key)
            self._emit(SystemEvent("DeleteKey", key), sink)
            if key.kind is KeyKind.DEFAULT_MASTER:
                # Exactly one per account and region: the system makes the next one now,
                # not at the front's next start.
                await self._s.provision_default_key(key.account_id)
            return None
        if _expiry_due(key, now):
            key = await self._drop_material(key)
            self._emit(SystemEvent("DeleteKeyMaterial", key), sink)
        return key

    async def current(self, key: Key) -> Key | None:
        """``key`` as it is now (None once its deletion window has ended). The key's lock
        is taken only when something is due, so reads of a key with a future end date do
        not wait behind its changes."""
        now = self._s.clock()
        if not (_deletion_due(key, now) or _expiry_due(key, now)):
            return key
        return await self._settle(key)

    async def settled(self, key: Key, key_ref: str) -> Key:
        """``key``, settled. :raises KeyNotFound: if its deletion window has ended."""
        current = await self.current(key)
        if current is None:
            raise KeyNotFound(key_ref)
        return current

    async def run_lifecycle(self) -> list[SystemEvent]:
        """One sweep over every key: deletions and expiries that are due, then automatic
        rotations (Enabled keys whose last rotation is an interval old; a disabled key's
        rotation waits, as Alibaba's does)."""
        events: list[SystemEvent] = []
        now = self._s.clock()
        for key in await self._s._store.all_keys():
            try:
                await self._sweep_key(key, now, events)
            except KmsError as exc:
                # One key's backend being down (a token, an EKM) must not stop the sweep for
                # every key after it; this one is tried again at the next sweep.
                log.warning("lifecycle sweep skipped %s this time: %s", key.key_id, exc)
        return events

    async def _sweep_key(self, key: Key, now: datetime, events: list[SystemEvent]) -> None:
        """What is due on one key: its deletion or expiry, then its automatic rotation."""
        async with self._s.key_locks.hold(key.key_id):
            settled = await self._settle(key, events)
            if settled is None:
                return
            interval = settled.rotation_interval
            if interval is None or settled.state is not KeyState.ENABLED:
                return
            last = parse_time(settled.last_rotation or settled.created)
            if last + timedelta(seconds=interval) > now:
                return
            try:
                require_rotation(settled, Op.CREATE_KEY_VERSION, PrincipalKind.USER,
                                 addon=self._has_addon(settled))
            except UnsupportedOperation:
                return  # e.g. the account dropped the add-on: the policy waits.
            try:
                version = await self._rotate(settled, system_principal(settled.account_id))
            except LimitExceeded as exc:
                log.warning("automatic rotation of %s waits: %s", settled.key_id, exc)
                return
            self._emit(SystemEvent("CreateKeyVersion", settled, version.version_id), events)


def _deletion_due(key: Key, now: datetime) -> bool:
    return bool(key.state is KeyState.PENDING_DELETION and key.delete_date
                and parse_time(key.delete_date) <= now)


def _expiry_due(key: Key, now: datetime) -> bool:
    return bool(key.material_expire and parse_time(key.material_expire) <= now)


def next_rotation(key: Key) -> str | None:
    """When automatic rotation next makes a version (None when it is off)."""
    if key.rotation_interval is None:
        return None
    last = parse_time(key.last_rotation or key.created)
    return format_time(last + timedelta(seconds=key.rotation_interval))


def _backup_document(data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError:
        raise InvalidParameter("KeyBackup", "the backup document is malformed") from None
    if not isinstance(document, dict) or document.get("format") != _BACKUP_FORMAT:
        raise InvalidParameter("KeyBackup", f"not a {_BACKUP_FORMAT} document")
    return document

