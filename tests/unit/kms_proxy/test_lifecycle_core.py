"""The lifecycle core on real parts: automatic rotation, the deletion window, BYOK import and
material expiry, the default master key's "import only when first enabled", key backups,
and the sweep that carries out what time decides.

Everything is real (SQLite in tmp_path, the software backend, the HSM backend on a SoftHSM2
token, RSA-OAEP wrapping with ``cryptography``); only the clock belongs to the test, and it
moves time forward.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11e

from kms_proxy.api.actions import key_metadata
from kms_proxy.backends.base import KeyBackend
from kms_proxy.backends.hsm import HSMBackend
from kms_proxy.backends.software import SoftwareBackend
from kms_proxy.core.byok import key_check_value
from kms_proxy.core.errors import (
    AccessDenied,
    AliasNotFound,
    ConcurrentChange,
    DeletionProtected,
    ExpiredImportToken,
    InvalidCiphertext,
    InvalidKeyMaterial,
    InvalidParameter,
    KeyNotFound,
    KeyStateInvalid,
    LimitExceeded,
    Unsupported,
    UnsupportedOperation,
)
from kms_proxy.core.lifecycle import SystemEvent, format_time, next_rotation
from kms_proxy.core.model import (
    Instance,
    InstanceType,
    Key,
    KeyKind,
    KeySpec,
    KeyState,
    KeyStorageMechanism,
    Origin,
    Principal,
    PrincipalKind,
    ProtectionLevel,
)
from kms_proxy.core.service import KeyService, ServiceConfig
from kms_proxy.store.sqlite import SQLiteStore
from shared.pkcs11pool import DispatchMode, PKCS11Pool, SessionContext
from tests.conftest import HSMConfig

ACCOUNT = "1234567890123456"
REGION = "cn-hangzhou"
USER = Principal(ACCOUNT, "alice")
OSS = Principal(ACCOUNT, "oss", PrincipalKind.SERVICE, "oss")
SOFTWARE_INSTANCE = "kst-hzz-software"
HARDWARE_INSTANCE = "kst-hzz-hardware"
WRAP_LABEL = "kms-proxy.wrap"
INTERNAL = KeyStorageMechanism.HSM_INTERNAL
DATABASE = KeyStorageMechanism.HSM_ENCRYPTED_DATABASE
T0 = datetime(2025, 3, 1, 8, 0, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
DAY_S = 86_400
CONTEXT = {"purpose": "lifecycle-test", "a": "b"}


class Clock:
    """The only part the test controls: a UTC time that moves when told to."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class Env:
    service: KeyService
    store: SQLiteStore
    path: Path
    software: SoftwareBackend


class Build(Protocol):
    async def __call__(self, name: str = "kms.db", *, addon: bool = False,
                       imported_default: bool = False, hsm: HSMBackend | None = None,
                       root_key: bytes | None = None) -> Env: ...


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def root_key() -> bytes:
    return os.urandom(32)


@pytest.fixture
async def build(tmp_path: Path, clock: Clock, root_key: bytes) -> AsyncIterator[Build]:
    """A KeyService on its own SQLite file, with a software and a hardware instance."""
    stores: list[SQLiteStore] = []
    default_root = root_key

    async def make(name: str = "kms.db", *, addon: bool = False,
                   imported_default: bool = False, hsm: HSMBackend | None = None,
                   root_key: bytes | None = None) -> Env:
        path = tmp_path / name
        store = SQLiteStore(path)
        store.open()
        stores.append(store)
        software = SoftwareBackend(root_key or default_root)
        backends: dict[KeyKind, KeyBackend] = {
            kind: software for kind in (KeyKind.SOFTWARE, KeyKind.DEFAULT_MASTER,
                                        KeyKind.SERVICE)}
        if hsm is not None:
            backends[KeyKind.HARDWARE] = hsm
        service = KeyService(
            store=store, backends=backends, clock=clock,
            config=ServiceConfig(
                region=REGION, regions=(REGION,),
                default_instances={ACCOUNT: SOFTWARE_INSTANCE},
                rotation_addon=frozenset({ACCOUNT}) if addon else frozenset(),
                imported_default_keys=frozenset({ACCOUNT}) if imported_default
                else frozenset()))
        for instance_id, kind in ((SOFTWARE_INSTANCE, InstanceType.SOFTWARE),
                                  (HARDWARE_INSTANCE, InstanceType.HARDWARE)):
            await service.add_instance(Instance(
                instance_id=instance_id, account_id=ACCOUNT, region=REGION, type=kind,
                name=instance_id, spec_qps=1000, created="2025-01-01T00:00:00Z"))
        return Env(service, store, path, software)

    yield make
    for store in stores:
        store.close()




# -- helpers ------------------------------------------------------------------------------


async def create(service: KeyService, *, spec: KeySpec = KeySpec.AES_256,
                 origin: Origin = Origin.ALIYUN_KMS, instance: str = SOFTWARE_INSTANCE,
                 storage: KeyStorageMechanism | None = None,
                 tags: Mapping[str, str] | None = None) -> Key:
    return await service.create_key(USER, spec=spec, usage=None, origin=origin,
                                    instance_id=instance, description="lifecycle test",
                                    tags=tags or {}, storage=storage)


async def sweep(service: KeyService) -> list[tuple[str, str]]:
    """One sweep, as (action, key id) pairs."""
    return [(e.action, e.key.key_id) for e in await service.lifecycle.run_lifecycle()]


async def version_ids(service: KeyService, key_ref: str,
                      principal: Principal = USER) -> list[str]:
    listed = await service.lifecycle.list_key_versions(principal, key_ref, page_number=1,
                                                       page_size=100)
    assert listed.total == len(listed.items)
    return [v.version_id for v in listed.items]


def wrap(public_key_der: bytes, material: bytes) -> bytes:
    """What a BYOK client does with GetParametersForImport's public key."""
    public = serialization.load_der_public_key(public_key_der)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 2048
    return public.encrypt(material, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                                                 algorithm=hashes.SHA256(), label=None))


async def import_material(service: KeyService, key_ref: str, material: bytes, *,
                          expire_unix: int | None = None,
                          principal: Principal = USER) -> Key:
    params = await service.lifecycle.get_parameters_for_import(
        principal, key_ref, wrapping_spec="RSA_2048", algorithm="RSAES_OAEP_SHA_256")
    return await service.lifecycle.import_key_material(
        principal, key_ref, encrypted=wrap(params.public_key_der, material),
        token=params.token, expire_unix=expire_unix)


def unix(moment: datetime) -> int:
    return int(moment.timestamp())


def open_independently(material: bytes, blob: bytes, context: Mapping[str, str]) -> bytes:
    """Decrypt a blob with ``cryptography`` and the raw material (the documented layout:
    version id (36) || IV (12) || ciphertext || tag (16); AAD = the version id, then the
    canonical context JSON)."""
    sealed = blob[36:]
    aad = blob[:36] + json.dumps(dict(context), sort_keys=True,
                                 separators=(",", ":")).encode()
    return AESGCM(material).decrypt(sealed[:12], sealed[12:], aad)


def token_objects(**attrs: Any) -> Any:
    """A pool callable listing the token's objects matching ``attrs``."""
    def find(ctx: SessionContext) -> list[Any]:
        return list(ctx.session.get_objects({getattr(Attribute, k): v
                                             for k, v in attrs.items()}))
    return find


async def decrypts(service: KeyService, blob: bytes, principal: Principal = USER) -> bytes:
    return (await service.decrypt(principal, blob, CONTEXT)).plaintext


# -- 1. rotation --------------------------------------------------------------------------


