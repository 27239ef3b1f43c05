"""Every action of the front through the official SDK (``alibabacloud-kms20160120``), with
both signature schemes, checking the response fields the SDK maps."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

import pytest
from alibabacloud_kms20160120 import models
from alibabacloud_kms20160120.client import Client
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from kms_proxy.app import SERVICE
from kms_proxy.core.quotas import GatewayQuotas
from tests.integration.kms.conftest import (
    ACCOUNT_A,
    ACCOUNT_B,
    INSTANCE_A,
    INSTANCE_B,
    REGION,
    Kms,
    StartKms,
    assert_error,
)

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DATE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
KEY_ID = re.compile(r"key-[a-z0-9]+")
TRICKY = [
    "hello world",
    "a b+c/d=e*f~g %20 &x=y",
    "aGVsbG8=",
    "  leading and trailing  ",
    "é 密钥 🔑 ü\u00a0nbsp",
    "line1\nline2\ttab",
    "+/=+/==",
]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def create_key(kms: Kms, client: Client, **kwargs: Any) -> Any:
    body = await kms.sdk(client, "create_key", models.CreateKeyRequest(**kwargs))
    return body.key_metadata


async def encrypt(kms: Kms, client: Client, key_id: str, plaintext: str,
                  context: dict[str, str] | None = None) -> Any:
    return await kms.sdk(client, "encrypt", models.EncryptRequest(
        key_id=key_id, plaintext=plaintext, encryption_context=context))


async def decrypt(kms: Kms, client: Client, blob: str,
                  context: dict[str, str] | None = None) -> Any:
    return await kms.sdk(client, "decrypt", models.DecryptRequest(
        ciphertext_blob=blob, encryption_context=context))


@pytest.fixture(scope="module")
def wrapping_key() -> rsa.RSAPrivateKey:
    """A caller's RSA-2048 key pair for data key export, made once per module."""
    return rsa.generate_private_key(65537, 2048)


