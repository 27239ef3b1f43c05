"""The ciphertext blob and the encryption context.

Symmetric blob, compatible with Alibaba's documented layout (reference section 3):
``key version id (36 ASCII bytes, a UUID) || sealed``, where ``sealed`` is the backend's
own format (software/HSM keys: ``IV (12 B) || ciphertext || tag (16 B)``). The key version
id leads, so Decrypt finds the key without a KeyId, and a rotation or a change of algorithm
stays transparent: the version decides the key and its spec.

The encryption context is not stored; it is canonicalised (sorted keys, compact JSON,
UTF-8) into the AAD, so equal contexts in any order decrypt. The AAD starts with the key
version id, so the blob's unauthenticated head cannot be swapped: versions that share
material (external keys linked to one EKM key, in any account; BYOK keys given the same
material) would otherwise decrypt each other's blobs, past a disabled key or another
account's boundary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Final

from kms_proxy.core.errors import InvalidCiphertext

__all__ = ["VERSION_ID_LENGTH", "blob_aad", "join_blob", "split_blob"]

VERSION_ID_LENGTH: Final = 36
_UUID: Final = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def join_blob(version_id: str, sealed: bytes) -> bytes:
    raw = version_id.encode("ascii")
    assert len(raw) == VERSION_ID_LENGTH, "key version ids are UUIDs"
    return raw + sealed


def split_blob(blob: bytes) -> tuple[str, bytes]:
    """The key version id and the sealed part. :raises InvalidCiphertext: if malformed."""
    head, sealed = blob[:VERSION_ID_LENGTH], blob[VERSION_ID_LENGTH:]
    if not sealed or not _UUID.fullmatch(head):
        raise InvalidCiphertext()
    return head.decode("ascii"), sealed


def blob_aad(version_id: str, context: Mapping[str, str] | None) -> bytes:
    """The AAD of a blob of ``version_id``: the version id (36 bytes, so the two parts
    cannot be confused), then the encryption context, order-independent (nothing more
    for no context)."""
    head = version_id.encode("ascii")
    assert len(head) == VERSION_ID_LENGTH, "key version ids are UUIDs"
    if not context:
        return head
    return head + json.dumps(dict(context), sort_keys=True, separators=(",", ":"),
                             ensure_ascii=False).encode()