async def test_automatic_rotation_of_a_software_key(build: Build, clock: Clock) -> None:
    service = (await build()).service
    key = await create(service)
    first = key.primary_version_id
    old_blob = (await service.encrypt(USER, key.key_id, b"before rotation", CONTEXT)).blob

    policy = await service.lifecycle.update_rotation_policy(USER, key.key_id, enabled=True,
                                                            interval=7 * DAY_S)
    assert policy.rotation_interval == 7 * DAY_S
    assert policy.last_rotation == key.created == format_time(T0)
    assert next_rotation(policy) == format_time(T0 + 7 * DAY)

    clock.advance(7 * DAY - SECOND)
    assert await sweep(service) == []
    assert await version_ids(service, key.key_id) == [first]

    clock.advance(2 * SECOND)  # 7 days + 1 s after the last rotation
    events = await service.lifecycle.run_lifecycle()
    assert [(e.action, e.key.key_id) for e in events] == [("CreateKeyVersion", key.key_id)]
    rotated = await service.describe_key(USER, key.key_id)
    assert events[0].version_id == rotated.primary_version_id != first
    assert await version_ids(service, key.key_id) == [first, rotated.primary_version_id]
    assert rotated.last_rotation == format_time(T0 + 7 * DAY + SECOND)
    assert next_rotation(rotated) == format_time(T0 + 14 * DAY + SECOND)
    assert rotated.rotation_interval == 7 * DAY_S

    # Old ciphertext still decrypts; new ciphertext is made by the new primary version.
    assert await decrypts(service, old_blob) == b"before rotation"
    new = await service.encrypt(USER, key.key_id, b"after rotation", CONTEXT)
    assert new.version_id == rotated.primary_version_id
    assert new.blob[:36] == rotated.primary_version_id.encode()
    assert await decrypts(service, new.blob) == b"after rotation"

    # Nothing is due again until another interval has passed.
    assert await sweep(service) == []
    clock.advance(7 * DAY - SECOND)
    assert await sweep(service) == []
    clock.advance(SECOND)
    assert await sweep(service) == [("CreateKeyVersion", key.key_id)]
    assert len(await version_ids(service, key.key_id)) == 3
    assert await decrypts(service, old_blob) == b"before rotation"


async def test_software_rotation_policy_bounds_and_refusals(build: Build) -> None:
    service = (await build()).service
    key = await create(service)
    for interval in (7 * DAY_S - 1, 365 * DAY_S + 1):
        with pytest.raises(InvalidParameter, match="RotationInterval"):
            await service.lifecycle.update_rotation_policy(USER, key.key_id, enabled=True,
                                                           interval=interval)
    off = await service.lifecycle.update_rotation_policy(USER, key.key_id, enabled=False,
                                                         interval=None)
    assert off.rotation_interval is None
    assert next_rotation(off) is None
    # Asymmetric keys and keys with imported material never rotate.
    signing = await create(service, spec=KeySpec.EC_P256)
    byok = await create(service, origin=Origin.EXTERNAL)
    for refused, reason in ((signing, "asymmetric"), (byok, "imported material")):
        with pytest.raises(UnsupportedOperation, match=reason):
            await service.lifecycle.create_key_version(USER, refused.key_id)
        with pytest.raises(UnsupportedOperation, match=reason):
            await service.lifecycle.update_rotation_policy(USER, refused.key_id,
                                                           enabled=True, interval=7 * DAY_S)


async def test_a_disabled_key_waits_and_rotates_once_enabled_and_due(
        build: Build, clock: Clock) -> None:
    service = (await build()).service
    key = await create(service)
    waiting = await create(service)
    blob = (await service.encrypt(USER, key.key_id, b"kept", CONTEXT)).blob
    for k in (key, waiting):
        await service.lifecycle.update_rotation_policy(USER, k.key_id, enabled=True,
                                                       interval=30 * DAY_S)
        await service.set_enabled(USER, k.key_id, False)
    disabled = await service.describe_key(USER, key.key_id)
    assert key_metadata(disabled)["AutomaticRotation"] == "Suspended"

    clock.advance(90 * DAY)
    assert await sweep(service) == []
    assert len(await version_ids(service, key.key_id)) == 1

    enabled = await service.set_enabled(USER, key.key_id, True)
    assert key_metadata(enabled)["AutomaticRotation"] == "Enabled"
    # One version for the overdue policy, not one per missed interval; the other key,
    # still disabled, keeps waiting.
    assert await sweep(service) == [("CreateKeyVersion", key.key_id)]
    assert await sweep(service) == []
    assert len(await version_ids(service, key.key_id)) == 2
    assert len(await version_ids(service, waiting.key_id)) == 1
    assert (await service.describe_key(USER, key.key_id)).last_rotation == format_time(
        T0 + 90 * DAY)
    assert await decrypts(service, blob) == b"kept"

    # Rotation on the enabled key waits for its next interval from the rotation.
    clock.advance(30 * DAY - SECOND)
    assert await sweep(service) == []
    clock.advance(SECOND)
    assert await sweep(service) == [("CreateKeyVersion", key.key_id)]


async def test_default_master_key_rotates_yearly_with_the_addon(
        build: Build, clock: Clock) -> None:
    service = (await build(addon=True)).service
    default = await service.provision_default_key(ACCOUNT)
    assert default.kind is KeyKind.DEFAULT_MASTER
    old = await service.encrypt(OSS, default.key_id, b"server-side", CONTEXT)

    # The default key rotates every 365 days, no other interval.
    with pytest.raises(InvalidParameter, match="RotationInterval"):
        await service.lifecycle.update_rotation_policy(USER, default.key_id, enabled=True,
                                                       interval=30 * DAY_S)
    policy = await service.lifecycle.update_rotation_policy(USER, default.key_id,
                                                            enabled=True, interval=None)
    assert policy.rotation_interval == 365 * DAY_S

    clock.advance(365 * DAY - SECOND)
    assert await sweep(service) == []
    clock.advance(2 * SECOND)
    events = await service.lifecycle.run_lifecycle()
    assert [(e.action, e.key.key_id) for e in events] == [("CreateKeyVersion",
                                                           default.key_id)]
    versions = await version_ids(service, default.key_id)
    assert versions == [default.primary_version_id, events[0].version_id]
    rotated = await service.describe_key(USER, default.key_id)
    assert rotated.primary_version_id == events[0].version_id
    assert rotated.last_rotation == format_time(T0 + 365 * DAY + SECOND)

    assert await decrypts(service, old.blob, OSS) == b"server-side"
    new = await service.encrypt(OSS, default.key_id, b"after", CONTEXT)
    assert new.version_id == events[0].version_id
    assert await decrypts(service, new.blob, OSS) == b"after"
    assert await sweep(service) == []


async def test_default_master_key_rotation_needs_the_addon(build: Build,
                                                           clock: Clock) -> None:
    service = (await build()).service
    default = await service.provision_default_key(ACCOUNT)
    with pytest.raises(UnsupportedOperation, match="add-on"):
        await service.lifecycle.update_rotation_policy(USER, default.key_id, enabled=True,
                                                       interval=None)
    with pytest.raises(UnsupportedOperation, match="add-on"):
        await service.lifecycle.create_key_version(USER, default.key_id)
    clock.advance(800 * DAY)
    assert await sweep(service) == []
    assert await version_ids(service, default.key_id) == [default.primary_version_id]


async def test_a_deleted_default_master_key_is_replaced_when_its_window_ends(
        build: Build, clock: Clock) -> None:
    """Exactly one per account and region: the system makes the next default master key
    as soon as the last one is deleted (it used to wait for the front's next start), and
    the audit hook hears both."""
    service = (await build()).service
    old = await service.provision_default_key(ACCOUNT)
    heard: list[tuple[str, str]] = []
    service.lifecycle.on_event = lambda e: heard.append((e.action, e.key.key_id))
    await service.lifecycle.schedule_key_deletion(USER, old.key_id, 7)
    clock.advance(7 * DAY)
    assert await sweep(service) == [("DeleteKey", old.key_id)]
    [new] = [k for k in await service._store.list_keys(ACCOUNT, REGION)
             if k.kind is KeyKind.DEFAULT_MASTER]
    assert new.key_id != old.key_id and new.state is KeyState.ENABLED
    assert heard == [("DeleteKey", old.key_id), ("CreateKey", new.key_id)]
    assert await decrypts(service, (await service.encrypt(OSS, new.key_id, b"sse",
                                                          CONTEXT)).blob, OSS) == b"sse"
    assert (await service.provision_default_key(ACCOUNT)).key_id == new.key_id


