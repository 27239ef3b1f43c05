"""The lifecycle actions through the official SDK: key versions and rotation (manual and
policy), scheduled deletion, deletion protection, BYOK import into a software instance, the
project's BackupKey/RestoreKeyBackup extension, their audit trail, and a property test of
the duration and window parameters. Every refusal is checked for its status, its Code and
for leaving the store and the key as they were."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest
from alibabacloud_kms20160120 import models as m
from alibabacloud_kms20160120.client import Client
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms_proxy.config import AccountConfig, InstanceConfig
from kms_proxy.core.model import InstanceType
from tests.integration.kms.conftest import (
    ACCOUNT_A,
    ACCOUNT_B,
    AK_A1,
    AK_A2,
    AK_B1,
    REGION,
    Kms,
    Reply,
    StartKms,
    assert_error,
)

TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
DATE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DAY: Final = 86_400
SLACK: Final = timedelta(minutes=2)
MISSING_KEY: Final = "key-hzz00000000000000000000"

IP = "InvalidParameter"
MP = "MissingParameter"
UNSUPPORTED = "Rejected.UnsupportedOperation"
MODIFY = "Rejected.StateModifiedFailed"


def _oaep(digest: Callable[[], hashes.HashAlgorithm]) -> Callable[[], AsymmetricPadding]:
    return lambda: padding.OAEP(mgf=padding.MGF1(digest()), algorithm=digest(), label=None)


WRAPPINGS: Final[dict[str, Callable[[], AsymmetricPadding]]] = {
    "RSAES_OAEP_SHA_256": _oaep(hashes.SHA256),
    "RSAES_OAEP_SHA_1": _oaep(hashes.SHA1),
}


# -- helpers ---------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)


def format_time(moment: datetime) -> str:
    return moment.strftime(TIME_FORMAT)


def assert_near(text: str, expected: datetime) -> None:
    assert DATE.fullmatch(text), text
    assert abs(parse_time(text) - expected) <= SLACK, (text, expected)


def now() -> datetime:
    return datetime.now(UTC)


def arn(key_id: str, account: str = ACCOUNT_A) -> str:
    return f"acs:kms:{REGION}:{account}:key/{key_id}"


@pytest.fixture
def alice(kms: Kms) -> Client:
    """Account A's first user, V3 signatures (tests that do not vary the scheme)."""
    return kms.client("a1", "v3")


async def create_key(kms: Kms, client: Client, **kwargs: Any) -> Any:
    body = await kms.sdk(client, "create_key", m.CreateKeyRequest(**kwargs))
    return body.key_metadata


async def describe(kms: Kms, client: Client, key_id: str) -> Any:
    return (await kms.sdk(client, "describe_key", m.DescribeKeyRequest(key_id=key_id))
            ).key_metadata


async def snapshot(kms: Kms, client: Client, key_id: str) -> dict[str, Any]:
    """DescribeKey's KeyMetadata as the raw JSON the front sent."""
    reply = await kms.call(client, "DescribeKey", {"KeyId": key_id})
    assert reply.status == 200, reply
    metadata: dict[str, Any] = reply.body["KeyMetadata"]
    return metadata


def snapshot_blocking(kms: Kms, client: Client, key_id: str) -> dict[str, Any]:
    reply = kms.call_blocking(client, "DescribeKey", {"KeyId": key_id})
    assert reply.status == 200, reply
    metadata: dict[str, Any] = reply.body["KeyMetadata"]
    return metadata


async def encrypt(kms: Kms, client: Client, key_id: str, plaintext: str) -> Any:
    return await kms.sdk(client, "encrypt", m.EncryptRequest(key_id=key_id,
                                                             plaintext=plaintext))


async def decrypt(kms: Kms, client: Client, blob: str) -> Any:
    return await kms.sdk(client, "decrypt", m.DecryptRequest(ciphertext_blob=blob))


async def versions_of(kms: Kms, client: Client, key_id: str) -> list[str]:
    body = await kms.sdk(client, "list_key_versions", m.ListKeyVersionsRequest(
        key_id=key_id, page_size=100))
    return [v.key_version_id for v in body.key_versions.key_version]


async def backup(kms: Kms, client: Client, key_id: str) -> str:
    reply = await kms.call(client, "BackupKey", {"KeyId": key_id})
    assert reply.status == 200, reply
    text = reply.body["KeyBackup"]
    assert isinstance(text, str)
    return text


# -- BYOK helpers ---------------------------------------------------------------------------

async def import_parameters(kms: Kms, client: Client, key_id: str,
                            algorithm: str = "RSAES_OAEP_SHA_256") -> Any:
    return await kms.sdk(client, "get_parameters_for_import", m.GetParametersForImportRequest(
        key_id=key_id, wrapping_key_spec="RSA_2048", wrapping_algorithm=algorithm))


def wrap(public_key_b64: str, material: bytes, algorithm: str) -> str:
    public = serialization.load_der_public_key(base64.b64decode(public_key_b64))
    assert isinstance(public, rsa.RSAPublicKey)
    return b64(public.encrypt(material, WRAPPINGS[algorithm]()))


def import_request(parameters: Any, key_id: str, material: bytes, *,
                   algorithm: str = "RSAES_OAEP_SHA_256",
                   expire_unix: int | None = None) -> Any:
    return m.ImportKeyMaterialRequest(
        key_id=key_id, encrypted_key_material=wrap(parameters.public_key, material, algorithm),
        import_token=parameters.import_token, key_material_expire_unix=expire_unix)


async def import_material(kms: Kms, client: Client, key_id: str, material: bytes, *,
                          algorithm: str = "RSAES_OAEP_SHA_256",
                          expire_unix: int | None = None) -> None:
    parameters = await import_parameters(kms, client, key_id, algorithm)
    await kms.sdk(client, "import_key_material", import_request(
        parameters, key_id, material, algorithm=algorithm, expire_unix=expire_unix))


async def byok_key(kms: Kms, client: Client, **kwargs: Any) -> Any:
    meta = await create_key(kms, client, origin="EXTERNAL", **kwargs)
    assert (meta.origin, meta.key_state) == ("EXTERNAL", "PendingImport")
    return meta


# -- 1. versions and manual rotation ----------------------------------------------------------

async def test_manual_rotation_of_a_software_key(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client)
    first = meta.primary_key_version
    old = await encrypt(kms, client, meta.key_id, "before rotation")
    assert old.key_version_id == first

    created = (await kms.sdk(client, "create_key_version",
                             m.CreateKeyVersionRequest(key_id=meta.key_id))).key_version
    second = created.key_version_id
    assert UUID.fullmatch(second) and second != first
    assert created.key_id == meta.key_id
    assert_near(created.creation_date, now())

    described = await describe(kms, client, meta.key_id)
    assert described.primary_key_version == second
    assert described.last_rotation_date == created.creation_date
    assert described.key_state == "Enabled"
    new = await encrypt(kms, client, meta.key_id, "after rotation")
    assert (new.key_id, new.key_version_id) == (meta.key_id, second)
    opened_old = await decrypt(kms, client, old.ciphertext_blob)
    assert (opened_old.plaintext, opened_old.key_version_id) == ("before rotation", first)
    opened_new = await decrypt(kms, client, new.ciphertext_blob)
    assert (opened_new.plaintext, opened_new.key_version_id) == ("after rotation", second)

    listed = await kms.sdk(client, "list_key_versions",
                           m.ListKeyVersionsRequest(key_id=meta.key_id))
    assert (listed.total_count, listed.page_number, listed.page_size) == (2, 1, 10)
    rows = listed.key_versions.key_version
    assert [(r.key_id, r.key_version_id) for r in rows] == [(meta.key_id, first),
                                                            (meta.key_id, second)]
    assert all(DATE.fullmatch(r.creation_date) for r in rows)
    paged = [await kms.sdk(client, "list_key_versions", m.ListKeyVersionsRequest(
        key_id=meta.key_id, page_number=n, page_size=1)) for n in (1, 2, 3)]
    assert [p.total_count for p in paged] == [2, 2, 2]
    assert [p.page_number for p in paged] == [1, 2, 3]
    assert [[v.key_version_id for v in (p.key_versions.key_version or [])]
            for p in paged] == [[first], [second], []]

    for version in (first, second):
        one = (await kms.sdk(client, "describe_key_version", m.DescribeKeyVersionRequest(
            key_id=meta.key_id, key_version_id=version))).key_version
        assert (one.key_id, one.key_version_id) == (meta.key_id, version)
        assert DATE.fullmatch(one.creation_date)
    other = await create_key(kms, client)
    for wrong in ("00000000-0000-4000-8000-000000000000", other.primary_key_version):
        reply = await kms.sdk_error(client, "describe_key_version", m.DescribeKeyVersionRequest(
            key_id=meta.key_id, key_version_id=wrong))
        assert_error(reply, 404, "Forbidden.KeyVersionNotFound")
    assert kms.counts()["key_versions"] == 3


