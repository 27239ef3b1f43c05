"""The seed's tables as data: what each key kind may do, and what each key spec supports.

Every action consults these tables through ``require``; there are no per-handler ``if``
chains about kinds. Source: ``shared/reference/seed-digest.md`` (capability tables) and the
OpenAPI reference (specs, algorithms, sizes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from kms_proxy.core.errors import AccessDenied, Unsupported, UnsupportedOperation
from kms_proxy.core.model import (
    InstanceType,
    Key,
    KeyKind,
    KeySpec,
    KeyState,
    KeyStorageMechanism,
    KeyUsage,
    Origin,
    PrincipalKind,
)

__all__ = [
    "ACCOUNT_OPS",
    "KEYLESS_OPS",
    "KIND_CAPABILITIES",
    "KIND_INSTANCE",
    "ROTATION_RULES",
    "SPECS",
    "Capability",
    "Op",
    "RotationRule",
    "SpecInfo",
    "require",
    "require_import",
    "require_principal",
    "require_rotation",
    "required_capability",
    "spec_info",
]


class Op(StrEnum):
    """Every action the core performs (their names match the OpenAPI actions)."""

    CREATE_KEY = "CreateKey"
    DESCRIBE_KEY = "DescribeKey"
    LIST_KEYS = "ListKeys"
    ENABLE_KEY = "EnableKey"
    DISABLE_KEY = "DisableKey"
    UPDATE_KEY_DESCRIPTION = "UpdateKeyDescription"
    CREATE_ALIAS = "CreateAlias"
    UPDATE_ALIAS = "UpdateAlias"
    DELETE_ALIAS = "DeleteAlias"
    LIST_ALIASES = "ListAliases"
    LIST_ALIASES_BY_KEY_ID = "ListAliasesByKeyId"
    TAG_RESOURCE = "TagResource"
    UNTAG_RESOURCE = "UntagResource"
    LIST_RESOURCE_TAGS = "ListResourceTags"
    TAG_RESOURCES = "TagResources"
    UNTAG_RESOURCES = "UntagResources"
    LIST_TAG_RESOURCES = "ListTagResources"
    ENCRYPT = "Encrypt"
    DECRYPT = "Decrypt"
    GENERATE_DATA_KEY = "GenerateDataKey"
    GENERATE_DATA_KEY_WITHOUT_PLAINTEXT = "GenerateDataKeyWithoutPlaintext"
    GENERATE_AND_EXPORT_DATA_KEY = "GenerateAndExportDataKey"
    EXPORT_DATA_KEY = "ExportDataKey"
    RE_ENCRYPT = "ReEncrypt"
    ASYMMETRIC_SIGN = "AsymmetricSign"
    ASYMMETRIC_VERIFY = "AsymmetricVerify"
    ASYMMETRIC_ENCRYPT = "AsymmetricEncrypt"
    ASYMMETRIC_DECRYPT = "AsymmetricDecrypt"
    GET_PUBLIC_KEY = "GetPublicKey"
    LIST_KMS_INSTANCES = "ListKmsInstances"
    GET_KMS_INSTANCE = "GetKmsInstance"
    GET_KMS_INSTANCE_QUOTA_INFOS = "GetKmsInstanceQuotaInfos"
    GET_DEFAULT_KMS_INSTANCE = "GetDefaultKmsInstance"
    DESCRIBE_ACCOUNT_KMS_STATUS = "DescribeAccountKmsStatus"
    DESCRIBE_REGIONS = "DescribeRegions"
    GET_RANDOM_PASSWORD = "GetRandomPassword"  # noqa: S105 (an action name)
    SCHEDULE_KEY_DELETION = "ScheduleKeyDeletion"
    CANCEL_KEY_DELETION = "CancelKeyDeletion"
    SET_DELETION_PROTECTION = "SetDeletionProtection"
    CREATE_KEY_VERSION = "CreateKeyVersion"
    UPDATE_ROTATION_POLICY = "UpdateRotationPolicy"
    LIST_KEY_VERSIONS = "ListKeyVersions"
    DESCRIBE_KEY_VERSION = "DescribeKeyVersion"
    GET_PARAMETERS_FOR_IMPORT = "GetParametersForImport"
    IMPORT_KEY_MATERIAL = "ImportKeyMaterial"
    DELETE_KEY_MATERIAL = "DeleteKeyMaterial"
    # This project's extension: the seed's "backup" column has no 2016-01-20 action.
    BACKUP_KEY = "BackupKey"
    RESTORE_KEY_BACKUP = "RestoreKeyBackup"


class Capability(StrEnum):
    """The columns of the seed's capability tables."""

    DATA_CRYPTO = "data encrypt/decrypt"
    SIGN_VERIFY = "sign/verify"
    SERVER_SIDE_ENCRYPTION = "server-side encryption"
    ROTATION = "rotation"
    SCHEDULED_DELETION = "scheduled deletion"
    DELETION_PROTECTION = "deletion protection"
    BYOK_IMPORT = "BYOK import"
    BACKUP = "backup"
    ALIASES = "aliases"
    TAGS = "tags"
    # Changing attributes (enable/disable, description). Service keys' attributes are not
    # editable; migrated keys are read-only.
    EDIT_ATTRIBUTES = "attribute changes"


