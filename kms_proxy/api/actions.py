"""The table from Alibaba ``Action`` to handler. Each handler parses typed parameters, makes
one core call and serialises the answer with the field names the official SDK maps."""

from __future__ import annotations

import binascii
import json
from base64 import b64encode, urlsafe_b64decode, urlsafe_b64encode
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from kms_proxy.api.params import Params
from kms_proxy.core.errors import InvalidParameter, MissingParameter, UnsupportedOperation
from kms_proxy.core.lifecycle import next_rotation
from kms_proxy.core.model import (
    Alias,
    Instance,
    InstanceType,
    Key,
    KeySpec,
    KeyState,
    KeyStorageMechanism,
    KeyUsage,
    KeyVersion,
    Origin,
    Principal,
    ProtectionLevel,
)
from kms_proxy.core.passwords import CLASSES, random_password
from kms_proxy.core.service import KeyService, Page

__all__ = ["ACTIONS", "Action", "Call"]


@dataclass(frozen=True, slots=True)
class Call:
    service: KeyService
    principal: Principal
    params: Params


Handler = Callable[[Call], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Action:
    handler: Handler
    # Documented parameters (required ones first), for the OpenAPI description.
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    summary: str = ""


def _b64(data: bytes) -> str:
    return b64encode(data).decode()


def key_metadata(key: Key, *, describe: bool = False) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "KeyId": key.key_id,
        "Arn": key.arn,
        "KeySpec": key.spec.value,
        "KeyUsage": key.usage.value,
        "KeyState": key.state.value,
        "Origin": key.origin.value,
        "ProtectionLevel": key.protection_level.value,
        "CreationDate": key.created,
        "Creator": key.creator,
        "Description": key.description,
        "PrimaryKeyVersion": key.primary_version_id,
        "AutomaticRotation": _rotation_status(key),
        "LastRotationDate": key.last_rotation or key.created,
        "MaterialExpireTime": key.material_expire or "",
    }
    if key.rotation_interval is not None:
        metadata["RotationInterval"] = f"{key.rotation_interval}s"
        metadata["NextRotationDate"] = next_rotation(key)
    if key.instance_id:
        metadata["DKMSInstanceId"] = key.instance_id
    if key.delete_date:
        metadata["DeleteDate"] = key.delete_date
    if key.storage_mechanism is not None:
        metadata["KeyStorageMechanism"] = key.storage_mechanism.value
    if key.external_key_id is not None:
        metadata["ExternalKeyId"] = key.external_key_id
    if describe:
        metadata["DeletionProtection"] = "Enabled" if key.deletion_protection else "Disabled"
        metadata["DeletionProtectionDescription"] = key.deletion_protection_description
    return metadata


def _rotation_status(key: Key) -> str:
    """Alibaba's AutomaticRotation: a policy on a key that is not Enabled is Suspended."""
    if key.rotation_interval is None:
        return "Disabled"
    return "Enabled" if key.state is KeyState.ENABLED else "Suspended"


def _version_row(version: KeyVersion) -> dict[str, str]:
    return {"KeyId": version.key_id, "KeyVersionId": version.version_id,
            "CreationDate": version.created}


def _paged(page: Page[Any], outer: str, inner: str, rows: list[dict[str, Any]]
           ) -> dict[str, Any]:
    return {outer: {inner: rows}, "PageNumber": page.page_number,
            "PageSize": page.page_size, "TotalCount": page.total}


def _alias_row(alias: Alias) -> dict[str, str]:
    return {"AliasName": alias.name, "AliasArn": alias.arn, "KeyId": alias.key_id}


def _instance_arn(instance: Instance) -> str:
    return f"acs:kms:{instance.region}:{instance.account_id}:keystore/{instance.instance_id}"


# -- key lifecycle ---------------------------------------------------------------------

async def create_key(c: Call) -> dict[str, Any]:
    p = c.params
    if p.get("Policy"):
        # Accepting and dropping it would leave a key open that its caller meant to close.
        raise UnsupportedOperation("key policies (Policy) are not implemented by this front; "
                                   "create the key without one")
    key = await c.service.create_key(
        c.principal,
        spec=p.enum("KeySpec", KeySpec, default=KeySpec.AES_256) or KeySpec.AES_256,
        usage=p.enum("KeyUsage", KeyUsage),
        origin=p.enum("Origin", Origin, default=Origin.ALIYUN_KMS) or Origin.ALIYUN_KMS,
        instance_id=p.optional_text("DKMSInstanceId", max_len=128),
        description=p.get("Description") or "",
        tags=p.tags("Tags"),
        storage=p.enum("KeyStorageMechanism", KeyStorageMechanism),
        # This project's extension for external (XKI) keys: the key's id in the external
        # key manager. Send it with the SDK's generic call_api (see the README).
        external_key_id=p.optional_text("ExternalKeyId", max_len=128),
        rotation=p.boolean("EnableAutomaticRotation"),
        rotation_interval=p.duration("RotationInterval"),
        protection_level=p.enum("ProtectionLevel", ProtectionLevel))
    return {"KeyMetadata": key_metadata(key)}