def spki_b64(private: rsa.RSAPrivateKey) -> str:
    return b64(private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


# -- key lifecycle ---------------------------------------------------------------------

async def test_create_key_default_spec(kms: Kms, client: Client) -> None:
    tags = [{"TagKey": "env", "TagValue": "prod"}, {"TagKey": "team", "TagValue": "a-b"}]
    meta = await create_key(kms, client, description="first key", tags=json.dumps(tags))
    assert KEY_ID.fullmatch(meta.key_id)
    assert meta.key_spec == "Aliyun_AES_256"
    assert meta.key_usage == "ENCRYPT/DECRYPT"
    assert meta.key_state == "Enabled"
    assert meta.arn == f"acs:kms:{REGION}:{ACCOUNT_A}:key/{meta.key_id}"
    assert meta.dkmsinstance_id == INSTANCE_A
    assert meta.origin == "Aliyun_KMS"
    assert meta.protection_level == "SOFTWARE"
    assert meta.creator == ACCOUNT_A
    assert meta.description == "first key"
    assert DATE.fullmatch(meta.creation_date)
    assert UUID.fullmatch(meta.primary_key_version)
    assert meta.delete_date is None
    listed = await kms.sdk(client, "list_resource_tags",
                           models.ListResourceTagsRequest(key_id=meta.key_id))
    assert sorted((t.key_id, t.tag_key, t.tag_value) for t in listed.tags.tag) == [
        (meta.key_id, "env", "prod"), (meta.key_id, "team", "a-b")]


@pytest.mark.parametrize(("spec", "usage"), [
    ("Aliyun_AES_128", "ENCRYPT/DECRYPT"),
    ("Aliyun_SM4", "ENCRYPT/DECRYPT"),
    ("RSA_2048", "SIGN/VERIFY"),
    ("RSA_3072", "SIGN/VERIFY"),
    ("EC_P256", "SIGN/VERIFY"),
    ("EC_P256K", "SIGN/VERIFY"),
])
async def test_create_key_specs_and_default_usage(kms: Kms, client: Client, spec: str,
                                                  usage: str) -> None:
    meta = await create_key(kms, client, key_spec=spec)
    assert (meta.key_spec, meta.key_usage, meta.key_state) == (spec, usage, "Enabled")
    if spec.startswith("Aliyun_"):
        sealed = await encrypt(kms, client, meta.key_id, "secret")
        assert (await decrypt(kms, client, sealed.ciphertext_blob)).plaintext == "secret"
    else:
        public = await kms.sdk(client, "get_public_key", models.GetPublicKeyRequest(
            key_id=meta.key_id, key_version_id=meta.primary_key_version))
        loaded = serialization.load_pem_public_key(public.public_key.encode())
        if spec.startswith("RSA_"):
            assert isinstance(loaded, rsa.RSAPublicKey)
            assert loaded.key_size == int(spec[4:])
        else:
            assert isinstance(loaded, ec.EllipticCurvePublicKey)
            assert loaded.curve.name == ("secp256r1" if spec == "EC_P256" else "secp256k1")


async def test_create_key_ec_sm2_is_unsupported(kms: Kms, client: Client) -> None:
    reply = await kms.sdk_error(client, "create_key", models.CreateKeyRequest(key_spec="EC_SM2"))
    assert_error(reply, 400, "Rejected.UnsupportedOperation")
    assert kms.counts()["keys"] == 0


async def test_create_key_rsa_for_encryption_and_bad_usage(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client, key_spec="EC_P256", key_usage="SIGN/VERIFY")
    assert meta.key_usage == "SIGN/VERIFY"
    reply = await kms.sdk_error(client, "create_key", models.CreateKeyRequest(
        key_spec="EC_P256", key_usage="ENCRYPT/DECRYPT"))
    assert_error(reply, 400, "InvalidParameter", names="KeyUsage")


async def test_describe_key_by_id_alias_and_arn(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client, description="described")
    await kms.sdk(client, "create_alias", models.CreateAliasRequest(
        alias_name="alias/described", key_id=meta.key_id))
    refs = [meta.key_id, "alias/described", meta.arn,
            f"acs:kms:{REGION}:{ACCOUNT_A}:alias/described"]
    for ref in refs:
        body = await kms.sdk(client, "describe_key", models.DescribeKeyRequest(key_id=ref))
        got = body.key_metadata
        assert got.key_id == meta.key_id, ref
        assert got.arn == meta.arn
        assert got.description == "described"
        assert got.deletion_protection == "Disabled"
        assert got.deletion_protection_description == ""
        assert got.key_spec == "Aliyun_AES_256"
        assert got.primary_key_version == meta.primary_key_version
        assert got.automatic_rotation == "Disabled"
        assert got.dkmsinstance_id == INSTANCE_A
        assert got.delete_date is None
        assert UUID.fullmatch(body.request_id.lower())
    for missing, code in [("key-hzz0000000000000000000", "Forbidden.KeyNotFound"),
                          ("alias/nothing-here", "Forbidden.AliasNotFound"),
                          (f"acs:kms:cn-shanghai:{ACCOUNT_A}:key/{meta.key_id}",
                           "Forbidden.KeyNotFound")]:
        reply = await kms.sdk_error(client, "describe_key",
                                    models.DescribeKeyRequest(key_id=missing))
        assert_error(reply, 404, code)


async def list_all(kms: Kms, client: Client, filters: list[dict[str, Any]] | None = None,
                   page_size: int = 100) -> tuple[list[str], int]:
    seen: list[str] = []
    page, total = 1, -1
    while True:
        body = await kms.sdk(client, "list_keys", models.ListKeysRequest(
            filters=json.dumps(filters) if filters is not None else None,
            page_number=page, page_size=page_size))
        assert body.page_number == page and body.page_size == page_size
        total = body.total_count
        seen += [k.key_id for k in body.keys.key]
        for k in body.keys.key:
            assert k.key_arn == f"acs:kms:{REGION}:{ACCOUNT_A}:key/{k.key_id}"
        if len(seen) >= total or not body.keys.key:
            # The account's default master key (a UUID id, made by the system at start-up)
            # is listed too when it matches; these tests count the keys they made.
            ids = [k for k in seen if k.startswith("key-")]
            return ids, total - (len(seen) - len(ids))
        page += 1


async def test_list_keys_paging_and_filters(kms: Kms, client: Client) -> None:
    prod = await create_key(kms, client, tags=json.dumps([{"TagKey": "env",
                                                           "TagValue": "prod"}]))
    small = await create_key(kms, client, key_spec="Aliyun_AES_128")
    signer = await create_key(kms, client, key_spec="EC_P256")
    await kms.sdk(client, "disable_key", models.DisableKeyRequest(key_id=small.key_id))
    await kms.sdk(client, "create_alias", models.CreateAliasRequest(
        alias_name="alias/listed", key_id=signer.key_id))
    # Another account's key never shows up.
    await create_key(kms, kms.client("b1", "v3"))
    every = [prod.key_id, small.key_id, signer.key_id]

    ids, total = await list_all(kms, client, page_size=1)
    assert (ids, total) == (every, 3)
    body = await kms.sdk(client, "list_keys", models.ListKeysRequest(page_size=1, page_number=3))
    assert [k.key_id for k in body.keys.key] == [small.key_id] and body.total_count == 4
    body = await kms.sdk(client, "list_keys", models.ListKeysRequest(page_number=9))
    assert body.keys.key == [] and body.total_count == 4 and body.page_size == 10

    cases: list[tuple[list[dict[str, Any]], list[str]]] = [
        ([{"Key": "KeyState", "Values": ["Disabled"]}], [small.key_id]),
        ([{"Key": "KeyState", "Values": ["Enabled", "Disabled"]}], every),
        ([{"Key": "KeySpec", "Values": ["EC_P256"]}], [signer.key_id]),
        ([{"Key": "KeySpec", "Values": ["Aliyun_AES_256", "Aliyun_AES_128"]}],
         [prod.key_id, small.key_id]),
        ([{"Key": "KeyUsage", "Values": ["SIGN/VERIFY"]}], [signer.key_id]),
        ([{"Key": "AliasName", "Values": ["alias/listed"]}], [signer.key_id]),
        ([{"Key": "TagKey", "Values": ["env"]}], [prod.key_id]),
        ([{"Key": "TagValue", "Values": ["prod"]}], [prod.key_id]),
        ([{"Key": "KeyState", "Values": ["Enabled"]},
          {"Key": "KeySpec", "Values": ["Aliyun_AES_256"]}], [prod.key_id]),
        ([{"Key": "KeyState", "Values": ["Disabled"]}, {"Key": "TagKey", "Values": ["env"]}],
         []),
    ]
    for filters, expected in cases:
        assert await list_all(kms, client, filters) == (expected, len(expected)), filters


async def test_enable_and_disable(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client)
    sealed = await encrypt(kms, client, meta.key_id, "before")
    await kms.sdk(client, "disable_key", models.DisableKeyRequest(key_id=meta.key_id))
    described = await kms.sdk(client, "describe_key",
                              models.DescribeKeyRequest(key_id=meta.key_id))
    assert described.key_metadata.key_state == "Disabled"
    # Disabling twice is fine.
    await kms.sdk(client, "disable_key", models.DisableKeyRequest(key_id=meta.key_id))
    assert_error(await kms.sdk_error(client, "encrypt", models.EncryptRequest(
        key_id=meta.key_id, plaintext="x")), 409, "Rejected.Disabled")
    assert_error(await kms.sdk_error(client, "decrypt", models.DecryptRequest(
        ciphertext_blob=sealed.ciphertext_blob)), 409, "Rejected.Disabled")
    assert_error(await kms.sdk_error(client, "generate_data_key", models.GenerateDataKeyRequest(
        key_id=meta.key_id)), 409, "Rejected.Disabled")
    await kms.sdk(client, "enable_key", models.EnableKeyRequest(key_id=meta.key_id))
    described = await kms.sdk(client, "describe_key",
                              models.DescribeKeyRequest(key_id=meta.key_id))
    assert described.key_metadata.key_state == "Enabled"
    assert (await decrypt(kms, client, sealed.ciphertext_blob)).plaintext == "before"
    again = await encrypt(kms, client, meta.key_id, "after")
    assert (await decrypt(kms, client, again.ciphertext_blob)).plaintext == "after"


async def test_update_key_description(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client, description="old")
    for text in ("new description é", ""):
        await kms.sdk(client, "update_key_description", models.UpdateKeyDescriptionRequest(
            key_id=meta.key_id, description=text))
        body = await kms.sdk(client, "describe_key", models.DescribeKeyRequest(key_id=meta.key_id))
        assert body.key_metadata.description == text


# -- aliases ---------------------------------------------------------------------------

async def test_aliases(kms: Kms, client: Client) -> None:
    first = await create_key(kms, client)
    second = await create_key(kms, client)
    name = "alias/app/data-key_1"
    await kms.sdk(client, "create_alias", models.CreateAliasRequest(alias_name=name,
                                                                    key_id=first.key_id))
    await kms.sdk(client, "create_alias", models.CreateAliasRequest(alias_name="alias/other",
                                                                    key_id=first.arn))
    listed = await kms.sdk(client, "list_aliases", models.ListAliasesRequest())
    assert listed.total_count == 2
    rows = {(a.alias_name, a.alias_arn, a.key_id) for a in listed.aliases.alias}
    assert rows == {(name, f"acs:kms:{REGION}:{ACCOUNT_A}:{name}", first.key_id),
                    ("alias/other", f"acs:kms:{REGION}:{ACCOUNT_A}:alias/other", first.key_id)}
    paged = await kms.sdk(client, "list_aliases", models.ListAliasesRequest(page_size=1,
                                                                            page_number=2))
    assert [a.alias_name for a in paged.aliases.alias] == ["alias/other"]
    assert (paged.total_count, paged.page_number, paged.page_size) == (2, 2, 1)

    sealed = await encrypt(kms, client, name, "via alias")
    assert sealed.key_id == first.key_id

    duplicate = await kms.sdk_error(client, "create_alias", models.CreateAliasRequest(
        alias_name=name, key_id=second.key_id))
    assert_error(duplicate, 400, "AliasAlreadyExists")
    for reserved in ("alias/acs/oss", "alias/acsmine"):
        reply = await kms.sdk_error(client, "create_alias", models.CreateAliasRequest(
            alias_name=reserved, key_id=first.key_id))
        assert_error(reply, 400, "Unsupported.Alias")

    await kms.sdk(client, "update_alias", models.UpdateAliasRequest(alias_name=name,
                                                                    key_id=second.key_id))
    assert (await encrypt(kms, client, name, "moved")).key_id == second.key_id
    by_first = await kms.sdk(client, "list_aliases_by_key_id",
                             models.ListAliasesByKeyIdRequest(key_id=first.key_id))
    assert [a.alias_name for a in by_first.aliases.alias] == ["alias/other"]
    by_second = await kms.sdk(client, "list_aliases_by_key_id",
                              models.ListAliasesByKeyIdRequest(key_id=name))
    assert [(a.alias_name, a.key_id) for a in by_second.aliases.alias] == [(name,
                                                                            second.key_id)]
    assert by_second.total_count == 1

    await kms.sdk(client, "delete_alias", models.DeleteAliasRequest(alias_name=name))
    assert_error(await kms.sdk_error(client, "encrypt", models.EncryptRequest(
        key_id=name, plaintext="x")), 404, "Forbidden.AliasNotFound")
    assert_error(await kms.sdk_error(client, "delete_alias", models.DeleteAliasRequest(
        alias_name=name)), 404, "Forbidden.AliasNotFound")
    assert_error(await kms.sdk_error(client, "update_alias", models.UpdateAliasRequest(
        alias_name=name, key_id=first.key_id)), 404, "Forbidden.AliasNotFound")
    # Deleting an alias leaves the key alone.
    body = await kms.sdk(client, "describe_key", models.DescribeKeyRequest(key_id=second.key_id))
    assert body.key_metadata.key_state == "Enabled"
    assert kms.counts()["aliases"] == 1


# -- tags ------------------------------------------------------------------------------

async def list_tags(kms: Kms, client: Client, key_id: str) -> dict[str, str]:
    body = await kms.sdk(client, "list_resource_tags",
                         models.ListResourceTagsRequest(key_id=key_id))
    assert all(t.key_id == key_id for t in body.tags.tag)
    return {t.tag_key: t.tag_value for t in body.tags.tag}


async def test_tags(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client)
    assert await list_tags(kms, client, meta.key_id) == {}
    tags = [{"TagKey": f"k{i:02d}", "TagValue": f"v{i}"} for i in range(19)]
    await kms.sdk(client, "tag_resource", models.TagResourceRequest(
        key_id=meta.key_id, tags=json.dumps(tags)))
    await kms.sdk(client, "tag_resource", models.TagResourceRequest(
        key_id=meta.key_id, tags=json.dumps([{"TagKey": "k00", "TagValue": "changed"},
                                             {"TagKey": "twentieth", "TagValue": "x:y@z"}])))
    expected = {f"k{i:02d}": f"v{i}" for i in range(19)} | {"k00": "changed",
                                                            "twentieth": "x:y@z"}
    assert await list_tags(kms, client, meta.key_id) == expected

    too_many = await kms.sdk_error(client, "tag_resource", models.TagResourceRequest(
        key_id=meta.key_id, tags=json.dumps([{"TagKey": "21st", "TagValue": "v"}])))
    assert_error(too_many, 400, "InvalidParameter", names="Tags")
    for bad_key in ("acs:reserved", "aliyun-reserved", "", "x" * 129, "bad#char"):
        reply = await kms.sdk_error(client, "tag_resource", models.TagResourceRequest(
            key_id=meta.key_id, tags=json.dumps([{"TagKey": bad_key, "TagValue": "v"}])))
        assert_error(reply, 400, "InvalidParameter", names="Tags")
    assert await list_tags(kms, client, meta.key_id) == expected

    await kms.sdk(client, "untag_resource", models.UntagResourceRequest(
        key_id=meta.key_id, tag_keys=json.dumps(["k00", "twentieth", "never-there"])))
    del expected["k00"], expected["twentieth"]
    assert await list_tags(kms, client, meta.key_id) == expected
    # Room again for one more.
    await kms.sdk(client, "tag_resource", models.TagResourceRequest(
        key_id=meta.key_id, tags=json.dumps([{"TagKey": "21st", "TagValue": "v"}])))
    assert (await list_tags(kms, client, meta.key_id))["21st"] == "v"


async def test_create_key_with_21_tags_is_refused(kms: Kms, client: Client) -> None:
    tags = [{"TagKey": f"k{i}", "TagValue": "v"} for i in range(21)]
    reply = await kms.sdk_error(client, "create_key", models.CreateKeyRequest(
        tags=json.dumps(tags)))
    assert_error(reply, 400, "InvalidParameter", names="Tags")
    assert kms.counts() == {"keys": 0, "key_versions": 0, "aliases": 0, "tags": 0}


# -- symmetric crypto --------------------------------------------------------------------

async def test_encrypt_decrypt_with_context_in_any_order(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client)
    context = {"purpose": "test", "tenant": "t-1", "zz": "é 密钥"}
    sealed = await encrypt(kms, client, meta.key_id, "secret text", context)
    assert sealed.key_id == meta.key_id
    assert sealed.key_version_id == meta.primary_key_version
    raw = base64.b64decode(sealed.ciphertext_blob)
    # Alibaba's documented layout: key version id (36 ASCII bytes) || IV || ct || tag.
    assert raw[:36].decode() == meta.primary_key_version
    assert len(raw) == 36 + 12 + len(b"secret text") + 16
    reordered = dict(reversed(list(context.items())))
    opened = await decrypt(kms, client, sealed.ciphertext_blob, reordered)
    assert (opened.plaintext, opened.key_id, opened.key_version_id) == (
        "secret text", meta.key_id, meta.primary_key_version)
    for wrong in (None, {"purpose": "test"}, {**context, "extra": "x"},
                  {**context, "tenant": "t-2"}):
        reply = await kms.sdk_error(client, "decrypt", models.DecryptRequest(
            ciphertext_blob=sealed.ciphertext_blob, encryption_context=wrong))
        assert_error(reply, 400, "InvalidParameter")


async def test_plaintext_size_limit(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client)
    largest = "A" * 6144
    sealed = await encrypt(kms, client, meta.key_id, largest)
    assert (await decrypt(kms, client, sealed.ciphertext_blob)).plaintext == largest
    reply = await kms.sdk_error(client, "encrypt", models.EncryptRequest(
        key_id=meta.key_id, plaintext=largest + "A"))
    assert_error(reply, 400, "InvalidParameter", names="Plaintext")


async def test_plaintext_round_trips_exactly(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client)
    for text in TRICKY:
        sealed = await encrypt(kms, client, meta.key_id, text, {"k": text})
        assert (await decrypt(kms, client, sealed.ciphertext_blob, {"k": text})).plaintext \
            == text, text


async def test_generate_data_key(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client)
    cases: list[tuple[dict[str, Any], int]] = [
        ({}, 32), ({"number_of_bytes": 16}, 16), ({"key_spec": "AES_128"}, 16),
        ({"key_spec": "AES_256"}, 32), ({"number_of_bytes": 1}, 1),
        ({"number_of_bytes": 1024}, 1024),
        # With both, KeySpec is ignored.
        ({"number_of_bytes": 24, "key_spec": "AES_128"}, 24),
    ]
    context = {"file": "a.txt"}
    for kwargs, size in cases:
        body = await kms.sdk(client, "generate_data_key", models.GenerateDataKeyRequest(
            key_id=meta.key_id, encryption_context=context, **kwargs))
        assert len(base64.b64decode(body.plaintext, validate=True)) == size, kwargs
        assert (body.key_id, body.key_version_id) == (meta.key_id, meta.primary_key_version)
        opened = await decrypt(kms, client, body.ciphertext_blob, context)
        assert opened.plaintext == body.plaintext


async def test_generate_data_key_without_plaintext(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client)
    await kms.sdk(client, "create_alias", models.CreateAliasRequest(alias_name="alias/dk",
                                                                    key_id=meta.key_id))
    body = await kms.sdk(client, "generate_data_key_without_plaintext",
                         models.GenerateDataKeyWithoutPlaintextRequest(
                             key_id="alias/dk", number_of_bytes=48))
    assert body.to_map().keys() == {"CiphertextBlob", "KeyId", "KeyVersionId", "RequestId"}
    assert (body.key_id, body.key_version_id) == (meta.key_id, meta.primary_key_version)
    opened = await decrypt(kms, client, body.ciphertext_blob)
    assert len(base64.b64decode(opened.plaintext, validate=True)) == 48


async def test_re_encrypt(kms: Kms, client: Client) -> None:
    source = await create_key(kms, client)
    destination = await create_key(kms, client)
    sealed = await encrypt(kms, client, source.key_id, "moving text", {"from": "a"})
    moved = await kms.sdk(client, "re_encrypt", models.ReEncryptRequest(
        ciphertext_blob=sealed.ciphertext_blob, destination_key_id=destination.key_id,
        source_encryption_context={"from": "a"}, destination_encryption_context={"to": "b"}))
    assert (moved.key_id, moved.key_version_id) == (destination.key_id,
                                                    destination.primary_key_version)
    opened = await decrypt(kms, client, moved.ciphertext_blob, {"to": "b"})
    assert (opened.plaintext, opened.key_id) == ("moving text", destination.key_id)
    assert_error(await kms.sdk_error(client, "decrypt", models.DecryptRequest(
        ciphertext_blob=moved.ciphertext_blob, encryption_context={"from": "a"})),
        400, "InvalidParameter")
    wrong_source = await kms.sdk_error(client, "re_encrypt", models.ReEncryptRequest(
        ciphertext_blob=sealed.ciphertext_blob, destination_key_id=destination.key_id,
        source_encryption_context={"from": "x"}))
    assert_error(wrong_source, 400, "InvalidParameter")


# -- asymmetric ------------------------------------------------------------------------

def local_verify(pem: str, algorithm: str, digest: bytes, signature: bytes) -> None:
    """:raises InvalidSignature:"""
    public = serialization.load_pem_public_key(pem.encode())
    prehashed = Prehashed(hashes.SHA256())
    if isinstance(public, rsa.RSAPublicKey):
        # Alibaba's RSA_PSS_SHA_256: MGF1-SHA256 and a salt as long as the digest.
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            if algorithm == "RSA_PSS_SHA_256" else padding.PKCS1v15())
        public.verify(signature, digest, pad, prehashed)
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, digest, ec.ECDSA(prehashed))