_ALL_USER_KEY: Final = frozenset(Capability)

# Seed digest, "Capabilities per key kind". Rotation rules narrower than a yes/no (software:
# symmetric only; hardware: symmetric in HsmEncryptedDatabase only; default and service keys:
# the paid add-on) are ROTATION_RULES below; the default key's "import only when first
# enabled" is in require_import.
KIND_CAPABILITIES: Final[Mapping[KeyKind, frozenset[Capability]]] = MappingProxyType({
    KeyKind.SOFTWARE: _ALL_USER_KEY,
    KeyKind.HARDWARE: _ALL_USER_KEY - {Capability.BACKUP},
    KeyKind.EXTERNAL: frozenset({
        Capability.DATA_CRYPTO, Capability.SERVER_SIDE_ENCRYPTION,
        Capability.SCHEDULED_DELETION, Capability.DELETION_PROTECTION,
        Capability.ALIASES, Capability.TAGS, Capability.EDIT_ATTRIBUTES,
    }),
    KeyKind.DEFAULT_MASTER: frozenset({
        Capability.SERVER_SIDE_ENCRYPTION, Capability.ROTATION,
        Capability.SCHEDULED_DELETION, Capability.DELETION_PROTECTION,
        Capability.BYOK_IMPORT, Capability.ALIASES, Capability.TAGS,
        Capability.EDIT_ATTRIBUTES,
    }),
    KeyKind.SERVICE: frozenset({
        Capability.SERVER_SIDE_ENCRYPTION, Capability.ROTATION,
        Capability.ALIASES, Capability.TAGS,
    }),
    # "Keys migrated from KMS 1.0 are read-only: every operation is refused."
    KeyKind.MIGRATED: frozenset(),
})

# Which instance type each user key kind lives in.
KIND_INSTANCE: Final[Mapping[InstanceType, KeyKind]] = MappingProxyType({
    InstanceType.SOFTWARE: KeyKind.SOFTWARE,
    InstanceType.HARDWARE: KeyKind.HARDWARE,
    InstanceType.EXTERNAL: KeyKind.EXTERNAL,
})


@dataclass(frozen=True, slots=True)
class SpecInfo:
    symmetric: bool
    usages: frozenset[KeyUsage]
    default_usage: KeyUsage
    sign_algorithms: frozenset[str] = frozenset()
    # Asymmetric encryption algorithm -> the largest plaintext it takes, in bytes.
    encrypt_algorithms: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({}))
    # Instance types that can hold this spec; empty means no backend implements it here.
    instance_types: frozenset[InstanceType] = frozenset()
    # Why a spec is not available (shown in Rejected.UnsupportedOperation).
    unsupported_reason: str = ""


_ENC: Final = frozenset({KeyUsage.ENCRYPT_DECRYPT})
_BOTH: Final = frozenset({KeyUsage.ENCRYPT_DECRYPT, KeyUsage.SIGN_VERIFY})
_SIGN: Final = frozenset({KeyUsage.SIGN_VERIFY})
_RSA_SIGN: Final = frozenset({"RSA_PSS_SHA_256", "RSA_PKCS1_SHA_256"})