async def test_create_key_version_refusals(kms: Kms, alice: Client) -> None:
    rsa_key = await create_key(kms, alice, key_spec="RSA_2048")
    aes = await create_key(kms, alice)
    before = kms.counts()
    reply = await kms.sdk_error(alice, "create_key_version",
                                m.CreateKeyVersionRequest(key_id=rsa_key.key_id))
    assert_error(reply, 400, UNSUPPORTED)

    await kms.sdk(alice, "disable_key", m.DisableKeyRequest(key_id=aes.key_id))
    reply = await kms.sdk_error(alice, "create_key_version",
                                m.CreateKeyVersionRequest(key_id=aes.key_id))
    assert_error(reply, 409, "Rejected.Disabled")
    await kms.sdk(alice, "enable_key", m.EnableKeyRequest(key_id=aes.key_id))

    await kms.sdk(alice, "schedule_key_deletion", m.ScheduleKeyDeletionRequest(
        key_id=aes.key_id, pending_window_in_days=7))
    reply = await kms.sdk_error(alice, "create_key_version",
                                m.CreateKeyVersionRequest(key_id=aes.key_id))
    assert_error(reply, 409, "Rejected.PendingDeletion")

    reply = await kms.sdk_error(alice, "create_key_version",
                                m.CreateKeyVersionRequest(key_id=MISSING_KEY))
    assert_error(reply, 404, "Forbidden.KeyNotFound")
    assert_error(await kms.call(alice, "CreateKeyVersion", {}), 400, MP, names="KeyId")
    assert kms.counts() == before
    assert await versions_of(kms, alice, rsa_key.key_id) == [rsa_key.primary_key_version]
    assert await versions_of(kms, alice, aes.key_id) == [aes.primary_key_version]


# -- 2. rotation policy -----------------------------------------------------------------------

async def test_update_rotation_policy(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client)
    key_id = meta.key_id
    fresh = await describe(kms, client, key_id)
    assert fresh.automatic_rotation == "Disabled"
    assert fresh.rotation_interval is None and fresh.next_rotation_date is None

    await kms.sdk(client, "update_rotation_policy", m.UpdateRotationPolicyRequest(
        key_id=key_id, enable_automatic_rotation=True, rotation_interval="30d"))
    enabled = await describe(kms, client, key_id)
    assert enabled.automatic_rotation == "Enabled"
    assert enabled.rotation_interval == "2592000s"
    assert enabled.last_rotation_date == meta.creation_date
    assert enabled.next_rotation_date == format_time(
        parse_time(meta.creation_date) + timedelta(days=30))

    before = await snapshot(kms, client, key_id)
    for interval in ("6d", "366d", "0d", "31536001s"):
        reply = await kms.sdk_error(client, "update_rotation_policy",
                                    m.UpdateRotationPolicyRequest(
                                        key_id=key_id, enable_automatic_rotation=True,
                                        rotation_interval=interval))
        assert_error(reply, 400, IP, names="RotationInterval")
    reply = await kms.sdk_error(client, "update_rotation_policy", m.UpdateRotationPolicyRequest(
        key_id=key_id, enable_automatic_rotation=True))
    assert_error(reply, 400, MP, names="RotationInterval")
    for raw in ("7x", "d7", "7 d", "7.5d", "-7d", "7"):
        reply = await kms.call(client, "UpdateRotationPolicy", {
            "KeyId": key_id, "EnableAutomaticRotation": "true", "RotationInterval": raw})
        assert_error(reply, 400, IP, names="RotationInterval")
    reply = await kms.call(client, "UpdateRotationPolicy", {"KeyId": key_id,
                                                            "RotationInterval": "30d"})
    assert_error(reply, 400, MP, names="EnableAutomaticRotation")
    reply = await kms.call(client, "UpdateRotationPolicy", {
        "KeyId": key_id, "EnableAutomaticRotation": "yes", "RotationInterval": "30d"})
    assert_error(reply, 400, IP, names="EnableAutomaticRotation")
    assert await snapshot(kms, client, key_id) == before

    # The bounds themselves, in other units, are accepted.
    for interval, seconds in (("168h", 7 * DAY), ("525600m", 365 * DAY), ("604800s", 7 * DAY)):
        await kms.sdk(client, "update_rotation_policy", m.UpdateRotationPolicyRequest(
            key_id=key_id, enable_automatic_rotation=True, rotation_interval=interval))
        assert (await describe(kms, client, key_id)).rotation_interval == f"{seconds}s"
    await kms.sdk(client, "update_rotation_policy", m.UpdateRotationPolicyRequest(
        key_id=key_id, enable_automatic_rotation=True, rotation_interval="30d"))

    # A manual rotation moves the next automatic one.
    rotated = (await kms.sdk(client, "create_key_version",
                             m.CreateKeyVersionRequest(key_id=key_id))).key_version
    after = await describe(kms, client, key_id)
    assert after.last_rotation_date == rotated.creation_date
    assert after.next_rotation_date == format_time(
        parse_time(rotated.creation_date) + timedelta(days=30))

    await kms.sdk(client, "disable_key", m.DisableKeyRequest(key_id=key_id))
    suspended = await describe(kms, client, key_id)
    assert (suspended.key_state, suspended.automatic_rotation) == ("Disabled", "Suspended")
    assert suspended.rotation_interval == "2592000s"
    assert suspended.next_rotation_date == after.next_rotation_date
    reply = await kms.sdk_error(client, "update_rotation_policy", m.UpdateRotationPolicyRequest(
        key_id=key_id, enable_automatic_rotation=False))
    assert_error(reply, 409, "Rejected.Disabled")
    await kms.sdk(client, "enable_key", m.EnableKeyRequest(key_id=key_id))
    assert (await describe(kms, client, key_id)).automatic_rotation == "Enabled"

    await kms.sdk(client, "update_rotation_policy", m.UpdateRotationPolicyRequest(
        key_id=key_id, enable_automatic_rotation=False))
    disabled = await describe(kms, client, key_id)
    assert disabled.automatic_rotation == "Disabled"
    assert disabled.rotation_interval is None and disabled.next_rotation_date is None


async def test_rotation_policy_is_refused_where_keys_do_not_rotate(kms: Kms,
                                                                   alice: Client) -> None:
    rsa_key = await create_key(kms, alice, key_spec="RSA_2048")
    reply = await kms.sdk_error(alice, "update_rotation_policy", m.UpdateRotationPolicyRequest(
        key_id=rsa_key.key_id, enable_automatic_rotation=True, rotation_interval="30d"))
    assert_error(reply, 400, UNSUPPORTED)
    reply = await kms.sdk_error(alice, "update_rotation_policy", m.UpdateRotationPolicyRequest(
        key_id=MISSING_KEY, enable_automatic_rotation=True, rotation_interval="30d"))
    assert_error(reply, 404, "Forbidden.KeyNotFound")
    assert (await describe(kms, alice, rsa_key.key_id)).automatic_rotation == "Disabled"


async def test_create_key_with_automatic_rotation(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client, enable_automatic_rotation=True, rotation_interval="7d")
    assert meta.automatic_rotation == "Enabled"
    assert meta.rotation_interval == "604800s"
    assert meta.next_rotation_date == format_time(
        parse_time(meta.creation_date) + timedelta(days=7))
    described = await describe(kms, client, meta.key_id)
    assert (described.automatic_rotation, described.rotation_interval) == ("Enabled",
                                                                          "604800s")
    assert described.next_rotation_date == meta.next_rotation_date
    # Not rotated yet: one version.
    assert await versions_of(kms, client, meta.key_id) == [meta.primary_key_version]
    plain = await create_key(kms, client, enable_automatic_rotation=False)
    assert plain.automatic_rotation == "Disabled" and plain.rotation_interval is None


