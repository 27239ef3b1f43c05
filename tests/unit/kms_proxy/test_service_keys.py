"""Default and service keys in the core, on a real SQLite store and the software backend."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from pathlib import Path

import pytest

from kms_proxy.backends.software import SoftwareBackend
from kms_proxy.core.calls import RESOLVED_KEY
from kms_proxy.core.errors import AccessDenied, AliasNotFound, Throttled, UnsupportedOperation
from kms_proxy.core.lifecycle import SystemEvent
from kms_proxy.core.model import Alias, KeyKind, KeyVersion, Principal, PrincipalKind
from kms_proxy.core.service import KeyService, ServiceConfig
from kms_proxy.store.base import StoreConflict
from kms_proxy.store.sqlite import SQLiteStore

ACCOUNT = "1234567890123456"
OSS = Principal(ACCOUNT, "oss", PrincipalKind.SERVICE, "oss")
RDS = Principal(ACCOUNT, "rds", PrincipalKind.SERVICE, "rds")
USER = Principal(ACCOUNT, "alice")


@pytest.fixture
async def service(tmp_path: Path) -> KeyService:
    store = SQLiteStore(tmp_path / "kms.db")
    store.open()
    software = SoftwareBackend(os.urandom(32))
    return KeyService(store=store, backends={k: software for k in (
        KeyKind.SOFTWARE, KeyKind.DEFAULT_MASTER, KeyKind.SERVICE)},
        config=ServiceConfig(region="cn-hangzhou", regions=("cn-hangzhou",),
                             default_instances={}))


async def test_concurrent_first_uses_make_one_service_key(service: KeyService) -> None:
    results = await asyncio.gather(*(service.encrypt(OSS, "alias/acs/oss", b"x", None)
                                     for _ in range(25)))
    assert len({r.key_id for r in results}) == 1
    keys = await service.list_keys(USER, filters=[("CreatorType", ["Service"])],
                                   page_number=1, page_size=100)
    assert [k.key_id for k in keys.items] == [results[0].key_id]


async def test_a_service_key_serves_only_its_product(service: KeyService) -> None:
    sealed = await service.encrypt(OSS, "alias/acs/oss", b"data", {"a": "b"})
    with pytest.raises(AccessDenied):
        await service.encrypt(RDS, "alias/acs/oss", b"x", None)
    with pytest.raises(AccessDenied):
        await service.decrypt(RDS, sealed.blob, {"a": "b"})
    # Another product's first use of its own alias makes its own key.
    assert (await service.encrypt(RDS, "alias/acs/rds", b"x", None)).key_id != sealed.key_id
    # An application sees the key but cannot use it directly.
    with pytest.raises(UnsupportedOperation):
        await service.decrypt(USER, sealed.blob, {"a": "b"})
    # Nobody but the product itself makes it appear.
    with pytest.raises(AliasNotFound):
        await service.encrypt(USER, "alias/acs/ecs", b"x", None)


async def test_one_default_master_key_per_account(service: KeyService) -> None:
    first = await service.provision_default_key(ACCOUNT)
    assert (await service.provision_default_key(ACCOUNT)).key_id == first.key_id
    assert first.kind is KeyKind.DEFAULT_MASTER
    with pytest.raises(UnsupportedOperation, match="default master"):
        await service.encrypt(USER, first.key_id, b"x", None)
    sealed = await service.encrypt(OSS, first.key_id, b"sse", None)
    assert (await service.decrypt(RDS, sealed.blob, None)).plaintext == b"sse"


async def test_a_refused_use_of_another_products_key_names_that_key(
        service: KeyService) -> None:
    """The audit line names the key the core found, also when the principal may not use
    it: the owner check ran before the key was recorded, so the line named no key."""
    sealed = await service.encrypt(OSS, "alias/acs/oss", b"data", None)
    for refused_call in (service.encrypt(RDS, "alias/acs/oss", b"x", None),
                         service.decrypt(RDS, sealed.blob, None)):
        RESOLVED_KEY.set(None)
        with pytest.raises(AccessDenied):
            await refused_call
        resolved = RESOLVED_KEY.get()
        assert resolved is not None and resolved.key_id == sealed.key_id


async def test_system_made_keys_are_announced_with_their_alias(
        service: KeyService) -> None:
    events: list[SystemEvent] = []
    service.lifecycle.on_event = events.append
    default = await service.provision_default_key(ACCOUNT)
    sealed = await service.encrypt(OSS, "alias/acs/oss", b"x", None)
    await service.encrypt(OSS, "alias/acs/oss", b"x", None)  # No second event.
    assert [(e.action, e.key.key_id, e.alias) for e in events] == [
        ("CreateKey", default.key_id, None), ("CreateKey", sealed.key_id, "alias/acs/oss")]


async def test_a_key_and_its_alias_are_stored_together(service: KeyService,
                                                       tmp_path: Path) -> None:
    """A service key's alias is written in the key's own transaction: an alias insert that
    fails leaves no key behind (it left an orphan service key, and the next use made a
    second one for the product)."""
    store = service._store
    first = await service.encrypt(OSS, "alias/acs/oss", b"x", None)
    stored = await store.get_key(first.key_id)
    assert stored is not None
    orphan = dataclasses.replace(stored, key_id=str(uuid.uuid4()))
    taken = Alias("alias/acs/oss", orphan.key_id, ACCOUNT, "cn-hangzhou")
    with pytest.raises(StoreConflict):
        await store.create_key(orphan, [KeyVersion(orphan.key_id, str(uuid.uuid4()),
                                                   orphan.created, b"m")], {},
                               aliases=[taken])
    assert await store.get_key(orphan.key_id) is None
    keys = await service.list_keys(USER, filters=[("CreatorType", ["Service"])],
                                   page_number=1, page_size=100)
    assert [k.key_id for k in keys.items] == [first.key_id]


async def test_default_keys_share_their_accounts_quota(tmp_path: Path) -> None:
    """The seed: default keys, 1000 ops/s per account, not upgradable. They have no
    instance, and went unthrottled."""
    store = SQLiteStore(tmp_path / "quota.db")
    store.open()
    software = SoftwareBackend(os.urandom(32))
    service = KeyService(store=store, backends={k: software for k in (
        KeyKind.SOFTWARE, KeyKind.DEFAULT_MASTER, KeyKind.SERVICE)},
        config=ServiceConfig(region="cn-hangzhou", regions=("cn-hangzhou",),
                             default_instances={}, default_keys_qps=3))
    default = await service.provision_default_key(ACCOUNT)
    other = Principal("6543210987654321", "oss", PrincipalKind.SERVICE, "oss")
    await service.provision_default_key(other.account_id)
    outcomes = []
    for ref in (default.key_id, "alias/acs/oss", default.key_id, "alias/acs/oss"):
        try:
            outcomes.append((await service.encrypt(OSS, ref, b"x", None)).key_id)
        except Throttled:
            outcomes.append("throttled")
    # The service key's first use also creates it; the bucket is shared by both keys.
    assert "throttled" not in outcomes[:3] and outcomes[3] == "throttled"
    # Another account has its own quota.
    assert (await service.encrypt(other, "alias/acs/oss", b"x", None)).key_id
    store.close()


async def test_listings_leave_out_another_products_service_key(service: KeyService) -> None:
    """A product may not read another's service key by name (DescribeKey,
    ListResourceTags), so account-wide listings (keys, tags, aliases) leave it out too."""
    oss_key = (await service.encrypt(OSS, "alias/acs/oss", b"x", None)).key_id
    rds_key = (await service.encrypt(RDS, "alias/acs/rds", b"x", None)).key_id
    await service.tag_resources(USER, [oss_key, rds_key], {"owner": "private"})
    with pytest.raises(AccessDenied):
        await service.list_resource_tags(RDS, oss_key)
    rows, _ = await service.list_tag_resources(RDS, [], {}, after=None, limit=200)
    assert {key_id for key_id, _, _ in rows} == {rds_key}
    keys = await service.list_keys(RDS, filters=[], page_number=1, page_size=100)
    assert oss_key not in {k.key_id for k in keys.items}
    assert rds_key in {k.key_id for k in keys.items}
    aliases = await service.list_aliases(RDS, page_number=1, page_size=100)
    assert {a.name for a in aliases.items} == {"alias/acs/rds"}
    aliases = await service.list_aliases(USER, page_number=1, page_size=100)
    assert {a.name for a in aliases.items} == {"alias/acs/oss", "alias/acs/rds"}
    # The account's users see both.
    rows, _ = await service.list_tag_resources(USER, [], {}, after=None, limit=200)
    assert {key_id for key_id, _, _ in rows} == {oss_key, rds_key}