async def test_a_policy_outlives_the_addon_but_can_be_turned_off(build: Build) -> None:
    """An account that loses the add-on keeps a policy the sweep skips; turning it off
    must still work (it was refused as needing the add-on)."""
    with_addon = (await build(addon=True)).service
    default = await with_addon.provision_default_key(ACCOUNT)
    await with_addon.lifecycle.update_rotation_policy(USER, default.key_id, enabled=True,
                                                      interval=None)
    without = (await build(addon=False)).service  # The same database, the add-on gone.
    off = await without.lifecycle.update_rotation_policy(USER, default.key_id,
                                                         enabled=False, interval=None)
    assert off.rotation_interval is None
    with pytest.raises(UnsupportedOperation, match="add-on"):
        await without.lifecycle.update_rotation_policy(USER, default.key_id, enabled=True,
                                                       interval=None)
    # With no policy to remove, the full rule still applies.
    with pytest.raises(UnsupportedOperation, match="add-on"):
        await without.lifecycle.update_rotation_policy(USER, default.key_id,
                                                       enabled=False, interval=None)


async def test_concurrent_creates_cannot_pass_the_key_quota_together(build: Build) -> None:
    """The check and the insert are one step per instance: five CreateKeys at once against
    four places. EC keys, because their generation yields to the loop (a thread), which is
    when the others could pass the check."""
    service = (await build()).service
    await service.add_instance(Instance(
        instance_id=SOFTWARE_INSTANCE, account_id=ACCOUNT, region=REGION,
        type=InstanceType.SOFTWARE, name="small", spec_qps=1000,
        created="2025-01-01T00:00:00Z", key_quota=4))
    made = await asyncio.gather(*(create(service, spec=KeySpec.EC_P256) for _ in range(5)),
                                return_exceptions=True)
    assert sorted(type(r).__name__ for r in made) == ["Key"] * 4 + ["LimitExceeded"]
    assert (await service.get_kms_instance(USER, SOFTWARE_INSTANCE)).versions_used == 4


async def test_an_instances_key_quota_counts_key_versions(build: Build,
                                                          clock: Clock) -> None:
    """Reference section 9: an instance holds 1000 keys by default, counted in key versions.
    CreateKey, CreateKeyVersion and RestoreKeyBackup stop at it; automatic rotation waits
    without stopping the sweep; deleting a key makes room."""
    env = await build()
    service = env.service
    await service.add_instance(Instance(
        instance_id=SOFTWARE_INSTANCE, account_id=ACCOUNT, region=REGION,
        type=InstanceType.SOFTWARE, name="small", spec_qps=1000,
        created="2025-01-01T00:00:00Z", key_quota=4))
    keys = [await create(service) for _ in range(4)]
    with pytest.raises(LimitExceeded, match="4 of 4 key versions"):
        await create(service)
    with pytest.raises(LimitExceeded):
        await service.lifecycle.create_key_version(USER, keys[0].key_id)
    # A key that exists is refused as existing, not for the full instance.
    _, own = await service.lifecycle.backup_key(USER, keys[0].key_id)
    with pytest.raises(InvalidParameter, match="exists"):
        await service.lifecycle.restore_key_backup(USER, own)
    _, backup = await service.lifecycle.backup_key(USER, keys[1].key_id)
    await service.lifecycle.update_rotation_policy(USER, keys[2].key_id, enabled=True,
                                                   interval=7 * DAY_S)
    clock.advance(8 * DAY)
    assert await sweep(service) == []  # The rotation waits; the sweep goes on.
    view = await service.get_kms_instance(USER, SOFTWARE_INSTANCE)
    assert (view.versions_used, view.instance.key_quota) == (4, 4)

    await service.lifecycle.schedule_key_deletion(USER, keys[1].key_id, 7)
    clock.advance(7 * DAY)
    # (Whether the rotation comes in the deleting sweep depends on the order of the keys.)
    done = await sweep(service) + await sweep(service)
    assert sorted(done) == sorted([("DeleteKey", keys[1].key_id),
                                   ("CreateKeyVersion", keys[2].key_id)])
    # The freed place went to the waiting rotation, so the backup cannot come back.
    assert (await service.get_kms_instance(USER, SOFTWARE_INSTANCE)).versions_used == 4
    with pytest.raises(LimitExceeded):
        await service.lifecycle.restore_key_backup(USER, backup)


async def test_hardware_rotation_only_symmetric_in_the_encrypted_database(
        build: Build, clock: Clock, hsm: HSMBackend) -> None:
    service = (await build(hsm=hsm)).service
    db_key = await create(service, instance=HARDWARE_INSTANCE, storage=DATABASE)
    assert db_key.protection_level is ProtectionLevel.HSM
    blob1 = (await service.encrypt(USER, db_key.key_id, b"one", CONTEXT)).blob

    second = await service.lifecycle.create_key_version(USER, db_key.key_id)
    assert second.material.startswith(b"wrapped.v2:")
    assert (await service.describe_key(USER, db_key.key_id)).primary_version_id == \
        second.version_id
    blob2 = (await service.encrypt(USER, db_key.key_id, b"two", CONTEXT)).blob
    assert blob2[:36] == second.version_id.encode()
    assert await decrypts(service, blob1) == b"one"
    assert await decrypts(service, blob2) == b"two"

    # Automatic rotation of the same key, by the sweep.
    await service.lifecycle.update_rotation_policy(USER, db_key.key_id, enabled=True,
                                                   interval=7 * DAY_S)
    clock.advance(7 * DAY + SECOND)
    assert await sweep(service) == [("CreateKeyVersion", db_key.key_id)]
    assert len(await version_ids(service, db_key.key_id)) == 3
    blob3 = (await service.encrypt(USER, db_key.key_id, b"three", CONTEXT)).blob
    for blob, plaintext in ((blob1, b"one"), (blob2, b"two"), (blob3, b"three")):
        assert await decrypts(service, blob) == plaintext

    internal = await create(service, instance=HARDWARE_INSTANCE, storage=INTERNAL)
    with pytest.raises(UnsupportedOperation, match="HsmEncryptedDatabase"):
        await service.lifecycle.create_key_version(USER, internal.key_id)
    with pytest.raises(UnsupportedOperation, match="HsmEncryptedDatabase"):
        await service.lifecycle.update_rotation_policy(USER, internal.key_id, enabled=True,
                                                       interval=7 * DAY_S)
    signing = await create(service, spec=KeySpec.EC_P256, instance=HARDWARE_INSTANCE,
                           storage=DATABASE)
    rsa_key = await create(service, spec=KeySpec.RSA_2048, instance=HARDWARE_INSTANCE,
                           storage=INTERNAL)
    for refused in (signing, rsa_key):
        with pytest.raises(UnsupportedOperation, match="asymmetric"):
            await service.lifecycle.create_key_version(USER, refused.key_id)
        with pytest.raises(UnsupportedOperation, match="asymmetric"):
            await service.lifecycle.update_rotation_policy(USER, refused.key_id,
                                                           enabled=True, interval=7 * DAY_S)
        assert len(await version_ids(service, refused.key_id)) == 1
    assert len(await version_ids(service, internal.key_id)) == 1


# -- 2. deletion window -------------------------------------------------------------------


async def test_the_sweep_deletes_a_key_when_its_window_ends(build: Build,
                                                            clock: Clock) -> None:
    env = await build()
    service, store = env.service, env.store
    key = await create(service, tags={"team": "blue"})
    survivor = await create(service)
    await service.create_alias(USER, "alias/doomed", key.key_id)
    await service.create_alias(USER, "alias/doomed-too", key.key_id)
    await service.create_alias(USER, "alias/survivor", survivor.key_id)
    blob = (await service.encrypt(USER, "alias/doomed", b"soon gone", CONTEXT)).blob

    with pytest.raises(InvalidParameter, match="PendingWindowInDays"):
        await service.lifecycle.schedule_key_deletion(USER, key.key_id, 6)
    with pytest.raises(InvalidParameter, match="PendingWindowInDays"):
        await service.lifecycle.schedule_key_deletion(USER, key.key_id, 367)
    pending = await service.lifecycle.schedule_key_deletion(USER, key.key_id, 7)
    assert pending.state is KeyState.PENDING_DELETION
    assert pending.delete_date == format_time(T0 + 7 * DAY)
    with pytest.raises(KeyStateInvalid) as refused:
        await service.decrypt(USER, blob, CONTEXT)
    assert refused.value.code == "Rejected.PendingDeletion"

    clock.advance(7 * DAY - SECOND)
    assert await sweep(service) == []
    assert (await service.describe_key(USER, key.key_id)).state is KeyState.PENDING_DELETION

    clock.advance(SECOND)
    events = await service.lifecycle.run_lifecycle()
    assert events == [SystemEvent("DeleteKey", pending)]
    with pytest.raises(KeyNotFound):
        await service.resolve(USER, key.key_id)
    with pytest.raises(AliasNotFound):
        await service.resolve(USER, "alias/doomed")
    assert await store.get_key(key.key_id) is None
    assert await store.list_versions(key.key_id) == []
    assert await store.get_version(key.primary_version_id) is None
    assert await store.get_alias(ACCOUNT, REGION, "alias/doomed") is None
    assert await store.list_aliases(ACCOUNT, REGION, key.key_id) == []
    assert [a.name for a in await store.list_aliases(ACCOUNT, REGION)] == ["alias/survivor"]
    assert await store.get_tags(key.key_id) == {}
    with pytest.raises(InvalidCiphertext):
        await service.decrypt(USER, blob, CONTEXT)

    assert (await service.resolve(USER, "alias/survivor")).state is KeyState.ENABLED
    assert await sweep(service) == []