SPECS: Final[Mapping[KeySpec, SpecInfo]] = MappingProxyType({
    KeySpec.AES_256: SpecInfo(True, _ENC, KeyUsage.ENCRYPT_DECRYPT,
                              instance_types=frozenset(InstanceType)),
    KeySpec.AES_128: SpecInfo(True, _ENC, KeyUsage.ENCRYPT_DECRYPT,
                              instance_types=frozenset({InstanceType.SOFTWARE,
                                                        InstanceType.HARDWARE})),
    KeySpec.SM4: SpecInfo(True, _ENC, KeyUsage.ENCRYPT_DECRYPT,
                          instance_types=frozenset({InstanceType.SOFTWARE})),
    KeySpec.RSA_2048: SpecInfo(
        False, _BOTH, KeyUsage.SIGN_VERIFY, _RSA_SIGN,
        MappingProxyType({"RSAES_OAEP_SHA_256": 190, "RSAES_OAEP_SHA_1": 214}),
        frozenset({InstanceType.SOFTWARE, InstanceType.HARDWARE})),
    KeySpec.RSA_3072: SpecInfo(
        False, _BOTH, KeyUsage.SIGN_VERIFY, _RSA_SIGN,
        MappingProxyType({"RSAES_OAEP_SHA_256": 318, "RSAES_OAEP_SHA_1": 342}),
        frozenset({InstanceType.SOFTWARE, InstanceType.HARDWARE})),
    KeySpec.EC_P256: SpecInfo(False, _SIGN, KeyUsage.SIGN_VERIFY,
                              frozenset({"ECDSA_SHA_256"}),
                              instance_types=frozenset({InstanceType.SOFTWARE,
                                                        InstanceType.HARDWARE})),
    KeySpec.EC_P256K: SpecInfo(False, _SIGN, KeyUsage.SIGN_VERIFY,
                               frozenset({"ECDSA_SHA_256"}),
                               instance_types=frozenset({InstanceType.SOFTWARE})),
    # No maintained Python library implements SM2 signatures and SM2PKE well enough to
    # stand behind (pyca/cryptography does not); refuse clearly rather than fake it.
    KeySpec.EC_SM2: SpecInfo(False, _BOTH, KeyUsage.SIGN_VERIFY, frozenset({"SM2DSA"}),
                             MappingProxyType({"SM2PKE": 6047}),
                             unsupported_reason="EC_SM2 keys are not implemented "
                                                "(no maintained SM2 library)"),
})


def spec_info(spec: KeySpec) -> SpecInfo:
    return SPECS[spec]


# What an action needs from the key's kind when an application (AccessKey) calls it.
_OP_CAPABILITY: Final[Mapping[Op, Capability]] = MappingProxyType({
    Op.ENCRYPT: Capability.DATA_CRYPTO,
    Op.DECRYPT: Capability.DATA_CRYPTO,
    Op.GENERATE_DATA_KEY: Capability.DATA_CRYPTO,
    Op.GENERATE_DATA_KEY_WITHOUT_PLAINTEXT: Capability.DATA_CRYPTO,
    Op.GENERATE_AND_EXPORT_DATA_KEY: Capability.DATA_CRYPTO,
    Op.EXPORT_DATA_KEY: Capability.DATA_CRYPTO,
    Op.RE_ENCRYPT: Capability.DATA_CRYPTO,
    Op.ASYMMETRIC_ENCRYPT: Capability.DATA_CRYPTO,
    Op.ASYMMETRIC_DECRYPT: Capability.DATA_CRYPTO,
    Op.ASYMMETRIC_SIGN: Capability.SIGN_VERIFY,
    Op.ASYMMETRIC_VERIFY: Capability.SIGN_VERIFY,
    Op.GET_PUBLIC_KEY: Capability.DATA_CRYPTO,
    Op.ENABLE_KEY: Capability.EDIT_ATTRIBUTES,
    Op.DISABLE_KEY: Capability.EDIT_ATTRIBUTES,
    Op.UPDATE_KEY_DESCRIPTION: Capability.EDIT_ATTRIBUTES,
    Op.CREATE_ALIAS: Capability.ALIASES,
    Op.UPDATE_ALIAS: Capability.ALIASES,
    Op.DELETE_ALIAS: Capability.ALIASES,
    Op.TAG_RESOURCE: Capability.TAGS,
    Op.UNTAG_RESOURCE: Capability.TAGS,
    Op.TAG_RESOURCES: Capability.TAGS,
    Op.UNTAG_RESOURCES: Capability.TAGS,
    Op.SCHEDULE_KEY_DELETION: Capability.SCHEDULED_DELETION,
    Op.CANCEL_KEY_DELETION: Capability.SCHEDULED_DELETION,
    Op.SET_DELETION_PROTECTION: Capability.DELETION_PROTECTION,
    Op.CREATE_KEY_VERSION: Capability.ROTATION,
    Op.UPDATE_ROTATION_POLICY: Capability.ROTATION,
    Op.GET_PARAMETERS_FOR_IMPORT: Capability.BYOK_IMPORT,
    Op.IMPORT_KEY_MATERIAL: Capability.BYOK_IMPORT,
    Op.DELETE_KEY_MATERIAL: Capability.BYOK_IMPORT,
    Op.BACKUP_KEY: Capability.BACKUP,
})

