"""Malformed input through the real front: precise Alibaba errors in the JSON envelope, never
a 500, and nothing written to the store when a request fails.

Parameter values that the typed SDK models would not send go through the SDK's generic
``call_api``, so every request is still signed by the official SDK.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from alibabacloud_kms20160120 import models
from alibabacloud_kms20160120.client import Client
from alibabacloud_tea_openapi.utils import Utils
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from shared import serving
from shared.tls import client_context
from tests.conftest import leave_mid_body, stall_mid_body
from tests.integration.kms.conftest import (
    ACCOUNT_A,
    AK_A1,
    ENVELOPE,
    INSTANCE_A,
    REGION,
    Kms,
    Reply,
    StartKms,
    assert_error,
    sdk_client,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def wrapping_spki() -> str:
    key = rsa.generate_private_key(65537, 2048)
    return b64(key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo))


@dataclass
class World:
    """What exists before a malformed request: keys, an alias, a ciphertext."""

    key_id: str
    version_id: str
    ec_key_id: str
    ec_version_id: str
    blob: bytes
    context: dict[str, str]
    spki: str

    @property
    def blob_b64(self) -> str:
        return b64(self.blob)


@pytest.fixture
async def world(kms: Kms, client: Client, wrapping_spki: str) -> World:
    key = (await kms.sdk(client, "create_key", models.CreateKeyRequest(
        tags=json.dumps([{"TagKey": "t", "TagValue": "v"}])))).key_metadata
    ec_key = (await kms.sdk(client, "create_key", models.CreateKeyRequest(
        key_spec="EC_P256"))).key_metadata
    await kms.sdk(client, "create_alias", models.CreateAliasRequest(alias_name="alias/exists",
                                                                    key_id=key.key_id))
    context = {"purpose": "malformed"}
    sealed = await kms.sdk(client, "encrypt", models.EncryptRequest(
        key_id=key.key_id, plaintext="the plaintext", encryption_context=context))
    return World(key.key_id, key.primary_key_version, ec_key.key_id,
                 ec_key.primary_key_version, base64.b64decode(sealed.ciphertext_blob), context,
                 wrapping_spki)


def ctx_json(context: dict[str, str]) -> str:
    return json.dumps(context, separators=(",", ":"))


def check_envelope(reply: Reply) -> None:
    """A JSON answer: a success with its RequestId, or a 4xx Alibaba error envelope."""
    assert reply.status != 500, reply
    assert isinstance(reply.body.get("RequestId"), str), reply
    if reply.status != 200:
        assert ENVELOPE <= reply.body.keys(), reply
        assert reply.body["HttpStatus"] == reply.status, reply
        assert 400 <= reply.status < 500, reply


@dataclass(frozen=True)
class Case:
    action: str
    params: Callable[[World], dict[str, Any]]
    status: int
    code: str
    names: str | None = None


def export(w: World, **extra: Any) -> dict[str, Any]:
    return {"KeyId": w.key_id, "PublicKeyBlob": w.spki, "WrappingKeySpec": "RSA_2048",
            "WrappingAlgorithm": "RSAES_OAEP_SHA_256", **extra}


def sign(w: World, **extra: Any) -> dict[str, Any]:
    return {"KeyId": w.ec_key_id, "KeyVersionId": w.ec_version_id,
            "Algorithm": "ECDSA_SHA_256", "Digest": b64(bytes(32)), **extra}


IP = "InvalidParameter"
MP = "MissingParameter"
CASES: dict[str, Case] = {
    # Missing required parameters.
    "encrypt-no-plaintext": Case("Encrypt", lambda w: {"KeyId": w.key_id}, 400, MP, "Plaintext"),
    "encrypt-empty-plaintext": Case("Encrypt", lambda w: {"KeyId": w.key_id, "Plaintext": ""},
                                    400, MP, "Plaintext"),
    "encrypt-no-key": Case("Encrypt", lambda w: {"Plaintext": "x"}, 400, MP, "KeyId"),
    "decrypt-no-blob": Case("Decrypt", lambda w: {}, 400, MP, "CiphertextBlob"),
    "describe-no-key": Case("DescribeKey", lambda w: {}, 400, MP, "KeyId"),
    "gdk-no-key": Case("GenerateDataKey", lambda w: {}, 400, MP, "KeyId"),
    "reencrypt-no-destination": Case("ReEncrypt", lambda w: {"CiphertextBlob": w.blob_b64},
                                     400, MP, "DestinationKeyId"),
    "alias-no-name": Case("CreateAlias", lambda w: {"KeyId": w.key_id}, 400, MP, "AliasName"),
    "description-missing": Case("UpdateKeyDescription", lambda w: {"KeyId": w.key_id}, 400, MP,
                                "Description"),
    "tag-no-tags": Case("TagResource", lambda w: {"KeyId": w.key_id}, 400, MP, "Tags"),
    "untag-no-keys": Case("UntagResource", lambda w: {"KeyId": w.key_id}, 400, MP, "TagKeys"),
    "sign-no-version": Case("AsymmetricSign", lambda w: {
        k: v for k, v in sign(w).items() if k != "KeyVersionId"}, 400, MP, "KeyVersionId"),
    "export-no-public-key": Case("GenerateAndExportDataKey", lambda w: {
        k: v for k, v in export(w).items() if k != "PublicKeyBlob"}, 400, MP, "PublicKeyBlob"),
    "instance-no-id": Case("GetKmsInstance", lambda w: {}, 400, MP, "KmsInstanceId"),
    # Base64 and JSON.
    "blob-not-base64": Case("Decrypt", lambda w: {"CiphertextBlob": "not*base64!"}, 400, IP,
                            "CiphertextBlob"),
    "blob-non-ascii": Case("Decrypt", lambda w: {"CiphertextBlob": "密钥"}, 400, IP,
                           "CiphertextBlob"),
    "blob-too-short": Case("Decrypt", lambda w: {"CiphertextBlob": "YWJj"}, 400, IP),
    "digest-not-base64": Case("AsymmetricSign", lambda w: sign(w, Digest="%%%"), 400, IP,
                              "Digest"),
    "context-bad-json": Case("Encrypt", lambda w: {"KeyId": w.key_id, "Plaintext": "x",
                                                   "EncryptionContext": "{not json"},
                             400, IP, "EncryptionContext"),
    "context-number": Case("Encrypt", lambda w: {"KeyId": w.key_id, "Plaintext": "x",
                                                 "EncryptionContext": '{"a":1}'},
                           400, IP, "EncryptionContext"),
    "context-nested": Case("Encrypt", lambda w: {"KeyId": w.key_id, "Plaintext": "x",
                                                 "EncryptionContext": '{"a":{"b":"c"}}'},
                           400, IP, "EncryptionContext"),
    "context-array": Case("Encrypt", lambda w: {"KeyId": w.key_id, "Plaintext": "x",
                                                "EncryptionContext": '["a","b"]'},
                          400, IP, "EncryptionContext"),
    "context-null-value": Case("Decrypt", lambda w: {"CiphertextBlob": w.blob_b64,
                                                     "EncryptionContext": '{"a":null}'},
                               400, IP, "EncryptionContext"),
    "context-too-long": Case("Encrypt", lambda w: {
        "KeyId": w.key_id, "Plaintext": "x",
        "EncryptionContext": ctx_json({"k": "v" * 8200})}, 400, IP, "EncryptionContext"),
    # The parser would keep the last value: one pair would drop out of the AAD unseen.
    "context-repeated-name": Case("Encrypt", lambda w: {
        "KeyId": w.key_id, "Plaintext": "x",
        "EncryptionContext": '{"purpose":"payroll","purpose":"test"}'}, 400, IP,
        "EncryptionContext"),
    "context-repeated-name-decrypt": Case("Decrypt", lambda w: {
        "CiphertextBlob": w.blob_b64,
        "EncryptionContext": ctx_json(w.context)[:-1] + ',"a":"1","a":"2"}'}, 400, IP,
        "EncryptionContext"),
    "tags-repeated-member": Case("CreateKey", lambda w: {
        "Tags": '[{"TagKey":"a","TagKey":"b","TagValue":"v"}]'}, 400, IP, "Tags"),
    "gdk-context-bad": Case("GenerateDataKey", lambda w: {"KeyId": w.key_id,
                                                          "EncryptionContext": "[1]"},
                            400, IP, "EncryptionContext"),
    "filters-bad-json": Case("ListKeys", lambda w: {"Filters": "[{"}, 400, IP, "Filters"),
    "filters-object": Case("ListKeys", lambda w: {"Filters": '{"Key":"KeyState"}'}, 400, IP,
                           "Filters"),
    "filters-values-not-list": Case("ListKeys", lambda w: {
        "Filters": '[{"Key":"KeyState","Values":"Enabled"}]'}, 400, IP, "Filters"),
    "filters-unknown-key": Case("ListKeys", lambda w: {
        "Filters": '[{"Key":"Colour","Values":["red"]}]'}, 400, IP, "Filters"),
    "filters-eleven": Case("ListKeys", lambda w: {"Filters": json.dumps(
        [{"Key": "KeyState", "Values": ["Enabled"]}] * 11)}, 400, IP, "Filters"),
    "tags-bad-json": Case("CreateKey", lambda w: {"Tags": "[{"}, 400, IP, "Tags"),
    "tags-not-strings": Case("CreateKey", lambda w: {"Tags": '[{"TagKey":1,"TagValue":"v"}]'},
                             400, IP, "Tags"),
    "tags-repeated-key": Case("TagResource", lambda w: {
        "KeyId": w.key_id, "Tags": json.dumps([{"TagKey": "a", "TagValue": "1"},
                                               {"TagKey": "a", "TagValue": "2"}])},
        400, IP, "Tags"),
    "tags-acs-prefix": Case("CreateKey", lambda w: {
        "Tags": json.dumps([{"TagKey": "acs:x", "TagValue": "v"}])}, 400, IP, "Tags"),
    "tags-21": Case("CreateKey", lambda w: {"Tags": json.dumps(
        [{"TagKey": f"k{i}", "TagValue": "v"} for i in range(21)])}, 400, IP, "Tags"),
    "tagkeys-empty": Case("UntagResource", lambda w: {"KeyId": w.key_id, "TagKeys": "[]"},
                          400, IP, "TagKeys"),
    "tagkeys-not-json": Case("UntagResource", lambda w: {"KeyId": w.key_id, "TagKeys": "t"},
                             400, IP, "TagKeys"),
    # Enumerations and ranges.
    "keyspec-bad": Case("CreateKey", lambda w: {"KeySpec": "Aliyun_AES_999"}, 400, IP,
                        "KeySpec"),
    "keyusage-bad": Case("CreateKey", lambda w: {"KeyUsage": "WRAP"}, 400, IP, "KeyUsage"),
    "keyusage-wrong-for-spec": Case("CreateKey", lambda w: {"KeyUsage": "SIGN/VERIFY"}, 400,
                                    IP, "KeyUsage"),
    # BYOK of asymmetric material is not implemented (symmetric BYOK is).
    "origin-external-asymmetric": Case("CreateKey", lambda w: {"Origin": "EXTERNAL",
                                                               "KeySpec": "RSA_2048"},
                                       400, "Rejected.UnsupportedOperation"),
    # Accepted and dropped, a policy meant to close a key would leave it open.
    "policy-not-implemented": Case("CreateKey", lambda w: {
        "Policy": '{"Version":"1","Statement":[{"Effect":"Deny","Action":["kms:*"]}]}'},
        400, "Rejected.UnsupportedOperation"),
    "protection-level-bad": Case("CreateKey", lambda w: {"ProtectionLevel": "BOGUS"}, 400,
                                 IP, "ProtectionLevel"),
    # The default instance is a software one: an HSM key asked for is not silently SOFTWARE.
    "protection-level-hsm-in-software": Case("CreateKey", lambda w: {"ProtectionLevel": "HSM"},
                                             400, "Unsupported.ProtectionLevel"),
    "spec-sm2": Case("CreateKey", lambda w: {"KeySpec": "EC_SM2"}, 400,
                     "Rejected.UnsupportedOperation"),
    "instance-unknown": Case("CreateKey", lambda w: {"DKMSInstanceId": "kst-hzznotthere0001"},
                             403, "Forbidden.DKMSInstanceNotFound"),
    "description-too-long": Case("CreateKey", lambda w: {"Description": "d" * 8193}, 400, IP,
                                 "Description"),
    "gdk-keyspec-bad": Case("GenerateDataKey", lambda w: {"KeyId": w.key_id,
                                                          "KeySpec": "AES_512"},
                            400, IP, "KeySpec"),
    "gdk-bytes-0": Case("GenerateDataKey", lambda w: {"KeyId": w.key_id, "NumberOfBytes": "0"},
                        400, IP, "NumberOfBytes"),
    "gdk-bytes-1025": Case("GenerateDataKey", lambda w: {"KeyId": w.key_id,
                                                         "NumberOfBytes": "1025"},
                           400, IP, "NumberOfBytes"),
    "gdk-bytes-text": Case("GenerateDataKey", lambda w: {"KeyId": w.key_id,
                                                         "NumberOfBytes": "many"},
                           400, IP, "NumberOfBytes"),
    "gdkwp-bytes-0": Case("GenerateDataKeyWithoutPlaintext",
                          lambda w: {"KeyId": w.key_id, "NumberOfBytes": "0"}, 400, IP,
                          "NumberOfBytes"),
    "list-keys-pagesize-0": Case("ListKeys", lambda w: {"PageSize": "0"}, 400, IP, "PageSize"),
    "list-keys-pagesize-101": Case("ListKeys", lambda w: {"PageSize": "101"}, 400, IP,
                                   "PageSize"),
    "list-keys-pagenumber-0": Case("ListKeys", lambda w: {"PageNumber": "0"}, 400, IP,
                                   "PageNumber"),
    # PageNumber is an Integer (int32): 2147483647 is the largest.
    "list-keys-pagenumber-2^31": Case("ListKeys", lambda w: {"PageNumber": "2147483648"}, 400,
                                      IP, "PageNumber"),
    "list-aliases-pagesize-0": Case("ListAliases", lambda w: {"PageSize": "0"}, 400, IP,
                                    "PageSize"),
    "list-aliases-pagesize-101": Case("ListAliases", lambda w: {"PageSize": "101"}, 400, IP,
                                      "PageSize"),
    "list-instances-pagesize-101": Case("ListKmsInstances", lambda w: {"PageSize": "101"},
                                        400, IP, "PageSize"),
    "dryrun-bad": Case("Encrypt", lambda w: {"KeyId": w.key_id, "Plaintext": "x",
                                             "DryRun": "maybe"}, 400, IP, "DryRun"),
    "plaintext-6145": Case("Encrypt", lambda w: {"KeyId": w.key_id, "Plaintext": "p" * 6145},
                           400, IP, "Plaintext"),
    "plaintext-6145-bytes-utf8": Case("Encrypt", lambda w: {"KeyId": w.key_id,
                                                            "Plaintext": "é" * 3073},
                                      400, IP, "Plaintext"),
    "alias-bad-chars": Case("CreateAlias", lambda w: {"AliasName": "alias/bad name",
                                                      "KeyId": w.key_id},
                            400, IP, "AliasName"),
    "alias-no-prefix": Case("CreateAlias", lambda w: {"AliasName": "exists", "KeyId": w.key_id},
                            400, IP, "AliasName"),
    "alias-reserved": Case("CreateAlias", lambda w: {"AliasName": "alias/acs/kms",
                                                     "KeyId": w.key_id}, 400, "Unsupported.Alias"),
    "alias-duplicate": Case("CreateAlias", lambda w: {"AliasName": "alias/exists",
                                                      "KeyId": w.key_id}, 400,
                            "AliasAlreadyExists"),
    "wrapping-spec-bad": Case("GenerateAndExportDataKey", lambda w: export(
        w, WrappingKeySpec="EC_SM2"), 400, "Rejected.UnsupportedOperation"),
    "wrapping-algorithm-bad": Case("GenerateAndExportDataKey", lambda w: export(
        w, WrappingAlgorithm="RSAES_PKCS1_V1_5"), 400, IP, "WrappingAlgorithm"),
    "public-key-garbage": Case("GenerateAndExportDataKey", lambda w: export(
        w, PublicKeyBlob=b64(b"not a key")), 400, IP, "PublicKeyBlob"),
    "digest-wrong-length": Case("AsymmetricSign", lambda w: sign(w, Digest=b64(b"short")),
                                400, IP, "Digest"),
    "sign-algorithm-bad": Case("AsymmetricSign", lambda w: sign(w, Algorithm="RSA_PSS_SHA_256"),
                               400, IP, "Algorithm"),
    # Keys that cannot do it, and keys that are not there.
    "encrypt-with-signing-key": Case("Encrypt", lambda w: {"KeyId": w.ec_key_id,
                                                           "Plaintext": "x"},
                                     400, "Rejected.UnsupportedOperation"),
    "sign-with-aes-key": Case("AsymmetricSign", lambda w: sign(w, KeyId=w.key_id), 400,
                              "Rejected.UnsupportedOperation"),
    "public-key-of-aes-key": Case("GetPublicKey", lambda w: {"KeyId": w.key_id}, 400,
                                  "Rejected.UnsupportedOperation"),
    "tag-secret": Case("TagResource", lambda w: {
        "SecretName": "s", "Tags": json.dumps([{"TagKey": "a", "TagValue": "b"}])}, 400,
        "Rejected.UnsupportedOperation"),
    "key-unknown": Case("Encrypt", lambda w: {"KeyId": "key-hzz00000000000000000000",
                                              "Plaintext": "x"}, 404, "Forbidden.KeyNotFound"),
    "alias-unknown": Case("Encrypt", lambda w: {"KeyId": "alias/none", "Plaintext": "x"}, 404,
                          "Forbidden.AliasNotFound"),
    "arn-other-region": Case("DescribeKey", lambda w: {
        "KeyId": f"acs:kms:cn-beijing:{ACCOUNT_A}:key/{w.key_id}"}, 404,
        "Forbidden.KeyNotFound"),
    "version-unknown": Case("AsymmetricSign", lambda w: sign(w, KeyVersionId=w.version_id),
                            404, "Forbidden.KeyVersionNotFound"),
    "alias-delete-unknown": Case("DeleteAlias", lambda w: {"AliasName": "alias/none"}, 404,
                                 "Forbidden.AliasNotFound"),
    "update-alias-unknown": Case("UpdateAlias", lambda w: {"AliasName": "alias/none",
                                                           "KeyId": w.key_id}, 404,
                                 "Forbidden.AliasNotFound"),
    "instance-other": Case("GetKmsInstance", lambda w: {"KmsInstanceId": "kst-hzzinstanceb0001"},
                           403, "Forbidden.DKMSInstanceNotFound"),
    # Ciphertext and context.
    "decrypt-wrong-context": Case("Decrypt", lambda w: {
        "CiphertextBlob": w.blob_b64, "EncryptionContext": ctx_json({"purpose": "other"})},
        400, IP),
    "decrypt-no-context": Case("Decrypt", lambda w: {"CiphertextBlob": w.blob_b64}, 400, IP),
    "decrypt-extra-context": Case("Decrypt", lambda w: {
        "CiphertextBlob": w.blob_b64,
        "EncryptionContext": ctx_json({**w.context, "x": "y"})}, 400, IP),
    "reencrypt-wrong-context": Case("ReEncrypt", lambda w: {
        "CiphertextBlob": w.blob_b64, "DestinationKeyId": w.key_id}, 400, IP),
    "export-wrong-context": Case("ExportDataKey", lambda w: {
        "CiphertextBlob": w.blob_b64, "PublicKeyBlob": w.spki, "WrappingKeySpec": "RSA_2048",
        "WrappingAlgorithm": "RSAES_OAEP_SHA_256"}, 400, IP),
    "export-not-a-data-key": Case("ExportDataKey", lambda w: {
        "CiphertextBlob": w.blob_b64, "EncryptionContext": ctx_json(w.context),
        "PublicKeyBlob": w.spki, "WrappingKeySpec": "RSA_2048",
        "WrappingAlgorithm": "RSAES_OAEP_SHA_256"}, 400, IP, "CiphertextBlob"),
    "blob-unknown-version": Case("Decrypt", lambda w: {
        "CiphertextBlob": b64(str(uuid.uuid4()).encode() + w.blob[36:]),
        "EncryptionContext": ctx_json(w.context)}, 400, IP),
    "blob-uppercase-version": Case("Decrypt", lambda w: {
        "CiphertextBlob": b64(w.blob[:36].upper() + w.blob[36:]),
        "EncryptionContext": ctx_json(w.context)}, 400, IP),
    "blob-version-only": Case("Decrypt", lambda w: {
        "CiphertextBlob": b64(w.blob[:36]), "EncryptionContext": ctx_json(w.context)}, 400, IP),
    "blob-no-tag": Case("Decrypt", lambda w: {
        "CiphertextBlob": b64(w.blob[:36 + 20]), "EncryptionContext": ctx_json(w.context)},
        400, IP),
    "blob-truncated": Case("Decrypt", lambda w: {
        "CiphertextBlob": b64(w.blob[:-1]), "EncryptionContext": ctx_json(w.context)}, 400, IP),
    "blob-extended": Case("Decrypt", lambda w: {
        "CiphertextBlob": b64(w.blob + b"\0"), "EncryptionContext": ctx_json(w.context)},
        400, IP),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_malformed_parameters(kms: Kms, client: Client, world: World, name: str) -> None:
    case = CASES[name]
    before = kms.counts()
    reply = await kms.call(client, case.action, case.params(world))
    assert_error(reply, case.status, case.code, names=case.names)
    assert kms.counts() == before


@pytest.mark.parametrize(("part", "offset"), [
    ("version id", 0), ("version id", 35), ("iv", 36), ("iv", 47), ("ciphertext", 48),
    ("ciphertext", -17), ("tag", -16), ("tag", -1)])
async def test_tampered_blob(kms: Kms, client: Client, world: World, part: str,
                             offset: int) -> None:
    for flip in (0x01, 0x80):
        tampered = bytearray(world.blob)
        tampered[offset] ^= flip
        reply = await kms.call(client, "Decrypt", {"CiphertextBlob": b64(bytes(tampered)),
                                                   "EncryptionContext": ctx_json(world.context)})
        assert_error(reply, 400, "InvalidParameter")
        assert "Plaintext" not in reply.body
    # The untouched blob still opens.
    reply = await kms.call(client, "Decrypt", {"CiphertextBlob": world.blob_b64,
                                               "EncryptionContext": ctx_json(world.context)})
    assert (reply.status, reply.body["Plaintext"]) == (200, "the plaintext")


async def test_dry_run_is_an_error(kms: Kms, client: Client, world: World) -> None:
    before = kms.counts()
    requests = [
        ("Encrypt", {"KeyId": world.key_id, "Plaintext": "x"}),
        ("Decrypt", {"CiphertextBlob": world.blob_b64,
                     "EncryptionContext": ctx_json(world.context)}),
        ("GenerateDataKey", {"KeyId": world.key_id}),
        ("AsymmetricSign", sign(world)),
    ]
    for action, params in requests:
        for value in ("true", "True", "TRUE"):
            reply = await kms.call(client, action, {**params, "DryRun": value})
            assert_error(reply, 400, "Rejected.UnsupportedOperation")
            assert "Plaintext" not in reply.body and "CiphertextBlob" not in reply.body
        # DryRun=false is an ordinary call.
        assert (await kms.call(client, action, {**params, "DryRun": "false"})).status == 200
    assert kms.counts() == before


async def test_recipient_is_refused_not_ignored(kms: Kms, client: Client,
                                               world: World) -> None:
    """A Recipient asks for the answer sealed for an attested enclave
    (CiphertextForRecipient); the plaintext must not come back instead."""
    recipient = {"Recipient": '{"AttestationDocument":"AAAA","KeyEncryptionAlgorithm":'
                              '"RSAES_OAEP_SHA_256"}'}
    before = kms.counts()
    for action, params in (
            ("Decrypt", {"CiphertextBlob": world.blob_b64,
                         "EncryptionContext": ctx_json(world.context)}),
            ("GenerateDataKey", {"KeyId": world.key_id}),
            ("AsymmetricDecrypt", {"KeyId": world.key_id, "KeyVersionId": "v",
                                   "Algorithm": "RSAES_OAEP_SHA_256",
                                   "CiphertextBlob": b64(bytes(256))})):
        # Where the SDK puts it (the form body), and in the query.
        for reply in (await kms.call(client, action, params, recipient),
                      await kms.call(client, action, {**params, **recipient})):
            assert_error(reply, 400, "Rejected.UnsupportedOperation")
            assert "Plaintext" not in reply.body
    # The official SDK's own field goes the same way.
    with pytest.raises(Exception, match="Recipient") as caught:
        await asyncio.to_thread(client.generate_data_key, models.GenerateDataKeyRequest(
            key_id=world.key_id, recipient=recipient["Recipient"]))
    assert caught.value.code == "Rejected.UnsupportedOperation"  # type: ignore[attr-defined]
    assert kms.counts() == before


async def test_protection_level_is_checked_or_decided_by_the_instance(
        kms: Kms, client: Client) -> None:
    """Without DKMSInstanceId the level must be what the default instance gives; with one,
    the instance's type decides and the parameter is ignored (reference, CreateKey)."""
    reply = await kms.call(client, "CreateKey", {"ProtectionLevel": "SOFTWARE"})
    assert (reply.status, reply.body["KeyMetadata"]["ProtectionLevel"]) == (200, "SOFTWARE")
    reply = await kms.call(client, "CreateKey", {"ProtectionLevel": "HSM",
                                                 "DKMSInstanceId": INSTANCE_A})
    assert (reply.status, reply.body["KeyMetadata"]["ProtectionLevel"]) == (200, "SOFTWARE")