async def test_a_window_that_ended_settles_without_the_sweep(build: Build,
                                                             clock: Clock) -> None:
    env = await build()
    service, store = env.service, env.store
    by_resolve = await create(service)
    by_decrypt = await create(service)
    await service.create_alias(USER, "alias/lazy", by_resolve.key_id)
    blob = (await service.encrypt(USER, by_decrypt.key_id, b"x", CONTEXT)).blob
    for key in (by_resolve, by_decrypt):
        await service.lifecycle.schedule_key_deletion(USER, key.key_id, 7)
    clock.advance(7 * DAY)

    with pytest.raises(KeyNotFound):
        await service.resolve(USER, "alias/lazy")
    assert await store.get_key(by_resolve.key_id) is None
    assert await store.get_alias(ACCOUNT, REGION, "alias/lazy") is None
    with pytest.raises(KeyNotFound):
        await service.resolve(USER, by_resolve.key_id)

    with pytest.raises(InvalidCiphertext):
        await service.decrypt(USER, blob, CONTEXT)
    assert await store.get_key(by_decrypt.key_id) is None
    with pytest.raises(KeyNotFound):
        await service.lifecycle.cancel_key_deletion(USER, by_decrypt.key_id)
    # Nothing is left for the sweep.
    assert await sweep(service) == []


async def test_list_keys_never_shows_a_key_whose_window_ended(build: Build,
                                                             clock: Clock) -> None:
    service = (await build()).service
    doomed, kept = await create(service), await create(service)
    await service.lifecycle.schedule_key_deletion(USER, doomed.key_id, 7)
    listed = await service.list_keys(USER, filters=[], page_number=1, page_size=100)
    assert {k.key_id for k in listed.items} >= {doomed.key_id, kept.key_id}
    clock.advance(7 * DAY)
    listed = await service.list_keys(USER, filters=[], page_number=1, page_size=100)
    ids = {k.key_id for k in listed.items}
    assert kept.key_id in ids and doomed.key_id not in ids
    assert listed.total == len(ids)


async def test_deleting_hsm_internal_keys_removes_their_token_objects(
        build: Build, clock: Clock, pool: PKCS11Pool, hsm: HSMBackend) -> None:
    service = (await build(hsm=hsm)).service
    aes = await create(service, instance=HARDWARE_INSTANCE, storage=INTERNAL)
    pair = await create(service, spec=KeySpec.EC_P256, instance=HARDWARE_INSTANCE,
                        storage=INTERNAL)
    assert len(await pool.run(token_objects(LABEL=aes.primary_version_id))) == 1
    assert len(await pool.run(token_objects(LABEL=pair.primary_version_id))) == 2
    blob = (await service.encrypt(USER, aes.key_id, b"in the token", CONTEXT)).blob
    assert await decrypts(service, blob) == b"in the token"

    for key in (aes, pair):
        await service.lifecycle.schedule_key_deletion(USER, key.key_id, 7)
    clock.advance(7 * DAY)
    assert sorted(await sweep(service)) == sorted([("DeleteKey", aes.key_id),
                                                   ("DeleteKey", pair.key_id)])
    assert await pool.run(token_objects(LABEL=aes.primary_version_id)) == []
    assert await pool.run(token_objects(LABEL=pair.primary_version_id)) == []
    # The wrapping key is untouched.
    assert len(await pool.run(token_objects(LABEL=WRAP_LABEL))) == 1
    with pytest.raises(InvalidCiphertext):
        await service.decrypt(USER, blob, CONTEXT)
    with pytest.raises(KeyNotFound):
        await service.resolve(USER, aes.key_id)


async def test_cancel_within_the_window_keeps_the_key(build: Build, clock: Clock) -> None:
    service = (await build()).service
    key = await create(service)
    blob = (await service.encrypt(USER, key.key_id, b"saved", CONTEXT)).blob
    await service.lifecycle.schedule_key_deletion(USER, key.key_id, 7)
    clock.advance(7 * DAY - SECOND)
    kept = await service.lifecycle.cancel_key_deletion(USER, key.key_id)
    assert kept.state is KeyState.ENABLED
    assert kept.delete_date is None
    clock.advance(30 * DAY)
    assert await sweep(service) == []
    assert (await service.describe_key(USER, key.key_id)).state is KeyState.ENABLED
    assert await decrypts(service, blob) == b"saved"
    with pytest.raises(KeyStateInvalid):
        await service.lifecycle.cancel_key_deletion(USER, key.key_id)

    # A key without material goes back to waiting for it.
    byok = await create(service, origin=Origin.EXTERNAL)
    await service.lifecycle.schedule_key_deletion(USER, byok.key_id, 7)
    back = await service.lifecycle.cancel_key_deletion(USER, byok.key_id)
    assert back.state is KeyState.PENDING_IMPORT

    # Deletion protection refuses the schedule altogether.
    await service.lifecycle.set_deletion_protection(USER, key.key_id, enabled=True,
                                                    description="keep")
    with pytest.raises(DeletionProtected):
        await service.lifecycle.schedule_key_deletion(USER, key.key_id, 7)


# -- 3. BYOK ------------------------------------------------------------------------------


async def test_software_byok_material_expiry_and_reimport(build: Build, clock: Clock) -> None:
    env = await build()
    service, store = env.service, env.store
    key = await create(service, origin=Origin.EXTERNAL)
    assert (key.state, key.origin) == (KeyState.PENDING_IMPORT, Origin.EXTERNAL)
    with pytest.raises(KeyStateInvalid) as waiting:
        await service.encrypt(USER, key.key_id, b"x", CONTEXT)
    assert waiting.value.code == "Rejected.PendingImport"

    material = os.urandom(32)
    imported = await import_material(service, key.key_id, material,
                                     expire_unix=unix(clock() + HOUR))
    assert imported.state is KeyState.ENABLED
    assert imported.material_expire == format_time(T0 + HOUR)
    assert imported.material_check == key_check_value(material)
    blob = (await service.encrypt(USER, key.key_id, b"imported", CONTEXT)).blob
    assert open_independently(material, blob, CONTEXT) == b"imported"
    assert await decrypts(service, blob) == b"imported"

    # The expiry, carried out by the sweep.
    clock.advance(HOUR - SECOND)
    assert await sweep(service) == []
    clock.advance(SECOND)
    events = await service.lifecycle.run_lifecycle()
    assert [(e.action, e.key.key_id) for e in events] == [("DeleteKeyMaterial", key.key_id)]
    assert events[0].key.state is KeyState.PENDING_IMPORT
    expired = await service.describe_key(USER, key.key_id)
    assert expired.state is KeyState.PENDING_IMPORT
    assert expired.material_expire is None
    assert (await store.get_version(key.primary_version_id)) is not None
    assert (await store.list_versions(key.key_id))[0].material == b""
    with pytest.raises(KeyStateInvalid):
        await service.decrypt(USER, blob, CONTEXT)

    # Only the same material goes back in, with a fresh token.
    with pytest.raises(InvalidKeyMaterial):
        await import_material(service, key.key_id, os.urandom(32))
    with pytest.raises(InvalidKeyMaterial):
        await import_material(service, key.key_id, material[:16])
    again = await import_material(service, key.key_id, material,
                                  expire_unix=unix(clock() + HOUR))
    assert again.state is KeyState.ENABLED
    assert await decrypts(service, blob) == b"imported"

    # The second expiry settles lazily: no sweep, the next resolve sees PendingImport.
    clock.advance(HOUR)
    assert (await service.resolve(USER, key.key_id)).state is KeyState.PENDING_IMPORT
    with pytest.raises(KeyStateInvalid):
        await service.encrypt(USER, key.key_id, b"x", CONTEXT)
    assert await sweep(service) == []

    # An expiry must lie in the future.
    with pytest.raises(InvalidParameter, match="KeyMaterialExpireUnix"):
        await import_material(service, key.key_id, material, expire_unix=unix(clock()))
    # DeleteKeyMaterial by hand, after a permanent import.
    await import_material(service, key.key_id, material)
    deleted = await service.lifecycle.delete_key_material(USER, key.key_id)
    assert deleted.state is KeyState.PENDING_IMPORT