async def sign_and_verify(kms: Kms, client: Client, meta: Any, algorithm: str) -> None:
    public = await kms.sdk(client, "get_public_key", models.GetPublicKeyRequest(
        key_id=meta.key_id, key_version_id=meta.primary_key_version))
    assert (public.key_id, public.key_version_id) == (meta.key_id, meta.primary_key_version)
    assert public.public_key.startswith("-----BEGIN PUBLIC KEY-----")
    digest = hashlib.sha256(f"message for {algorithm}".encode()).digest()
    signed = await kms.sdk(client, "asymmetric_sign", models.AsymmetricSignRequest(
        key_id=meta.key_id, key_version_id=meta.primary_key_version, algorithm=algorithm,
        digest=b64(digest)))
    assert (signed.key_id, signed.key_version_id) == (meta.key_id, meta.primary_key_version)
    signature = base64.b64decode(signed.value)
    local_verify(public.public_key, algorithm, digest, signature)

    async def verify(value: bytes, checked: bytes = digest) -> bool:
        body = await kms.sdk(client, "asymmetric_verify", models.AsymmetricVerifyRequest(
            key_id=meta.key_id, key_version_id=meta.primary_key_version, algorithm=algorithm,
            digest=b64(checked), value=b64(value)))
        assert (body.key_id, body.key_version_id) == (meta.key_id, meta.primary_key_version)
        assert isinstance(body.value, bool)
        return bool(body.value)

    assert await verify(signature) is True
    flipped = bytearray(signature)
    flipped[len(flipped) // 2] ^= 0x01
    assert await verify(bytes(flipped)) is False
    with pytest.raises(InvalidSignature):
        local_verify(public.public_key, algorithm, digest, bytes(flipped))
    assert await verify(signature, hashlib.sha256(b"another message").digest()) is False


async def test_rsa_sign_and_verify(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client, key_spec="RSA_2048")
    for algorithm in ("RSA_PSS_SHA_256", "RSA_PKCS1_SHA_256"):
        await sign_and_verify(kms, client, meta, algorithm)
    # A PKCS#1 v1.5 signature is not a PSS one.
    digest = hashlib.sha256(b"m").digest()
    pkcs1 = await kms.sdk(client, "asymmetric_sign", models.AsymmetricSignRequest(
        key_id=meta.key_id, key_version_id=meta.primary_key_version,
        algorithm="RSA_PKCS1_SHA_256", digest=b64(digest)))
    body = await kms.sdk(client, "asymmetric_verify", models.AsymmetricVerifyRequest(
        key_id=meta.key_id, key_version_id=meta.primary_key_version,
        algorithm="RSA_PSS_SHA_256", digest=b64(digest), value=pkcs1.value))
    assert body.value is False
    wrong = await kms.sdk_error(client, "asymmetric_sign", models.AsymmetricSignRequest(
        key_id=meta.key_id, key_version_id=meta.primary_key_version,
        algorithm="ECDSA_SHA_256", digest=b64(digest)))
    assert_error(wrong, 400, "InvalidParameter", names="Algorithm")
    # A signing key does not encrypt.
    refused = await kms.sdk_error(client, "asymmetric_encrypt", models.AsymmetricEncryptRequest(
        key_id=meta.key_id, key_version_id=meta.primary_key_version,
        algorithm="RSAES_OAEP_SHA_256", plaintext=b64(b"x")))
    assert_error(refused, 400, "Rejected.UnsupportedOperation")


@pytest.mark.parametrize("spec", ["EC_P256", "EC_P256K"])
async def test_ecdsa_sign_and_verify(kms: Kms, client: Client, spec: str) -> None:
    meta = await create_key(kms, client, key_spec=spec)
    await sign_and_verify(kms, client, meta, "ECDSA_SHA_256")
    unknown_version = await kms.sdk_error(client, "asymmetric_sign", models.AsymmetricSignRequest(
        key_id=meta.key_id, key_version_id="00000000-0000-4000-8000-000000000000",
        algorithm="ECDSA_SHA_256", digest=b64(bytes(32))))
    assert_error(unknown_version, 404, "Forbidden.KeyVersionNotFound")


async def test_asymmetric_encrypt_and_decrypt(kms: Kms, client: Client) -> None:
    meta = await create_key(kms, client, key_spec="RSA_2048", key_usage="ENCRYPT/DECRYPT")
    assert meta.key_usage == "ENCRYPT/DECRYPT"
    public_pem = (await kms.sdk(client, "get_public_key", models.GetPublicKeyRequest(
        key_id=meta.key_id))).public_key
    public = serialization.load_pem_public_key(public_pem.encode())
    assert isinstance(public, rsa.RSAPublicKey)
    limits = {"RSAES_OAEP_SHA_256": (hashes.SHA256, 190), "RSAES_OAEP_SHA_1": (hashes.SHA1, 214)}
    for algorithm, (digest, limit) in limits.items():
        def request(method: str, data: bytes, algorithm: str = algorithm) -> Any:
            field = "plaintext" if method == "asymmetric_encrypt" else "ciphertext_blob"
            cls = (models.AsymmetricEncryptRequest if method == "asymmetric_encrypt"
                   else models.AsymmetricDecryptRequest)
            return cls(key_id=meta.key_id, key_version_id=meta.primary_key_version,
                       algorithm=algorithm, **{field: b64(data)})

        for message in (b"short secret", bytes(range(256))[:limit]):
            sealed = await kms.sdk(client, "asymmetric_encrypt", request("asymmetric_encrypt",
                                                                         message))
            assert (sealed.key_id, sealed.key_version_id) == (meta.key_id,
                                                              meta.primary_key_version)
            assert len(base64.b64decode(sealed.ciphertext_blob)) == 256
            opened = await kms.sdk(client, "asymmetric_decrypt", request(
                "asymmetric_decrypt", base64.b64decode(sealed.ciphertext_blob)))
            assert base64.b64decode(opened.plaintext) == message
            assert (opened.key_id, opened.key_version_id) == (meta.key_id,
                                                              meta.primary_key_version)
        # Ciphertext made locally with the public key.
        oaep = padding.OAEP(mgf=padding.MGF1(digest()), algorithm=digest(), label=None)
        local = public.encrypt(b"made locally", oaep)
        opened = await kms.sdk(client, "asymmetric_decrypt", request("asymmetric_decrypt",
                                                                     local))
        assert base64.b64decode(opened.plaintext) == b"made locally"
        too_long = await kms.sdk_error(client, "asymmetric_encrypt", request(
            "asymmetric_encrypt", b"x" * (limit + 1)))
        assert_error(too_long, 400, "InvalidParameter", names="Plaintext")
    # The other OAEP hash does not open it.
    local = public.encrypt(b"sha256 only", padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                                                        algorithm=hashes.SHA256(), label=None))
    wrong = await kms.sdk_error(client, "asymmetric_decrypt", models.AsymmetricDecryptRequest(
        key_id=meta.key_id, key_version_id=meta.primary_key_version,
        algorithm="RSAES_OAEP_SHA_1", ciphertext_blob=b64(local)))
    assert_error(wrong, 400, "InvalidParameter")
    refused = await kms.sdk_error(client, "asymmetric_sign", models.AsymmetricSignRequest(
        key_id=meta.key_id, key_version_id=meta.primary_key_version,
        algorithm="RSA_PSS_SHA_256", digest=b64(bytes(32))))
    assert_error(refused, 400, "Rejected.UnsupportedOperation")