async def test_unknown_action_and_wrong_version(kms: Kms, client: Client) -> None:
    reply = await kms.call(client, "DeleteEverything", {"KeyId": "x"})
    assert_error(reply, 404, "InvalidAction.NotFound")
    assert "does not implement" not in reply.body["Message"]
    # A real Alibaba action this front lacks says so, with the same code.
    reply = await kms.call(client, "GetSecretValue", {"SecretName": "x"})
    assert_error(reply, 404, "InvalidAction.NotFound")
    assert "does not implement" in reply.body["Message"]
    reply = await kms.call(client, "DescribeRegions", version="2015-01-01")
    assert_error(reply, 400, "InvalidVersion")
    assert kms.counts() == {"keys": 0, "key_versions": 0, "aliases": 0, "tags": 0}


# -- regressions: bugs these tests found ---------------------------------------------------

@pytest.mark.parametrize("action", ["Decrypt", "ReEncrypt"])
async def test_blob_naming_an_asymmetric_key_version(kms: Kms, client: Client, world: World,
                                                     action: str) -> None:
    forged = b64(world.ec_version_id.encode() + bytes(40))
    params = {"CiphertextBlob": forged}
    if action == "ReEncrypt":
        params["DestinationKeyId"] = world.key_id
    reply = await kms.call(client, action, params)
    assert_error(reply, 400, "InvalidParameter")