@pytest.mark.parametrize(("params", "code", "name"), [
    ({"EnableAutomaticRotation": "true", "RotationInterval": "6d"}, IP, "RotationInterval"),
    ({"EnableAutomaticRotation": "true", "RotationInterval": "366d"}, IP, "RotationInterval"),
    ({"EnableAutomaticRotation": "true", "RotationInterval": "7x"}, IP, "RotationInterval"),
    ({"EnableAutomaticRotation": "true"}, MP, "RotationInterval"),
    ({"RotationInterval": "30d"}, IP, "RotationInterval"),
    ({"EnableAutomaticRotation": "maybe", "RotationInterval": "30d"}, IP,
     "EnableAutomaticRotation"),
    ({"EnableAutomaticRotation": "true", "RotationInterval": "30d", "KeySpec": "RSA_2048"},
     UNSUPPORTED, None),
    ({"EnableAutomaticRotation": "true", "RotationInterval": "30d", "Origin": "EXTERNAL"},
     UNSUPPORTED, None),
], ids=["6d", "366d", "7x", "no-interval", "interval-without-rotation", "bad-boolean",
        "asymmetric", "byok"])
async def test_create_key_with_bad_rotation_creates_nothing(
        kms: Kms, alice: Client, params: dict[str, str], code: str, name: str | None) -> None:
    before = kms.counts()
    reply = await kms.call(alice, "CreateKey", params)
    assert_error(reply, 400, code, names=name)
    assert kms.counts() == before


async def test_create_key_with_bad_rotation_through_the_sdk(kms: Kms, alice: Client) -> None:
    before = kms.counts()
    reply = await kms.sdk_error(alice, "create_key", m.CreateKeyRequest(
        enable_automatic_rotation=True, rotation_interval="366d"))
    assert_error(reply, 400, IP, names="RotationInterval")
    assert kms.counts() == before


async def default_key_id(kms: Kms, client: Client) -> str:
    """The account's default master key (made by the system at start-up)."""
    listed = await kms.sdk(client, "list_keys", m.ListKeysRequest(page_size=100))
    for row in listed.keys.key:
        if (await describe(kms, client, row.key_id)).creator == "Aliyun":
            return str(row.key_id)
    raise AssertionError("no default master key")


async def test_default_key_rotates_only_with_the_addon(kms: Kms, alice: Client,
                                                       start_kms: StartKms,
                                                       tmp_path: Path) -> None:
    default = await default_key_id(kms, alice)
    before = kms.counts()
    reply = await kms.sdk_error(alice, "create_key_version",
                                m.CreateKeyVersionRequest(key_id=default))
    assert_error(reply, 400, UNSUPPORTED)
    reply = await kms.sdk_error(alice, "update_rotation_policy", m.UpdateRotationPolicyRequest(
        key_id=default, enable_automatic_rotation=True, rotation_interval="365d"))
    assert_error(reply, 400, UNSUPPORTED)
    assert_error(await kms.call(alice, "BackupKey", {"KeyId": default}), 400, UNSUPPORTED)
    assert kms.counts() == before

    addon_dir = tmp_path / "addon"
    addon_dir.mkdir()
    addon: Kms = await start_kms(directory=addon_dir, accounts=(
        AccountConfig(ACCOUNT_A, (AK_A1, AK_A2), rotation_addon=True),
        AccountConfig(ACCOUNT_B, (AK_B1,))))
    client = addon.client("a1")
    default = await default_key_id(addon, client)
    for interval in ("30d", "364d", "366d"):
        reply = await addon.sdk_error(client, "update_rotation_policy",
                                      m.UpdateRotationPolicyRequest(
                                          key_id=default, enable_automatic_rotation=True,
                                          rotation_interval=interval))
        assert_error(reply, 400, IP, names="RotationInterval")
    # The one allowed interval is the default.
    await addon.sdk(client, "update_rotation_policy", m.UpdateRotationPolicyRequest(
        key_id=default, enable_automatic_rotation=True))
    described = await describe(addon, client, default)
    assert (described.automatic_rotation, described.rotation_interval) == ("Enabled",
                                                                          "31536000s")
    await addon.sdk(client, "update_rotation_policy", m.UpdateRotationPolicyRequest(
        key_id=default, enable_automatic_rotation=True, rotation_interval="8760h"))
    # (Its data crypto belongs to cloud services; a user only rotates it.)
    version = (await addon.sdk(client, "create_key_version",
                               m.CreateKeyVersionRequest(key_id=default))).key_version
    assert (await versions_of(addon, client, default))[1:] == [version.key_version_id]
    assert (await describe(addon, client, default)).primary_key_version == (
        version.key_version_id)


# -- 3. scheduled deletion ----------------------------------------------------------------------

async def test_schedule_key_deletion_window_is_checked(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client)
    before, state = kms.counts(), await snapshot(kms, client, meta.key_id)
    for days in (6, 367, 0, -7):
        reply = await kms.sdk_error(client, "schedule_key_deletion", m.ScheduleKeyDeletionRequest(
            key_id=meta.key_id, pending_window_in_days=days))
        assert_error(reply, 400, IP, names="PendingWindowInDays")
    reply = await kms.sdk_error(client, "schedule_key_deletion", m.ScheduleKeyDeletionRequest(
        key_id=meta.key_id))
    assert_error(reply, 400, MP, names="PendingWindowInDays")
    for raw in ("seven", "7.0", "7d", "", "99999999999999999999"):
        reply = await kms.call(client, "ScheduleKeyDeletion", {"KeyId": meta.key_id,
                                                               "PendingWindowInDays": raw})
        assert_error(reply, 400, MP if raw == "" else IP, names="PendingWindowInDays")
    reply = await kms.sdk_error(client, "schedule_key_deletion", m.ScheduleKeyDeletionRequest(
        key_id=MISSING_KEY, pending_window_in_days=7))
    assert_error(reply, 404, "Forbidden.KeyNotFound")
    assert kms.counts() == before
    assert await snapshot(kms, client, meta.key_id) == state

    # 366 days is the longest window.
    longest = await create_key(kms, client)
    await kms.sdk(client, "schedule_key_deletion", m.ScheduleKeyDeletionRequest(
        key_id=longest.key_id, pending_window_in_days=366))
    assert_near((await describe(kms, client, longest.key_id)).delete_date,
                now() + timedelta(days=366))


async def test_schedule_and_cancel_key_deletion(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client)
    sealed = await encrypt(kms, client, meta.key_id, "keep me")
    await kms.sdk(client, "schedule_key_deletion", m.ScheduleKeyDeletionRequest(
        key_id=meta.key_id, pending_window_in_days=7))
    pending = await describe(kms, client, meta.key_id)
    assert pending.key_state == "PendingDeletion"
    assert_near(pending.delete_date, now() + timedelta(days=7))

    reply = await kms.sdk_error(client, "encrypt", m.EncryptRequest(key_id=meta.key_id,
                                                                    plaintext="x"))
    assert_error(reply, 409, "Rejected.PendingDeletion")
    reply = await kms.sdk_error(client, "decrypt", m.DecryptRequest(
        ciphertext_blob=sealed.ciphertext_blob))
    assert_error(reply, 409, "Rejected.PendingDeletion")
    reply = await kms.sdk_error(client, "schedule_key_deletion", m.ScheduleKeyDeletionRequest(
        key_id=meta.key_id, pending_window_in_days=30))
    assert_error(reply, 409, MODIFY)
    reply = await kms.sdk_error(client, "enable_key", m.EnableKeyRequest(key_id=meta.key_id))
    assert_error(reply, 409, MODIFY)
    # The failed second scheduling kept the first window.
    assert (await describe(kms, client, meta.key_id)).delete_date == pending.delete_date

    await kms.sdk(client, "cancel_key_deletion", m.CancelKeyDeletionRequest(key_id=meta.key_id))
    back = await describe(kms, client, meta.key_id)
    assert back.key_state == "Enabled"
    assert back.delete_date is None
    assert "DeleteDate" not in await snapshot(kms, client, meta.key_id)
    assert (await decrypt(kms, client, sealed.ciphertext_blob)).plaintext == "keep me"

    reply = await kms.sdk_error(client, "cancel_key_deletion",
                                m.CancelKeyDeletionRequest(key_id=meta.key_id))
    assert_error(reply, 409, MODIFY)
    await kms.sdk(client, "disable_key", m.DisableKeyRequest(key_id=meta.key_id))
    reply = await kms.sdk_error(client, "cancel_key_deletion",
                                m.CancelKeyDeletionRequest(key_id=meta.key_id))
    assert_error(reply, 409, MODIFY)
    assert (await describe(kms, client, meta.key_id)).key_state == "Disabled"


