"""The whole key taxonomy of the seed, end to end, against the real dev stack
(``kms-proxy dev up``: the EKM simulator and the front as subprocesses, a SoftHSM2 token for
hardware keys), with the official SDK as the application and a bearer-token client as a
cloud service.

Walks: software, hardware, external, default master and service keys (plus a migrated
key), and the seed's refusals: default keys refuse direct application calls, external keys
refuse sign/verify, migrated keys refuse everything but reads.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from alibabacloud_kms20160120 import models as m
from alibabacloud_kms20160120.client import Client
from alibabacloud_tea_openapi import models as open_api
from darabonba.runtime import RuntimeOptions

from kms_proxy.demo import ServicePrincipal
from tests.e2e.stacktools import (
    KMS_PROXY,
    ServiceClient,
    call_action,
    default_key_id,
    refused,
    run,
    sdk_for,
)


def test_the_whole_taxonomy(stack: dict[str, Any], sdk: Client) -> None:
    instances = stack["instances"]
    oss = ServiceClient(stack, "oss")

    # Software key (software key management instance): data crypto, sign/verify, SSE.
    software = sdk.create_key(m.CreateKeyRequest()).body.key_metadata
    assert (software.dkmsinstance_id, software.protection_level) == (
        instances["software"], "SOFTWARE")
    blob = sdk.encrypt(m.EncryptRequest(key_id=software.key_id, plaintext="sw")).body
    assert sdk.decrypt(m.DecryptRequest(ciphertext_blob=blob.ciphertext_blob)
                       ).body.plaintext == "sw"
    status, body = oss.call("Encrypt", KeyId=software.key_id, Plaintext="sse")
    assert status == 200 and body["KeyId"] == software.key_id
    rsa = sdk.create_key(m.CreateKeyRequest(key_spec="RSA_2048")).body.key_metadata
    digest = base64.b64encode(hashlib.sha256(b"m").digest()).decode()
    signature = sdk.asymmetric_sign(m.AsymmetricSignRequest(
        key_id=rsa.key_id, key_version_id=rsa.primary_key_version,
        algorithm="RSA_PKCS1_SHA_256", digest=digest)).body.value
    assert sdk.asymmetric_verify(m.AsymmetricVerifyRequest(
        key_id=rsa.key_id, key_version_id=rsa.primary_key_version,
        algorithm="RSA_PKCS1_SHA_256", digest=digest, value=signature)).body.value

    # Hardware key (hardware instance, SoftHSM2 token): data crypto and sign/verify.
    hardware = sdk.create_key(m.CreateKeyRequest(
        dkmsinstance_id=instances["hardware"])).body.key_metadata
    assert hardware.protection_level == "HSM"
    blob = sdk.encrypt(m.EncryptRequest(key_id=hardware.key_id, plaintext="hw")).body
    assert sdk.decrypt(m.DecryptRequest(ciphertext_blob=blob.ciphertext_blob)
                       ).body.plaintext == "hw"
    hw_ec = sdk.create_key(m.CreateKeyRequest(dkmsinstance_id=instances["hardware"],
                                              key_spec="EC_P256")).body.key_metadata
    signature = sdk.asymmetric_sign(m.AsymmetricSignRequest(
        key_id=hw_ec.key_id, key_version_id=hw_ec.primary_key_version,
        algorithm="ECDSA_SHA_256", digest=digest)).body.value
    assert sdk.asymmetric_verify(m.AsymmetricVerifyRequest(
        key_id=hw_ec.key_id, key_version_id=hw_ec.primary_key_version,
        algorithm="ECDSA_SHA_256", digest=digest, value=signature)).body.value

    # External key (external instance, XKI to the EKM simulator over mTLS + SigV4).
    params = open_api.Params(action="CreateKey", version="2016-01-20", protocol="HTTPS",
                             pathname="/", method="POST", auth_type="AK", style="RPC",
                             req_body_type="formData", body_type="json")
    created = sdk.call_api(params, open_api.OpenApiRequest(query={
        "DKMSInstanceId": instances["external"], "ExternalKeyId": stack["ekm"]["keys"]
        ["default"]}), RuntimeOptions())["body"]["KeyMetadata"]
    external = created["KeyId"]
    blob = sdk.encrypt(m.EncryptRequest(key_id=external, plaintext="xki",
                                        encryption_context={"k": "v"})).body
    assert sdk.decrypt(m.DecryptRequest(ciphertext_blob=blob.ciphertext_blob,
                                        encryption_context={"k": "v"})).body.plaintext == "xki"
    assert oss.call("Decrypt", CiphertextBlob=blob.ciphertext_blob,
                    EncryptionContext='{"k":"v"}')[1]["Plaintext"] == "xki"
    # Refusal: external keys are symmetric only (no sign/verify).
    assert refused(lambda: sdk.create_key(m.CreateKeyRequest(
        dkmsinstance_id=instances["external"], key_spec="RSA_2048"))) == (
        400, "Rejected.UnsupportedOperation")
    assert refused(lambda: sdk.asymmetric_sign(m.AsymmetricSignRequest(
        key_id=external, key_version_id=created["PrimaryKeyVersion"],
        algorithm="RSA_PSS_SHA_256", digest=digest))) == (400, "Rejected.UnsupportedOperation")
    instance = sdk.get_kms_instance(m.GetKmsInstanceRequest(
        kms_instance_id=instances["external"])).body.kms_instance
    assert instance.status == "Connected"
    hardware = sdk.get_kms_instance(m.GetKmsInstanceRequest(
        kms_instance_id=instances["hardware"])).body.kms_instance
    assert (hardware.product_version, instance.product_version) == ("1", "3")

    # Default master key: provisioned by the system, server-side encryption only.
    default = default_key_id(sdk)
    assert refused(lambda: sdk.encrypt(m.EncryptRequest(key_id=default, plaintext="x"))) == (
        400, "Rejected.UnsupportedOperation")
    status, body = oss.call("GenerateDataKey", KeyId=default)
    assert status == 200 and len(base64.b64decode(body["Plaintext"])) == 32

    # Service key: created the first time the product's service principal uses it.
    status, body = oss.call("Encrypt", KeyId="alias/acs/oss", Plaintext="svc")
    assert status == 200
    service_key = body["KeyId"]
    again = oss.call("Encrypt", KeyId="alias/acs/oss", Plaintext="svc")[1]
    assert again["KeyId"] == service_key  # exactly one per product
    assert refused(lambda: sdk.encrypt(m.EncryptRequest(
        key_id="alias/acs/oss", plaintext="x"))) == (400, "Rejected.UnsupportedOperation")
    assert refused(lambda: sdk.update_key_description(m.UpdateKeyDescriptionRequest(
        key_id=service_key, description="mine now"))) == (400, "Rejected.UnsupportedOperation")
    # A cloud service uses keys for server-side encryption; it does not manage them.
    for action, params in (("ScheduleKeyDeletion", {"PendingWindowInDays": "7"}),
                           ("CreateKeyVersion", {}), ("DisableKey", {})):
        status, body = oss.call(action, KeyId=software.key_id, **params)
        assert (status, body["Code"]) == (403, "Forbidden.NoPermission"), action
    assert sdk.describe_key(m.DescribeKeyRequest(key_id=software.key_id)).body \
        .key_metadata.key_state == "Enabled"
    # Another product cannot reach oss's service key.
    status, body = ServiceClient(stack, "rds").call("Encrypt", KeyId="alias/acs/oss",
                                                    Plaintext="x")
    assert (status, body["Code"]) == (403, "Forbidden.NoPermission")

    # Migrated KMS 1.0 key: read-only metadata.
    migrated = json.loads(run("keys", "import-migrated", "--config", stack["config"],
                              "--account", stack["account_id"],
                              "--key-id", "0badc0de-12ab-34cd-56ef-1234567890ab"))["KeyId"]
    # The running front reads the store on a cache miss, so it sees the imported key.
    assert sdk.describe_key(m.DescribeKeyRequest(key_id=migrated)).body.key_metadata.key_id \
        == migrated
    assert refused(lambda: sdk.disable_key(m.DisableKeyRequest(key_id=migrated))) == (
        400, "Rejected.UnsupportedOperation")
    assert refused(lambda: sdk.encrypt(m.EncryptRequest(key_id=migrated, plaintext="x"))) == (
        400, "Rejected.UnsupportedOperation")
    status, body = oss.call("Encrypt", KeyId=migrated, Plaintext="x")
    assert (status, body["Code"]) == (400, "Rejected.UnsupportedOperation")


def test_hardware_key_material_is_not_in_the_database(stack: dict[str, Any],
                                                      sdk: Client) -> None:
    """Nothing the database holds for an HsmInternal key is key material: only a reference
    to the token object (the token test proves the object is sensitive)."""
    key = sdk.create_key(m.CreateKeyRequest(
        dkmsinstance_id=stack["instances"]["hardware"])).body.key_metadata
    import sqlite3

    database = Path(stack["workdir"]) / "data" / "kms.db"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        [(material,)] = db.execute("SELECT material FROM key_versions WHERE key_id = ?",
                                   (key.key_id,)).fetchall()
    assert len(material) < 64 and key.primary_key_version.encode() in material


def test_stack_json_lists_a_demo_key_of_every_kind(stack: dict[str, Any], sdk: Client) -> None:
    assert set(stack["keys"]) == {"software", "hardware", "external", "default", "service",
                                  "migrated"}
    assert set(stack["instances"]) == {"software", "hardware", "external"}
    for kind, key_id in stack["keys"].items():
        described = sdk.describe_key(m.DescribeKeyRequest(key_id=key_id)).body.key_metadata
        assert described.key_id == key_id, kind
    assert sdk.describe_key(m.DescribeKeyRequest(
        key_id="alias/demo/hardware")).body.key_metadata.protection_level == "HSM"


def test_ekm_side_rotation_keeps_old_ciphertexts_decryptable(stack: dict[str, Any],
                                                            sdk: Client) -> None:
    external = stack["keys"]["external"]
    before = sdk.encrypt(m.EncryptRequest(key_id=external, plaintext="before")).body
    subprocess.run([sys.executable, "-m", "ekm_sim.cli", "keys", "rotate",
                    stack["ekm"]["keys"]["default"], "--config", stack["ekm"]["config"]],
                   check=True, capture_output=True, timeout=60)
    import time

    time.sleep(0.7)  # the simulator re-reads its key registry within 0.5 s
    after = sdk.encrypt(m.EncryptRequest(key_id=external, plaintext="after")).body
    for blob, text in ((before, "before"), (after, "after")):
        assert sdk.decrypt(m.DecryptRequest(ciphertext_blob=blob.ciphertext_blob)
                           ).body.plaintext == text


def test_ekm_outage_gives_a_typed_error_within_the_budget_and_recovers(
        stack: dict[str, Any], sdk: Client) -> None:
    """The EKM stopped mid-run: 503 ServiceUnavailableTemporary well within the XKS budget
    (250 ms per call, the front's answer adds its own work), then recovery once it is back
    on the same address."""
    import time

    external, ekm_dir = stack["keys"]["external"], str(Path(stack["ekm"]["config"]).parent)
    ekm = [sys.executable, "-m", "ekm_sim.cli", "dev"]

    def instance_status() -> str:
        return str(sdk.get_kms_instance(m.GetKmsInstanceRequest(
            kms_instance_id=stack["instances"]["external"])).body.kms_instance.status)

    sealed = sdk.encrypt(m.EncryptRequest(key_id=external, plaintext="before")).body
    assert instance_status() == "Connected"
    subprocess.run([*ekm, "down", "--workdir", ekm_dir], check=True, timeout=60)
    try:
        started = time.monotonic()
        assert refused(lambda: sdk.encrypt(m.EncryptRequest(
            key_id=external, plaintext="x"))) == (503, "ServiceUnavailableTemporary")
        assert time.monotonic() - started < 1.0
        # The failed call told the instance at once (the probe runs every 30 s).
        assert instance_status() == "Disconnected"
    finally:
        subprocess.run([*ekm, "up", "--workdir", ekm_dir], check=True, timeout=120,
                       capture_output=True)
    assert sdk.decrypt(m.DecryptRequest(ciphertext_blob=sealed.ciphertext_blob)
                       ).body.plaintext == "before"
    assert instance_status() == "Connected"


def _external_key(client: Client, instance_id: str, external_key_id: str) -> dict[str, Any]:
    metadata: dict[str, Any] = call_action(client, "CreateKey", DKMSInstanceId=instance_id,
                                           ExternalKeyId=external_key_id)["KeyMetadata"]
    return metadata


def test_external_keys_on_one_ekm_key_cannot_read_each_others_blobs(
        stack: dict[str, Any], sdk: Client) -> None:
    """Every account's external instance reaches the same EKM key here, so without the key
    version id in the XKS AAD a blob's head could be swapped for another key's: past a
    disabled key, and across accounts."""
    ekm_key = stack["ekm"]["keys"]["default"]
    first, second = (account["id"] for account in stack["accounts"][:2])
    other_sdk = sdk_for(stack, second)
    mine = _external_key(sdk, stack["instances_by_account"][first]["external"], ekm_key)
    also_mine = _external_key(sdk, stack["instances_by_account"][first]["external"], ekm_key)
    theirs = _external_key(other_sdk, stack["instances_by_account"][second]["external"],
                           ekm_key)
    blob = base64.b64decode(sdk.encrypt(m.EncryptRequest(
        key_id=mine["KeyId"], plaintext="only mine")).body.ciphertext_blob)
    sdk.disable_key(m.DisableKeyRequest(key_id=mine["KeyId"]))

    def swapped(key: dict[str, Any]) -> str:
        return base64.b64encode(key["PrimaryKeyVersion"].encode() + blob[36:]).decode()

    assert refused(lambda: sdk.decrypt(m.DecryptRequest(
        ciphertext_blob=swapped(also_mine)))) == (400, "InvalidParameter")
    assert refused(lambda: other_sdk.decrypt(m.DecryptRequest(
        ciphertext_blob=swapped(theirs)))) == (400, "InvalidParameter")
    assert refused(lambda: sdk.decrypt(m.DecryptRequest(
        ciphertext_blob=base64.b64encode(blob).decode()))) == (409, "Rejected.Disabled")


def test_an_oversized_request_line_is_refused_without_echoing_it(
        stack: dict[str, Any], sdk: Client) -> None:
    """The SDK puts Plaintext in the query: past the front's 64 KiB request line, aiohttp's
    parser refuses the request. The answer is the Alibaba error the SDK reads, and neither
    it nor the front's log quotes the plaintext."""
    marker = "E2E-SECRET-5d1c"
    with pytest.raises(Exception) as caught:
        sdk.encrypt(m.EncryptRequest(key_id=stack["keys"]["software"],
                                     plaintext=marker + "中" * 8000))
    error: Any = caught.value
    assert (error.status_code, error.code) == (400, "InvalidParameter")
    assert marker not in str(error)
    assert marker not in Path(stack["log"]).read_text(errors="replace")


def _b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def test_bearer_tokens_refused_over_http(stack: dict[str, Any]) -> None:
    """Service tokens the front must refuse, sent as a cloud product sends them."""
    # Signed by the trusted dev issuer, for an account this front does not host: no
    # service key may be made for it.
    phantom = run("dev", "token", "--workdir", str(stack["workdir"]), "--product", "oss",
                  "--account", "111111222222").strip()
    status, body = ServicePrincipal(stack, "oss", token=phantom).call(
        "Encrypt", KeyId="alias/acs/oss", Plaintext="x")
    assert (status, body["Code"]) == (403, "Forbidden.KmsServiceNotEnabled")
    # Headers an attacker controls: no algorithm at all, and algorithms that are not
    # strings (a list or an object once made the check itself fail).
    good = run("dev", "token", "--workdir", str(stack["workdir"]), "--product", "oss",
               "--account", stack["account_id"]).strip()
    claims = good.split(".")[1]
    for header in ({"alg": "none", "typ": "JWT"}, {"alg": ["ES256"]}, {"alg": {"a": 1}},
                   {"alg": "HS256"}):
        forged = f"{_b64url(header)}.{claims}.AAAA"
        status, body = ServicePrincipal(stack, "oss", token=forged).call(
            "Encrypt", KeyId="alias/acs/oss", Plaintext="x")
        assert (status, body["Code"]) == (400, "InvalidSecurityToken.Malformed"), header
    status, body = ServicePrincipal(stack, "oss", token=good).call(
        "Encrypt", KeyId="alias/acs/oss", Plaintext="x")
    assert status == 200, body
    # The scheme is case-insensitive; a second Authorization header is refused, not
    # ignored (the first one used to win).
    assert _raw_encrypt(stack, [f"bearer {good}"])[0] == 200
    status, body = _raw_encrypt(stack, [f"Bearer {good}", "ACS3-HMAC-SHA256 x"])
    assert (status, body["Code"]) == (400, "IncompleteSignature"), body
    # A bearer request's action comes from an unsigned header: one that is not UTF-8 is an
    # unknown action (it was a 500, and the request went unaudited).
    status, body = _raw_encrypt(stack, [f"Bearer {good}"],
                                {"x-acs-action": b"Describe\xffKey"})
    assert (status, body["Code"]) == (404, "InvalidAction.NotFound"), body
    audit_log = Path(stack["config"]).parent / "data" / "audit.log"
    deadline = time.monotonic() + 10  # The audit log is flushed in batches.
    while body["RequestId"] not in audit_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    [line] = [json.loads(x) for x in audit_log.read_text().splitlines()
              if body["RequestId"] in x]
    assert (line["action"], line["error_code"]) == ("(invalid)", "InvalidAction.NotFound")
    # The CLI refuses to mint what the front would refuse, with a message, not a traceback.
    for args in (["--product", "kms", "--account", stack["account_id"]],
                 ["--product", "oss", "--account", stack["account_id"], "--ttl", "-100"],
                 ["--product", "OSS/../x", "--account", stack["account_id"]]):
        done = subprocess.run([*KMS_PROXY, "dev", "token", "--workdir",
                               str(stack["workdir"]), *args],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2 and done.stderr.startswith("kms-proxy: "), done.stderr
        assert "Traceback" not in done.stderr and not done.stdout


def _raw_encrypt(stack: dict[str, Any], authorization: list[str],
                 extra: dict[str, bytes] | None = None) -> tuple[int, dict[str, Any]]:
    """An Encrypt with exactly these Authorization header lines (and ``extra`` headers,
    sent as the bytes given)."""
    host, port = stack["kms"]["endpoint"].rsplit(":", 1)
    connection = http.client.HTTPSConnection(
        host, int(port), context=ssl.create_default_context(cafile=stack["kms"]["ca"]),
        timeout=10)
    try:
        connection.putrequest("POST", "/?Action=Encrypt&Version=2016-01-20&KeyId=alias%2Facs"
                                      "%2Foss&Plaintext=x")
        for value in authorization:
            connection.putheader("Authorization", value)
        for name, raw in (extra or {}).items():
            connection.putheader(name, raw)
        connection.putheader("Content-Length", "0")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_the_front_tells_the_ekm_who_calls_and_why(stack: dict[str, Any],
                                                   sdk: Client) -> None:
    """requestMetadata as the EKM received it (its request log): the front's RequestId,
    the operation, and the calling principal's ARN, for a user and for a cloud service."""
    import time

    external = stack["keys"]["external"]
    user_call = sdk.encrypt(m.EncryptRequest(key_id=external, plaintext="who"))
    service_status, service_body = ServiceClient(stack, "oss").call(
        "Decrypt", CiphertextBlob=user_call.body.ciphertext_blob)
    assert service_status == 200
    expected = {
        user_call.body.request_id: ("Encrypt", f"acs:ram::{stack['account_id']}:user/"),
        service_body["RequestId"]: ("Decrypt", "oss"),
    }
    log = Path(stack["ekm"]["config"]).parent / "requests.log"
    deadline = time.monotonic() + 5
    while True:
        seen = {r.get("kmsRequestId"): r for r in map(json.loads,
                                                       log.read_text().splitlines())}
        if all(request_id in seen for request_id in expected) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for request_id, (operation, principal) in expected.items():
        record = seen[request_id]
        assert (record["kmsOperation"], record["keyId"], record["status"]) == (
            operation, stack["ekm"]["keys"]["default"], 200)
        assert principal in record["principal"], record


def test_served_processes_refuse_an_encoded_body(stack: dict[str, Any]) -> None:
    """As served (shared.serving, not a test server): neither process decodes a body."""
    ekm = stack["ekm"]
    ekm_context = ssl.create_default_context(cafile=ekm["ca"])
    ekm_context.load_cert_chain(ekm["client_cert"], ekm["client_key"])
    targets = [
        (stack["kms"]["endpoint"], ssl.create_default_context(cafile=stack["kms"]["ca"]),
         "/?Action=DescribeRegions&Version=2016-01-20", "Code", "InvalidParameter"),
        (ekm["url"].removeprefix("https://"), ekm_context,
         f"/{ekm['uri_prefix']}/kms/xks/v1/health", "errorName", "ValidationException")]
    for endpoint, context, path, field, code in targets:
        host, port = endpoint.rsplit(":", 1)
        for encoding in ("gzip", "deflate", "br"):
            connection = http.client.HTTPSConnection(host, int(port), context=context,
                                                     timeout=10)
            try:
                connection.request("POST", path, body=b"\x1f\x8b\x08\x00 junk", headers={
                    "Content-Type": "application/json", "Content-Encoding": encoding})
                response = connection.getresponse()
                answer = json.loads(response.read())
            finally:
                connection.close()
            assert (response.status, answer[field]) == (400, code), (endpoint, answer)