# -- data key export -------------------------------------------------------------------

def unwrap(private: rsa.RSAPrivateKey, exported: str, algorithm: str) -> bytes:
    # RSAES_OAEP_SHA_1 is one of the API's wrapping algorithms.
    digest = hashes.SHA256() if algorithm == "RSAES_OAEP_SHA_256" else hashes.SHA1()  # noqa: S303
    return private.decrypt(base64.b64decode(exported),
                           padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None))


@pytest.mark.parametrize("algorithm", ["RSAES_OAEP_SHA_256", "RSAES_OAEP_SHA_1"])
async def test_generate_and_export_data_key(kms: Kms, client: Client,
                                            wrapping_key: rsa.RSAPrivateKey,
                                            algorithm: str) -> None:
    meta = await create_key(kms, client)
    context = {"export": "yes"}
    body = await kms.sdk(client, "generate_and_export_data_key",
                         models.GenerateAndExportDataKeyRequest(
                             key_id=meta.key_id, public_key_blob=spki_b64(wrapping_key),
                             wrapping_key_spec="RSA_2048", wrapping_algorithm=algorithm,
                             encryption_context=context))
    assert (body.key_id, body.key_version_id) == (meta.key_id, meta.primary_key_version)
    data_key = unwrap(wrapping_key, body.exported_data_key, algorithm)
    assert len(data_key) == 32
    opened = await decrypt(kms, client, body.ciphertext_blob, context)
    assert base64.b64decode(opened.plaintext) == data_key

    sixteen = await kms.sdk(client, "generate_and_export_data_key",
                            models.GenerateAndExportDataKeyRequest(
                                key_id=meta.key_id, public_key_blob=spki_b64(wrapping_key),
                                wrapping_key_spec="RSA_2048", wrapping_algorithm=algorithm,
                                key_spec="AES_128"))
    assert len(unwrap(wrapping_key, sixteen.exported_data_key, algorithm)) == 16


