"""GetRandomPassword through the official SDK: the length and character rules, precise
refusals, and a password that appears in no log and no audit event."""

from __future__ import annotations

import logging
import string

import pytest
from alibabacloud_kms20160120 import models
from alibabacloud_kms20160120.client import Client

from tests.integration.kms.conftest import Kms, StartKms, assert_error

EVERY = set(string.ascii_letters + string.digits + string.punctuation)


async def password(kms: Kms, client: Client, **kwargs: str) -> str:
    body = await kms.sdk(client, "get_random_password",
                         models.GetRandomPasswordRequest(**kwargs))
    return str(body.random_password)


async def test_default_and_bounds(kms: Kms, client: Client) -> None:
    drawn = [await password(kms, client) for _ in range(64)]
    assert all(len(p) == 32 and set(p) <= EVERY for p in drawn)
    assert len(set(drawn)) == len(drawn)
    # 2,048 characters from 94: every one of them turns up (a miss is about 3e-8 likely).
    assert set("".join(drawn)) == EVERY
    assert len(await password(kms, client, password_length="8")) == 8
    assert len(await password(kms, client, password_length="128")) == 128


async def test_classes_and_excluded_characters(kms: Kms, client: Client) -> None:
    only_punctuation = await password(kms, client, exclude_lowercase="true",
                                      exclude_uppercase="true", exclude_numbers="true")
    assert set(only_punctuation) <= set(string.punctuation)
    no_letters = await password(kms, client, exclude_characters=string.ascii_letters + " é")
    assert set(no_letters) <= set(string.digits + string.punctuation)
    # Each remaining type at least once, also when one is cut down to a single character.
    for _ in range(60):
        p = await password(kms, client, password_length="8",
                           require_each_included_type="true",
                           exclude_characters=string.digits[1:] + "ABCDEFGHIJKLMNOPQRSTUVWXY")
        assert "0" in p and "Z" in p
        assert set(p) & set(string.ascii_lowercase) and set(p) & set(string.punctuation)


@pytest.mark.parametrize(("params", "named"), [
    ({"PasswordLength": "7"}, "PasswordLength"),
    ({"PasswordLength": "129"}, "PasswordLength"),
    ({"PasswordLength": "twelve"}, "PasswordLength"),
    ({"ExcludeNumbers": "yes"}, "ExcludeNumbers"),
    ({"RequireEachIncludedType": "1"}, "RequireEachIncludedType"),
    ({"ExcludeLowercase": "true", "ExcludeUppercase": "true", "ExcludeNumbers": "true",
      "ExcludeCharacters": string.punctuation}, "ExcludeCharacters"),
    ({"ExcludeLowercase": "true", "ExcludeUppercase": "true", "ExcludeNumbers": "true",
      "ExcludePunctuation": "true"}, "Exclude*"),
])
async def test_bad_parameters_are_named(kms: Kms, client: Client, params: dict[str, str],
                                        named: str) -> None:
    reply = await kms.call(client, "GetRandomPassword", params)
    assert_error(reply, 400, "InvalidParameter", names=named)


async def test_the_password_is_neither_logged_nor_audited(
        start_kms: StartKms, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("kms_proxy", "aiohttp", "shared"):
        caplog.set_level(logging.DEBUG, logger=name)
    kms = await start_kms()
    client = kms.client()
    drawn = [await password(kms, client, password_length="64") for _ in range(5)]
    await kms.stop()  # flushes the audit log
    audit = kms.config.audit_log.read_text()
    assert audit.count('"GetRandomPassword"') == 5
    logged = caplog.text
    # The request log was captured: a line for each call.
    assert len([r for r in caplog.records if r.name == "kms_proxy.access"]) >= 5
    for p in drawn:
        assert p not in audit and p not in logged
