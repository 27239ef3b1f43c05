"""The capability and key-state tables, cell by cell, against the seed digest and the
OpenAPI reference (transcribed here literally, so a change to either side shows up)."""

from __future__ import annotations

import pytest

from kms_proxy.core.capabilities import (
    KEYLESS_OPS,
    KIND_CAPABILITIES,
    SPECS,
    Capability,
    Op,
    require,
    require_principal,
)
from kms_proxy.core.errors import AccessDenied, KeyStateInvalid, UnsupportedOperation
from kms_proxy.core.model import KeyKind, KeySpec, KeyState, KeyUsage, PrincipalKind
from kms_proxy.core.states import STATE_RULES, require_state

Y, N = True, False
C = Capability
# seed-digest.md, "Capabilities per key kind": crypto from self-built applications.
SEED_CRYPTO = {
    KeyKind.DEFAULT_MASTER: {C.DATA_CRYPTO: N, C.SIGN_VERIFY: N, C.SERVER_SIDE_ENCRYPTION: Y},
    KeyKind.SERVICE: {C.DATA_CRYPTO: N, C.SIGN_VERIFY: N, C.SERVER_SIDE_ENCRYPTION: Y},
    KeyKind.SOFTWARE: {C.DATA_CRYPTO: Y, C.SIGN_VERIFY: Y, C.SERVER_SIDE_ENCRYPTION: Y},
    KeyKind.HARDWARE: {C.DATA_CRYPTO: Y, C.SIGN_VERIFY: Y, C.SERVER_SIDE_ENCRYPTION: Y},
    KeyKind.EXTERNAL: {C.DATA_CRYPTO: Y, C.SIGN_VERIFY: N, C.SERVER_SIDE_ENCRYPTION: Y},
}
# seed-digest.md, lifecycle table (reading of merged cells). "only with the paid rotation
# add-on" and "only when first enabled" count as yes: the capability exists, narrowed.
SEED_LIFECYCLE = {
    KeyKind.DEFAULT_MASTER: {C.ROTATION: Y, C.SCHEDULED_DELETION: Y,
                             C.DELETION_PROTECTION: Y, C.BYOK_IMPORT: Y, C.BACKUP: N},
    KeyKind.SERVICE: {C.ROTATION: Y, C.SCHEDULED_DELETION: N, C.DELETION_PROTECTION: N,
                      C.BYOK_IMPORT: N, C.BACKUP: N},
    KeyKind.SOFTWARE: {C.ROTATION: Y, C.SCHEDULED_DELETION: Y, C.DELETION_PROTECTION: Y,
                       C.BYOK_IMPORT: Y, C.BACKUP: Y},
    KeyKind.HARDWARE: {C.ROTATION: Y, C.SCHEDULED_DELETION: Y, C.DELETION_PROTECTION: Y,
                       C.BYOK_IMPORT: Y, C.BACKUP: N},
    KeyKind.EXTERNAL: {C.ROTATION: N, C.SCHEDULED_DELETION: Y, C.DELETION_PROTECTION: Y,
                       C.BYOK_IMPORT: N, C.BACKUP: N},
}
CELLS = [(kind, cap, allowed) for table in (SEED_CRYPTO, SEED_LIFECYCLE)
         for kind, row in table.items() for cap, allowed in row.items()]


@pytest.mark.parametrize(("kind", "capability", "allowed"), CELLS,
                         ids=[f"{k}-{c.name}" for k, c, _ in CELLS])
def test_every_cell_of_the_seed_tables(kind: KeyKind, capability: Capability,
                                       allowed: bool) -> None:
    assert (capability in KIND_CAPABILITIES[kind]) is allowed