async def test_deletion_of_a_rotating_key_suspends_its_rotation(kms: Kms,
                                                                alice: Client) -> None:
    meta = await create_key(kms, alice, enable_automatic_rotation=True, rotation_interval="30d")
    await kms.sdk(alice, "schedule_key_deletion", m.ScheduleKeyDeletionRequest(
        key_id=meta.key_id, pending_window_in_days=10))
    pending = await describe(kms, alice, meta.key_id)
    assert (pending.key_state, pending.automatic_rotation) == ("PendingDeletion", "Suspended")
    reply = await kms.sdk_error(alice, "update_rotation_policy", m.UpdateRotationPolicyRequest(
        key_id=meta.key_id, enable_automatic_rotation=False))
    assert_error(reply, 409, "Rejected.PendingDeletion")
    await kms.sdk(alice, "cancel_key_deletion", m.CancelKeyDeletionRequest(key_id=meta.key_id))
    assert (await describe(kms, alice, meta.key_id)).automatic_rotation == "Enabled"


# -- 4. deletion protection ------------------------------------------------------------------

async def test_deletion_protection(kms: Kms, alice: Client) -> None:
    meta = await create_key(kms, alice)
    await kms.sdk(alice, "set_deletion_protection", m.SetDeletionProtectionRequest(
        protected_resource_arn=meta.arn, enable_deletion_protection=True,
        deletion_protection_description="production data, do not delete"))
    protected = await describe(kms, alice, meta.key_id)
    assert protected.deletion_protection == "Enabled"
    assert protected.deletion_protection_description == "production data, do not delete"

    before, state = kms.counts(), await snapshot(kms, alice, meta.key_id)
    reply = await kms.sdk_error(alice, "schedule_key_deletion", m.ScheduleKeyDeletionRequest(
        key_id=meta.key_id, pending_window_in_days=7))
    assert_error(reply, 403, "Forbidden.NoPermission")
    assert await snapshot(kms, alice, meta.key_id) == state
    assert state["KeyState"] == "Enabled" and "DeleteDate" not in state
    assert kms.counts() == before

    await kms.sdk(alice, "set_deletion_protection", m.SetDeletionProtectionRequest(
        protected_resource_arn=meta.arn, enable_deletion_protection=False))
    lifted = await describe(kms, alice, meta.key_id)
    assert (lifted.deletion_protection, lifted.deletion_protection_description) == (
        "Disabled", "")
    await kms.sdk(alice, "schedule_key_deletion", m.ScheduleKeyDeletionRequest(
        key_id=meta.key_id, pending_window_in_days=7))
    assert (await describe(kms, alice, meta.key_id)).key_state == "PendingDeletion"

    reply = await kms.sdk_error(alice, "set_deletion_protection", m.SetDeletionProtectionRequest(
        protected_resource_arn=meta.arn, enable_deletion_protection=True))
    assert_error(reply, 409, MODIFY)
    assert (await describe(kms, alice, meta.key_id)).deletion_protection == "Disabled"


async def test_deletion_protection_refusals(kms: Kms, alice: Client) -> None:
    meta = await create_key(kms, alice)
    bob = kms.client("b1", "v3")
    state = await snapshot(kms, alice, meta.key_id)
    reply = await kms.sdk_error(bob, "set_deletion_protection", m.SetDeletionProtectionRequest(
        protected_resource_arn=meta.arn, enable_deletion_protection=True))
    assert_error(reply, 403, "Forbidden.NoPermission")
    reply = await kms.sdk_error(bob, "schedule_key_deletion", m.ScheduleKeyDeletionRequest(
        key_id=meta.arn, pending_window_in_days=7))
    assert_error(reply, 403, "Forbidden.NoPermission")

    reply = await kms.call(alice, "SetDeletionProtection", {"ProtectedResourceArn": meta.arn})
    assert_error(reply, 400, MP, names="EnableDeletionProtection")
    reply = await kms.call(alice, "SetDeletionProtection", {"EnableDeletionProtection": "true"})
    assert_error(reply, 400, MP, names="ProtectedResourceArn")
    reply = await kms.call(alice, "SetDeletionProtection", {
        "ProtectedResourceArn": meta.arn, "EnableDeletionProtection": "on"})
    assert_error(reply, 400, IP, names="EnableDeletionProtection")
    reply = await kms.call(alice, "SetDeletionProtection", {
        "ProtectedResourceArn": meta.arn, "EnableDeletionProtection": "true",
        "DeletionProtectionDescription": "d" * 8193})
    assert_error(reply, 400, IP, names="DeletionProtectionDescription")
    reply = await kms.sdk_error(alice, "set_deletion_protection", m.SetDeletionProtectionRequest(
        protected_resource_arn=arn(MISSING_KEY), enable_deletion_protection=True))
    assert_error(reply, 404, "Forbidden.KeyNotFound")
    assert await snapshot(kms, alice, meta.key_id) == state


# -- 5. BYOK on a software instance -----------------------------------------------------------

@pytest.mark.parametrize("algorithm", sorted(WRAPPINGS))
async def test_byok_import_round_trip(kms: Kms, alice: Client, algorithm: str) -> None:
    meta = await byok_key(kms, alice, description="imported")
    assert meta.dkmsinstance_id is not None
    reply = await kms.sdk_error(alice, "encrypt", m.EncryptRequest(key_id=meta.key_id,
                                                                   plaintext="x"))
    assert_error(reply, 409, "Rejected.PendingImport")

    parameters = await import_parameters(kms, alice, meta.key_id, algorithm)
    assert parameters.key_id == meta.key_id
    public = serialization.load_der_public_key(base64.b64decode(parameters.public_key,
                                                                validate=True))
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
    assert isinstance(parameters.import_token, str) and len(parameters.import_token) >= 32
    assert_near(parameters.token_expire_time, now() + timedelta(hours=24))

    material = os.urandom(32)
    await kms.sdk(alice, "import_key_material", import_request(
        parameters, meta.key_id, material, algorithm=algorithm))
    enabled = await describe(kms, alice, meta.key_id)
    assert (enabled.key_state, enabled.origin) == ("Enabled", "EXTERNAL")
    assert enabled.material_expire_time in ("", None)
    sealed = await encrypt(kms, alice, meta.key_id, "imported secret")
    assert sealed.key_version_id == meta.primary_key_version
    assert (await decrypt(kms, alice, sealed.ciphertext_blob)).plaintext == "imported secret"


async def test_byok_delete_and_reimport_material(kms: Kms, alice: Client) -> None:
    meta = await byok_key(kms, alice)
    material = os.urandom(32)
    await import_material(kms, alice, meta.key_id, material)
    sealed = await encrypt(kms, alice, meta.key_id, "survives re-import")

    # Another material is refused even while the first is in place.
    parameters = await import_parameters(kms, alice, meta.key_id)
    reply = await kms.sdk_error(alice, "import_key_material", import_request(
        parameters, meta.key_id, os.urandom(32)))
    assert_error(reply, 400, "InvalidKeyMaterial")
    assert (await describe(kms, alice, meta.key_id)).key_state == "Enabled"

    await kms.sdk(alice, "delete_key_material", m.DeleteKeyMaterialRequest(key_id=meta.key_id))
    gone = await describe(kms, alice, meta.key_id)
    assert gone.key_state == "PendingImport"
    reply = await kms.sdk_error(alice, "decrypt", m.DecryptRequest(
        ciphertext_blob=sealed.ciphertext_blob))
    assert_error(reply, 409, "Rejected.PendingImport")
    reply = await kms.sdk_error(alice, "encrypt", m.EncryptRequest(key_id=meta.key_id,
                                                                   plaintext="x"))
    assert_error(reply, 409, "Rejected.PendingImport")

    before = kms.counts()
    parameters = await import_parameters(kms, alice, meta.key_id, "RSAES_OAEP_SHA_1")
    reply = await kms.sdk_error(alice, "import_key_material", import_request(
        parameters, meta.key_id, os.urandom(32), algorithm="RSAES_OAEP_SHA_1"))
    assert_error(reply, 400, "InvalidKeyMaterial")
    assert (await describe(kms, alice, meta.key_id)).key_state == "PendingImport"
    assert kms.counts() == before

    await kms.sdk(alice, "import_key_material", import_request(
        parameters, meta.key_id, material, algorithm="RSAES_OAEP_SHA_1"))
    assert (await describe(kms, alice, meta.key_id)).key_state == "Enabled"
    opened = await decrypt(kms, alice, sealed.ciphertext_blob)
    assert (opened.plaintext, opened.key_version_id) == ("survives re-import",
                                                         meta.primary_key_version)
    assert kms.counts() == before