async def describe_key(c: Call) -> dict[str, Any]:
    key = await c.service.describe_key(c.principal, c.params.text("KeyId"))
    return {"KeyMetadata": key_metadata(key, describe=True)}


async def list_keys(c: Call) -> dict[str, Any]:
    number, size = c.params.page()
    page = await c.service.list_keys(c.principal, filters=c.params.filters("Filters"),
                                     page_number=number, page_size=size)
    return _paged(page, "Keys", "Key", [{"KeyId": k.key_id, "KeyArn": k.arn}
                                        for k in page.items])


async def enable_key(c: Call) -> dict[str, Any]:
    await c.service.set_enabled(c.principal, c.params.text("KeyId"), True)
    return {}


async def disable_key(c: Call) -> dict[str, Any]:
    await c.service.set_enabled(c.principal, c.params.text("KeyId"), False)
    return {}


async def update_key_description(c: Call) -> dict[str, Any]:
    description = c.params.get("Description")
    if description is None:
        c.params.text("Description")  # raises MissingParameter
    await c.service.update_key_description(c.principal, c.params.text("KeyId"),
                                           description or "")
    return {}


# -- versions, rotation, deletion ------------------------------------------------------------

async def create_key_version(c: Call) -> dict[str, Any]:
    version = await c.service.lifecycle.create_key_version(c.principal,
                                                           c.params.text("KeyId"))
    return {"KeyVersion": _version_row(version)}


async def update_rotation_policy(c: Call) -> dict[str, Any]:
    p = c.params
    await c.service.lifecycle.update_rotation_policy(
        c.principal, p.text("KeyId"), enabled=p.required_boolean("EnableAutomaticRotation"),
        interval=p.duration("RotationInterval"))
    return {}


async def list_key_versions(c: Call) -> dict[str, Any]:
    number, size = c.params.page()
    page = await c.service.lifecycle.list_key_versions(
        c.principal, c.params.text("KeyId"), page_number=number, page_size=size)
    return _paged(page, "KeyVersions", "KeyVersion", [_version_row(v) for v in page.items])


async def describe_key_version(c: Call) -> dict[str, Any]:
    version = await c.service.lifecycle.describe_key_version(
        c.principal, c.params.text("KeyId"), c.params.text("KeyVersionId", max_len=128))
    return {"KeyVersion": _version_row(version)}


async def schedule_key_deletion(c: Call) -> dict[str, Any]:
    days = c.params.integer("PendingWindowInDays", default=None, low=-(1 << 31),
                            high=1 << 31)
    if days is None:
        c.params.text("PendingWindowInDays")  # raises MissingParameter
    assert days is not None
    await c.service.lifecycle.schedule_key_deletion(c.principal, c.params.text("KeyId"),
                                                    days)
    return {}


async def cancel_key_deletion(c: Call) -> dict[str, Any]:
    await c.service.lifecycle.cancel_key_deletion(c.principal, c.params.text("KeyId"))
    return {}


async def set_deletion_protection(c: Call) -> dict[str, Any]:
    p = c.params
    # The current SDK sends KeyId (and KmsInstanceId) beside, or instead of, the ARN.
    target = p.optional_text("ProtectedResourceArn", max_len=512) or p.optional_text("KeyId")
    if target is None:
        p.text("ProtectedResourceArn")  # raises MissingParameter
    assert target is not None
    await c.service.lifecycle.set_deletion_protection(
        c.principal, target,
        enabled=p.required_boolean("EnableDeletionProtection"),
        description=p.get("DeletionProtectionDescription") or "")
    return {}


# -- BYOK ------------------------------------------------------------------------------

async def get_parameters_for_import(c: Call) -> dict[str, Any]:
    p = c.params
    issued = await c.service.lifecycle.get_parameters_for_import(
        c.principal, p.text("KeyId"), wrapping_spec=p.text("WrappingKeySpec", max_len=32),
        algorithm=p.text("WrappingAlgorithm", max_len=32))
    return {"KeyId": issued.key_id, "ImportToken": issued.token,
            "PublicKey": _b64(issued.public_key_der),
            "TokenExpireTime": issued.expires.strftime("%Y-%m-%dT%H:%M:%SZ")}


