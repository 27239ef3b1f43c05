"""The audit trail of real SDK traffic: one hash-chained event per authenticated action,
successful or not, with no plaintext, data key or secret in it or in the logs."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from alibabacloud_kms20160120 import models

from kms_proxy.config import Config
from kms_proxy.core.audit import verify_chain
from tests.integration.kms.conftest import (
    ACCESS_KEYS,
    ACCOUNT_A,
    ACCOUNT_B,
    AK_A1,
    REGION,
    Kms,
    Reply,
    StartKms,
    assert_error,
    sdk_client,
)

PLAINTEXT = "Top secret 7f3a: the eagle lands at dawn + = / é"
CONTEXT = {"case": "audit"}
# Events KMS writes on its own at a first start: a CreateKey per account's default key.
PROVISIONED = 2
TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


@dataclass(frozen=True)
class Expected:
    request_id: str
    who: str
    action: str
    key_id: str | None
    outcome: str = "Success"
    error_code: str | None = None
    # Whether the core found the key (then the line has its ARN), also when the action
    # failed afterwards; a request refused before that names the key as it was given.
    resolved: bool = True


def principal(who: str) -> tuple[str, str]:
    account = ACCOUNT_B if who.startswith("b") else ACCOUNT_A
    return account, f"acs:ram::{account}:user/{ACCESS_KEYS[who].user}"


def forbidden_values(config: Config, extra: list[str]) -> list[str]:
    """Every secret value, in the encodings it could leak in."""
    values = [PLAINTEXT, base64.b64encode(PLAINTEXT.encode()).decode(), quote(PLAINTEXT),
              quote_plus(PLAINTEXT), "the eagle lands at dawn", *extra]
    for key in ACCESS_KEYS.values():
        values += [key.secret, quote(key.secret, safe="")]
    for raw in (config.root_key, config.audit_chain_key or b""):
        values += [base64.b64encode(raw).decode(), raw.hex()]
    return values


async def run_traffic(kms: Kms) -> tuple[list[Expected], list[str]]:
    """A mix of successes, failures and unauthenticated requests; what the audit must hold
    and the extra secret values that must not show up."""
    alice, carol, bob = kms.client("a1", "v3"), kms.client("a2", "v2"), kms.client("b1", "v3")
    expected: list[Expected] = []
    secrets: list[str] = []

    meta = (await kms.sdk(alice, "create_key", models.CreateKeyRequest(
        description="audited")))
    key_id = meta.key_metadata.key_id
    expected.append(Expected(meta.request_id, "a1", "CreateKey", key_id))
    alias = await kms.sdk(alice, "create_alias", models.CreateAliasRequest(
        alias_name="alias/audited", key_id=key_id))
    expected.append(Expected(alias.request_id, "a1", "CreateAlias", key_id))
    sealed = await kms.sdk(alice, "encrypt", models.EncryptRequest(
        key_id="alias/audited", plaintext=PLAINTEXT, encryption_context=CONTEXT))
    expected.append(Expected(sealed.request_id, "a1", "Encrypt", key_id))
    opened = await kms.sdk(carol, "decrypt", models.DecryptRequest(
        ciphertext_blob=sealed.ciphertext_blob, encryption_context=CONTEXT))
    assert opened.plaintext == PLAINTEXT
    expected.append(Expected(opened.request_id, "a2", "Decrypt", key_id))
    data_key = await kms.sdk(alice, "generate_data_key", models.GenerateDataKeyRequest(
        key_id=key_id))
    secrets += [data_key.plaintext, base64.b64decode(data_key.plaintext).hex()]
    expected.append(Expected(data_key.request_id, "a1", "GenerateDataKey", key_id))
    again = await kms.sdk(carol, "decrypt", models.DecryptRequest(
        ciphertext_blob=data_key.ciphertext_blob))
    assert again.plaintext == data_key.plaintext
    expected.append(Expected(again.request_id, "a2", "Decrypt", key_id))

    async def failing(client: Any, who: str, action: str, params: dict[str, Any],
                      status: int, code: str, key: str | None, *, resolved: bool) -> None:
        reply = await kms.call(client, action, params)
        assert_error(reply, status, code)
        expected.append(Expected(reply.body["RequestId"], who, action, key, "Failure", code,
                                 resolved))

    missing_key = "key-hzz00000000000000000000"
    await failing(alice, "a1", "Encrypt", {"KeyId": missing_key, "Plaintext": PLAINTEXT},
                  404, "Forbidden.KeyNotFound", missing_key, resolved=False)
    # The blob named the key; the context did not match.
    await failing(carol, "a2", "Decrypt", {"CiphertextBlob": sealed.ciphertext_blob,
                                           "EncryptionContext": '{"case":"other"}'},
                  400, "InvalidParameter", key_id, resolved=True)
    too_long = PLAINTEXT * (6144 // len(PLAINTEXT) + 1)
    await failing(alice, "a1", "Encrypt", {"KeyId": key_id, "Plaintext": too_long},
                  400, "InvalidParameter", key_id, resolved=False)
    await failing(alice, "a1", "Encrypt", {"KeyId": key_id, "Plaintext": PLAINTEXT,
                                           "DryRun": "true"},
                  400, "Rejected.UnsupportedOperation", key_id, resolved=False)
    await failing(bob, "b1", "DescribeKey",
                  {"KeyId": f"acs:kms:{REGION}:{ACCOUNT_A}:key/{key_id}"},
                  403, "Forbidden.NoPermission", f"acs:kms:{REGION}:{ACCOUNT_A}:key/{key_id}",
                  resolved=False)
    # ReEncrypt's key is its destination: one that is not found is named as given, not
    # replaced by the source key the blob named.
    await failing(alice, "a1", "ReEncrypt", {"CiphertextBlob": sealed.ciphertext_blob,
                                             "SourceEncryptionContext": json.dumps(CONTEXT),
                                             "DestinationKeyId": "alias/missing"},
                  404, "Forbidden.AliasNotFound", "alias/missing", resolved=False)
    # Named by alias and by ARN, the lines name the key itself.
    version = await kms.sdk(alice, "create_key_version", models.CreateKeyVersionRequest(
        key_id="alias/audited"))
    expected.append(Expected(version.request_id, "a1", "CreateKeyVersion", key_id))
    disabled = await kms.sdk(alice, "disable_key", models.DisableKeyRequest(
        key_id="alias/audited"))
    expected.append(Expected(disabled.request_id, "a1", "DisableKey", key_id))
    await failing(carol, "a2", "GenerateDataKey",
                  {"KeyId": f"acs:kms:{REGION}:{ACCOUNT_A}:key/{key_id}"}, 409,
                  "Rejected.Disabled", key_id, resolved=True)

    # Authenticated, so audited even though no action ran.
    unknown = await kms.call(alice, "NoSuchAction")
    assert_error(unknown, 404, "InvalidAction.NotFound")
    expected.append(Expected(unknown.body["RequestId"], "a1", "NoSuchAction", None, "Failure",
                             "InvalidAction.NotFound", False))
    # Not authenticated, so not audited.
    wrong = sdk_client(kms.port, kms.tls.ca, AK_A1, "v3", secret="wrong-secret-000000000000")
    assert_error(await kms.call(wrong, "Encrypt", {"KeyId": key_id, "Plaintext": PLAINTEXT}),
                 400, "SignatureDoesNotMatch")
    status, _, body = await kms.http("POST", "/?Action=Encrypt&Version=2016-01-20")
    assert_error(Reply(status, json.loads(body)), 400, "IncompleteSignature")
    return expected, secrets


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def capture_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    for name in ("kms_proxy", "aiohttp", "shared"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


async def test_one_event_per_authenticated_action(start_kms: StartKms,
                                                  capture_logs: pytest.LogCaptureFixture
                                                  ) -> None:
    kms = await start_kms()
    expected, secrets = await run_traffic(kms)
    await kms.stop()  # flushes the audit log
    path = kms.config.audit_log
    assert path.stat().st_mode & 0o777 == 0o600
    events = read_events(path)
    # First what KMS did on its own at start-up: each account's default master key.
    made, events = events[:PROVISIONED], events[PROVISIONED:]
    for seq, (event, account) in enumerate(zip(made, (ACCOUNT_A, ACCOUNT_B), strict=True),
                                           start=1):
        assert event["seq"] == seq and event["request_id"].startswith("kms-")
        assert (event["principal"], event["account_id"], event["action"], event["outcome"]
                ) == (f"acs:ram::{account}:service/kms", account, "CreateKey", "Success")
        assert event["key_arn"] == f"acs:kms:{REGION}:{account}:key/{event['key_id']}"
    assert [e["request_id"] for e in events] == [x.request_id for x in expected]
    for seq, (event, want) in enumerate(zip(events, expected, strict=True),
                                        start=PROVISIONED + 1):
        account, arn = principal(want.who)
        assert event["seq"] == seq
        assert (event["principal"], event["account_id"], event["action"]) == (
            arn, account, want.action), event
        assert (event["key_id"], event["outcome"], event["error_code"]) == (
            want.key_id, want.outcome, want.error_code), event
        # The ARN is recorded only for a key the core found for the call: a call refused
        # before that may name a key of another account, or none that exists.
        if want.resolved and want.key_id:
            assert event["key_arn"] == f"acs:kms:{REGION}:{account}:key/{want.key_id}"
        else:
            assert event["key_arn"] is None
        assert TIME.fullmatch(event["time"])
        assert event["source_ip"] == "127.0.0.1"
    by_action = {(e["action"], e["outcome"]): e for e in events}
    assert by_action["CreateAlias", "Success"]["details"] == {"AliasName": "alias/audited"}
    assert re.fullmatch(r"[0-9a-f-]{36}",
                        by_action["Decrypt", "Success"]["details"]["KeyVersionId"])
    assert re.fullmatch(r"[0-9a-f-]{36}",
                        by_action["CreateKeyVersion", "Success"]["details"]["KeyVersionId"])

    report = verify_chain(path, chain_key=kms.config.audit_chain_key)
    assert (report.ok, report.events, report.first_bad_seq) == (
        True, PROVISIONED + len(expected), None)
    assert report.last_hash == events[-1]["hash"]
    assert not verify_chain(path, chain_key=os.urandom(32)).ok
    assert not verify_chain(path).ok

    text = path.read_text()
    logged = capture_logs.text + "\n".join(
        f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in capture_logs.records)
    assert any(r.name.startswith("kms_proxy") for r in capture_logs.records)
    for value in forbidden_values(kms.config, secrets):
        assert value not in text, f"audit log leaks {value[:12]}..."
        assert value not in logged, f"logs leak {value[:12]}..."


def edited(lines: list[str], index: int, change: dict[str, Any]) -> list[str]:
    entry = json.loads(lines[index])
    entry.update(change)
    out = list(lines)
    out[index] = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return out


@pytest.mark.parametrize("tamper", ["outcome", "key_id", "delete", "swap", "append-garbage"])
async def test_editing_the_log_breaks_the_chain(start_kms: StartKms, tmp_path: Path,
                                                tamper: str) -> None:
    kms = await start_kms()
    await run_traffic(kms)
    await kms.stop()
    path = kms.config.audit_log
    lines = path.read_text().splitlines()
    assert verify_chain(path, chain_key=kms.config.audit_chain_key).ok
    if tamper == "outcome":
        changed, bad = edited(lines, 2, {"outcome": "Failure"}), 3
    elif tamper == "key_id":
        changed, bad = edited(lines, 4, {"key_id": "key-hzzsomeoneelse000000"}), 5
    elif tamper == "delete":
        changed, bad = lines[:3] + lines[4:], 4
    elif tamper == "swap":
        changed, bad = [lines[1], lines[0], *lines[2:]], 1
    else:
        changed, bad = [*lines, '{"seq": 999}'], len(lines) + 1
    copy = tmp_path / f"tampered-{tamper}.log"
    copy.write_text("\n".join(changed) + "\n")
    report = verify_chain(copy, chain_key=kms.config.audit_chain_key)
    assert not report.ok
    assert report.first_bad_seq == bad
    assert report.events == bad - 1


def toml_config(config: Config, path: Path, *, chain_key: bytes | None = None) -> Path:
    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    accounts = "".join(
        f'[[accounts]]\nid = "{account.id}"\n' + "".join(
            f'[[accounts.access_keys]]\nid = "{k.id}"\nsecret = "{k.secret}"\n'
            f'user = "{k.user}"\n' for k in account.access_keys)
        for account in config.accounts)
    instances = "".join(
        f'[[instances]]\nid = "{i.id}"\naccount_id = "{i.account_id}"\ntype = "software"\n'
        f'name = "{i.name}"\nspec_qps = {i.spec_qps}\ndefault = true\n'
        for i in config.instances)
    assert config.audit_chain_key is not None
    path.write_text(f"""region = "{config.region}"