async def test_byok_import_failures_change_nothing(kms: Kms, alice: Client) -> None:
    meta = await byok_key(kms, alice)
    other = await byok_key(kms, alice)
    material = os.urandom(32)
    parameters = await import_parameters(kms, alice, meta.key_id)
    others = await import_parameters(kms, alice, other.key_id)
    stranger = rsa.generate_private_key(65537, 2048).public_key()
    before = kms.counts()
    state = await snapshot(kms, alice, meta.key_id)
    other_state = await snapshot(kms, alice, other.key_id)

    def request(**change: Any) -> Any:
        base = import_request(parameters, meta.key_id, material)
        for name, value in change.items():
            setattr(base, name, value)
        return base

    cases: list[tuple[Any, int, str]] = [
        # 128-bit material for an AES-256 key.
        (import_request(parameters, meta.key_id, os.urandom(16)), 400, "InvalidKeyMaterial"),
        (import_request(parameters, meta.key_id, os.urandom(33)), 400, "InvalidKeyMaterial"),
        # The other key's token (and its public key): issued for another key.
        (import_request(others, meta.key_id, material), 400, "InvalidImportToken"),
        (request(import_token="garbage"), 400, "InvalidImportToken"),
        (request(import_token=parameters.import_token.split(".")[0] + ".forged-secret"), 400,
         "InvalidImportToken"),
        # Wrapped with a public key the service never issued.
        (request(encrypted_key_material=b64(stranger.encrypt(
            material, WRAPPINGS["RSAES_OAEP_SHA_256"]()))), 400, "InvalidKeyMaterial"),
        # Wrapped for the right key with the other algorithm than the token's.
        (request(encrypted_key_material=wrap(parameters.public_key, material,
                                             "RSAES_OAEP_SHA_1")), 400, "InvalidKeyMaterial"),
        (request(key_material_expire_unix=int(now().timestamp()) - 3600), 400, IP),
        (request(key_material_expire_unix=int(now().timestamp()) - 1), 400, IP),
    ]
    for req, status, code in cases:
        reply = await kms.sdk_error(alice, "import_key_material", req)
        assert_error(reply, status, code)
    good = import_request(parameters, meta.key_id, material)
    raw_cases: list[tuple[dict[str, str], str, str]] = [
        ({"EncryptedKeyMaterial": "not base64!"}, IP, "EncryptedKeyMaterial"),
        ({"EncryptedKeyMaterial": ""}, MP, "EncryptedKeyMaterial"),
        ({"ImportToken": ""}, MP, "ImportToken"),
        ({"KeyMaterialExpireUnix": "tomorrow"}, IP, "KeyMaterialExpireUnix"),
        ({"KeyMaterialExpireUnix": "-1"}, IP, "KeyMaterialExpireUnix"),
        ({"KeyMaterialExpireUnix": str(10**13)}, IP, "KeyMaterialExpireUnix"),
    ]
    for change, code, name in raw_cases:
        params = {"KeyId": meta.key_id, "EncryptedKeyMaterial": good.encrypted_key_material,
                  "ImportToken": parameters.import_token, **change}
        assert_error(await kms.call(alice, "ImportKeyMaterial", params), 400, code, names=name)
    assert kms.counts() == before
    assert await snapshot(kms, alice, meta.key_id) == state
    assert await snapshot(kms, alice, other.key_id) == other_state

    # The parameters are still good after all those failures; a future expiry shows.
    expire = int(now().timestamp()) + 30 * DAY
    await kms.sdk(alice, "import_key_material", request(key_material_expire_unix=expire))
    imported = await describe(kms, alice, meta.key_id)
    assert imported.key_state == "Enabled"
    assert imported.material_expire_time == format_time(datetime.fromtimestamp(expire, UTC))
    assert (await snapshot(kms, alice, other.key_id)) == other_state
    # The other key's own parameters still work for it.
    await kms.sdk(alice, "import_key_material", import_request(others, other.key_id,
                                                               os.urandom(32)))
    assert (await describe(kms, alice, other.key_id)).key_state == "Enabled"
    assert kms.counts() == before


async def test_byok_parameter_refusals(kms: Kms, alice: Client) -> None:
    native = await create_key(kms, alice)
    imported = await byok_key(kms, alice)
    before = kms.counts()
    reply = await kms.sdk_error(alice, "get_parameters_for_import",
                                m.GetParametersForImportRequest(
                                    key_id=native.key_id, wrapping_key_spec="RSA_2048",
                                    wrapping_algorithm="RSAES_OAEP_SHA_256"))
    assert_error(reply, 400, "Unsupported.Origin")
    reply = await kms.sdk_error(alice, "delete_key_material",
                                m.DeleteKeyMaterialRequest(key_id=native.key_id))
    assert_error(reply, 400, "Unsupported.Origin")
    reply = await kms.call(alice, "ImportKeyMaterial", {
        "KeyId": native.key_id, "EncryptedKeyMaterial": b64(bytes(256)),
        "ImportToken": "a.b"})
    assert_error(reply, 400, "Unsupported.Origin")

    for spec, algorithm, status, code, name in (
        ("EC_SM2", "SM2PKE", 400, UNSUPPORTED, None),
        ("RSA_2048", "RSAES_OAEP_SHA_512", 400, IP, "WrappingAlgorithm"),
        ("RSA_2048", "SM2PKE", 400, IP, "WrappingAlgorithm"),
        ("RSA_4096", "RSAES_OAEP_SHA_256", 400, IP, "WrappingKeySpec"),
    ):
        reply = await kms.sdk_error(alice, "get_parameters_for_import",
                                    m.GetParametersForImportRequest(
                                        key_id=imported.key_id, wrapping_key_spec=spec,
                                        wrapping_algorithm=algorithm))
        assert_error(reply, status, code, names=name)
    reply = await kms.call(alice, "GetParametersForImport", {
        "KeyId": imported.key_id, "WrappingKeySpec": "RSA_2048"})
    assert_error(reply, 400, MP, names="WrappingAlgorithm")
    reply = await kms.sdk_error(alice, "get_parameters_for_import",
                                m.GetParametersForImportRequest(
                                    key_id=MISSING_KEY, wrapping_key_spec="RSA_2048",
                                    wrapping_algorithm="RSAES_OAEP_SHA_256"))
    assert_error(reply, 404, "Forbidden.KeyNotFound")
    assert kms.counts() == before
    assert (await describe(kms, alice, imported.key_id)).key_state == "PendingImport"
    assert (await describe(kms, alice, native.key_id)).key_state == "Enabled"


async def test_byok_keys_never_rotate(kms: Kms, alice: Client) -> None:
    meta = await byok_key(kms, alice)
    before = kms.counts()
    reply = await kms.sdk_error(alice, "create_key_version",
                                m.CreateKeyVersionRequest(key_id=meta.key_id))
    assert_error(reply, 400, UNSUPPORTED)
    await import_material(kms, alice, meta.key_id, os.urandom(32))
    reply = await kms.sdk_error(alice, "create_key_version",
                                m.CreateKeyVersionRequest(key_id=meta.key_id))
    assert_error(reply, 400, UNSUPPORTED)
    reply = await kms.sdk_error(alice, "update_rotation_policy", m.UpdateRotationPolicyRequest(
        key_id=meta.key_id, enable_automatic_rotation=True, rotation_interval="30d"))
    assert_error(reply, 400, UNSUPPORTED)
    assert kms.counts() == before
    assert await versions_of(kms, alice, meta.key_id) == [meta.primary_key_version]
    assert (await describe(kms, alice, meta.key_id)).automatic_rotation == "Disabled"