async def import_key_material(c: Call) -> dict[str, Any]:
    p = c.params
    await c.service.lifecycle.import_key_material(
        c.principal, p.text("KeyId"), encrypted=p.b64("EncryptedKeyMaterial", max_len=8192),
        token=p.text("ImportToken", max_len=256),
        expire_unix=p.integer("KeyMaterialExpireUnix", default=None, low=0,
                              high=253402300799))
    return {}


async def delete_key_material(c: Call) -> dict[str, Any]:
    await c.service.lifecycle.delete_key_material(c.principal, c.params.text("KeyId"))
    return {}


# -- backup (this project's extension: the 2016-01-20 API has no backup action) ----------

async def backup_key(c: Call) -> dict[str, Any]:
    key, backup = await c.service.lifecycle.backup_key(c.principal, c.params.text("KeyId"))
    return {"KeyId": key.key_id, "KeyBackup": _b64(backup)}


async def restore_key_backup(c: Call) -> dict[str, Any]:
    key = await c.service.lifecycle.restore_key_backup(c.principal,
                                                       c.params.b64("KeyBackup"))
    return {"KeyMetadata": key_metadata(key)}


# -- aliases ---------------------------------------------------------------------------

async def create_alias(c: Call) -> dict[str, Any]:
    await c.service.create_alias(c.principal, c.params.text("AliasName", max_len=261),
                                 c.params.text("KeyId"))
    return {}


async def update_alias(c: Call) -> dict[str, Any]:
    await c.service.update_alias(c.principal, c.params.text("AliasName", max_len=261),
                                 c.params.text("KeyId"))
    return {}


async def delete_alias(c: Call) -> dict[str, Any]:
    await c.service.delete_alias(c.principal, c.params.text("AliasName", max_len=261))
    return {}


async def list_aliases(c: Call) -> dict[str, Any]:
    number, size = c.params.page()
    page = await c.service.list_aliases(c.principal, page_number=number, page_size=size)
    return _paged(page, "Aliases", "Alias", [_alias_row(a) for a in page.items])


async def list_aliases_by_key_id(c: Call) -> dict[str, Any]:
    number, size = c.params.page()
    page = await c.service.list_aliases(c.principal, page_number=number, page_size=size,
                                        key_ref=c.params.text("KeyId"))
    return _paged(page, "Aliases", "Alias", [_alias_row(a) for a in page.items])


# -- tags ------------------------------------------------------------------------------

def _tagged_key(p: Params) -> str:
    if p.get("SecretName") or p.get("CertificateId"):
        # Secrets and certificates are not part of this service.
        raise UnsupportedOperation("only keys can be tagged here")
    return p.text("KeyId")


async def tag_resource(c: Call) -> dict[str, Any]:
    c.params.text("Tags")  # raises MissingParameter when absent
    tags = c.params.tags("Tags")
    if not tags:
        raise InvalidParameter("Tags", "at least one tag is needed")
    await c.service.tag_resource(c.principal, _tagged_key(c.params), tags)
    return {}


async def untag_resource(c: Call) -> dict[str, Any]:
    await c.service.untag_resource(c.principal, _tagged_key(c.params),
                                   c.params.string_list("TagKeys"))
    return {}


async def list_resource_tags(c: Call) -> dict[str, Any]:
    key, tags = await c.service.list_resource_tags(c.principal, c.params.text("KeyId"))
    return {"Tags": {"Tag": [{"KeyId": key.key_id, "TagKey": k, "TagValue": v}
                             for k, v in tags.items()]}}


# The batch forms (reference section 2.3): lists flattened as ResourceId.N, Tag.N.Key.
_BATCH_KEYS: Final = 50
_BATCH_TAGS: Final = 20
_TAG_ROWS_PER_PAGE: Final = 200


def _batch_keys(c: Call, *, required: bool) -> list[str]:
    """``RegionId`` and ``ResourceType`` checked; the ``ResourceId.N`` references."""
    if c.params.text("RegionId", max_len=64) != c.service.region:
        raise InvalidParameter("RegionId", f"this endpoint serves {c.service.region}")
    resource_type = c.params.text("ResourceType", max_len=64)
    if resource_type == "secret":
        raise UnsupportedOperation("secrets are not part of this service: only keys can "
                                   "be tagged here")
    if resource_type != "key":
        raise InvalidParameter("ResourceType", "must be key or secret")
    # As long as a KeyId may be: an alias ARN of a 255-character alias is about 300.
    refs = c.params.repeated("ResourceId", max_items=_BATCH_KEYS, max_len=512)
    if required and not refs:
        raise MissingParameter("ResourceId.1")
    return refs