def test_aliases_tags_and_audit_for_every_kind_but_migrated() -> None:
    # "All kinds support key identifiers management: aliases and tags."
    for kind in (KeyKind.DEFAULT_MASTER, KeyKind.SERVICE, KeyKind.SOFTWARE,
                 KeyKind.HARDWARE, KeyKind.EXTERNAL):
        assert {C.ALIASES, C.TAGS} <= KIND_CAPABILITIES[kind]
    # "Keys migrated from KMS 1.0 are read-only: every operation is refused."
    assert KIND_CAPABILITIES[KeyKind.MIGRATED] == frozenset()


@pytest.mark.parametrize("kind", list(KeyKind))
@pytest.mark.parametrize("op", [Op.ENCRYPT, Op.DECRYPT, Op.GENERATE_DATA_KEY])
def test_direct_calls_versus_server_side_encryption(kind: KeyKind, op: Op) -> None:
    """Default keys serve server-side encryption only: an application is refused, a
    service principal is allowed; migrated keys refuse both."""
    app_ok = kind in (KeyKind.SOFTWARE, KeyKind.HARDWARE, KeyKind.EXTERNAL)
    service_ok = kind is not KeyKind.MIGRATED
    for principal, ok in ((PrincipalKind.USER, app_ok), (PrincipalKind.SERVICE, service_ok)):
        if ok:
            require(kind, op, principal)
        else:
            with pytest.raises(UnsupportedOperation):
                require(kind, op, principal)


def test_migrated_keys_allow_only_reads() -> None:
    for op in Op:
        if op in (Op.DESCRIBE_KEY, Op.LIST_KEYS, Op.LIST_ALIASES, Op.LIST_ALIASES_BY_KEY_ID,
                  Op.LIST_RESOURCE_TAGS, Op.LIST_TAG_RESOURCES, Op.LIST_KEY_VERSIONS,
                  Op.DESCRIBE_KEY_VERSION):
            require(KeyKind.MIGRATED, op, PrincipalKind.USER)
        elif op is not Op.CREATE_KEY and op not in KEYLESS_OPS:
            with pytest.raises(UnsupportedOperation, match="read-only"):
                require(KeyKind.MIGRATED, op, PrincipalKind.USER)


# OpenAPI reference section 6.2 (409 codes), transcribed.
_R = {"D": "Rejected.Disabled", "P": "Rejected.PendingDeletion",
      "I": "Rejected.PendingImport", "M": "Rejected.StateModifiedFailed"}
REFERENCE_STATES = {
    Op.ENCRYPT: ("D", "P", "I"), Op.DECRYPT: ("D", "P", "I"),
    Op.GENERATE_DATA_KEY: ("D", "P", "I"), Op.GENERATE_DATA_KEY_WITHOUT_PLAINTEXT: ("D", "P", "I"),
    Op.ENABLE_KEY: (None, "M", "M"), Op.DISABLE_KEY: (None, "M", "M"),
    Op.CREATE_ALIAS: (None, "M", None),
    Op.UPDATE_KEY_DESCRIPTION: (None, "P", None), Op.TAG_RESOURCE: (None, "P", None),
    Op.UNTAG_RESOURCE: (None, "P", None),
    Op.DESCRIBE_KEY: (None, None, None), Op.LIST_KEYS: (None, None, None),
    Op.LIST_ALIASES: (None, None, None), Op.DELETE_ALIAS: (None, None, None),
    Op.LIST_RESOURCE_TAGS: (None, None, None), Op.CREATE_KEY: (None, None, None),
    Op.CREATE_KEY_VERSION: ("D", "P", "I"), Op.UPDATE_ROTATION_POLICY: ("D", "P", "I"),
    Op.SCHEDULE_KEY_DELETION: (None, "M", None),
    Op.CANCEL_KEY_DELETION: ("M", None, "M"),  # and "M" when Enabled (below)
    Op.IMPORT_KEY_MATERIAL: (None, "M", None),
    Op.LIST_KEY_VERSIONS: (None, None, None), Op.DESCRIBE_KEY_VERSION: (None, None, None),
    Op.GET_PARAMETERS_FOR_IMPORT: (None, None, None),
    Op.DELETE_KEY_MATERIAL: (None, None, None),
}
# The one row whose Enabled column is not OK.
ENABLED_REJECTS = {Op.CANCEL_KEY_DELETION: "M"}
STATE_CELLS = [(op, state, codes[i]) for op, codes in REFERENCE_STATES.items()
               for i, state in enumerate((KeyState.DISABLED, KeyState.PENDING_DELETION,
                                          KeyState.PENDING_IMPORT))]