@pytest.mark.parametrize(("spec", "size"), [("Aliyun_AES_128", 16), ("Aliyun_SM4", 16)])
async def test_byok_128_bit_specs(kms: Kms, alice: Client, spec: str, size: int) -> None:
    meta = await byok_key(kms, alice, key_spec=spec)
    parameters = await import_parameters(kms, alice, meta.key_id)
    for wrong in (32, 24):
        reply = await kms.sdk_error(alice, "import_key_material", import_request(
            parameters, meta.key_id, os.urandom(wrong)))
        assert_error(reply, 400, "InvalidKeyMaterial")
    await kms.sdk(alice, "import_key_material", import_request(parameters, meta.key_id,
                                                               os.urandom(size)))
    described = await describe(kms, alice, meta.key_id)
    assert (described.key_spec, described.key_state) == (spec, "Enabled")
    sealed = await encrypt(kms, alice, meta.key_id, f"{spec} imported")
    assert (await decrypt(kms, alice, sealed.ciphertext_blob)).plaintext == f"{spec} imported"


async def test_byok_pkcs1_wrapping_is_refused(kms: Kms, alice: Client) -> None:
    """RSAES_PKCS1_V1_5 unwrapping cannot tell a wrong wrapping from material (OpenSSL's
    implicit rejection yields random bytes), so the front refuses to issue such parameters
    rather than take garbage as a key's material about once in 250 wrong wrappings."""
    meta = await byok_key(kms, alice)
    before = kms.counts()
    reply = await kms.sdk_error(alice, "get_parameters_for_import",
                                m.GetParametersForImportRequest(
                                    key_id=meta.key_id, wrapping_key_spec="RSA_2048",
                                    wrapping_algorithm="RSAES_PKCS1_V1_5"))
    assert_error(reply, 400, "Rejected.UnsupportedOperation")
    assert "implicit rejection" in str(reply.body["Message"])
    assert (await describe(kms, alice, meta.key_id)).key_state == "PendingImport"
    assert kms.counts() == before


async def test_imported_material_expiry_is_carried_out_and_audited(
        start_kms: StartKms, tmp_path: Path) -> None:
    """Expired material leaves the key PendingImport until the same material comes back,
    whether the periodic sweep or a request notices the expiry first, and the audit trail
    records the material's deletion by KMS itself either way."""
    lazy: Kms = await start_kms()  # sweeps at start, then every 60 s: a request comes first
    sweeping_dir = tmp_path / "sweeping"
    sweeping_dir.mkdir()
    sweeping: Kms = await start_kms(directory=sweeping_dir, lifecycle_interval_s=0.2)
    expire = int(now().timestamp()) + 3
    prepared: list[tuple[Kms, Client, Any, bytes, Any]] = []
    for front in (sweeping, lazy):
        client = front.client("a1")
        meta = await byok_key(front, client)
        material = os.urandom(32)
        await import_material(front, client, meta.key_id, material, expire_unix=expire)
        described = await describe(front, client, meta.key_id)
        assert described.material_expire_time == format_time(
            datetime.fromtimestamp(expire, UTC))
        sealed = await encrypt(front, client, meta.key_id, "expiring")
        prepared.append((front, client, meta, material, sealed))
    await asyncio.sleep(max(0.0, expire - now().timestamp()) + 1.5)

    for front, client, meta, material, sealed in prepared:
        expired = await describe(front, client, meta.key_id)
        assert (expired.key_state, expired.material_expire_time) == ("PendingImport", "")
        reply = await front.sdk_error(client, "decrypt", m.DecryptRequest(
            ciphertext_blob=sealed.ciphertext_blob))
        assert_error(reply, 409, "Rejected.PendingImport")
        await import_material(front, client, meta.key_id, material)
        assert (await decrypt(front, client, sealed.ciphertext_blob)).plaintext == "expiring"

    for front, _, meta, _, _ in prepared:
        await front.stop()
        events = [json.loads(line)
                  for line in front.config.audit_log.read_text().splitlines()]
        by_kms = [(e["action"], e["outcome"]) for e in events
                  if e["key_id"] == meta.key_id
                  and e["principal"] == f"acs:ram::{ACCOUNT_A}:service/kms"]
        assert by_kms == [("DeleteKeyMaterial", "Success")], (
            "sweeping" if front is sweeping else "request-first", by_kms)


async def test_byok_key_deletion_and_cancel_keep_pending_import(kms: Kms,
                                                                alice: Client) -> None:
    meta = await byok_key(kms, alice)
    await kms.sdk(alice, "schedule_key_deletion", m.ScheduleKeyDeletionRequest(
        key_id=meta.key_id, pending_window_in_days=7))
    assert (await describe(kms, alice, meta.key_id)).key_state == "PendingDeletion"
    await kms.sdk(alice, "cancel_key_deletion", m.CancelKeyDeletionRequest(key_id=meta.key_id))
    assert (await describe(kms, alice, meta.key_id)).key_state == "PendingImport"

    # With material, then deleted while PendingDeletion: the state and DeleteDate stay.
    await import_material(kms, alice, meta.key_id, os.urandom(32))
    await kms.sdk(alice, "schedule_key_deletion", m.ScheduleKeyDeletionRequest(
        key_id=meta.key_id, pending_window_in_days=8))
    scheduled = await describe(kms, alice, meta.key_id)
    await kms.sdk(alice, "delete_key_material", m.DeleteKeyMaterialRequest(key_id=meta.key_id))
    after = await describe(kms, alice, meta.key_id)
    assert (after.key_state, after.delete_date) == ("PendingDeletion", scheduled.delete_date)
    parameters = await import_parameters(kms, alice, meta.key_id)
    reply = await kms.sdk_error(alice, "import_key_material", import_request(
        parameters, meta.key_id, os.urandom(32)))
    assert_error(reply, 409, MODIFY)
    await kms.sdk(alice, "cancel_key_deletion", m.CancelKeyDeletionRequest(key_id=meta.key_id))
    assert (await describe(kms, alice, meta.key_id)).key_state == "PendingImport"


# -- 6. backup and restore (this project's extension) ---------------------------------------

async def rotated_tagged_key(kms: Kms, client: Client) -> tuple[Any, list[tuple[str, str]]]:
    """A software key with two versions and a tag, and (blob, plaintext) under each."""
    meta = await create_key(kms, client, description="backed up", tags=json.dumps(
        [{"TagKey": "env", "TagValue": "prod"}]))
    blobs = [((await encrypt(kms, client, meta.key_id, "under version one")).ciphertext_blob,
              "under version one")]
    await kms.sdk(client, "create_key_version", m.CreateKeyVersionRequest(key_id=meta.key_id))
    blobs.append(((await encrypt(kms, client, meta.key_id, "under version two")
                   ).ciphertext_blob, "under version two"))
    return meta, blobs


