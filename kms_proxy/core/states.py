"""The key-state x action table as data (OpenAPI reference section 6.2; every rejection is
HTTP 409 at the edge)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from kms_proxy.core.capabilities import Op
from kms_proxy.core.errors import KeyStateInvalid
from kms_proxy.core.model import KeyState

__all__ = ["STATE_RULES", "require_state"]

_MODIFY = "Rejected.StateModifiedFailed"


def _row(**rejections: str) -> Mapping[KeyState, str]:
    """One row: the states that reject the action, each with its Alibaba code."""
    names = {"disabled": KeyState.DISABLED, "pending_deletion": KeyState.PENDING_DELETION,
             "pending_import": KeyState.PENDING_IMPORT, "enabled": KeyState.ENABLED}
    return MappingProxyType({names[state]: code for state, code in rejections.items()})


_CRYPTO: Final = _row(disabled="Rejected.Disabled", pending_deletion="Rejected.PendingDeletion",
                      pending_import="Rejected.PendingImport")
_ALWAYS: Final = _row()

# Op -> {state that rejects it: code}. A state that is absent allows the action.
STATE_RULES: Final[Mapping[Op, Mapping[KeyState, str]]] = MappingProxyType({
    Op.ENCRYPT: _CRYPTO,
    Op.DECRYPT: _CRYPTO,
    Op.GENERATE_DATA_KEY: _CRYPTO,
    Op.GENERATE_DATA_KEY_WITHOUT_PLAINTEXT: _CRYPTO,
    # Not in the 2021 table; they use a key's material the same way as Encrypt/Decrypt.
    Op.GENERATE_AND_EXPORT_DATA_KEY: _CRYPTO,
    Op.EXPORT_DATA_KEY: _CRYPTO,
    Op.RE_ENCRYPT: _CRYPTO,
    Op.ASYMMETRIC_SIGN: _CRYPTO,
    Op.ASYMMETRIC_VERIFY: _CRYPTO,
    Op.ASYMMETRIC_ENCRYPT: _CRYPTO,
    Op.ASYMMETRIC_DECRYPT: _CRYPTO,
    Op.GET_PUBLIC_KEY: _CRYPTO,
    Op.ENABLE_KEY: _row(pending_deletion=_MODIFY, pending_import=_MODIFY),
    Op.DISABLE_KEY: _row(pending_deletion=_MODIFY, pending_import=_MODIFY),
    Op.CREATE_ALIAS: _row(pending_deletion=_MODIFY),
    # UpdateAlias checks only the target key's state.
    Op.UPDATE_ALIAS: _row(pending_deletion="Rejected.PendingDeletion"),
    Op.UPDATE_KEY_DESCRIPTION: _row(pending_deletion="Rejected.PendingDeletion"),
    Op.TAG_RESOURCE: _row(pending_deletion="Rejected.PendingDeletion"),
    Op.UNTAG_RESOURCE: _row(pending_deletion="Rejected.PendingDeletion"),
    # The batch forms check each key as the single ones do.
    Op.TAG_RESOURCES: _row(pending_deletion="Rejected.PendingDeletion"),
    Op.UNTAG_RESOURCES: _row(pending_deletion="Rejected.PendingDeletion"),
    Op.DESCRIBE_KEY: _ALWAYS,
    Op.LIST_KEYS: _ALWAYS,
    Op.LIST_ALIASES: _ALWAYS,
    Op.LIST_ALIASES_BY_KEY_ID: _ALWAYS,
    Op.DELETE_ALIAS: _ALWAYS,
    Op.LIST_RESOURCE_TAGS: _ALWAYS,
    Op.LIST_TAG_RESOURCES: _ALWAYS,
    Op.CREATE_KEY: _ALWAYS,
    Op.CREATE_KEY_VERSION: _CRYPTO,
    Op.UPDATE_ROTATION_POLICY: _CRYPTO,
    Op.SCHEDULE_KEY_DELETION: _row(pending_deletion=_MODIFY),
    Op.CANCEL_KEY_DELETION: _row(enabled=_MODIFY, disabled=_MODIFY, pending_import=_MODIFY),
    # Not in the 2021 table; its API page: "the key must not be PendingDeletion".
    Op.SET_DELETION_PROTECTION: _row(pending_deletion=_MODIFY),
    Op.IMPORT_KEY_MATERIAL: _row(pending_deletion=_MODIFY),
    Op.GET_PARAMETERS_FOR_IMPORT: _ALWAYS,
    Op.DELETE_KEY_MATERIAL: _ALWAYS,
    Op.LIST_KEY_VERSIONS: _ALWAYS,
    Op.DESCRIBE_KEY_VERSION: _ALWAYS,
    # This project's extensions: a backup is taken of a key in any state but deletion; a
    # restore makes a key anew, like CreateKey.
    Op.BACKUP_KEY: _row(pending_deletion="Rejected.PendingDeletion"),
    Op.RESTORE_KEY_BACKUP: _ALWAYS,
})


def require_state(state: KeyState, op: Op) -> None:
    """:raises KeyStateInvalid: with the table's code if ``state`` rejects ``op``."""
    code = STATE_RULES[op].get(state)
    if code is not None:
        raise KeyStateInvalid(state.value, op.value, code)