@pytest.mark.parametrize(("op", "state", "code"), STATE_CELLS,
                         ids=[f"{o.value}-{s.value}" for o, s, _ in STATE_CELLS])
def test_every_cell_of_the_state_table(op: Op, state: KeyState, code: str | None) -> None:
    if op in ENABLED_REJECTS:
        with pytest.raises(KeyStateInvalid) as rejected:
            require_state(KeyState.ENABLED, op)
        assert rejected.value.code == _R[ENABLED_REJECTS[op]]
    else:
        require_state(KeyState.ENABLED, op)
    if code is None:
        require_state(state, op)
    else:
        with pytest.raises(KeyStateInvalid) as caught:
            require_state(state, op)
        assert caught.value.code == _R[code]


def test_every_op_has_a_state_row() -> None:
    missing = {op for op in Op if op not in STATE_RULES} - KEYLESS_OPS
    assert missing == set()


def test_spec_table() -> None:
    assert SPECS[KeySpec.AES_256].usages == {KeyUsage.ENCRYPT_DECRYPT}
    assert SPECS[KeySpec.EC_P256].usages == {KeyUsage.SIGN_VERIFY}
    assert SPECS[KeySpec.RSA_2048].default_usage is KeyUsage.SIGN_VERIFY
    assert SPECS[KeySpec.RSA_2048].encrypt_algorithms == {"RSAES_OAEP_SHA_256": 190,
                                                          "RSAES_OAEP_SHA_1": 214}
    assert SPECS[KeySpec.RSA_3072].encrypt_algorithms == {"RSAES_OAEP_SHA_256": 318,
                                                          "RSAES_OAEP_SHA_1": 342}
    assert SPECS[KeySpec.EC_SM2].unsupported_reason


SERVICE_MAY = {Op.ENCRYPT, Op.DECRYPT, Op.GENERATE_DATA_KEY,
               Op.GENERATE_DATA_KEY_WITHOUT_PLAINTEXT, Op.RE_ENCRYPT, Op.DESCRIBE_KEY,
               Op.LIST_KEYS, Op.LIST_ALIASES, Op.LIST_ALIASES_BY_KEY_ID, Op.LIST_RESOURCE_TAGS,
               Op.LIST_TAG_RESOURCES,
               Op.LIST_KEY_VERSIONS, Op.DESCRIBE_KEY_VERSION, Op.GET_KMS_INSTANCE,
               Op.GET_KMS_INSTANCE_QUOTA_INFOS, Op.LIST_KMS_INSTANCES, Op.DESCRIBE_REGIONS,
               Op.GET_DEFAULT_KMS_INSTANCE, Op.DESCRIBE_ACCOUNT_KMS_STATUS}


@pytest.mark.parametrize("op", list(Op), ids=[o.value for o in Op])
def test_a_service_principal_only_encrypts_for_the_account_and_reads(op: Op) -> None:
    require_principal(op, PrincipalKind.USER, "acs:ram::1:user/u")
    if op in SERVICE_MAY:
        require_principal(op, PrincipalKind.SERVICE, "acs:ram::1:service/oss")
    else:
        with pytest.raises(AccessDenied):
            require_principal(op, PrincipalKind.SERVICE, "acs:ram::1:service/oss")


def test_every_action_is_an_op() -> None:
    """The edge checks the principal's role with ``Op(action)`` before the handler runs: an
    action without an Op would answer 500 instead of acting."""
    from kms_proxy.api.actions import ACTIONS

    assert set(ACTIONS) <= {op.value for op in Op}