# Crypto a cloud service performs for server-side encryption.
_SSE_OPS: Final = frozenset({
    Op.ENCRYPT, Op.DECRYPT, Op.GENERATE_DATA_KEY, Op.GENERATE_DATA_KEY_WITHOUT_PLAINTEXT,
    Op.RE_ENCRYPT,
})


# Reads every key kind allows, migrated keys included.
_READ_OPS: Final = frozenset({
    Op.DESCRIBE_KEY, Op.LIST_KEYS, Op.LIST_ALIASES, Op.LIST_ALIASES_BY_KEY_ID,
    Op.LIST_RESOURCE_TAGS, Op.LIST_TAG_RESOURCES, Op.LIST_KEY_VERSIONS,
    Op.DESCRIBE_KEY_VERSION,
})


# Reads about the account and its instances, not about a key: no kind or state applies.
ACCOUNT_OPS: Final = frozenset({
    Op.LIST_KMS_INSTANCES, Op.GET_KMS_INSTANCE, Op.GET_KMS_INSTANCE_QUOTA_INFOS,
    Op.GET_DEFAULT_KMS_INSTANCE, Op.DESCRIBE_ACCOUNT_KMS_STATUS, Op.DESCRIBE_REGIONS})

# Actions that name no key at all: no kind or state applies.
KEYLESS_OPS: Final = ACCOUNT_OPS | {Op.GET_RANDOM_PASSWORD}

# What a cloud service (a JWT service principal) may call for the account it acts for: the
# crypto of server-side encryption and reads. Managing keys (creating, rotating, deleting,
# importing, backing up) is the account's users' business.
_SERVICE_PRINCIPAL_OPS: Final = _SSE_OPS | _READ_OPS | ACCOUNT_OPS


def require_principal(op: Op, principal: PrincipalKind, arn: str) -> None:
    """:raises AccessDenied: if a service principal calls an action outside its role."""
    if principal is PrincipalKind.SERVICE and op not in _SERVICE_PRINCIPAL_OPS:
        raise AccessDenied(arn, op.value, "a cloud service may only use keys for "
                                          "server-side encryption and read their metadata")


def required_capability(op: Op, principal: PrincipalKind) -> Capability | None:
    """The capability ``op`` needs; ``None`` for reads every key kind allows."""
    if principal is PrincipalKind.SERVICE and op in _SSE_OPS:
        return Capability.SERVER_SIDE_ENCRYPTION
    if op is Op.GET_PUBLIC_KEY:
        # Reading a public key is part of using an asymmetric key in either usage.
        return None
    return _OP_CAPABILITY.get(op)


def _a_key(kind: KeyKind) -> str:
    """"a software key", "an external key" (for messages)."""
    label = kind.value.replace("_", " ")
    return f"{'an' if label[0] in 'aeiou' else 'a'} {label} key"