async def test_an_import_token_lives_24_hours(build: Build, clock: Clock) -> None:
    service = (await build()).service
    key = await create(service, origin=Origin.EXTERNAL)
    material = os.urandom(32)
    early, late = [await service.lifecycle.get_parameters_for_import(
        USER, key.key_id, wrapping_spec="RSA_2048", algorithm="RSAES_OAEP_SHA_256")
        for _ in range(2)]
    assert early.expires == late.expires == T0 + 24 * HOUR
    assert early.public_key_der != late.public_key_der

    clock.advance(24 * HOUR - SECOND)
    done = await service.lifecycle.import_key_material(
        USER, key.key_id, encrypted=wrap(early.public_key_der, material), token=early.token,
        expire_unix=None)
    assert done.state is KeyState.ENABLED

    clock.advance(2 * SECOND)
    with pytest.raises(ExpiredImportToken):
        await service.lifecycle.import_key_material(
            USER, key.key_id, encrypted=wrap(late.public_key_der, material),
            token=late.token, expire_unix=None)

    # With the material gone, an expired token still fails and a fresh one works.
    await service.lifecycle.delete_key_material(USER, key.key_id)
    with pytest.raises(ExpiredImportToken):
        await service.lifecycle.import_key_material(
            USER, key.key_id, encrypted=wrap(late.public_key_der, material),
            token=late.token, expire_unix=None)
    assert (await service.describe_key(USER, key.key_id)).state is KeyState.PENDING_IMPORT
    assert (await import_material(service, key.key_id, material)).state is KeyState.ENABLED


async def test_hardware_byok_in_the_token(build: Build, clock: Clock, pool: PKCS11Pool,
                                          hsm: HSMBackend) -> None:
    env = await build(hsm=hsm)
    service = env.service
    key = await create(service, origin=Origin.EXTERNAL, instance=HARDWARE_INSTANCE)
    assert key.storage_mechanism is INTERNAL
    assert key.state is KeyState.PENDING_IMPORT
    label = key.primary_version_id
    assert await pool.run(token_objects(LABEL=label)) == []

    material = os.urandom(32)
    imported = await import_material(service, key.key_id, material,
                                     expire_unix=unix(clock() + HOUR))
    assert imported.state is KeyState.ENABLED
    assert (await env.store.get_version(label)) is not None
    assert (await env.store.list_versions(key.key_id))[0].material == \
        b"internal:" + label.encode()

    def inspect(ctx: SessionContext) -> dict[str, Any]:
        found = list(ctx.session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                              Attribute.LABEL: label}))
        assert len(found) == 1
        obj = found[0]
        facts = {a.name: obj[a] for a in (Attribute.TOKEN, Attribute.SENSITIVE,
                                          Attribute.EXTRACTABLE, Attribute.PRIVATE)}
        try:
            obj[Attribute.VALUE]
        except p11e.AttributeSensitive:
            facts["VALUE"] = "refused"
        else:
            facts["VALUE"] = "readable"
        return facts

    assert await pool.run(inspect) == {"TOKEN": True, "SENSITIVE": True,
                                       "EXTRACTABLE": False, "PRIVATE": True,
                                       "VALUE": "refused"}
    blob = (await service.encrypt(USER, key.key_id, b"hardware byok", CONTEXT)).blob
    # The token holds exactly the imported material.
    assert open_independently(material, blob, CONTEXT) == b"hardware byok"
    assert await decrypts(service, blob) == b"hardware byok"

    # Expiry removes the token object; the same material comes back into the token.
    clock.advance(HOUR)
    assert await sweep(service) == [("DeleteKeyMaterial", key.key_id)]
    assert await pool.run(token_objects(LABEL=label)) == []
    again = await import_material(service, key.key_id, material)
    assert again.state is KeyState.ENABLED
    assert len(await pool.run(token_objects(LABEL=label))) == 1
    assert await decrypts(service, blob) == b"hardware byok"


CHANGES_DURING_AN_IMPORT: dict[str, tuple[Any, Any]] = {
    "ScheduleKeyDeletion": (
        lambda s, k: s.lifecycle.schedule_key_deletion(USER, k, 7),
        lambda key: key.state is KeyState.PENDING_DELETION and key.delete_date is not None),
    "SetDeletionProtection": (
        lambda s, k: s.lifecycle.set_deletion_protection(USER, k, enabled=True,
                                                         description="keep"),
        lambda key: key.deletion_protection and key.deletion_protection_description == "keep"),
    "UpdateKeyDescription": (
        lambda s, k: s.update_key_description(USER, k, "changed meanwhile"),
        lambda key: key.description == "changed meanwhile"),
    "DisableKey": (
        lambda s, k: s.set_enabled(USER, k, False),
        lambda key: key.state is KeyState.DISABLED),
}


@pytest.mark.parametrize("change", sorted(CHANGES_DURING_AN_IMPORT))
async def test_a_change_made_while_material_is_unwrapped_is_kept(build: Build,
                                                                change: str) -> None:
    """The import unwraps in a worker thread; a change that arrives meanwhile waits for the
    key's lock and applies to the imported key, instead of being saved over."""
    service = (await build()).service
    key = await create(service, origin=Origin.EXTERNAL)
    material = os.urandom(32)
    if change == "DisableKey":  # Only an Enabled key can be disabled: a re-import.
        await import_material(service, key.key_id, material)
        await service.lifecycle.delete_key_material(USER, key.key_id)
        await import_material(service, key.key_id, material)
    params = await service.lifecycle.get_parameters_for_import(
        USER, key.key_id, wrapping_spec="RSA_2048", algorithm="RSAES_OAEP_SHA_256")
    act, kept = CHANGES_DURING_AN_IMPORT[change]
    # gather starts the import first; it runs until the unwrap's thread hop, and the
    # change runs there.
    imported, changed = await asyncio.gather(
        service.lifecycle.import_key_material(
            USER, key.key_id, encrypted=wrap(params.public_key_der, material),
            token=params.token, expire_unix=None),
        act(service, key.key_id))
    assert imported.material_check == key_check_value(material)
    assert kept(changed)
    for now in (await service.describe_key(USER, key.key_id),
                await build_fresh_read(service, key.key_id)):
        assert kept(now), change
        assert now.material_check == key_check_value(material)


async def build_fresh_read(service: KeyService, key_id: str) -> Key:
    """The key as the store holds it (not the service's cache)."""
    stored = await service._store.get_key(key_id)
    assert stored is not None
    return stored


async def test_a_change_during_a_sweep_rotation_is_kept(build: Build, clock: Clock,
                                                       hsm_config: HSMConfig) -> None:
    """The sweep rotates under the key's lock: with the token in worker threads the new
    version is made off the event loop, and a ScheduleKeyDeletion that arrives then waits
    and applies to the rotated key (without the lock the rotation's save would be stale)."""
    threads = dataclasses.replace(hsm_config, mode=DispatchMode.THREADS)
    async with PKCS11Pool(threads.pool()) as pool:
        hsm = HSMBackend(pool, wrapping_key_label="kms-proxy.wrap")
        assert await hsm.ensure_token_keys()
        service = (await build(hsm=hsm)).service
        key = await create(service, instance=HARDWARE_INSTANCE, storage=DATABASE)
        await service.lifecycle.update_rotation_policy(USER, key.key_id, enabled=True,
                                                       interval=7 * DAY_S)
        clock.advance(7 * DAY + SECOND)
        events, scheduled = await asyncio.gather(
            service.lifecycle.run_lifecycle(),
            service.lifecycle.schedule_key_deletion(USER, key.key_id, 7))
        assert [e.action for e in events] == ["CreateKeyVersion"]
        now = await service.describe_key(USER, key.key_id)
        assert now.state is KeyState.PENDING_DELETION == scheduled.state
        assert now.primary_version_id == events[0].version_id != key.primary_version_id