regions = {json.dumps(list(config.regions))}
database = "{config.database}"
root_key = "{b64(config.root_key)}"
audit_log = "{config.audit_log}"
audit_chain_key = "{b64(chain_key or config.audit_chain_key)}"

[server]
host = "127.0.0.1"
port = 0
tls = true
cert = "{config.server.cert}"
key = "{config.server.key}"

{accounts}{instances}""")
    path.chmod(0o600)
    return path


def verify_cli(config_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_PROXY")}
    return subprocess.run([sys.executable, "-m", "kms_proxy.cli", "audit", "verify",
                           "--config", str(config_path)], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


async def test_cli_audit_verify(start_kms: StartKms, tmp_path: Path) -> None:
    kms = await start_kms()
    expected, _ = await run_traffic(kms)
    await kms.stop()
    config_path = toml_config(kms.config, tmp_path / "kms-proxy.toml")
    good = await asyncio.to_thread(verify_cli, config_path)
    assert good.returncode == 0, good.stderr
    report = json.loads(good.stdout)
    assert (report["ok"], report["events"], report["first_bad_seq"]) == (
        True, PROVISIONED + len(expected), None)

    wrong_key = toml_config(kms.config, tmp_path / "wrong-key.toml", chain_key=os.urandom(32))
    bad = await asyncio.to_thread(verify_cli, wrong_key)
    assert bad.returncode == 1 and json.loads(bad.stdout)["first_bad_seq"] == 1

    path = kms.config.audit_log
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edited(lines, 5, {"error_code": "Forged"})) + "\n")
    tampered = await asyncio.to_thread(verify_cli, config_path)
    assert tampered.returncode == 1
    assert json.loads(tampered.stdout)["first_bad_seq"] == 6


async def test_cli_audit_verify_on_a_missing_log_is_not_a_verdict(start_kms: StartKms,
                                                                  tmp_path: Path) -> None:
    """Exit 1 means a broken chain; a log that cannot be read is exit 2 and a message (it
    was a traceback and exit 1)."""
    kms = await start_kms()
    await kms.stop()
    config_path = toml_config(kms.config, tmp_path / "kms-proxy.toml")
    kms.config.audit_log.unlink()
    done = await asyncio.to_thread(verify_cli, config_path)
    assert done.returncode == 2 and "cannot read" in done.stderr and "Traceback" not in \
        done.stderr, done.stderr
