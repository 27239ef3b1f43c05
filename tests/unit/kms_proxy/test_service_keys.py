"""Default and service keys in the core, on a real SQLite store and the software backend."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from kms_proxy.backends.software import SoftwareBackend
from kms_proxy.core.errors import AccessDenied, AliasNotFound, UnsupportedOperation
from kms_proxy.core.model import KeyKind, Principal, PrincipalKind
from kms_proxy.core.service import KeyService, ServiceConfig
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
