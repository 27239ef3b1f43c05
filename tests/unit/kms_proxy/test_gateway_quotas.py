"""The shared gateway's per-account QPS limits (reference section 10) as data, and the
buckets that apply them."""

from __future__ import annotations

import pytest

from kms_proxy.core.capabilities import Op
from kms_proxy.core.errors import Throttled
from kms_proxy.core.quotas import GATEWAY_GROUPS, GatewayQuotas

# Capped elsewhere (instance QPS, the account's default-key QPS) or given no limit.
UNCAPPED = {Op.ENCRYPT, Op.DECRYPT, Op.GENERATE_DATA_KEY,
            Op.GENERATE_DATA_KEY_WITHOUT_PLAINTEXT, Op.GENERATE_AND_EXPORT_DATA_KEY,
            Op.EXPORT_DATA_KEY, Op.RE_ENCRYPT, Op.ASYMMETRIC_SIGN, Op.ASYMMETRIC_VERIFY,
            Op.ASYMMETRIC_ENCRYPT, Op.ASYMMETRIC_DECRYPT, Op.GET_RANDOM_PASSWORD}


def test_every_op_is_in_one_group_or_capped_elsewhere() -> None:
    grouped = [op for group in GATEWAY_GROUPS for op in group.ops]
    assert len(grouped) == len(set(grouped))
    assert set(Op) - set(grouped) == UNCAPPED


def test_the_reference_figures() -> None:
    assert {g.name: g.qps for g in GATEWAY_GROUPS} == {
        "key management reads": 50, "ListResourceTags": 300, "CreateKey": 10,
        "key management writes": 30, "instance management reads": 50,
        "DescribeAccountKmsStatus": 1}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_second_of_calls_per_account_and_group() -> None:
    clock = Clock()
    quotas = GatewayQuotas(enabled=True, clock=clock)
    for _ in range(10):
        quotas.admit("111111", Op.CREATE_KEY)
    with pytest.raises(Throttled, match="QPS") as caught:
        quotas.admit("111111", Op.CREATE_KEY)
    assert caught.value.quota == "CreateKey of account 111111 (10 QPS)"
    # Another account, and another group of the same account, have their own.
    quotas.admit("222222", Op.CREATE_KEY)
    quotas.admit("111111", Op.DESCRIBE_KEY)
    # A tenth of a second gives one CreateKey back.
    clock.now += 0.1
    quotas.admit("111111", Op.CREATE_KEY)
    with pytest.raises(Throttled):
        quotas.admit("111111", Op.CREATE_KEY)
    # Crypto is not capped here.
    for _ in range(5000):
        quotas.admit("111111", Op.ENCRYPT)


def test_off_caps_nothing() -> None:
    quotas = GatewayQuotas(enabled=False, clock=Clock())
    for _ in range(100):
        quotas.admit("111111", Op.DESCRIBE_ACCOUNT_KMS_STATUS)