async def test_reads_of_a_key_with_a_future_end_date_do_not_wait_for_its_lock(
        build: Build, clock: Clock) -> None:
    service = (await build()).service
    key = await create(service, origin=Origin.EXTERNAL)
    await import_material(service, key.key_id, os.urandom(32),
                          expire_unix=unix(clock() + HOUR))
    held, release = asyncio.Event(), asyncio.Event()

    async def change() -> None:
        async with service.key_locks.hold(key.key_id):
            held.set()
            await release.wait()

    holder = asyncio.create_task(change())
    await held.wait()
    try:
        sealed = await asyncio.wait_for(service.encrypt(USER, key.key_id, b"r", CONTEXT), 5)
        assert await asyncio.wait_for(decrypts(service, sealed.blob), 5) == b"r"
    finally:
        release.set()
        await holder
    # Once the expiry is due, the read settles it under the lock.
    clock.advance(HOUR)
    with pytest.raises(KeyStateInvalid):
        await service.encrypt(USER, key.key_id, b"r", CONTEXT)


async def test_a_save_built_on_a_stale_read_is_refused(build: Build) -> None:
    """The safety net under the locks: a save names the revision it read."""
    service = (await build()).service
    key = await create(service)
    first = await service._save(dataclasses.replace(key, description="first"))
    assert first.revision == key.revision + 1
    with pytest.raises(ConcurrentChange):
        await service._save(dataclasses.replace(key, description="stale"))
    assert (await service.describe_key(USER, key.key_id)).description == "first"
    assert (await build_fresh_read(service, key.key_id)).description == "first"


async def test_concurrent_imports_make_one_token_object(build: Build, pool: PKCS11Pool,
                                                       hsm: HSMBackend) -> None:
    service = (await build(hsm=hsm)).service
    key = await create(service, origin=Origin.EXTERNAL, instance=HARDWARE_INSTANCE)
    material = os.urandom(32)
    first, second = await asyncio.gather(import_material(service, key.key_id, material),
                                         import_material(service, key.key_id, material))
    assert first.state is second.state is KeyState.ENABLED
    assert len(await pool.run(token_objects(LABEL=key.primary_version_id))) == 1
    blob = (await service.encrypt(USER, key.key_id, b"once", CONTEXT)).blob
    assert open_independently(material, blob, CONTEXT) == b"once"


async def test_keys_sharing_material_cannot_read_each_others_blobs(
        build: Build, hsm: HSMBackend) -> None:
    """The blob's head (the key version id) is not secret and not encrypted: swapping it
    must not let another key holding the same material decrypt (the AAD binds it)."""
    service = (await build(hsm=hsm)).service
    material = os.urandom(32)
    keys = [await create(service, origin=Origin.EXTERNAL),
            await create(service, origin=Origin.EXTERNAL),
            await create(service, origin=Origin.EXTERNAL, instance=HARDWARE_INSTANCE),
            await create(service, origin=Origin.EXTERNAL, instance=HARDWARE_INSTANCE,
                         storage=DATABASE)]
    for key in keys:
        await import_material(service, key.key_id, material)
    for source in keys:
        blob = (await service.encrypt(USER, source.key_id, b"only mine", CONTEXT)).blob
        assert blob[:36] == source.primary_version_id.encode()
        assert await decrypts(service, blob) == b"only mine"
        for other in keys:
            if other is not source:
                swapped = other.primary_version_id.encode() + blob[36:]
                with pytest.raises(InvalidCiphertext):
                    await service.decrypt(USER, swapped, CONTEXT)
    # Still refused once the source key is disabled: the swap is no way around that.
    blob = (await service.encrypt(USER, keys[0].key_id, b"x", CONTEXT)).blob
    await service.set_enabled(USER, keys[0].key_id, False)
    with pytest.raises(KeyStateInvalid):
        await service.decrypt(USER, blob, CONTEXT)
    with pytest.raises(InvalidCiphertext):
        await service.decrypt(USER, keys[1].primary_version_id.encode() + blob[36:], CONTEXT)


async def test_hardware_byok_in_the_encrypted_database(build: Build, pool: PKCS11Pool,
                                                       hsm: HSMBackend) -> None:
    env = await build(hsm=hsm)
    service = env.service
    key = await create(service, spec=KeySpec.AES_128, origin=Origin.EXTERNAL,
                       instance=HARDWARE_INSTANCE, storage=DATABASE)
    material = os.urandom(16)
    with pytest.raises(InvalidKeyMaterial):
        await import_material(service, key.key_id, os.urandom(32))
    imported = await import_material(service, key.key_id, material)
    assert imported.state is KeyState.ENABLED
    stored = (await env.store.list_versions(key.key_id))[0].material
    assert stored.startswith(b"wrapped.v2:")
    # The binding tag, then RFC 5649: the key and one block.
    assert len(stored) == len(b"wrapped.v2:") + 32 + 16 + 8
    assert material not in stored
    assert await pool.run(token_objects(LABEL=key.primary_version_id)) == []

    blob = (await service.encrypt(USER, key.key_id, b"wrapped byok", CONTEXT)).blob
    assert open_independently(material, blob, CONTEXT) == b"wrapped byok"
    assert await decrypts(service, blob) == b"wrapped byok"
    with pytest.raises(UnsupportedOperation, match="imported material"):
        await service.lifecycle.create_key_version(USER, key.key_id)


# -- 4. the default master key's import ---------------------------------------------------


async def test_default_master_key_takes_material_only_when_first_enabled(
        build: Build) -> None:
    service = (await build(imported_default=True)).service
    default = await service.provision_default_key(ACCOUNT)
    assert default.kind is KeyKind.DEFAULT_MASTER
    assert (default.state, default.origin) == (KeyState.PENDING_IMPORT, Origin.EXTERNAL)
    with pytest.raises(KeyStateInvalid):
        await service.encrypt(OSS, default.key_id, b"x", CONTEXT)

    # BYOK is the account's (user principal's) action.
    spare = await service.lifecycle.get_parameters_for_import(
        USER, default.key_id, wrapping_spec="RSA_2048", algorithm="RSAES_OAEP_SHA_256")
    material = os.urandom(32)
    enabled = await import_material(service, default.key_id, material)
    assert enabled.state is KeyState.ENABLED
    assert (await service.provision_default_key(ACCOUNT)).key_id == default.key_id

    sealed = await service.encrypt(OSS, default.key_id, b"server-side", CONTEXT)
    assert open_independently(material, sealed.blob, CONTEXT) == b"server-side"
    assert await decrypts(service, sealed.blob, OSS) == b"server-side"

    with pytest.raises(UnsupportedOperation, match="first enabled"):
        await service.lifecycle.get_parameters_for_import(
            USER, default.key_id, wrapping_spec="RSA_2048", algorithm="RSAES_OAEP_SHA_256")
    # A token issued before the first import is no way around it.
    with pytest.raises(UnsupportedOperation, match="first enabled"):
        await service.lifecycle.import_key_material(
            USER, default.key_id, encrypted=wrap(spare.public_key_der, material),
            token=spare.token, expire_unix=None)
    with pytest.raises(UnsupportedOperation, match="first enabled"):
        await service.lifecycle.delete_key_material(USER, default.key_id)
    assert (await service.describe_key(USER, default.key_id)).state is KeyState.ENABLED
    assert await decrypts(service, sealed.blob, OSS) == b"server-side"


async def test_an_imported_default_master_key_is_never_left_without_material(
        build: Build, clock: Clock) -> None:
    """DeleteKeyMaterial is refused on the default key because it could never take material
    again; an expiry must not reach the same dead end. Either answer keeps the key usable:
    refuse KeyMaterialExpireUnix for it, or take the same material back after expiry."""
    service = (await build(imported_default=True)).service
    default = await service.provision_default_key(ACCOUNT)
    material = os.urandom(32)
    try:
        await import_material(service, default.key_id, material,
                              expire_unix=unix(clock() + HOUR))
    except (InvalidParameter, UnsupportedOperation):
        # An expiry refused: the key is still waiting for its first (permanent) material.
        await import_material(service, default.key_id, material)
    sealed = await service.encrypt(OSS, default.key_id, b"server-side", CONTEXT)

    clock.advance(HOUR)
    await sweep(service)
    if (await service.describe_key(USER, default.key_id)).state is not KeyState.ENABLED:
        # The material expired: the same material must be importable again.
        again = await import_material(service, default.key_id, material)
        assert again.state is KeyState.ENABLED
    assert await decrypts(service, sealed.blob, OSS) == b"server-side"


