"""The shared gateway's QPS limits per account and region (reference section 10), as data.

Alibaba's OpenAPI gateway caps each account's calls per operation group; past a cap it
answers 429 ``Rejected.Throttling``. Crypto on an instance's keys is capped by the
instance's own QPS instead, and default and service keys by the account's 1,000 ops/s
(both ``KeyService._throttle``), so crypto is not in this table. GetRandomPassword, for
which the reference gives no limit, is not capped; this project's BackupKey and
RestoreKeyBackup count as key management writes.

Off unless configured (``gateway_quotas = true``): the limits are low (10 CreateKey a
second) and a test suite that makes keys in a loop would meet them, as it would on Alibaba.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from kms_proxy.core.capabilities import Op
from kms_proxy.core.errors import Throttled
from shared.ratelimit import TokenBucket

__all__ = ["GATEWAY_GROUPS", "GatewayQuotas", "QuotaGroup"]


@dataclass(frozen=True, slots=True)
class QuotaGroup:
    name: str
    qps: int
    ops: frozenset[Op]


GATEWAY_GROUPS: Final = (
    QuotaGroup("key management reads", 50, frozenset({
        Op.DESCRIBE_KEY, Op.LIST_KEYS, Op.DESCRIBE_KEY_VERSION, Op.LIST_KEY_VERSIONS,
        Op.GET_PUBLIC_KEY, Op.LIST_ALIASES, Op.LIST_ALIASES_BY_KEY_ID,
        Op.LIST_TAG_RESOURCES, Op.GET_PARAMETERS_FOR_IMPORT, Op.DESCRIBE_REGIONS})),
    QuotaGroup("ListResourceTags", 300, frozenset({Op.LIST_RESOURCE_TAGS})),
    QuotaGroup("CreateKey", 10, frozenset({Op.CREATE_KEY})),
    QuotaGroup("key management writes", 30, frozenset({
        Op.ENABLE_KEY, Op.DISABLE_KEY, Op.UPDATE_KEY_DESCRIPTION, Op.CREATE_ALIAS,
        Op.UPDATE_ALIAS, Op.DELETE_ALIAS, Op.TAG_RESOURCE, Op.UNTAG_RESOURCE,
        Op.TAG_RESOURCES, Op.UNTAG_RESOURCES, Op.SCHEDULE_KEY_DELETION,
        Op.CANCEL_KEY_DELETION, Op.SET_DELETION_PROTECTION, Op.CREATE_KEY_VERSION,
        Op.UPDATE_ROTATION_POLICY, Op.IMPORT_KEY_MATERIAL, Op.DELETE_KEY_MATERIAL,
        Op.BACKUP_KEY, Op.RESTORE_KEY_BACKUP})),
    QuotaGroup("instance management reads", 50, frozenset({
        Op.LIST_KMS_INSTANCES, Op.GET_KMS_INSTANCE, Op.GET_KMS_INSTANCE_QUOTA_INFOS,
        Op.GET_DEFAULT_KMS_INSTANCE})),
    QuotaGroup("DescribeAccountKmsStatus", 1, frozenset({Op.DESCRIBE_ACCOUNT_KMS_STATUS})),
)

_GROUP_OF: Final[Mapping[Op, QuotaGroup]] = MappingProxyType(
    {op: group for group in GATEWAY_GROUPS for op in group.ops})


class GatewayQuotas:
    """One token bucket per (account, group), a second's worth of burst, made on first use.

    Not thread-safe: it belongs to the front's event loop.
    """

    def __init__(self, *, enabled: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = enabled
        self._clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def admit(self, account_id: str, op: Op) -> None:
        """:raises Throttled: if the account has used its group's calls this second."""
        if not self.enabled:  # Every request passes here, crypto too: off costs nothing.
            return
        group = _GROUP_OF.get(op)
        if group is None:
            return
        bucket = self._buckets.get((account_id, group.name))
        if bucket is None:
            bucket = self._buckets[account_id, group.name] = TokenBucket(
                rate=group.qps, burst=group.qps, clock=self._clock)
        if not bucket.take():
            raise Throttled(f"{group.name} of account {account_id} ({group.qps} QPS)")