@pytest.mark.parametrize("algorithm", ["RSAES_OAEP_SHA_256", "RSAES_OAEP_SHA_1"])
async def test_export_data_key(kms: Kms, client: Client, wrapping_key: rsa.RSAPrivateKey,
                               algorithm: str) -> None:
    meta = await create_key(kms, client)
    context = {"a": "1", "b": "2"}
    generated = await kms.sdk(client, "generate_data_key", models.GenerateDataKeyRequest(
        key_id=meta.key_id, encryption_context=context))
    body = await kms.sdk(client, "export_data_key", models.ExportDataKeyRequest(
        ciphertext_blob=generated.ciphertext_blob, public_key_blob=spki_b64(wrapping_key),
        wrapping_key_spec="RSA_2048", wrapping_algorithm=algorithm,
        encryption_context={"b": "2", "a": "1"}))
    assert (body.key_id, body.key_version_id) == (meta.key_id, meta.primary_key_version)
    assert unwrap(wrapping_key, body.exported_data_key, algorithm) == base64.b64decode(
        generated.plaintext)
    opened = await decrypt(kms, client, generated.ciphertext_blob, context)
    assert base64.b64decode(opened.plaintext) == unwrap(wrapping_key, body.exported_data_key,
                                                        algorithm)
    wrong = await kms.sdk_error(client, "export_data_key", models.ExportDataKeyRequest(
        ciphertext_blob=generated.ciphertext_blob, public_key_blob=spki_b64(wrapping_key),
        wrapping_key_spec="RSA_2048", wrapping_algorithm=algorithm))
    assert_error(wrong, 400, "InvalidParameter")


