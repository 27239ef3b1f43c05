"""Hardware keys seen by the other callers of the same front: one tenant's failed RSA check
must not reach anyone else's request.

Real parts: the front on TLS with a SoftHSM2 token, the official SDK as every client.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import pytest
from alibabacloud_kms20160120 import models as m

from kms_proxy.config import HSMTokenConfig, InstanceConfig
from kms_proxy.core.model import InstanceType
from tests.conftest import HSMConfig
from tests.integration.kms.conftest import (
    ACCOUNT_A,
    ACCOUNT_B,
    INSTANCE_A,
    INSTANCE_B,
    Kms,
    StartKms,
)

HARDWARE = "kst-hzzhardware00001"


async def hardware_front(start_kms: StartKms, hsm_config: HSMConfig, mode: str) -> Kms:
    kms: Kms = await start_kms(
        hsm=HSMTokenConfig(module=hsm_config.module, token_label=hsm_config.token_label,
                           user_pin=hsm_config.user_pin, softhsm_conf=hsm_config.softhsm_conf,
                           mode=mode, workers=2),
        instances=(
            InstanceConfig(INSTANCE_A, ACCOUNT_A, InstanceType.SOFTWARE, "software-a", 100000),
            InstanceConfig(INSTANCE_B, ACCOUNT_B, InstanceType.SOFTWARE, "software-b", 100000),
            InstanceConfig(HARDWARE, ACCOUNT_A, InstanceType.HARDWARE, "hsm-a", 100000)))
    return kms


async def created(kms: Kms, **query: str) -> tuple[str, str]:
    """A hardware key's id and its first version id."""
    reply = await kms.call(kms.client(), "CreateKey", {"DKMSInstanceId": HARDWARE, **query})
    assert reply.status == 200, reply
    key_id = reply.body["KeyMetadata"]["KeyId"]
    versions = await kms.sdk(kms.client(), "list_key_versions",
                             m.ListKeyVersionsRequest(key_id=key_id))
    return key_id, versions.key_versions.key_version[0].key_version_id


@pytest.mark.parametrize("mode", ["inline", "threads"])
async def test_a_failed_rsa_check_does_not_drop_another_clients_connection(
        start_kms: StartKms, hsm_config: HSMConfig, mode: str) -> None:
    """SoftHSM left a failed RSA verify or OAEP decrypt on OpenSSL's error queue of the
    event loop's thread, and the next TLS read there (another client's, on its kept-alive
    connection) failed: the front closed it without an answer."""
    kms = await hardware_front(start_kms, hsm_config, mode)
    attacker, victim = kms.client("a1"), kms.client("a2")
    software = (await kms.call(attacker, "CreateKey", {})).body["KeyMetadata"]["KeyId"]

    async def victim_encrypts() -> Any:
        try:
            return (await kms.call(victim, "Encrypt", {"KeyId": software,
                                                        "Plaintext": "bystander"})).status
        except Exception as exc:  # What the victim's SDK saw, as a value.
            return f"{type(exc).__name__}: {str(exc)[:80]}"

    assert await victim_encrypts() == 200  # Its connection is now kept alive.
    signing, signing_version = await created(kms, KeySpec="RSA_2048", KeyUsage="SIGN/VERIFY")
    sealing, sealing_version = await created(kms, KeySpec="RSA_2048",
                                             KeyUsage="ENCRYPT/DECRYPT")
    digest = base64.b64encode(hashlib.sha256(b"message").digest()).decode()
    attempts = [
        ("AsymmetricVerify", {"KeyId": signing, "KeyVersionId": signing_version,
                              "Algorithm": algorithm, "Digest": digest,
                              "Value": base64.b64encode(os.urandom(256)).decode()})
        for algorithm in ("RSA_PSS_SHA_256", "RSA_PKCS1_SHA_256")] + [
        ("AsymmetricDecrypt", {"KeyId": sealing, "KeyVersionId": sealing_version,
                               "Algorithm": "RSAES_OAEP_SHA_256",
                               "CiphertextBlob": base64.b64encode(os.urandom(256)).decode()})]
    for action, query in attempts:
        for _ in range(2):
            reply = await kms.call(attacker, action, query)
            assert reply.status in (200, 400), reply
            assert reply.body.get("Value") is not True
            assert await victim_encrypts() == 200, action
