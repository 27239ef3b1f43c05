"""The request id of the call being served, set by the edge and read by the core when it
tells a backend who a call is for (``CallInfo``). A context variable, because the request id
is a cross-cutting fact of the edge that no core signature should have to carry."""

from __future__ import annotations

import uuid
from contextvars import ContextVar
from typing import Final

from kms_proxy.core.model import Key

__all__ = ["REQUEST_ID", "RESOLVED_KEY", "RESOLVED_KEYS", "current_request_id"]

REQUEST_ID: Final[ContextVar[str]] = ContextVar("kms_request_id", default="")
# The key the call resolved (named by id, alias or ARN, or by a blob's head), set by the
# core for the edge's audit line, which must name the key even when the answer does not
# (DisableKey KeyId=alias/x answers only a RequestId). The edge clears it per request.
RESOLVED_KEY: Final[ContextVar[Key | None]] = ContextVar("kms_resolved_key", default=None)
# The keys a batch action (TagResources and its kind) named, for the same audit line: by
# id once all were found, else as the caller named them.
RESOLVED_KEYS: Final[ContextVar[tuple[str, ...]]] = ContextVar("kms_resolved_keys",
                                                               default=())


def current_request_id() -> str:
    """The edge's request id, or a fresh one for calls that did not come through an edge."""
    return REQUEST_ID.get() or str(uuid.uuid4())