async def test_a_kms_made_default_master_key_takes_no_import(build: Build) -> None:
    service = (await build()).service
    default = await service.provision_default_key(ACCOUNT)
    assert (default.state, default.origin) == (KeyState.ENABLED, Origin.ALIYUN_KMS)
    with pytest.raises(Unsupported) as refused:
        await service.lifecycle.get_parameters_for_import(
            USER, default.key_id, wrapping_spec="RSA_2048", algorithm="RSAES_OAEP_SHA_256")
    assert refused.value.what == "Origin"
    with pytest.raises(Unsupported, match="Origin"):
        await service.lifecycle.delete_key_material(USER, default.key_id)
    # The same holds for a software key made by KMS.
    key = await create(service)
    with pytest.raises(Unsupported, match="Origin"):
        await service.lifecycle.get_parameters_for_import(
            USER, key.key_id, wrapping_spec="RSA_2048", algorithm="RSAES_OAEP_SHA_256")


# -- 5. backup ----------------------------------------------------------------------------


async def test_a_backup_restores_into_a_fresh_database(build: Build, clock: Clock) -> None:
    first = await build("first.db")
    key = await create(first.service, tags={"team": "blue", "env": "prod"})
    await first.service.create_alias(USER, "alias/backed-up", key.key_id)
    blob1 = (await first.service.encrypt(USER, key.key_id, b"version one", CONTEXT)).blob
    second_version = await first.service.lifecycle.create_key_version(USER, key.key_id)
    blob2 = (await first.service.encrypt(USER, key.key_id, b"version two", CONTEXT)).blob
    _, backup = await first.service.lifecycle.backup_key(USER, key.key_id)
    versions = await version_ids(first.service, key.key_id)

    second = await build("second.db")  # the same root key, the same instances
    restored = await second.service.lifecycle.restore_key_backup(USER, backup)
    assert restored.key_id == key.key_id
    assert restored.state is KeyState.ENABLED
    assert restored.primary_version_id == second_version.version_id
    assert await version_ids(second.service, key.key_id) == versions
    assert dict(await second.store.get_tags(key.key_id)) == {"team": "blue", "env": "prod"}
    assert await second.store.list_aliases(ACCOUNT, REGION, key.key_id) == []
    assert await decrypts(second.service, blob1) == b"version one"
    assert await decrypts(second.service, blob2) == b"version two"
    new = await second.service.encrypt(USER, key.key_id, b"restored", CONTEXT)
    assert await decrypts(first.service, new.blob) == b"restored"

    with pytest.raises(InvalidParameter, match="KeyBackup"):
        await second.service.lifecycle.restore_key_backup(USER, backup)
    with pytest.raises(AccessDenied):
        await (await build("third.db")).service.lifecycle.restore_key_backup(
            Principal("6543210987654321", "mallory"), backup)
    stranger = await build("fourth.db", root_key=os.urandom(32))
    with pytest.raises(InvalidParameter, match="KeyBackup"):
        await stranger.service.lifecycle.restore_key_backup(USER, backup)
    with pytest.raises(InvalidParameter, match="KeyBackup"):
        await second.service.lifecycle.restore_key_backup(USER, backup[:-1] + b"\0")

    # A key deleted at the end of its window comes back from its backup.
    await first.service.lifecycle.schedule_key_deletion(USER, key.key_id, 7)
    clock.advance(7 * DAY)
    assert await sweep(first.service) == [("DeleteKey", key.key_id)]
    with pytest.raises(InvalidCiphertext):
        await first.service.decrypt(USER, blob1, CONTEXT)
    back = await first.service.lifecycle.restore_key_backup(USER, backup)
    assert back.state is KeyState.ENABLED
    assert await decrypts(first.service, blob1) == b"version one"
    assert await decrypts(first.service, blob2) == b"version two"


async def test_pending_deletion_and_backups(build: Build, clock: Clock) -> None:
    first = await build("first.db")
    key = await create(first.service)
    blob = (await first.service.encrypt(USER, key.key_id, b"pending", CONTEXT)).blob
    await first.service.lifecycle.schedule_key_deletion(USER, key.key_id, 7)
    # The state table refuses a backup of a key in its deletion window.
    with pytest.raises(KeyStateInvalid) as refused:
        await first.service.lifecycle.backup_key(USER, key.key_id)
    assert refused.value.code == "Rejected.PendingDeletion"

    # A backup document that records PendingDeletion (sealed by the same root key) comes
    # back Disabled, without its DeleteDate, and is no longer deleted by the sweep.
    await first.service.lifecycle.cancel_key_deletion(USER, key.key_id)
    document = json.loads(first.software.open_backup(
        (await first.service.lifecycle.backup_key(USER, key.key_id))[1]))
    document["key"].update(state="PendingDeletion", delete_date=format_time(T0 + 7 * DAY))
    pending_backup = first.software.seal_backup(json.dumps(document).encode())

    second = await build("second.db")
    restored = await second.service.lifecycle.restore_key_backup(USER, pending_backup)
    assert restored.state is KeyState.DISABLED
    assert restored.delete_date is None
    clock.advance(30 * DAY)
    assert await sweep(second.service) == []
    with pytest.raises(KeyStateInvalid):
        await second.service.decrypt(USER, blob, CONTEXT)
    await second.service.set_enabled(USER, key.key_id, True)
    assert await decrypts(second.service, blob) == b"pending"


async def test_hardware_keys_make_no_backups(build: Build, hsm: HSMBackend) -> None:
    service = (await build(hsm=hsm)).service
    for storage in (INTERNAL, DATABASE):
        key = await create(service, instance=HARDWARE_INSTANCE, storage=storage)
        with pytest.raises(UnsupportedOperation, match="backup"):
            await service.lifecycle.backup_key(USER, key.key_id)


# -- 6. the store never holds imported material -------------------------------------------


def _needles(material: bytes) -> list[bytes]:
    return [material, material.hex().encode(), material.hex().upper().encode(),
            base64.b64encode(material), base64.urlsafe_b64encode(material),
            base64.b64encode(material).rstrip(b"=")]


def _scan_rows(path: Path, needles: list[bytes]) -> int:
    """Every column of every row of every table; returns how many values were read."""
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert {"keys", "key_versions", "aliases", "tags", "instances"} <= set(tables)
        seen = 0
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 - own table names
                for value in row:
                    seen += 1
                    raw = value if isinstance(value, bytes) else str(value).encode()
                    for needle in needles:
                        assert needle not in raw, f"imported material in {table}"
        return seen
    finally:
        db.close()


async def test_the_store_never_holds_imported_material(build: Build, clock: Clock) -> None:
    env = await build()
    service = env.service
    material = os.urandom(32)
    key = await create(service, origin=Origin.EXTERNAL, tags={"team": "blue"})
    await service.create_alias(USER, "alias/byok", key.key_id)
    await import_material(service, key.key_id, material, expire_unix=unix(clock() + HOUR))
    blob = (await service.encrypt(USER, "alias/byok", b"secret", CONTEXT)).blob
    assert open_independently(material, blob, CONTEXT) == b"secret"
    needles = _needles(material)

    stored = (await env.store.list_versions(key.key_id))[0].material
    assert stored and all(n not in stored for n in needles)
    assert _scan_rows(env.path, needles) > 20
    # Expiry and re-import leave no trace either; nor do the database's files themselves.
    clock.advance(HOUR)
    assert await sweep(service) == [("DeleteKeyMaterial", key.key_id)]
    await import_material(service, key.key_id, material)
    assert await decrypts(service, blob) == b"secret"
    _scan_rows(env.path, needles)
    files = [p for p in env.path.parent.iterdir() if p.name.startswith(env.path.name)]
    assert env.path in files
    for file in files:
        data = file.read_bytes()
        for needle in needles:
            assert needle not in data, f"imported material in {file.name}"


