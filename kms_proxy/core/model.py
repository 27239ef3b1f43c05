"""The core's vocabulary: enums with stable stored values, and frozen records.

Enum values are what the store keeps, so they never change; the Alibaba edge happens to use
the same strings for most of them, and maps the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "Alias",
    "CallInfo",
    "Instance",
    "InstanceType",
    "Key",
    "KeyKind",
    "KeySpec",
    "KeyState",
    "KeyStorageMechanism",
    "KeyUsage",
    "KeyVersion",
    "Origin",
    "Principal",
    "PrincipalKind",
    "ProtectionLevel",
    "Tag",
    "key_from_record",
]


class KeySpec(StrEnum):
    AES_256 = "Aliyun_AES_256"
    AES_128 = "Aliyun_AES_128"
    SM4 = "Aliyun_SM4"
    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    EC_P256 = "EC_P256"
    EC_P256K = "EC_P256K"
    EC_SM2 = "EC_SM2"


class KeyUsage(StrEnum):
    ENCRYPT_DECRYPT = "ENCRYPT/DECRYPT"
    SIGN_VERIFY = "SIGN/VERIFY"


class KeyState(StrEnum):
    ENABLED = "Enabled"
    DISABLED = "Disabled"
    PENDING_DELETION = "PendingDeletion"
    PENDING_IMPORT = "PendingImport"


class Origin(StrEnum):
    ALIYUN_KMS = "Aliyun_KMS"
    EXTERNAL = "EXTERNAL"


class ProtectionLevel(StrEnum):
    SOFTWARE = "SOFTWARE"
    HSM = "HSM"


class KeyStorageMechanism(StrEnum):
    """Where a hardware key's material lives (CreateKey ``KeyStorageMechanism``)."""

    HSM_INTERNAL = "HsmInternal"
    HSM_ENCRYPTED_DATABASE = "HsmEncryptedDatabase"


class InstanceType(StrEnum):
    """The seed's KMS instance types; each key kind needs its own (seed digest)."""

    SOFTWARE = "software"
    HARDWARE = "hardware"
    EXTERNAL = "external"


class KeyKind(StrEnum):
    """The seed's key taxonomy: what a key is decides what it may do."""

    SOFTWARE = "software"
    HARDWARE = "hardware"
    EXTERNAL = "external"
    DEFAULT_MASTER = "default_master"
    SERVICE = "service"
    MIGRATED = "migrated"


class PrincipalKind(StrEnum):
    USER = "user"
    SERVICE = "service"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who calls: an AccessKey user of an account, or a cloud service acting for one."""

    account_id: str
    name: str
    kind: PrincipalKind = PrincipalKind.USER
    # For a service principal: the cloud product it is (e.g. "oss").
    product: str | None = None

    @property
    def arn(self) -> str:
        if self.kind is PrincipalKind.SERVICE:
            return f"acs:ram::{self.account_id}:service/{self.product}"
        return f"acs:ram::{self.account_id}:user/{self.name}"


@dataclass(frozen=True, slots=True)
class CallInfo:
    """Who a backend call is for: what an external key manager logs and may authorise
    (XKS ``requestMetadata``)."""

    request_id: str
    principal_arn: str
    operation: str
    key_arn: str


@dataclass(frozen=True, slots=True)
class Instance:
    instance_id: str
    account_id: str
    region: str
    type: InstanceType
    name: str
    # Computing performance: the symmetric-operation QPS the instance is sold with.
    spec_qps: int
    created: str
    # Its key quota, counted in key versions (reference section 9: 1000 by default).
    key_quota: int = 1000


@dataclass(frozen=True, slots=True)
class Key:
    key_id: str
    account_id: str
    region: str
    kind: KeyKind
    spec: KeySpec
    usage: KeyUsage
    state: KeyState
    origin: Origin
    protection_level: ProtectionLevel
    instance_id: str | None
    description: str
    creator: str
    created: str
    primary_version_id: str
    delete_date: str | None = None
    deletion_protection: bool = False
    deletion_protection_description: str = ""
    # Hardware keys only.
    storage_mechanism: KeyStorageMechanism | None = None
    # External keys only: the key's id in the external key manager (XKS externalKeyId).
    external_key_id: str | None = None
    # Automatic rotation: the interval in seconds, None when it is off; and when the
    # primary version last changed (None: never rotated, the creation date counts).
    rotation_interval: int | None = None
    last_rotation: str | None = None
    # BYOK (Origin EXTERNAL): when the imported material expires (None: never) and a key
    # check value of it, so that a re-import can be held to the same material after the
    # material itself was deleted. The check value is 8 bytes of HMAC-SHA256 keyed with the
    # material (a one-way value, as KCVs are); empty until material is first imported.
    material_expire: str | None = None
    material_check: str = ""
    # Counts the saved changes; a save must name the revision it read (``_save``).
    revision: int = 0

    @property
    def arn(self) -> str:
        return f"acs:kms:{self.region}:{self.account_id}:key/{self.key_id}"


@dataclass(frozen=True, slots=True)
class KeyVersion:
    key_id: str
    version_id: str
    created: str
    # What the backend needs to find the material again: wrapped material for software
    # keys, a token object reference for hardware keys. Opaque to the core.
    material: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Alias:
    name: str
    key_id: str
    account_id: str
    region: str

    @property
    def arn(self) -> str:
        return f"acs:kms:{self.region}:{self.account_id}:{self.name}"


@dataclass(frozen=True, slots=True)
class Tag:
    key: str
    value: str


def key_from_record(raw: Mapping[str, Any]) -> Key:
    """A ``Key`` from its ``dataclasses.asdict`` form (the store's rows, key backups); fields
    added since a record was written take their defaults.

    :raises KeyError: :raises TypeError: :raises ValueError: for a malformed record.
    """
    fields = dict(raw)
    storage = fields.get("storage_mechanism")
    fields.update(kind=KeyKind(fields["kind"]), spec=KeySpec(fields["spec"]),
                  usage=KeyUsage(fields["usage"]), state=KeyState(fields["state"]),
                  origin=Origin(fields["origin"]),
                  protection_level=ProtectionLevel(fields["protection_level"]),
                  storage_mechanism=KeyStorageMechanism(storage) if storage else None)
    return Key(**fields)