@pytest.mark.parametrize(("action", "name"), [
    ("Encrypt", "EncryptionContext"), ("ListKeys", "Filters"), ("CreateKey", "Tags"),
    ("UntagResource", "TagKeys")])
async def test_deeply_nested_json(kms: Kms, client: Client, world: World, action: str,
                                  name: str) -> None:
    params = {"KeyId": world.key_id, "Plaintext": "x", name: "[" * 5000}
    before = kms.counts()
    reply = await kms.call(client, action, params)
    assert kms.counts() == before
    assert_error(reply, 400, "InvalidParameter", names=name)


@pytest.mark.parametrize(("action", "name", "value"), [
    ("Encrypt", "EncryptionContext", '{"a":"\\ud800"}'),
    ("Encrypt", "EncryptionContext", '{"\\udfff":"b"}'),
    ("GenerateDataKey", "EncryptionContext", '{"a":"x\\ud83d"}'),
    ("Decrypt", "EncryptionContext", '{"a":"\\ud800"}'),
    ("CreateKey", "Tags", '[{"TagKey":"\\ud800","TagValue":"v"}]'),
    ("UntagResource", "TagKeys", '["\\ud800"]'),
    ("ListKeys", "Filters", '[{"Key":"KeySpec","Values":["\\ud800"]}]')])