# -- a backend that is down, and what it must not take with it ---------------------------


async def _token_lost(pool: PKCS11Pool) -> None:
    """The token drops every session (a restart, a failover): the next call into it fails
    once, then the pool recovers."""
    with pool._module_lock:
        pool._lib.reinitialize()


async def test_one_keys_backend_failing_does_not_stop_the_sweep(
        build: Build, clock: Clock, hsm: HSMBackend, pool: PKCS11Pool) -> None:
    """The sweep stopped at the first key whose backend failed: every key after it waited
    for as long as that backend was down."""
    service = (await build(hsm=hsm)).service
    hardware = await create(service, instance=HARDWARE_INSTANCE, storage=DATABASE)
    software = await create(service)
    doomed = await create(service)
    for key in (hardware, software):
        await service.lifecycle.update_rotation_policy(USER, key.key_id, enabled=True,
                                                       interval=7 * DAY_S)
    await service.lifecycle.schedule_key_deletion(USER, doomed.key_id, 7)
    clock.advance(8 * DAY)
    await _token_lost(pool)
    done = await sweep(service)  # The hardware key (first) fails; the others go on.
    assert sorted(done) == sorted([("CreateKeyVersion", software.key_id),
                                   ("DeleteKey", doomed.key_id)])
    assert await sweep(service) == [("CreateKeyVersion", hardware.key_id)]  # Next time.


async def test_listing_keys_survives_a_due_keys_backend_being_down(
        build: Build, clock: Clock, hsm: HSMBackend, pool: PKCS11Pool) -> None:
    service = (await build(hsm=hsm)).service
    hardware = await create(service, instance=HARDWARE_INSTANCE, storage=INTERNAL)
    software = await create(service)
    await service.lifecycle.schedule_key_deletion(USER, hardware.key_id, 7)
    clock.advance(8 * DAY)
    await _token_lost(pool)
    listed = await service.list_keys(USER, filters=[], page_number=1, page_size=100)
    # The due key is shown as stored (its deletion waits for the token), not a 503 for all.
    assert {k.key_id for k in listed.items} >= {hardware.key_id, software.key_id}
    listed = await service.list_keys(USER, filters=[], page_number=1, page_size=100)
    assert hardware.key_id not in {k.key_id for k in listed.items}  # Token back: deleted.


async def test_deletion_destroys_a_token_object_a_failed_import_left(
        build: Build, clock: Clock, hsm: HSMBackend, pool: PKCS11Pool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An HsmInternal import whose database write failed leaves its token object; the
    version still has no stored material, and deletion skipped such versions, so the
    customer's material stayed in the HSM after the key was gone."""
    env = await build(hsm=hsm)
    service, store = env.service, env.store
    key = await create(service, origin=Origin.EXTERNAL, instance=HARDWARE_INSTANCE,
                       storage=INTERNAL)
    real_update = store.update_key
    failures = iter([sqlite3.OperationalError("disk I/O error")])

    async def fails_once(*args: Any, **kwargs: Any) -> None:
        for failure in failures:
            raise failure
        await real_update(*args, **kwargs)

    monkeypatch.setattr(store, "update_key", fails_once)
    with pytest.raises(sqlite3.OperationalError):
        await import_material(service, key.key_id, os.urandom(32))
    label = key.primary_version_id
    assert len(await pool.run(token_objects(LABEL=label))) == 1
    await service.lifecycle.schedule_key_deletion(USER, key.key_id, 7)
    clock.advance(7 * DAY)
    assert await sweep(service) == [("DeleteKey", key.key_id)]
    assert await pool.run(token_objects(LABEL=label)) == []


async def test_a_loop_of_import_requests_cannot_push_out_another_accounts_token(
        clock: Clock) -> None:
    """The outstanding import tokens were one FIFO for every account: 1000
    GetParametersForImport calls by one tenant invalidated every other tenant's token."""
    from cryptography.hazmat.primitives.asymmetric import padding as asym

    from kms_proxy.core.byok import ImportTokens

    tokens = ImportTokens(clock, capacity=6, per_key=2)
    alice = await tokens.issue("key-alice", "RSA_2048", "RSAES_OAEP_SHA_256", owner="111111")
    for key in ("key-bob-1", "key-bob-1", "key-bob-1", "key-bob-2", "key-bob-3", "key-bob-4",
                "key-bob-5", "key-bob-6"):
        last = await tokens.issue(key, "RSA_2048", "RSAES_OAEP_SHA_256", owner="222222")
    material = os.urandom(32)

    def wrapped(params: Any) -> bytes:
        public = serialization.load_der_public_key(params.public_key_der)
        assert isinstance(public, rsa.RSAPublicKey)
        return public.encrypt(material, asym.OAEP(asym.MGF1(hashes.SHA256()), hashes.SHA256(),
                                                  None))

    assert await tokens.unwrap("key-alice", alice.token, wrapped(alice)) == material
    assert await tokens.unwrap("key-bob-6", last.token, wrapped(last)) == material
    # An expired token still says so after other accounts asked for tokens while there is
    # room (expired ones are purged only when room is needed).
    roomy = ImportTokens(clock)
    early = await roomy.issue("key-alice", "RSA_2048", "RSAES_OAEP_SHA_256", owner="111111")
    clock.advance(25 * HOUR)
    await roomy.issue("key-carol", "RSA_2048", "RSAES_OAEP_SHA_256", owner="333333")
    with pytest.raises(ExpiredImportToken):
        await roomy.unwrap("key-alice", early.token, wrapped(early))


async def test_a_key_past_its_deletion_window_can_be_restored_before_the_sweep(
        build: Build, clock: Clock) -> None:
    """It is gone for every other action; RestoreKeyBackup said it still existed."""
    service = (await build()).service
    key = await create(service)
    _, backup = await service.lifecycle.backup_key(USER, key.key_id)
    await service.lifecycle.schedule_key_deletion(USER, key.key_id, 7)
    clock.advance(7 * DAY)
    restored = await service.lifecycle.restore_key_backup(USER, backup)
    assert restored.key_id == key.key_id
    assert (await service.describe_key(USER, key.key_id)).state is KeyState.ENABLED


async def test_the_key_is_judged_before_the_window(build: Build) -> None:
    """The module's order: the key, its kind and state, then the parameters. A window out
    of range on a key that does not exist said InvalidParameter, not KeyNotFound."""
    service = (await build()).service
    with pytest.raises(KeyNotFound):
        await service.lifecycle.schedule_key_deletion(USER, "key-hzznothere", 3)
    service_key = (await service.encrypt(OSS, "alias/acs/oss", b"x", None)).key_id
    with pytest.raises(UnsupportedOperation):
        await service.lifecycle.schedule_key_deletion(USER, service_key, 3)
    with pytest.raises(KeyNotFound):
        await service.lifecycle.set_deletion_protection(USER, "key-hzznothere", enabled=True,
                                                        description="d" * 9000)
    key = await create(service)
    with pytest.raises(InvalidParameter, match="PendingWindowInDays"):
        await service.lifecycle.schedule_key_deletion(USER, key.key_id, 3)


async def test_a_tag_batch_does_not_tag_a_key_scheduled_for_deletion_meanwhile(
        build: Build) -> None:
    """A batch checks its keys, then holds them (in key-id order) and checks them again
    before writing: a key whose deletion was scheduled in between is refused, and the
    batch changes no key."""
    env = await build()
    service = env.service
    first, second = sorted([await create(service), await create(service)],
                           key=lambda k: k.key_id)
    held, release = asyncio.Event(), asyncio.Event()

    async def schedule_while_held() -> None:
        async with service.key_locks.hold(first.key_id):
            held.set()
            await release.wait()
            await service.lifecycle.schedule_key_deletion(USER, first.key_id, 7)

    scheduler = asyncio.create_task(schedule_while_held())
    await held.wait()
    batch = asyncio.create_task(service.tag_resources(USER, [second.key_id, first.key_id],
                                                      {"late": "yes"}))
    # Until the batch has checked both keys and waits for the first one's lock.
    while service.key_locks._entries[first.key_id].users < 2:
        assert not batch.done()
        await asyncio.sleep(0)
    release.set()
    await scheduler
    with pytest.raises(KeyStateInvalid):
        await batch
    assert await service._store.get_tags_many([first.key_id, second.key_id]) == {}