# -- instances and regions ---------------------------------------------------------------

async def test_instances_and_regions(kms: Kms, client: Client, sig: str) -> None:
    await create_key(kms, client)
    await create_key(kms, client, key_spec="EC_P256")
    listed = await kms.sdk(client, "list_kms_instances", models.ListKmsInstancesRequest())
    assert [(i.kms_instance_id, i.kms_instance_arn) for i in listed.kms_instances.kms_instance] \
        == [(INSTANCE_A, f"acs:kms:{REGION}:{ACCOUNT_A}:keystore/{INSTANCE_A}")]
    assert (listed.total_count, listed.page_number, listed.page_size) == (1, 1, 20)
    got = (await kms.sdk(client, "get_kms_instance", models.GetKmsInstanceRequest(
        kms_instance_id=INSTANCE_A))).kms_instance
    # KeyNum is the instance's key quota (1000 by default), not the keys in use.
    assert (got.instance_id, got.instance_name, got.spec, got.key_num) == (
        INSTANCE_A, "software-a", 100000, 1000)
    assert got.status == "Connected"
    # Its use, counted in key versions: two keys, then one rotation.
    key_id = (await create_key(kms, client)).key_id
    await kms.sdk(client, "create_key_version", models.CreateKeyVersionRequest(key_id=key_id))
    quotas = await kms.sdk(client, "get_kms_instance_quota_infos",
                           models.GetKmsInstanceQuotaInfosRequest(kms_instance_id=INSTANCE_A))
    assert quotas.kms_instance_id == INSTANCE_A
    assert {q.resource_type: (q.resource_quota, q.used_quantity)
            for q in quotas.kms_instance_quota_infos} == {
        "key": (1000, 4), "secret": (0, 0), "qps": (100000, 0), "vpc": (1, 0)}
    [key_quota] = (await kms.sdk(client, "get_kms_instance_quota_infos",
                                 models.GetKmsInstanceQuotaInfosRequest(
                                     kms_instance_id=INSTANCE_A, resource_type="key"))
                   ).kms_instance_quota_infos
    assert (key_quota.resource_type, key_quota.used_quantity) == ("key", 4)
    bad = await kms.sdk_error(client, "get_kms_instance_quota_infos",
                              models.GetKmsInstanceQuotaInfosRequest(
                                  kms_instance_id=INSTANCE_A, resource_type="cpu"))
    assert_error(bad, 400, "InvalidParameter")
    default = await kms.sdk(client, "get_default_kms_instance")
    assert default.default_kms_instance_id == INSTANCE_A
    assert (await kms.sdk(client, "describe_account_kms_status")).account_status == "Enabled"
    # Billing codes as Alibaba reports them: pay-as-you-go on the China site (cn-hangzhou);
    # BSS CreateInstance's ProductVersion 3 is a software key management instance.
    assert (got.charge_type, got.product_type, got.product_version) == (
        "POSTPAY", "kms_ppi_public_cn", "3")
    other = kms.client("b1", sig)
    listed_b = await kms.sdk(other, "list_kms_instances", models.ListKmsInstancesRequest())
    assert [i.kms_instance_id for i in listed_b.kms_instances.kms_instance] == [INSTANCE_B]
    got_b = (await kms.sdk(other, "get_kms_instance", models.GetKmsInstanceRequest(
        kms_instance_id=INSTANCE_B))).kms_instance
    assert got_b.key_num == 1000
    hidden = await kms.sdk_error(other, "get_kms_instance", models.GetKmsInstanceRequest(
        kms_instance_id=INSTANCE_A))
    assert_error(hidden, 403, "Forbidden.DKMSInstanceNotFound")
    regions = await kms.sdk(client, "describe_regions")
    assert [r.region_id for r in regions.regions.region] == [REGION, "cn-shanghai"]
    assert regions.request_id