def require(kind: KeyKind, op: Op, principal: PrincipalKind) -> None:
    """Refuse ``op`` if the seed's tables say a ``kind`` key cannot do it.

    :raises UnsupportedOperation: naming the kind and the missing capability.
    """
    if kind is KeyKind.MIGRATED and op not in _READ_OPS:
        raise UnsupportedOperation(f"keys migrated from KMS 1.0 are read-only ({op})")
    needed = required_capability(op, principal)
    if needed is not None and needed not in KIND_CAPABILITIES[kind]:
        raise UnsupportedOperation(f"{_a_key(kind)} does not support {needed} ({op})")


_DAY: Final = 86_400


@dataclass(frozen=True, slots=True)
class RotationRule:
    """How a key kind may rotate, beyond the capability table's yes/no."""

    # RotationInterval bounds, in seconds.
    min_interval: int
    max_interval: int
    # Only this storage mechanism rotates (hardware keys: HsmEncryptedDatabase).
    storage: KeyStorageMechanism | None = None
    # Rotation is the paid add-on (default and service keys): the account must have it.
    needs_addon: bool = False


# OpenAPI reference section 2.7: software keys 7-365 d, default keys 365 d only; symmetric
# keys only, KMS-generated material only (imported material never rotates). Hardware keys
# rotate only in HsmEncryptedDatabase: the CreateKey text ("HsmInternal ... does not support
# rotation") and the issue say so. The seed's Chinese table reads "only when stored in the
# HSM and symmetric" (仅数据存储于密码机且为对称密钥时支持), which the digest repeats;
# the two disagree, and the API's own word decides (README). The reference gives no
# interval for hardware keys, so they take the software keys' bounds. Service keys follow
# the default key.
ROTATION_RULES: Final[Mapping[KeyKind, RotationRule]] = MappingProxyType({
    KeyKind.SOFTWARE: RotationRule(7 * _DAY, 365 * _DAY),
    KeyKind.HARDWARE: RotationRule(7 * _DAY, 365 * _DAY,
                                   storage=KeyStorageMechanism.HSM_ENCRYPTED_DATABASE),
    KeyKind.DEFAULT_MASTER: RotationRule(365 * _DAY, 365 * _DAY, needs_addon=True),
    KeyKind.SERVICE: RotationRule(365 * _DAY, 365 * _DAY, needs_addon=True),
})


def require_rotation(key: Key, op: Op, principal: PrincipalKind, *, addon: bool
                     ) -> RotationRule:
    """The rotation rule of ``key``; refuse ``op`` (CreateKeyVersion, UpdateRotationPolicy,
    automatic rotation) where the seed's rotation column or its narrower text says no.

    :raises UnsupportedOperation:
    """
    require(key.kind, op, principal)
    rule = ROTATION_RULES[key.kind]
    if not SPECS[key.spec].symmetric:
        raise UnsupportedOperation(f"asymmetric keys do not rotate ({op})")
    if key.origin is not Origin.ALIYUN_KMS:
        raise UnsupportedOperation(f"keys with imported material do not rotate ({op})")
    if rule.storage is not None and key.storage_mechanism is not rule.storage:
        raise UnsupportedOperation(f"{_a_key(key.kind)} rotates only with KeyStorageMechanism "
                                   f"{rule.storage} ({op})")
    if rule.needs_addon and not addon:
        raise UnsupportedOperation(f"rotating {_a_key(key.kind)} needs the paid rotation add-on, "
                                   f"which this account does not have ({op})")
    return rule


def require_import(key: Key, op: Op, principal: PrincipalKind) -> None:
    """Refuse a BYOK action where the seed says no: the capability table, then Origin, then
    the default master key's "import only when the key is first enabled".

    :raises UnsupportedOperation: :raises Unsupported: (``Unsupported.Origin``)
    """
    require(key.kind, op, principal)
    if key.origin is not Origin.EXTERNAL:
        raise Unsupported("Origin", f"{op} needs a key created with Origin EXTERNAL")
    if not SPECS[key.spec].symmetric:
        raise UnsupportedOperation(f"importing asymmetric key material is not "
                                   f"implemented ({op})")
    if key.kind is KeyKind.DEFAULT_MASTER and (
            op is Op.DELETE_KEY_MATERIAL or key.material_check
            or key.state is not KeyState.PENDING_IMPORT):
        raise UnsupportedOperation("a default master key takes imported material only when "
                                   f"it is first enabled ({op})")