async def test_lone_surrogate_escapes_in_json(kms: Kms, client: Client, world: World,
                                              action: str, name: str, value: str) -> None:
    """A JSON escape of half a surrogate pair is valid JSON but not Unicode text: it
    could become neither the UTF-8 AAD nor a database value."""
    params = {"KeyId": world.key_id, "Plaintext": "x", "CiphertextBlob": world.blob_b64,
              name: value}
    before = kms.counts()
    reply = await kms.call(client, action, params)
    assert kms.counts() == before
    assert_error(reply, 400, "InvalidParameter", names=name)
    # A whole pair is text (U+1F600) and works.
    if action == "Encrypt":
        reply = await kms.call(client, action, {**params, name: '{"a":"\\ud83d\\ude00"}'})
        assert reply.status == 200


@pytest.mark.parametrize("where", ["query", "form"])
async def test_invalid_utf8_after_percent_decoding_is_refused(kms: Kms, where: str) -> None:
    """``%FF%FE`` is not UTF-8: refused, not turned into U+FFFD and encrypted changed."""
    raw = "Action=Encrypt&Version=2016-01-20&KeyId=k&Plaintext=%FF%FEabc"
    if where == "query":
        status, _, body = await kms.http("POST", f"/?{raw}")
    else:
        status, _, body = await kms.http(
            "POST", "/", data=raw.encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"})
    reply = Reply(status, json.loads(body))
    assert_error(reply, 400, "InvalidParameter")
    assert "UTF-8" in reply.body["Message"]


@pytest.mark.parametrize("action", ["GenerateAndExportDataKey", "ExportDataKey"])
async def test_export_of_a_data_key_too_long_for_the_wrapping_key(
        kms: Kms, client: Client, world: World, action: str) -> None:
    if action == "GenerateAndExportDataKey":
        params = export(world, NumberOfBytes="1024")
    else:
        generated = await kms.call(client, "GenerateDataKey", {"KeyId": world.key_id,
                                                               "NumberOfBytes": "1024"})
        params = {k: v for k, v in export(world).items() if k != "KeyId"}
        params["CiphertextBlob"] = generated.body["CiphertextBlob"]
    reply = await kms.call(client, action, params)
    assert_error(reply, 400, "InvalidParameter")


# -- authentication ---------------------------------------------------------------------

async def test_wrong_secret_and_unknown_access_key(kms: Kms, sig: str) -> None:
    wrong = sdk_client(kms.port, kms.tls.ca, AK_A1, sig, secret="not-the-secret-at-all-0000")
    reply = await kms.call(wrong, "DescribeRegions")
    assert_error(reply, 400, "SignatureDoesNotMatch")
    reply = await kms.call(wrong, "CreateKey")
    assert_error(reply, 400, "SignatureDoesNotMatch")
    unknown = sdk_client(kms.port, kms.tls.ca, AK_A1, sig, access_key_id="LTAI5tNobodyHere00009")
    reply = await kms.call(unknown, "CreateKey")
    assert_error(reply, 404, "InvalidAccessKeyId.NotFound")
    assert kms.counts() == {"keys": 0, "key_versions": 0, "aliases": 0, "tags": 0}


def _pin_timestamp(monkeypatch: pytest.MonkeyPatch, offset: timedelta) -> None:
    def stamp() -> str:
        return (datetime.now(UTC) + offset).strftime("%Y-%m-%dT%H:%M:%SZ")

    monkeypatch.setattr(Utils, "get_timestamp", staticmethod(stamp))


@pytest.mark.parametrize("offset", [timedelta(minutes=-20), timedelta(minutes=20)])
async def test_skewed_date(kms: Kms, client: Client, monkeypatch: pytest.MonkeyPatch,
                           offset: timedelta) -> None:
    _pin_timestamp(monkeypatch, offset)
    reply = await kms.call(client, "CreateKey")
    assert_error(reply, 400, "InvalidTimeStamp.Expired")
    _pin_timestamp(monkeypatch, timedelta(minutes=-10))
    assert (await kms.call(client, "DescribeRegions")).status == 200
    assert kms.counts()["keys"] == 0


async def test_configured_clock_skew_is_enforced(start_kms: StartKms, sig: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    kms = await start_kms(max_clock_skew=60)
    client = kms.client("a1", sig)
    _pin_timestamp(monkeypatch, timedelta(minutes=-5))
    reply = await kms.call(client, "DescribeRegions")
    assert_error(reply, 400, "InvalidTimeStamp.Expired")


async def test_replayed_request_is_refused(start_kms: StartKms, sig: str) -> None:
    kms = await start_kms(capture=True)
    client = kms.client("a1", sig)
    first = await kms.call(client, "CreateKey", {"Description": "once"})
    assert first.status == 200
    assert kms.counts()["keys"] == 1
    original = kms.captured[-1]
    headers = {k: v for k, v in original["headers"].items()
               if k.lower() not in ("content-length", "connection", "transfer-encoding")}
    status, content_type, body = await kms.http(original["method"], original["path_qs"],
                                                headers=headers, data=original["body"] or None)
    reply = Reply(status, json.loads(body))
    assert content_type == "application/json"
    assert_error(reply, 400, "SignatureNonceUsed")
    assert kms.counts()["keys"] == 1


@pytest.mark.parametrize("case", ["restart", "future-dated", "journal lost"])
async def test_a_request_cannot_be_replayed_after_a_restart(
        start_kms: StartKms, sig: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        case: str) -> None:
    """Accepted nonces are journaled as they are accepted, so the next process refuses
    them: also one dated 10 minutes ahead (a client clock that runs fast). Without a
    journal, requests signed before the start are refused."""
    directory = tmp_path / "restarted"
    kms = await start_kms(capture=True, directory=directory)
    if case == "future-dated":
        _pin_timestamp(monkeypatch, timedelta(minutes=10))
    first = await kms.call(kms.client("a1", sig), "CreateKey", {"Description": "once"})
    assert first.status == 200
    monkeypatch.undo()
    original = kms.captured[-1]
    await kms.server.close()
    journal = sorted(directory.glob(kms.config.database.name + ".nonces.*"))
    assert len(journal) == 1 and journal[0].stat().st_mode & 0o777 == 0o600
    if case == "journal lost":
        journal[0].unlink()
        # Dates have whole seconds and the start's own second stays open.
        await asyncio.sleep(1.05 - datetime.now(UTC).microsecond / 1e6)
    again = await start_kms(directory=directory, root_key=kms.config.root_key,
                            audit_chain_key=kms.config.audit_chain_key)
    headers = {k: v for k, v in original["headers"].items()
               if k.lower() not in ("content-length", "connection", "transfer-encoding")}
    status, _, body = await again.http(original["method"], original["path_qs"],
                                       headers=headers, data=original["body"] or None)
    code = "InvalidTimeStamp.Expired" if case == "journal lost" else "SignatureNonceUsed"
    assert_error(Reply(status, json.loads(body)), 400, code)
    assert again.counts()["keys"] == 1
    # Fresh requests pass either way.
    assert (await again.call(again.client("a1", sig), "DescribeRegions")).status == 200


def _v2_form(params: dict[str, str]) -> bytes:
    """A legacy RPC request with every parameter in the form body, signed by the
    documented algorithm (HMAC-SHA1 over the sorted, percent-encoded parameters); the SDK
    puts them in the query, other clients do not."""
    def pe(value: str) -> str:
        return quote(value, safe="-_.~")

    signed = {"Format": "JSON", "Version": "2016-01-20", "AccessKeyId": AK_A1.id,
              "SignatureMethod": "HMAC-SHA1", "SignatureVersion": "1.0",
              "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "SignatureNonce": uuid.uuid4().hex, **params}
    canonical = "&".join(f"{pe(k)}={pe(v)}" for k, v in sorted(signed.items()))
    digest = hmac.new(f"{AK_A1.secret}&".encode(), f"POST&%2F&{pe(canonical)}".encode(),
                      hashlib.sha1).digest()
    return urlencode({**signed, "Signature": base64.b64encode(digest).decode()}).encode()


async def test_a_legacy_request_with_every_parameter_in_the_form_body(kms: Kms) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = await kms.http("POST", "/", headers=form, data=_v2_form(
        {"Action": "CreateKey", "Description": "all in the form"}))
    assert status == 200, body
    created = json.loads(body)["KeyMetadata"]
    assert created["Description"] == "all in the form"
    status, _, body = await kms.http("POST", "/", headers=form, data=_v2_form(
        {"Action": "DescribeKey", "KeyId": created["KeyId"], "Version": "2015-01-01"}))
    assert_error(Reply(status, json.loads(body)), 400, "InvalidVersion")


async def test_reused_nonce_with_a_fresh_signature(kms: Kms, client: Client, sig: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Utils, "get_nonce", staticmethod(lambda: "f" * 32))
    assert (await kms.call(client, "DescribeRegions")).status == 200
    reply = await kms.call(client, "CreateKey")
    assert_error(reply, 400, "SignatureNonceUsed")
    # Another access key may use the same nonce.
    other = kms.client("a2", sig)
    assert (await kms.call(other, "DescribeRegions")).status == 200
    assert kms.counts()["keys"] == 0


# -- raw HTTP ----------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/nonexistent", 404, "InvalidAction.NotFound"),
    ("POST", "/kms/keys", 404, "InvalidAction.NotFound"),
    ("PUT", "/", 403, "UnsupportedHTTPMethod"),
    ("DELETE", "/", 403, "UnsupportedHTTPMethod"),
    # Authentication comes before the action lookup: nothing is learnt unsigned.
    ("POST", "/?Version=2016-01-20", 400, "IncompleteSignature"),
    ("POST", "/?Action=DescribeRegions&Version=2016-01-20", 400, "IncompleteSignature"),
    ("GET", "/?Action=DescribeRegions&Version=2016-01-20&AccessKeyId=x&Signature=y", 400,
     "IncompleteSignature"),
    ("POST", "/?Action=DescribeRegions&Version=2016-01-20&Action=Encrypt", 400,
     "InvalidParameter"),
])
async def test_raw_requests_get_the_json_envelope(kms: Kms, method: str, path: str,
                                                  status: int, code: str) -> None:
    got, content_type, body = await kms.http(method, path)
    assert content_type == "application/json"
    reply = Reply(got, json.loads(body))
    assert reply.body.keys() == ENVELOPE
    assert_error(reply, status, code)


async def test_malformed_v3_authorization(kms: Kms) -> None:
    headers = {"x-acs-action": "DescribeRegions", "x-acs-version": "2016-01-20",
               "Authorization": "ACS3-HMAC-SHA256 garbage"}
    status, _, body = await kms.http("POST", "/", headers=headers)
    assert_error(Reply(status, json.loads(body)), 400, "IncompleteSignature")


# -- property: random text never breaks the front ------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=400)  # no lone surrogates


async def test_random_text_never_yields_a_500(kms: Kms, client: Client, world: World) -> None:
    base = world.blob
    blobs = st.one_of(
        TEXT,
        st.binary(max_size=200).map(b64),
        st.tuples(st.integers(0, len(base) - 1), st.integers(1, 255)).map(
            lambda t: b64(base[:t[0]] + bytes([base[t[0]] ^ t[1]]) + base[t[0] + 1:])),
        st.integers(0, len(base)).map(lambda n: b64(base[:n])),
    )
    # Any code point, lone surrogates too: JSON escapes them (\\ud800), so a client can send one.
    any_text = st.text(st.characters(), max_size=40)
    contexts = st.one_of(TEXT, st.dictionaries(TEXT, TEXT, max_size=4).map(json.dumps),
                         st.dictionaries(any_text, any_text, max_size=3).map(json.dumps),
                         st.recursive(st.none() | st.booleans() | st.integers() | TEXT,
                                      lambda c: st.lists(c, max_size=3)
                                      | st.dictionaries(TEXT, c, max_size=3),
                                      max_leaves=8).map(json.dumps))
    seen: list[int] = []

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(key_id=TEXT, context=contexts, blob=blobs)
    def run(key_id: str, context: str, blob: str) -> None:
        for action, params in (
            ("DescribeKey", {"KeyId": key_id}),
            ("Encrypt", {"KeyId": key_id or world.key_id, "Plaintext": "p",
                         "EncryptionContext": context}),
            ("Decrypt", {"CiphertextBlob": blob, "EncryptionContext": context}),
        ):
            reply = kms.call_blocking(client, action, params)
            check_envelope(reply)
            seen.append(reply.status)

    before = kms.counts()
    await asyncio.to_thread(run)
    assert kms.counts() == before
    assert seen and all(s != 500 for s in seen)


async def test_region_in_arn_is_respected(kms: Kms, client: Client, world: World) -> None:
    arn = f"acs:kms:{REGION}:{ACCOUNT_A}:key/{world.key_id}"
    reply = await kms.call(client, "DescribeKey", {"KeyId": arn})
    assert reply.status == 200 and reply.body["KeyMetadata"]["KeyId"] == world.key_id


async def test_a_client_that_leaves_mid_body_is_not_an_internal_error(
        kms: Kms, caplog: pytest.LogCaptureFixture) -> None:
    await leave_mid_body("127.0.0.1", kms.port, client_context(ca=kms.tls.ca),
                         b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                         b"application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n"
                         b"Action=", caplog)
    assert kms.counts() == {"keys": 0, "key_versions": 0, "aliases": 0, "tags": 0}


async def test_a_body_that_stops_arriving_is_refused_in_time(
        kms: Kms, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving, "body_timeout_s", 0.3)
    head, body = await stall_mid_body(
        "127.0.0.1", kms.port, client_context(ca=kms.tls.ca),
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
        b"application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nAc")
    assert head.startswith(b"HTTP/1.1 400")
    assert body["Code"] == "InvalidParameter"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
async def test_a_content_encoding_is_refused_not_decoded(kms: Kms, encoding: str,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    """The front takes a body only as sent: the ACS3 signature covers those bytes, and a
    body that did not decode was an unexpected error (500 and a traceback)."""
    status, content_type, body = await kms.http(
        "POST", "/?Action=DescribeRegions&Version=2016-01-20",
        headers={"Content-Type": "application/x-www-form-urlencoded",
                 "Content-Encoding": encoding},
        data=b"\x1f\x8b\x08\x00 not really compressed")
    assert (status, json.loads(body)["Code"]) == (400, "InvalidParameter"), body
    assert content_type.startswith("application/json")
    assert b"Content-Encoding" in body
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize(("method", "path"), [("POST", "/"), ("GET", "/"),
                                              ("GET", "/health"), ("GET", "/openapi.json")])
async def test_an_unknown_expectation_gets_the_api_envelope(kms: Kms, method: str,
                                                            path: str) -> None:
    """aiohttp answered an Expect other than 100-continue with a text/plain 417, before any
    middleware; every route now answers with the envelope, naming the header."""
    status, content_type, body = await kms.http(method, path, headers={"Expect": "200-ok"})
    assert content_type.startswith("application/json"), body
    assert_error(Reply(status, json.loads(body)), 400, "InvalidParameter", names="Expect")
    status, _, _ = await kms.http("GET", "/health", headers={"Expect": "100-continue"})
    assert status == 200


async def test_every_expectation_counts_and_a_refusal_is_logged(
        kms: Kms, caplog: pytest.LogCaptureFixture) -> None:
    """Repeated Expect fields are one list (RFC 9110): 100-continue first does not let
    another expectation through. The refusal passes the middleware, so it is logged."""
    caplog.set_level(logging.INFO, logger="kms_proxy.access")
    for fields in ([("Expect", "100-continue"), ("Expect", "200-ok")],
                   [("Expect", "200-ok"), ("Expect", "100-continue")],
                   [("Expect", "100-continue, 200-ok")]):
        async with kms.session.get(kms.url + "/health", headers=CIMultiDict(fields)) as resp:
            assert resp.status == 400, fields
            body = await resp.json()
        assert body["Code"] == "InvalidParameter"
        assert any(body["RequestId"] in r.getMessage() for r in caplog.records
                   if r.name == "kms_proxy.access"), fields
    for fine in ("100-Continue", " 100-continue ", "100-continue, 100-continue"):
        status, _, _ = await kms.http("GET", "/health", headers={"Expect": fine})
        assert status == 200, fine