def _tag_list(p: Params) -> dict[str, str | None]:
    """``Tag.N.Key`` / ``Tag.N.Value``: a tag key (each once) to its value (None when no
    value was sent)."""
    tags: dict[str, str | None] = {}
    for index, item in enumerate(p.repeated_objects("Tag", ("Key", "Value"),
                                                    max_items=_BATCH_TAGS), 1):
        if not item.get("Key"):
            raise MissingParameter(f"Tag.{index}.Key")
        if item["Key"] in tags:
            raise InvalidParameter("Tag", f"tag key {item['Key']!r} is repeated")
        tags[item["Key"]] = item.get("Value")
    return tags


def _next_token(position: tuple[str, str]) -> str:
    return urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


def _after(token: str | None) -> tuple[str, str] | None:
    """The position a ``NextToken`` this action gave names. :raises InvalidParameter:"""
    if token is None:
        return None
    try:
        position = json.loads(urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        position = None
    if (not isinstance(position, list) or len(position) != 2
            or not all(isinstance(v, str) for v in position)):
        raise InvalidParameter("NextToken", "not a token ListTagResources returned")
    return position[0], position[1]


async def tag_resources(c: Call) -> dict[str, Any]:
    refs = _batch_keys(c, required=True)
    tags = _tag_list(c.params)
    if not tags:
        raise MissingParameter("Tag.1.Key")
    await c.service.tag_resources(c.principal, refs,
                                  {k: v or "" for k, v in tags.items()})
    return {}


async def untag_resources(c: Call) -> dict[str, Any]:
    refs = _batch_keys(c, required=True)
    tag_keys: list[str] | None = c.params.repeated("TagKey", max_items=_BATCH_TAGS)
    if not tag_keys:
        # All counts only without tag keys (its API page).
        if not c.params.boolean("All"):
            raise MissingParameter("TagKey.1")
        tag_keys = None
    await c.service.untag_resources(c.principal, refs, tag_keys)
    return {}


async def list_tag_resources(c: Call) -> dict[str, Any]:
    refs = _batch_keys(c, required=False)
    wanted = _tag_list(c.params)
    after = _after(c.params.optional_text("NextToken", max_len=1024))
    rows, next_at = await c.service.list_tag_resources(
        c.principal, refs, wanted, after=after, limit=_TAG_ROWS_PER_PAGE)
    body: dict[str, Any] = {"TagResources": {"TagResource": [
        {"ResourceId": key_id, "ResourceType": "key", "TagKey": k, "TagValue": v}
        for key_id, k, v in rows]}}
    if next_at is not None:  # Absent on the last page.
        body["NextToken"] = _next_token(next_at)
    return body


# -- symmetric crypto --------------------------------------------------------------------

def _dry_run(p: Params) -> None:
    if p.boolean("DryRun"):
        raise UnsupportedOperation("DryRun is not supported")


def _no_recipient(p: Params) -> None:
    if p.get("Recipient"):
        # An attestation-bound answer (CiphertextForRecipient) was asked for; answering
        # with the plaintext would hand it to the host the caller did not trust.
        raise UnsupportedOperation("Recipient (an answer sealed for an attested enclave) "
                                   "is not supported by this front")


async def encrypt(c: Call) -> dict[str, Any]:
    p = c.params
    _dry_run(p)
    # Plaintext is an opaque string: its UTF-8 bytes are encrypted and Decrypt returns the
    # same string (what Alibaba's own transfer client does; reference section 3).
    result = await c.service.encrypt(c.principal, p.text("KeyId"),
                                     p.text("Plaintext", max_len=1 << 20).encode(),
                                     p.context("EncryptionContext"))
    return {"CiphertextBlob": _b64(result.blob), "KeyId": result.key_id,
            "KeyVersionId": result.version_id}


def _plaintext_text(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        # Only ciphertexts made elsewhere can hold non-UTF-8 bytes; return them as Base64.
        return _b64(data)


async def decrypt(c: Call) -> dict[str, Any]:
    p = c.params
    _dry_run(p)
    _no_recipient(p)
    result = await c.service.decrypt(c.principal, p.b64("CiphertextBlob"),
                                     p.context("EncryptionContext"))
    return {"KeyId": result.key_id, "KeyVersionId": result.version_id,
            "Plaintext": _plaintext_text(result.plaintext)}


async def generate_data_key(c: Call) -> dict[str, Any]:
    p = c.params
    _dry_run(p)
    _no_recipient(p)
    data_key = await c.service.generate_data_key(
        c.principal, p.text("KeyId"),
        number_of_bytes=p.integer("NumberOfBytes", default=None, low=1, high=1024),
        key_spec=p.optional_text("KeySpec", max_len=16), context=p.context())
    return {"CiphertextBlob": _b64(data_key.blob), "KeyId": data_key.key_id,
            "KeyVersionId": data_key.version_id, "Plaintext": data_key.plaintext_b64}


async def generate_data_key_without_plaintext(c: Call) -> dict[str, Any]:
    p = c.params
    _dry_run(p)
    data_key = await c.service.generate_data_key(
        c.principal, p.text("KeyId"),
        number_of_bytes=p.integer("NumberOfBytes", default=None, low=1, high=1024),
        key_spec=p.optional_text("KeySpec", max_len=16), context=p.context(),
        with_plaintext=False)
    return {"CiphertextBlob": _b64(data_key.blob), "KeyId": data_key.key_id,
            "KeyVersionId": data_key.version_id}


async def re_encrypt(c: Call) -> dict[str, Any]:
    p = c.params
    _dry_run(p)
    if p.get("SourceKeyId") or p.get("SourceKeyVersionId"):
        raise UnsupportedOperation("ReEncrypt from an asymmetric source key")
    result = await c.service.re_encrypt(
        c.principal, p.b64("CiphertextBlob"), p.text("DestinationKeyId"),
        source_context=p.context("SourceEncryptionContext"),
        destination_context=p.context("DestinationEncryptionContext"))
    return {"CiphertextBlob": _b64(result.blob), "KeyId": result.key_id,
            "KeyVersionId": result.version_id}


async def generate_and_export_data_key(c: Call) -> dict[str, Any]:
    p = c.params
    _dry_run(p)
    data_key = await c.service.generate_and_export_data_key(
        c.principal, p.text("KeyId"),
        number_of_bytes=p.integer("NumberOfBytes", default=None, low=1, high=1024),
        key_spec=p.optional_text("KeySpec", max_len=16), context=p.context(),
        public_key_der=p.b64("PublicKeyBlob"),
        wrapping_spec=p.text("WrappingKeySpec", max_len=32),
        wrapping_algorithm=p.text("WrappingAlgorithm", max_len=32))
    return {"CiphertextBlob": _b64(data_key.blob), "ExportedDataKey": _b64(data_key.exported),
            "KeyId": data_key.key_id, "KeyVersionId": data_key.version_id}


async def export_data_key(c: Call) -> dict[str, Any]:
    p = c.params
    _dry_run(p)
    data_key = await c.service.export_data_key(
        c.principal, p.b64("CiphertextBlob"), context=p.context(),
        public_key_der=p.b64("PublicKeyBlob"),
        wrapping_spec=p.text("WrappingKeySpec", max_len=32),
        wrapping_algorithm=p.text("WrappingAlgorithm", max_len=32))
    return {"ExportedDataKey": _b64(data_key.exported), "KeyId": data_key.key_id,
            "KeyVersionId": data_key.version_id}


# -- asymmetric ------------------------------------------------------------------------

async def asymmetric_sign(c: Call) -> dict[str, Any]:
    p = c.params
    _dry_run(p)
    result = await c.service.asymmetric_sign(
        c.principal, p.text("KeyId"), p.text("KeyVersionId", max_len=128),
        p.text("Algorithm", max_len=32), p.b64("Digest"))
    return {"KeyId": result.key_id, "KeyVersionId": result.version_id,
            "Value": _b64(result.plaintext)}


async def asymmetric_verify(c: Call) -> dict[str, Any]:
    p = c.params
    _dry_run(p)
    result, valid = await c.service.asymmetric_verify(
        c.principal, p.text("KeyId"), p.text("KeyVersionId", max_len=128),
        p.text("Algorithm", max_len=32), p.b64("Digest"), p.b64("Value"))
    return {"KeyId": result.key_id, "KeyVersionId": result.version_id, "Value": valid}


async def asymmetric_encrypt(c: Call) -> dict[str, Any]:
    p = c.params
    _dry_run(p)
    result = await c.service.asymmetric_encrypt(
        c.principal, p.text("KeyId"), p.text("KeyVersionId", max_len=128),
        p.text("Algorithm", max_len=32), p.b64("Plaintext"))
    return {"CiphertextBlob": _b64(result.blob), "KeyId": result.key_id,
            "KeyVersionId": result.version_id}


async def asymmetric_decrypt(c: Call) -> dict[str, Any]:
    p = c.params
    _dry_run(p)
    _no_recipient(p)
    result = await c.service.asymmetric_decrypt(
        c.principal, p.text("KeyId"), p.text("KeyVersionId", max_len=128),
        p.text("Algorithm", max_len=32), p.b64("CiphertextBlob"))
    return {"Plaintext": _b64(result.plaintext), "KeyId": result.key_id,
            "KeyVersionId": result.version_id}


async def get_public_key(c: Call) -> dict[str, Any]:
    p = c.params
    _dry_run(p)
    result = await c.service.get_public_key(c.principal, p.text("KeyId"),
                                            p.optional_text("KeyVersionId", max_len=128))
    return {"PublicKey": result.plaintext.decode(), "KeyId": result.key_id,
            "KeyVersionId": result.version_id}


# -- instances and regions ---------------------------------------------------------------

async def list_kms_instances(c: Call) -> dict[str, Any]:
    number, size = c.params.page(default_size=20)
    page = await c.service.list_kms_instances(c.principal, page_number=number,
                                              page_size=size)
    return _paged(page, "KmsInstances", "KmsInstance", [
        {"KmsInstanceId": i.instance_id, "KmsInstanceArn": _instance_arn(i)}
        for i in page.items])


async def get_kms_instance(c: Call) -> dict[str, Any]:
    view = await c.service.get_kms_instance(c.principal, c.params.text("KmsInstanceId",
                                                                       max_len=128))
    i = view.instance
    return {"KmsInstance": {
        "InstanceId": i.instance_id, "InstanceName": i.name, "Status": view.status,
        # KeyNum is the instance's key quota (the SDK: "the maximum number of keys that can
        # be created"), counted in key versions; GetKmsInstanceQuotaInfos shows the use.
        "Spec": i.spec_qps, "KeyNum": i.key_quota, "SecretNum": "0",
        "CreateTime": i.created, "StartDate": i.created,
        "ChargeType": "POSTPAY", "ProductVersion": _PRODUCT_VERSION[i.type],
        "ProductType": _product_type(c.service.region), "SaleStatus": "normal",
        "DeletionProtection": False,
    }}


async def get_kms_instance_quota_infos(c: Call) -> dict[str, Any]:
    view = await c.service.get_kms_instance(c.principal, c.params.text("KmsInstanceId",
                                                                       max_len=128))
    i = view.instance
    # What this front holds: key versions against the key quota; no secrets; the QPS spec
    # (none of it lent to other accounts); no VPC bound.
    quotas = {"key": (i.key_quota, view.versions_used), "secret": (0, 0),
              "qps": (i.spec_qps, 0), "vpc": (1, 0)}
    wanted = c.params.optional_text("ResourceType", max_len=16)
    if wanted is not None and wanted not in quotas:
        raise InvalidParameter("ResourceType", f"one of {', '.join(quotas)}")
    return {"KmsInstanceId": i.instance_id, "KmsInstanceQuotaInfos": [
        {"ResourceType": kind, "ResourceQuota": quota, "UsedQuantity": used}
        for kind, (quota, used) in quotas.items() if wanted in (None, kind)]}


async def get_default_kms_instance(c: Call) -> dict[str, Any]:
    return {"DefaultKmsInstanceId": c.service.default_instance_id(c.principal) or ""}


async def describe_account_kms_status(c: Call) -> dict[str, Any]:
    # An authenticated caller's account is one this front hosts: KMS is on for it.
    return {"AccountStatus": "Enabled"}


# BSS CreateInstance's ProductVersion: 1 a hardware, 3 a software key management instance.
# It names no code for an external (XKI) instance; this front reports it as software.
_PRODUCT_VERSION: Final[Mapping[InstanceType, str]] = MappingProxyType({
    InstanceType.SOFTWARE: "3", InstanceType.HARDWARE: "1", InstanceType.EXTERNAL: "3"})


def _product_type(region: str) -> str:
    """The billing product type of a pay-as-you-go (POSTPAY) instance: ``kms_ppi_public_cn``
    on the China site, ``kms_ppi_public_intl`` on the international one (subscriptions are
    ``kms_ddi_*``). The site is the account's; a local front infers it from the region."""
    return "kms_ppi_public_cn" if region.startswith("cn-") else "kms_ppi_public_intl"


async def get_random_password(c: Call) -> dict[str, Any]:
    p = c.params
    length = p.integer("PasswordLength", default=32, low=8, high=128)
    assert length is not None
    password = random_password(
        length, excluded_classes=frozenset(name for name in CLASSES if p.boolean(name)),
        exclude=p.optional_text("ExcludeCharacters", max_len=256) or "",
        require_each=p.boolean("RequireEachIncludedType"))
    return {"RandomPassword": password}


async def describe_regions(c: Call) -> dict[str, Any]:
    return {"Regions": {"Region": [{"RegionId": r} for r in c.service.describe_regions()]}}


_CTX = ("EncryptionContext", "DryRun")
ACTIONS: Final[Mapping[str, Action]] = MappingProxyType({
    "CreateKey": Action(create_key, (), ("DKMSInstanceId", "KeySpec", "KeyUsage", "Origin",
                                         "Description", "Tags", "KeyStorageMechanism",
                                         "EnableAutomaticRotation", "RotationInterval",
                                         "ExternalKeyId", "ProtectionLevel", "Policy"),
                        "Create a key"),
    "DescribeKey": Action(describe_key, ("KeyId",), (), "A key's metadata"),
    "ListKeys": Action(list_keys, (), ("Filters", "PageNumber", "PageSize"), "List keys"),
    "EnableKey": Action(enable_key, ("KeyId",), (), "Enable a key"),
    "DisableKey": Action(disable_key, ("KeyId",), (), "Disable a key"),
    "UpdateKeyDescription": Action(update_key_description, ("KeyId", "Description")),
    "CreateKeyVersion": Action(create_key_version, ("KeyId",), (), "Rotate a key by hand"),
    "UpdateRotationPolicy": Action(update_rotation_policy,
                                   ("KeyId", "EnableAutomaticRotation"),
                                   ("RotationInterval",), "Automatic rotation"),
    "ListKeyVersions": Action(list_key_versions, ("KeyId",), ("PageNumber", "PageSize")),
    "DescribeKeyVersion": Action(describe_key_version, ("KeyId", "KeyVersionId")),
    "ScheduleKeyDeletion": Action(schedule_key_deletion, ("KeyId", "PendingWindowInDays")),
    "CancelKeyDeletion": Action(cancel_key_deletion, ("KeyId",)),
    "SetDeletionProtection": Action(set_deletion_protection,
                                    ("ProtectedResourceArn", "EnableDeletionProtection"),
                                    ("DeletionProtectionDescription", "KeyId")),
    "GetParametersForImport": Action(get_parameters_for_import,
                                     ("KeyId", "WrappingKeySpec", "WrappingAlgorithm")),
    "ImportKeyMaterial": Action(import_key_material,
                                ("KeyId", "EncryptedKeyMaterial", "ImportToken"),
                                ("KeyMaterialExpireUnix",)),
    "DeleteKeyMaterial": Action(delete_key_material, ("KeyId",)),
    "BackupKey": Action(backup_key, ("KeyId",), (),
                        "This project's extension: an encrypted backup of a software key"),
    "RestoreKeyBackup": Action(restore_key_backup, ("KeyBackup",), (),
                               "This project's extension: recreate a key from a backup"),
    "CreateAlias": Action(create_alias, ("AliasName", "KeyId")),
    "UpdateAlias": Action(update_alias, ("AliasName", "KeyId")),
    "DeleteAlias": Action(delete_alias, ("AliasName",)),
    "ListAliases": Action(list_aliases, (), ("PageNumber", "PageSize")),
    "ListAliasesByKeyId": Action(list_aliases_by_key_id, ("KeyId",), ("PageNumber",
                                                                      "PageSize")),
    "TagResource": Action(tag_resource, ("KeyId", "Tags")),
    "UntagResource": Action(untag_resource, ("KeyId", "TagKeys")),
    "ListResourceTags": Action(list_resource_tags, ("KeyId",)),
    "TagResources": Action(tag_resources, ("RegionId", "ResourceType", "ResourceId.N",
                                           "Tag.N.Key"), ("Tag.N.Value",),
                           "The same tags on up to 50 keys, all or none"),
    "UntagResources": Action(untag_resources, ("RegionId", "ResourceType", "ResourceId.N"),
                             ("TagKey.N", "All"), "Tags off up to 50 keys, all or none"),
    "ListTagResources": Action(list_tag_resources, ("RegionId", "ResourceType"),
                               ("ResourceId.N", "Tag.N.Key", "Tag.N.Value", "NextToken"),
                               "Tags of keys, 200 rows a page"),
    "Encrypt": Action(encrypt, ("KeyId", "Plaintext"), _CTX),
    "Decrypt": Action(decrypt, ("CiphertextBlob",), (*_CTX, "Recipient")),
    "GenerateDataKey": Action(generate_data_key, ("KeyId",),
                              ("KeySpec", "NumberOfBytes", *_CTX, "Recipient")),
    "GenerateDataKeyWithoutPlaintext": Action(generate_data_key_without_plaintext,
                                              ("KeyId",), ("KeySpec", "NumberOfBytes", *_CTX)),
    "ReEncrypt": Action(re_encrypt, ("CiphertextBlob", "DestinationKeyId"),
                        ("SourceEncryptionContext", "DestinationEncryptionContext", "DryRun")),
    "GenerateAndExportDataKey": Action(
        generate_and_export_data_key,
        ("KeyId", "PublicKeyBlob", "WrappingKeySpec", "WrappingAlgorithm"),
        ("KeySpec", "NumberOfBytes", *_CTX)),
    "ExportDataKey": Action(export_data_key, ("CiphertextBlob", "PublicKeyBlob",
                                              "WrappingKeySpec", "WrappingAlgorithm"), _CTX),
    "AsymmetricSign": Action(asymmetric_sign, ("KeyId", "KeyVersionId", "Algorithm",
                                               "Digest"), ("DryRun",)),
    "AsymmetricVerify": Action(asymmetric_verify, ("KeyId", "KeyVersionId", "Algorithm",
                                                   "Digest", "Value"), ("DryRun",)),
    "AsymmetricEncrypt": Action(asymmetric_encrypt, ("KeyId", "KeyVersionId", "Algorithm",
                                                     "Plaintext"), ("DryRun",)),
    "AsymmetricDecrypt": Action(asymmetric_decrypt, ("KeyId", "KeyVersionId", "Algorithm",
                                                     "CiphertextBlob"),
                                ("DryRun", "Recipient")),
    "GetPublicKey": Action(get_public_key, ("KeyId",), ("KeyVersionId", "DryRun")),
    "ListKmsInstances": Action(list_kms_instances, (), ("PageNumber", "PageSize")),
    "GetKmsInstance": Action(get_kms_instance, ("KmsInstanceId",)),
    "GetKmsInstanceQuotaInfos": Action(get_kms_instance_quota_infos, ("KmsInstanceId",),
                                       ("ResourceType",), "An instance's quotas and use"),
    "GetDefaultKmsInstance": Action(get_default_kms_instance, (), (),
                                    "The instance CreateKey uses when none is named"),
    "DescribeAccountKmsStatus": Action(describe_account_kms_status, (), (),
                                       "Whether KMS is enabled for the account"),
    "DescribeRegions": Action(describe_regions),
    "GetRandomPassword": Action(get_random_password, (),
                                ("PasswordLength", "ExcludeCharacters", "ExcludeLowercase",
                                 "ExcludeUppercase", "ExcludeNumbers", "ExcludePunctuation",
                                 "RequireEachIncludedType"),
                                "A password from the CSPRNG (8-128 characters)"),
})

# Actions of the 2016-01-20 API (the official SDK's client) this front does not implement:
# secrets, application access points, client keys, network rules, policies, managed data
# keys, HMAC keys, instance purchase and VPC binding, key policies. They get
# the same 404 as an unknown name, with a message that says which it is.
NOT_IMPLEMENTED: Final = frozenset({
    "BatchGetSecretValue", "ConnectKmsInstance", "CreateApplicationAccessPoint",
    "CreateClientKey", "CreateNetworkRule", "CreatePolicy", "CreateSecret",
    "DeleteApplicationAccessPoint", "DeleteClientKey", "DeleteNetworkRule", "DeletePolicy",
    "DeleteSecret", "DescribeApplicationAccessPoint", "DescribeNetworkRule",
    "DescribePolicy", "DescribeSecret", "GenerateMac", "GetChallenge", "GetClientKey",
    "GetKeyPolicy", "GetManagedDataKey", "GetSecretPolicy",
    "GetSecretValue", "ListApplicationAccessPoints", "ListClientKeys",
    "ListManagedDataKeyVersions", "ListNetworkRules", "ListPolicies",
    "ListSecretVersionIds", "ListSecrets", "OpenKmsService",
    "PutSecretValue", "ReleaseKmsInstance", "RestoreSecret", "RotateSecret",
    "SetKeyPolicy", "SetSecretPolicy",
    "UpdateApplicationAccessPoint", "UpdateKmsInstanceBindVpc", "UpdateNetworkRule",
    "UpdatePolicy", "UpdateSecret", "UpdateSecretRotationPolicy",
    "UpdateSecretVersionStage", "VerifyMac"})