async def test_backup_is_sealed_and_guarded(kms: Kms, alice: Client) -> None:
    meta, _ = await rotated_tagged_key(kms, alice)
    reply = await kms.call(alice, "BackupKey", {"KeyId": meta.key_id})
    assert reply.status == 200, reply
    assert reply.body["KeyId"] == meta.key_id
    text = reply.body["KeyBackup"]
    raw = base64.b64decode(text, validate=True)
    with pytest.raises(ValueError):  # UnicodeDecodeError and JSONDecodeError alike
        json.loads(raw.decode())
    for clear in (meta.key_id.encode(), b"prod", b"backed up", b'"versions"',
                  meta.primary_key_version.encode()):
        assert clear not in raw
    assert (await backup(kms, alice, meta.key_id)) != text  # a fresh nonce each time

    before = kms.counts()
    reply = await kms.call(alice, "RestoreKeyBackup", {"KeyBackup": text})
    assert_error(reply, 400, IP, names="KeyBackup")
    for position in (0, 12, len(raw) // 2, len(raw) - 1):
        tampered = bytearray(raw)
        tampered[position] ^= 0x01
        reply = await kms.call(alice, "RestoreKeyBackup", {"KeyBackup": b64(bytes(tampered))})
        assert_error(reply, 400, IP, names="KeyBackup")
    for truncated in (raw[:-1], raw[:20], raw[:5], b""):
        reply = await kms.call(alice, "RestoreKeyBackup", {"KeyBackup": b64(truncated)})
        assert_error(reply, 400, MP if not truncated else IP, names="KeyBackup")
    assert_error(await kms.call(alice, "RestoreKeyBackup", {"KeyBackup": "%%not base64%%"}),
                 400, IP, names="KeyBackup")
    assert_error(await kms.call(alice, "RestoreKeyBackup", {}), 400, MP, names="KeyBackup")
    reply = await kms.call(kms.client("b1", "v3"), "RestoreKeyBackup", {"KeyBackup": text})
    assert_error(reply, 403, "Forbidden.NoPermission")
    reply = await kms.call(kms.client("b1", "v3"), "BackupKey", {"KeyId": meta.arn})
    assert_error(reply, 403, "Forbidden.NoPermission")
    assert_error(await kms.call(alice, "BackupKey", {"KeyId": MISSING_KEY}), 404,
                 "Forbidden.KeyNotFound")
    assert_error(await kms.call(alice, "BackupKey", {}), 400, MP, names="KeyId")
    assert kms.counts() == before


async def test_backup_of_a_key_pending_deletion_is_refused(kms: Kms, alice: Client) -> None:
    meta = await create_key(kms, alice)
    await kms.sdk(alice, "schedule_key_deletion", m.ScheduleKeyDeletionRequest(
        key_id=meta.key_id, pending_window_in_days=7))
    reply = await kms.call(alice, "BackupKey", {"KeyId": meta.key_id})
    assert_error(reply, 409, "Rejected.PendingDeletion")


async def test_backup_by_alias_answers_the_key_id(kms: Kms, alice: Client) -> None:
    """BackupKey's KeyId, like every other action's (GetParametersForImport, Encrypt ...), is
    the key's id even when the caller named the key by alias or ARN, and the audit event
    names that key with its real ARN."""
    meta = await create_key(kms, alice)
    await kms.sdk(alice, "create_alias", m.CreateAliasRequest(alias_name="alias/backed-up",
                                                              key_id=meta.key_id))
    replies = [await kms.call(alice, "BackupKey", {"KeyId": ref})
               for ref in ("alias/backed-up", meta.arn, meta.key_id)]
    assert [r.status for r in replies] == [200, 200, 200], replies
    await kms.stop()  # flushes the audit log
    events = {e["request_id"]: e for e in map(
        json.loads, kms.config.audit_log.read_text().splitlines())}
    answered = [r.body["KeyId"] for r in replies]
    audited = [(events[r.body["RequestId"]]["key_id"], events[r.body["RequestId"]]["key_arn"])
               for r in replies]
    assert (answered, audited) == ([meta.key_id] * 3, [(meta.key_id, meta.arn)] * 3)


async def test_restore_needs_the_key_instance(kms: Kms, alice: Client, start_kms: StartKms,
                                              tmp_path: Path) -> None:
    meta = await create_key(kms, alice)
    text = await backup(kms, alice, meta.key_id)
    other_dir = tmp_path / "other-instance"
    other_dir.mkdir()
    other_instance = "kst-hzzotherinstance01"
    other: Kms = await start_kms(
        directory=other_dir, root_key=kms.config.root_key,
        instances=(InstanceConfig(other_instance, ACCOUNT_A, InstanceType.SOFTWARE, "other",
                                  1000),
                   *[i for i in kms.config.instances if i.account_id != ACCOUNT_A]),
        default_instance={**kms.config.default_instance, ACCOUNT_A: other_instance})
    reply = await other.call(other.client("a1"), "RestoreKeyBackup", {"KeyBackup": text})
    assert_error(reply, 403, "Forbidden.DKMSInstanceNotFound")
    assert other.counts() == {"keys": 0, "key_versions": 0, "aliases": 0, "tags": 0}


async def test_backup_restores_into_a_fresh_front(kms: Kms, alice: Client, start_kms: StartKms,
                                                  tmp_path: Path) -> None:
    meta, blobs = await rotated_tagged_key(kms, alice)
    versions = await versions_of(kms, alice, meta.key_id)
    assert len(versions) == 2
    await kms.sdk(alice, "update_rotation_policy", m.UpdateRotationPolicyRequest(
        key_id=meta.key_id, enable_automatic_rotation=True, rotation_interval="90d"))
    original = await snapshot(kms, alice, meta.key_id)
    text = await backup(kms, alice, meta.key_id)

    # A front with another root key cannot open it.
    stranger_dir = tmp_path / "stranger"
    stranger_dir.mkdir()
    stranger: Kms = await start_kms(directory=stranger_dir)
    reply = await stranger.call(stranger.client("a1"), "RestoreKeyBackup", {"KeyBackup": text})
    assert_error(reply, 400, IP, names="KeyBackup")
    assert stranger.counts()["keys"] == 0

    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second: Kms = await start_kms(directory=second_dir, root_key=kms.config.root_key)
    assert second.config.instances == kms.config.instances
    client = second.client("a1", "v2")
    reply = await second.call(client, "DescribeKey", {"KeyId": meta.key_id})
    assert_error(reply, 404, "Forbidden.KeyNotFound")
    reply = await second.call(client, "RestoreKeyBackup", {"KeyBackup": text})
    assert reply.status == 200, reply
    restored = reply.body["KeyMetadata"]
    assert (restored["KeyId"], restored["Arn"], restored["KeyState"]) == (
        meta.key_id, meta.arn, "Enabled")
    assert restored["PrimaryKeyVersion"] == versions[1]
    assert await snapshot(second, client, meta.key_id) == original
    assert second.counts() == {"keys": 1, "key_versions": 2, "aliases": 0, "tags": 1}

    for blob, plaintext in blobs:
        assert (await decrypt(second, client, blob)).plaintext == plaintext
    assert await versions_of(second, client, meta.key_id) == versions
    tags = await second.sdk(client, "list_resource_tags",
                            m.ListResourceTagsRequest(key_id=meta.key_id))
    assert [(t.tag_key, t.tag_value) for t in tags.tags.tag] == [("env", "prod")]
    fresh = await encrypt(second, client, meta.key_id, "made on the second front")
    assert fresh.key_version_id == versions[1]
    assert (await decrypt(kms, alice, fresh.ciphertext_blob)).plaintext == (
        "made on the second front")

    # Restoring once more collides with the key now present.
    reply = await second.call(client, "RestoreKeyBackup", {"KeyBackup": text})
    assert_error(reply, 400, IP, names="KeyBackup")
    assert second.counts() == {"keys": 1, "key_versions": 2, "aliases": 0, "tags": 1}


async def test_backup_restores_a_key_pending_import(kms: Kms, alice: Client,
                                                    start_kms: StartKms,
                                                    tmp_path: Path) -> None:
    meta = await byok_key(kms, alice)
    material = os.urandom(32)
    await import_material(kms, alice, meta.key_id, material)
    sealed = await encrypt(kms, alice, meta.key_id, "byok backup")
    text = await backup(kms, alice, meta.key_id)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second: Kms = await start_kms(directory=second_dir, root_key=kms.config.root_key)
    client = second.client("a1")
    reply = await second.call(client, "RestoreKeyBackup", {"KeyBackup": text})
    assert reply.status == 200, reply
    assert (reply.body["KeyMetadata"]["Origin"], reply.body["KeyMetadata"]["KeyState"]) == (
        "EXTERNAL", "Enabled")
    assert (await decrypt(second, client, sealed.ciphertext_blob)).plaintext == "byok backup"
    # The restored key still takes only its own material.
    await second.sdk(client, "delete_key_material",
                     m.DeleteKeyMaterialRequest(key_id=meta.key_id))
    parameters = await import_parameters(second, client, meta.key_id)
    reply = await second.sdk_error(client, "import_key_material", import_request(
        parameters, meta.key_id, os.urandom(32)))
    assert_error(reply, 400, "InvalidKeyMaterial")
    await second.sdk(client, "import_key_material", import_request(parameters, meta.key_id,
                                                                   material))
    assert (await decrypt(second, client, sealed.ciphertext_blob)).plaintext == "byok backup"


# -- 7. audit ----------------------------------------------------------------------------

async def test_lifecycle_actions_are_audited_without_secrets(kms: Kms, alice: Client) -> None:
    secrets: list[str] = []
    key = await create_key(kms, alice)
    await kms.sdk(alice, "create_key_version", m.CreateKeyVersionRequest(key_id=key.key_id))
    await kms.sdk(alice, "list_key_versions", m.ListKeyVersionsRequest(key_id=key.key_id))
    await kms.sdk(alice, "describe_key_version", m.DescribeKeyVersionRequest(
        key_id=key.key_id, key_version_id=key.primary_key_version))
    await kms.sdk(alice, "update_rotation_policy", m.UpdateRotationPolicyRequest(
        key_id=key.key_id, enable_automatic_rotation=True, rotation_interval="30d"))
    await kms.sdk(alice, "set_deletion_protection", m.SetDeletionProtectionRequest(
        protected_resource_arn=key.arn, enable_deletion_protection=True,
        deletion_protection_description="audited"))
    protected = await kms.sdk_error(alice, "schedule_key_deletion",
                                    m.ScheduleKeyDeletionRequest(key_id=key.key_id,
                                                                 pending_window_in_days=7))
    await kms.sdk(alice, "set_deletion_protection", m.SetDeletionProtectionRequest(
        protected_resource_arn=key.arn, enable_deletion_protection=False))
    text = await backup(kms, alice, key.key_id)
    secrets.append(text)
    await kms.sdk(alice, "schedule_key_deletion", m.ScheduleKeyDeletionRequest(
        key_id=key.key_id, pending_window_in_days=7))
    await kms.sdk(alice, "cancel_key_deletion", m.CancelKeyDeletionRequest(key_id=key.key_id))
    restore = await kms.call(alice, "RestoreKeyBackup", {"KeyBackup": text})
    assert_error(restore, 400, IP)

    byok = await byok_key(kms, alice)
    material = os.urandom(32)
    parameters = await import_parameters(kms, alice, byok.key_id)
    bad = import_request(parameters, byok.key_id, os.urandom(16))
    failed = await kms.sdk_error(alice, "import_key_material", bad)
    good = import_request(parameters, byok.key_id, material)
    await kms.sdk(alice, "import_key_material", good)
    await kms.sdk(alice, "delete_key_material", m.DeleteKeyMaterialRequest(key_id=byok.key_id))
    secrets += [parameters.import_token, parameters.import_token.split(".", 1)[1],
                good.encrypted_key_material, bad.encrypted_key_material,
                b64(material), material.hex()]

    await kms.stop()  # flushes the audit log
    events = [json.loads(line) for line in kms.config.audit_log.read_text().splitlines()]
    outcomes = {(e["action"], e["outcome"], e["error_code"]) for e in events}
    for action in ("CreateKeyVersion", "ListKeyVersions", "DescribeKeyVersion",
                   "UpdateRotationPolicy", "SetDeletionProtection", "BackupKey",
                   "ScheduleKeyDeletion", "CancelKeyDeletion", "GetParametersForImport",
                   "ImportKeyMaterial", "DeleteKeyMaterial"):
        assert (action, "Success", None) in outcomes, action
    assert ("ScheduleKeyDeletion", "Failure", protected.code) in outcomes
    assert ("ImportKeyMaterial", "Failure", failed.code) in outcomes
    assert ("RestoreKeyBackup", "Failure", restore.code) in outcomes
    by_request = {e["request_id"]: e for e in events}
    assert by_request[protected.body["RequestId"]]["key_id"] == key.key_id
    assert by_request[restore.body["RequestId"]]["principal"].endswith("user/alice")
    for event in events:
        if event["action"] in ("SetDeletionProtection", "BackupKey", "ScheduleKeyDeletion",
                               "CreateKeyVersion") and event["outcome"] == "Success":
            assert (event["key_id"], event["key_arn"]) == (key.key_id, key.arn), event
        if event["action"] in ("GetParametersForImport", "ImportKeyMaterial",
                               "DeleteKeyMaterial") and event["outcome"] == "Success":
            assert (event["key_id"], event["key_arn"]) == (byok.key_id, byok.arn), event
    log = kms.config.audit_log.read_text()
    for secret in secrets:
        assert secret not in log, f"the audit log holds {secret[:16]}..."


# -- 8. property: durations and windows --------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=16)  # no lone surrogates
INTERVALS = st.one_of(
    st.tuples(st.integers(0, 40_000_000), st.sampled_from("dhmsDHMSxy ")).map(
        lambda t: f"{t[0]}{t[1]}"),
    st.from_regex(r"[ +-]?[0-9]{0,14}[dhms]{0,2}\s?", fullmatch=True),
    TEXT,
)
WINDOWS = st.one_of(
    st.integers(-400, 800).map(str),
    st.from_regex(r"[ +-]?[0-9]{0,12}[.d_ ]?[0-9]{0,2}", fullmatch=True),
    TEXT,
)
_CANONICAL_INTERVAL = re.compile(r"([0-9]{1,12})([dhms])")
_UNITS = {"d": DAY, "h": 3600, "m": 60, "s": 1}


def check_refusal(reply: Reply) -> None:
    assert 400 <= reply.status < 500, reply
    assert reply.body["HttpStatus"] == reply.status, reply
    assert reply.code in (IP, MP), reply


async def test_rotation_interval_and_pending_window_never_break_the_front(
        kms: Kms, alice: Client) -> None:
    rotating = (await create_key(kms, alice)).key_id
    deleting = (await create_key(kms, alice)).key_id
    seen: list[int] = []

    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(interval=INTERVALS, window=WINDOWS)
    def run(interval: str, window: str) -> None:
        canonical = _CANONICAL_INTERVAL.fullmatch(interval)
        seconds = int(canonical[1]) * _UNITS[canonical[2]] if canonical else None
        in_bounds = seconds is not None and 7 * DAY <= seconds <= 365 * DAY

        # UpdateRotationPolicy on an Enabled software key.
        before, counts = snapshot_blocking(kms, alice, rotating), kms.counts()
        reply = kms.call_blocking(alice, "UpdateRotationPolicy", {
            "KeyId": rotating, "EnableAutomaticRotation": "true", "RotationInterval": interval})
        seen.append(reply.status)
        if reply.status == 200:
            assert in_bounds, (interval, reply)
            after = snapshot_blocking(kms, alice, rotating)
            assert (after["AutomaticRotation"], after["RotationInterval"]) == (
                "Enabled", f"{seconds}s")
            kms.call_blocking(alice, "UpdateRotationPolicy", {
                "KeyId": rotating, "EnableAutomaticRotation": "false"})
        else:
            check_refusal(reply)
            assert not in_bounds, (interval, reply)
            assert reply.code == (MP if interval == "" else IP), reply
            assert snapshot_blocking(kms, alice, rotating) == before
        assert kms.counts() == counts

        # CreateKey with automatic rotation.
        counts = kms.counts()
        reply = kms.call_blocking(alice, "CreateKey", {"EnableAutomaticRotation": "true",
                                                       "RotationInterval": interval})
        seen.append(reply.status)
        if reply.status == 200:
            assert in_bounds, (interval, reply)
            assert reply.body["KeyMetadata"]["RotationInterval"] == f"{seconds}s"
            assert kms.counts() == {**counts, "keys": counts["keys"] + 1,
                                    "key_versions": counts["key_versions"] + 1}
        else:
            check_refusal(reply)
            assert not in_bounds, (interval, reply)
            assert kms.counts() == counts

        # ScheduleKeyDeletion on an Enabled key.
        before, counts = snapshot_blocking(kms, alice, deleting), kms.counts()
        reply = kms.call_blocking(alice, "ScheduleKeyDeletion", {
            "KeyId": deleting, "PendingWindowInDays": window})
        seen.append(reply.status)
        if window.isascii() and window.isdigit() and len(window) < 10:
            assert reply.status == (200 if 7 <= int(window) <= 366 else 400), (window, reply)
        if reply.status == 200:
            after = snapshot_blocking(kms, alice, deleting)
            assert after["KeyState"] == "PendingDeletion"
            days = int(window)
            assert 7 <= days <= 366
            assert_near(after["DeleteDate"], now() + timedelta(days=days))
            cancel = kms.call_blocking(alice, "CancelKeyDeletion", {"KeyId": deleting})
            assert cancel.status == 200, cancel
        else:
            check_refusal(reply)
            assert reply.code == (MP if window == "" else IP), reply
        assert snapshot_blocking(kms, alice, deleting) == before
        assert kms.counts() == counts

    await asyncio.to_thread(run)
    assert seen and all(status in (200, 400) for status in seen)