# -- accounts and users ------------------------------------------------------------------

async def test_cross_account_isolation(kms: Kms, client: Client, sig: str) -> None:
    meta = await create_key(kms, client)
    await kms.sdk(client, "create_alias", models.CreateAliasRequest(alias_name="alias/mine",
                                                                    key_id=meta.key_id))
    sealed = await encrypt(kms, client, meta.key_id, "account A only")
    # A second user of the same account can use the key.
    carol = kms.client("a2", sig)
    assert (await decrypt(kms, carol, sealed.ciphertext_blob)).plaintext == "account A only"

    bob = kms.client("b1", sig)
    assert_error(await kms.sdk_error(bob, "describe_key", models.DescribeKeyRequest(
        key_id=meta.key_id)), 404, "Forbidden.KeyNotFound")
    assert_error(await kms.sdk_error(bob, "describe_key", models.DescribeKeyRequest(
        key_id="alias/mine")), 404, "Forbidden.AliasNotFound")
    for ref in (meta.arn, f"acs:kms:{REGION}:{ACCOUNT_A}:alias/mine"):
        assert_error(await kms.sdk_error(bob, "describe_key", models.DescribeKeyRequest(
            key_id=ref)), 403, "Forbidden.NoPermission")
        assert_error(await kms.sdk_error(bob, "encrypt", models.EncryptRequest(
            key_id=ref, plaintext="x")), 403, "Forbidden.NoPermission")
    assert_error(await kms.sdk_error(bob, "decrypt", models.DecryptRequest(
        ciphertext_blob=sealed.ciphertext_blob)), 403, "Forbidden.NoPermission")
    assert_error(await kms.sdk_error(bob, "re_encrypt", models.ReEncryptRequest(
        ciphertext_blob=sealed.ciphertext_blob, destination_key_id=meta.arn)),
        403, "Forbidden.NoPermission")
    assert_error(await kms.sdk_error(bob, "create_alias", models.CreateAliasRequest(
        alias_name="alias/stolen", key_id=meta.arn)), 403, "Forbidden.NoPermission")
    assert_error(await kms.sdk_error(bob, "disable_key", models.DisableKeyRequest(
        key_id=meta.key_id)), 404, "Forbidden.KeyNotFound")
    keys_b = await kms.sdk(bob, "list_keys", models.ListKeysRequest())
    # Only B's own default master key.
    assert keys_b.total_count == 1 and not keys_b.keys.key[0].key_id.startswith("key-")
    assert keys_b.keys.key[0].key_arn.startswith(f"acs:kms:{REGION}:{ACCOUNT_B}:key/")
    aliases_b = await kms.sdk(bob, "list_aliases", models.ListAliasesRequest())
    assert aliases_b.total_count == 0
    # B's own key, B's own alias of the same name: no clash with A's.
    own = await create_key(kms, bob)
    assert own.arn == f"acs:kms:{REGION}:{ACCOUNT_B}:key/{own.key_id}"
    assert own.dkmsinstance_id == INSTANCE_B
    await kms.sdk(bob, "create_alias", models.CreateAliasRequest(alias_name="alias/mine",
                                                                 key_id=own.key_id))
    assert (await encrypt(kms, bob, "alias/mine", "b")).key_id == own.key_id
    assert (await encrypt(kms, client, "alias/mine", "a")).key_id == meta.key_id
    described = await kms.sdk(client, "describe_key", models.DescribeKeyRequest(
        key_id=meta.key_id))
    assert described.key_metadata.key_state == "Enabled"


async def test_gateway_quotas_answer_429_and_change_nothing(start_kms: StartKms) -> None:
    kms = await start_kms(gateway_quotas=True)
    service = kms.app[SERVICE]
    # The real quota class, on a clock that stands still: no call earns a token back.
    service.gateway = GatewayQuotas(enabled=True, clock=lambda: 0.0)
    client = kms.client()
    for _ in range(10):
        await create_key(kms, client)
    reply = await kms.sdk_error(client, "create_key", models.CreateKeyRequest())
    assert_error(reply, 429, "Rejected.Throttling")
    assert kms.counts()["keys"] == 10
    # Another account has its own quota; the same account's reads have theirs.
    await create_key(kms, kms.client("b1"))
    await kms.sdk(client, "list_keys", models.ListKeysRequest())
