"""The XKS API end to end: real SoftHSM token, real TLS with client certificates, requests
signed by botocore's SigV4 signer."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace

import pytest

from ekm_sim.admin import KeyAdmin, KeyUsage
from ekm_sim.app import KEYSTORE, reload_credentials
from ekm_sim.config import Config, HealthConfig, LimitsConfig
from ekm_sim.keystore import KeyStore
from ekm_sim.registry import KeyRegistry
from shared import serving
from shared.pkcs11pool import DispatchMode, PKCS11Pool
from shared.sigv4 import Credential
from shared.tls import client_context
from tests.conftest import (
    CRED_A,
    CRED_B,
    PREFIX,
    Sim,
    StartSim,
    TLSFiles,
    leave_mid_body,
    metadata,
    stall_mid_body,
    store,
)

b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
unb64 = base64.b64decode


async def test_health_reports_a_deep_check(sim: Sim) -> None:
    status, body = await sim.call("health", {"requestMetadata": {
        "kmsOperation": "KmsHealthCheck", "kmsRequestId": "r-1"}})
    assert status == 200
    assert body["xksProxyFleetSize"] == 1
    assert body["xksProxyVendor"] and body["xksProxyModel"].startswith("ekm-sim")
    assert body["ekmVendor"] == "SoftHSM project"
    [entry] = body["ekmFleetDetails"]
    assert entry["healthStatus"] == "ACTIVE"
    assert set(entry) == {"id", "model", "healthStatus"}


@pytest.mark.parametrize("body", [{}, {"requestMetadata": {}},
                                  {"requestMetadata": {"kmsOperation": "KmsHealthCheck"}}])
async def test_health_validates_its_body(sim: Sim, body: dict[str, object]) -> None:
    status, error = await sim.call("health", body)
    assert (status, error["errorName"]) == (400, "ValidationException")
    assert error["errorMessage"]


async def test_health_fails_unavailable_without_test_key(start_sim: StartSim,
                                                          make_config: Callable[..., Config]
                                                          ) -> None:
    config = make_config(health=HealthConfig(test_key="missing-probe-key", cache_seconds=0))
    sim = await start_sim(config, provision_keys=False)
    status, body = await sim.call("health", {"requestMetadata": {
        "kmsOperation": "KmsHealthCheck", "kmsRequestId": "r-1"}})
    assert status == 200
    assert body["ekmFleetDetails"][0]["healthStatus"] == "UNAVAILABLE"


async def test_health_result_is_cached(start_sim: StartSim,
                                       make_config: Callable[..., Config]) -> None:
    sim = await start_sim(make_config(health=HealthConfig(cache_seconds=30)))
    keystore = sim.app[KEYSTORE]
    first = await keystore.health()
    second = await keystore.health()
    assert second is first
    body = {"requestMetadata": {"kmsOperation": "KmsHealthCheck", "kmsRequestId": "r"}}
    assert (await sim.call("health", body))[0] == 200
    assert await keystore.health() is first


async def test_get_key_metadata_reports_usage_and_state(sim: Sim) -> None:
    expected = {"foo": ["ENCRYPT", "DECRYPT"], "encrypt_only_key": ["ENCRYPT"],
                "decrypt_only_key": ["DECRYPT"], "impotent_key": []}
    for key_id, usage in expected.items():
        status, body = await sim.call(f"keys/{key_id}/metadata",
                                      {"requestMetadata": metadata("CreateKey")})
        assert status == 200
        assert body == {"keySpec": "AES_256", "keyUsage": usage, "keyStatus": "ENABLED"}


async def test_unknown_kms_operation_and_metadata_fields_are_accepted(sim: Sim) -> None:
    meta = metadata("BulkEncryptFromTheFuture", kmsViaService="ebs", awsSourceVpc="vpc-1",
                    someFieldAddedLater={"nested": True})
    status, body = await sim.call("keys/foo/encrypt", {
        "requestMetadata": meta, "plaintext": b64(b"x"), "encryptionAlgorithm": "AES_GCM"})
    assert status == 200 and "ciphertext" in body


@pytest.mark.parametrize("aad", [None, b"project=nile,department=marketing"])
async def test_encrypt_decrypt_round_trip(sim: Sim, aad: bytes | None) -> None:
    status, sealed = await sim.encrypt("foo", b"plaintext\n", aad)
    assert status == 200
    assert len(unb64(sealed["ciphertext"])) == len(b"plaintext\n")
    assert len(unb64(sealed["initializationVector"])) == 12
    assert len(unb64(sealed["authenticationTag"])) == 16
    assert 0 < len(unb64(sealed["ciphertextMetadata"])) <= 20
    assert "ciphertextDataIntegrityValue" not in sealed
    assert await sim.decrypt("foo", sealed, aad) == (200, {"plaintext": b64(b"plaintext\n")})


async def test_ivs_are_unique(sim: Sim) -> None:
    ivs = {(await sim.encrypt("foo", b"same"))[1]["initializationVector"] for _ in range(50)}
    assert len(ivs) == 50


@pytest.mark.parametrize("aad", [None, b"project=nile,department=marketing"])
async def test_cdiv_matches_appendix_c_and_verifies(sim: Sim, aad: bytes | None) -> None:
    status, sealed = await sim.encrypt("foo", b"Hello World!", aad, cdiv=True)
    assert status == 200
    digest = hashlib.sha256(
        (aad or b"") + unb64(sealed["ciphertextMetadata"]) + unb64(sealed["initializationVector"])
        + unb64(sealed["ciphertext"]) + unb64(sealed["authenticationTag"])).digest()
    assert unb64(sealed["ciphertextDataIntegrityValue"]) == digest
    assert (await sim.decrypt("foo", sealed, aad))[0] == 200


async def test_large_plaintext_and_aad(sim: Sim) -> None:
    plaintext, aad = os.urandom(4096), os.urandom(8192)
    status, sealed = await sim.encrypt("foo", plaintext, aad, cdiv=True)
    assert status == 200
    assert await sim.decrypt("foo", sealed, aad) == (200, {"plaintext": b64(plaintext)})
    # The spec's minimums: 4300 B of plaintext must work too.
    plaintext = os.urandom(4300)
    status, sealed = await sim.encrypt("foo", plaintext, aad)
    assert status == 200
    assert (await sim.decrypt("foo", sealed, aad))[1]["plaintext"] == b64(plaintext)


def _flip(value: str, index: int = 0) -> str:
    raw = bytearray(unb64(value))
    raw[index] ^= 0x01
    return b64(bytes(raw))


@pytest.mark.parametrize("tamper", [
    "no_aad", "other_aad", "ciphertext", "tag", "iv", "ctm_version", "ctm_format", "no_ctm",
    "short_tag", "long_iv", "aad_moved_into_ctm"])
async def test_tampering_is_invalid_ciphertext(sim: Sim, tamper: str) -> None:
    aad = b"project=nile,department=marketing"
    _, sealed = await sim.encrypt("foo", b"secret data", aad)
    use_aad: bytes | None = aad
    if tamper == "no_aad":
        use_aad = None
    elif tamper == "other_aad":
        use_aad = b"project=blue,department=finance"
    elif tamper == "ciphertext":
        sealed["ciphertext"] = _flip(sealed["ciphertext"])
    elif tamper == "tag":
        sealed["authenticationTag"] = _flip(sealed["authenticationTag"], 15)
    elif tamper == "iv":
        sealed["initializationVector"] = _flip(sealed["initializationVector"])
    elif tamper == "ctm_version":
        sealed["ciphertextMetadata"] = _flip(sealed["ciphertextMetadata"], 4)
    elif tamper == "ctm_format":
        sealed["ciphertextMetadata"] = _flip(sealed["ciphertextMetadata"], 0)
    elif tamper == "no_ctm":
        del sealed["ciphertextMetadata"]
    elif tamper == "short_tag":
        sealed["authenticationTag"] = b64(unb64(sealed["authenticationTag"])[:12])
    elif tamper == "long_iv":
        sealed["initializationVector"] = b64(unb64(sealed["initializationVector"]) + b"\0" * 4)
    elif tamper == "aad_moved_into_ctm":
        # Move the AAD's last byte to the front of the ctm: the length prefixes catch it.
        use_aad = aad[:-1]
        sealed["ciphertextMetadata"] = b64(aad[-1:] + unb64(sealed["ciphertextMetadata"]))
    status, body = await sim.decrypt("foo", sealed, use_aad)
    assert (status, body["errorName"]) == (400, "InvalidCiphertextException")
    assert "secret data" not in json.dumps(body)


async def test_ciphertext_is_bound_to_its_key(sim: Sim, start_sim: StartSim,
                                              make_config: Callable[..., Config]) -> None:
    async with PKCS11Pool(sim.config.hsm.pool()) as pool:
        await KeyAdmin(pool, KeyRegistry(sim.config.registry)).create(
            "bar", KeyUsage())
    _, sealed = await sim.encrypt("foo", b"data")
    status, body = await sim.decrypt("bar", sealed)
    assert (status, body["errorName"]) == (400, "InvalidCiphertextException")


@pytest.mark.parametrize(("key_id", "cdiv", "aad"), [
    ("decrypt_only_key", False, None), ("decrypt_only_key", False, b"a"),
    ("decrypt_only_key", True, None), ("decrypt_only_key", True, b"a"),
    ("impotent_key", False, None), ("impotent_key", False, b"a"),
    ("impotent_key", True, None), ("impotent_key", True, b"a"),
    # The CDIV verification decrypt needs decrypt permission (Appendix C).
    ("encrypt_only_key", True, None), ("encrypt_only_key", True, b"a"),
])
async def test_encrypt_refused_by_key_usage(sim: Sim, key_id: str, cdiv: bool,
                                            aad: bytes | None) -> None:
    status, body = await sim.encrypt(key_id, b"data", aad, cdiv=cdiv)
    assert (status, body["errorName"]) == (400, "InvalidKeyUsageException")


@pytest.mark.parametrize("aad", [None, b"project=nile"])
async def test_encrypt_only_key_cannot_decrypt(sim: Sim, aad: bytes | None) -> None:
    status, sealed = await sim.encrypt("encrypt_only_key", b"data", aad)
    assert status == 200
    status, body = await sim.decrypt("encrypt_only_key", sealed, aad)
    assert (status, body["errorName"]) == (400, "InvalidKeyUsageException")


async def test_rotation_keeps_old_ciphertexts(sim: Sim) -> None:
    _, old = await sim.encrypt("foo", b"before rotation")
    async with PKCS11Pool(sim.config.hsm.pool()) as pool:
        record = await KeyAdmin(pool, KeyRegistry(sim.config.registry)).rotate("foo")
    assert record.versions == (1, 2)
    await asyncio.sleep(0.6)  # the server re-reads the registry at most every 0.5 s
    _, new = await sim.encrypt("foo", b"after rotation")
    assert new["ciphertextMetadata"] != old["ciphertextMetadata"]
    assert (await sim.decrypt("foo", old))[1] == {"plaintext": b64(b"before rotation")}
    assert (await sim.decrypt("foo", new))[1] == {"plaintext": b64(b"after rotation")}
    # A new version keeps the usage of the old one.
    _, meta = await sim.call("keys/foo/metadata", {"requestMetadata": metadata("DescribeKey")})
    assert meta["keyUsage"] == ["ENCRYPT", "DECRYPT"]


async def test_a_version_made_by_another_worker_decrypts_at_once(sim: Sim) -> None:
    """With several workers, one may make a ciphertext with a version another has not
    read yet (each re-reads the registry every 0.5 s): the other looks at the registry
    again before calling it invalid."""
    assert (await sim.encrypt("foo", b"warm"))[0] == 200  # the server has read the registry
    async with PKCS11Pool(sim.config.hsm.pool()) as pool:
        registry = KeyRegistry(sim.config.registry)
        assert (await KeyAdmin(pool, registry).rotate("foo")).versions == (1, 2)
        other_worker = KeyStore(pool=pool, registry=registry, limits=sim.config.limits,
                                health=sim.config.health, iv_from_hsm=False)
        sealed = await other_worker.encrypt(sim.config.stores[0], "foo", b"made elsewhere",
                                            None, want_cdiv=False, principal=None)
    status, body = await sim.decrypt("foo", {
        "ciphertext": b64(sealed.ciphertext), "initializationVector": b64(sealed.iv),
        "authenticationTag": b64(sealed.tag),
        "ciphertextMetadata": b64(sealed.ciphertext_metadata)})
    assert (status, body) == (200, {"plaintext": b64(b"made elsewhere")})


async def test_concurrent_rotations_in_one_process_each_add_a_version(sim: Sim) -> None:
    """One lock for a whole change, also between tasks of one process (each with its own
    registry object): three rotations give three new versions, not one twice."""
    # Token calls in worker threads, so each rotation really waits in the middle.
    threads = replace(sim.config.hsm, mode=DispatchMode.THREADS)
    async with PKCS11Pool(threads.pool()) as pool:
        records = await asyncio.gather(*(
            KeyAdmin(pool, KeyRegistry(sim.config.registry)).rotate("foo") for _ in range(3)))
        assert sorted(r.current_version for r in records) == [2, 3, 4]
        assert KeyRegistry(sim.config.registry).reload()["foo"].versions == (1, 2, 3, 4)


async def test_disabled_key(sim: Sim) -> None:
    _, sealed = await sim.encrypt("foo", b"data")
    KeyRegistry(sim.config.registry).set_enabled("foo", False)
    await asyncio.sleep(0.6)
    status, body = await sim.encrypt("foo", b"data")
    assert (status, body["errorName"]) == (400, "InvalidStateException")
    status, body = await sim.decrypt("foo", sealed)
    assert (status, body["errorName"]) == (400, "InvalidStateException")
    _, meta = await sim.call("keys/foo/metadata", {"requestMetadata": metadata("DescribeKey")})
    assert meta["keyStatus"] == "DISABLED"
    KeyRegistry(sim.config.registry).set_enabled("foo", True)
    await asyncio.sleep(0.6)
    assert (await sim.decrypt("foo", sealed))[0] == 200


@pytest.mark.parametrize("api", ["keys/non_existing_key/metadata", "keys/non_existing_key/encrypt",
                                 "keys/non_existing_key/decrypt"])
async def test_unknown_key(sim: Sim, api: str) -> None:
    body = {"requestMetadata": metadata(), "plaintext": b64(b"x"), "ciphertext": b64(b"x"),
            "initializationVector": b64(b"\0" * 12), "authenticationTag": b64(b"\0" * 16),
            "encryptionAlgorithm": "AES_GCM"}
    status, resp = await sim.call(api, body)
    assert (status, resp["errorName"]) == (404, "KeyNotFoundException")


async def test_health_test_key_is_not_a_customer_key(start_sim: StartSim,
                                                      make_config: Callable[..., Config]) -> None:
    sim = await start_sim(make_config(stores=(store(keys=("*",)),)))
    status, body = await sim.encrypt(sim.config.health.test_key, b"x")
    assert (status, body["errorName"]) == (404, "KeyNotFoundException")


async def test_allow_list_hides_other_keys(start_sim: StartSim,
                                           make_config: Callable[..., Config]) -> None:
    sim = await start_sim(make_config(stores=(store(keys=("encrypt_only_key",)),)))
    status, body = await sim.encrypt("foo", b"x")
    assert (status, body["errorName"]) == (404, "KeyNotFoundException")
    assert (await sim.encrypt("encrypt_only_key", b"x"))[0] == 200


async def test_two_stores_have_separate_credentials(start_sim: StartSim,
                                                    make_config: Callable[..., Config]) -> None:
    other = Credential("OTHERSTOREOTHERSTORE2345",
                       "b3RoZXItc3RvcmUtc2VjcmV0LWZvci10ZXN0cy0wMDAwMA==")
    sim = await start_sim(make_config(stores=(
        store(credentials=(CRED_A,)),
        store(uri_prefix="tenant/two", credentials=(other,), keys=("foo",)),
    )))
    assert (await sim.encrypt("foo", b"x", prefix="tenant/two", cred=other))[0] == 200
    status, body = await sim.encrypt("foo", b"x", prefix="tenant/two", cred=CRED_A)
    assert (status, body["errorName"]) == (401, "AuthenticationFailedException")
    status, body = await sim.encrypt("encrypt_only_key", b"x", prefix="tenant/two", cred=other)
    assert (status, body["errorName"]) == (404, "KeyNotFoundException")


async def test_both_credentials_of_a_store_work(sim: Sim) -> None:
    for cred in (CRED_A, CRED_B):
        assert (await sim.encrypt("foo", b"x", cred=cred))[0] == 200


async def test_credentials_rotate_without_restart(sim: Sim,
                                                   make_config: Callable[..., Config]) -> None:
    new = Credential("ROTATEDROTATEDROTATED234",
                     "cm90YXRlZC1zZWNyZXQtZm9yLXRlc3RzLTAwMDAwMDAwMA==")
    assert (await sim.encrypt("foo", b"x", cred=new))[0] == 401
    warnings = reload_credentials(sim.app, make_config(stores=(store(credentials=(CRED_A, new)),
                                                               store(uri_prefix="extra"))))
    assert warnings == ["new store 'extra' needs a restart"]
    assert (await sim.encrypt("foo", b"x", cred=new))[0] == 200
    assert (await sim.encrypt("foo", b"x", cred=CRED_A))[0] == 200
    status, body = await sim.encrypt("foo", b"x", cred=CRED_B)
    assert (status, body["errorName"]) == (401, "AuthenticationFailedException")


async def test_a_reload_names_every_change_it_does_not_apply(
        sim: Sim, make_config: Callable[..., Config]) -> None:
    """Only credentials are reloaded: a changed allow-list, principals, quota or limit is
    named in a warning rather than silently kept as it was."""
    changed = make_config(
        stores=(store(keys=("foo",), allowed_principals=("arn:aws:iam::1:user/x",),
                      quota_rps=5),),
        limits=LimitsConfig(max_plaintext_bytes=1000))
    warnings = reload_credentials(sim.app, changed)
    assert len(warnings) == 2, warnings
    assert all(name in warnings[0] for name in ("keys", "allowed_principals", "quota_rps"))
    assert "credentials" not in warnings[0].split(":")[1].split("changed")[0]
    assert warnings[1] == "limits changed; restart to apply"
    # Nothing but the credentials took effect: decrypt_only_key is still served.
    status, body = await sim.call("keys/decrypt_only_key/metadata",
                                  {"requestMetadata": metadata("DescribeKey")})
    assert status == 200, body


@pytest.mark.parametrize("cred", [
    Credential("Invalid" + CRED_A.access_key_id, CRED_A.secret_access_key),
    Credential(CRED_A.access_key_id, "Invalid" + CRED_A.secret_access_key),
])
async def test_bad_credentials(sim: Sim, cred: Credential) -> None:
    for api in ("health", "keys/foo/metadata", "keys/foo/encrypt"):
        status, body = await sim.call(api, {"requestMetadata": metadata()}, cred=cred)
        assert (status, body["errorName"]) == (401, "AuthenticationFailedException")


async def test_unsigned_and_wrong_region_requests(sim: Sim) -> None:
    status, body = await sim.call("health", {}, sign=False)
    assert (status, body["errorName"]) == (401, "AuthenticationFailedException")
    status, body = await sim.call("health", {}, region="eu-west-1")
    assert (status, body["errorName"]) == (401, "AuthenticationFailedException")


async def test_body_changed_after_signing(sim: Sim) -> None:
    from shared.sigv4 import sign_request

    body = json.dumps({"requestMetadata": metadata(), "plaintext": b64(b"x"),
                       "encryptionAlgorithm": "AES_GCM"}).encode()
    url = f"{sim.url}/{PREFIX}/kms/xks/v1/keys/foo/encrypt"
    headers = sign_request(method="POST", url=url, body=body,
                           headers={"Content-Type": "application/json"}, credential=CRED_A,
                           region="us-east-1", service="kms-xks-proxy")
    changed = body.replace(b64(b"x").encode(), b64(b"y").encode())
    assert changed != body
    async with sim.session.post(url, data=changed, headers=headers) as r:
        assert r.status == 401
        assert (await r.json())["errorName"] == "AuthenticationFailedException"


async def test_invalid_uri_paths(sim: Sim) -> None:
    for prefix, api in ((f"{PREFIX}/invalid", "health"), (PREFIX, "keys/foo/sign"),
                        (PREFIX, "nothing"), ("", "health"), (PREFIX, "keys/bad key!/encrypt")):
        status, body = await sim.call(api, {"requestMetadata": metadata()}, prefix=prefix)
        assert (status, body["errorName"]) == (404, "InvalidUriPathException")


@pytest.mark.parametrize("api", ["health", "keys/foo/metadata", "keys/foo/encrypt",
                                 "keys/foo/decrypt"])
async def test_get_is_405(sim: Sim, api: str) -> None:
    async with sim.session.get(f"{sim.url}/{PREFIX}/kms/xks/v1/{api}") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert resp.content_type == "application/json"
        assert "errorName" in await resp.json()


async def test_post_to_ping_names_the_method_ping_takes(sim: Sim) -> None:
    async with sim.session.post(f"{sim.url}/ping") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] in ("GET", "GET, HEAD", "HEAD, GET")
        assert (await resp.json())["errorMessage"].startswith("this path accepts only")


@pytest.mark.parametrize(("raw", "headers"), [
    (b"{not json", None),
    (b"[1,2,3]", None),
    (b'{"requestMetadata": "text"}', None),
    (b"\xff\xfe", None),
    # Nested deeper than the JSON parser's recursion limit, and under the body limit.
    (b"[" * 200_000 + b"]" * 200_000, None),
    (json.dumps({"requestMetadata": metadata()}).encode(), {"Content-Type": "text/plain"}),
])
async def test_malformed_bodies_are_validation_errors(sim: Sim, raw: bytes,
                                                      headers: dict[str, str] | None) -> None:
    status, body = await sim.call("keys/foo/encrypt", raw=raw, headers=headers)
    assert (status, body["errorName"]) == (400, "ValidationException")


@pytest.mark.parametrize("change", [
    {"plaintext": None}, {"plaintext": "not base64!"}, {"plaintext": "-_-_"},
    {"plaintext": ""}, {"encryptionAlgorithm": "AES_CBC"}, {"encryptionAlgorithm": None},
    {"ciphertextDataIntegrityValueAlgorithm": "MD5"}, {"additionalAuthenticatedData": 5},
    {"requestMetadata": None}, {"requestMetadata": {"kmsOperation": "Encrypt"}},
])
async def test_invalid_encrypt_fields(sim: Sim, change: dict[str, object]) -> None:
    body: dict[str, object] = {"requestMetadata": metadata(), "plaintext": b64(b"data"),
                               "encryptionAlgorithm": "AES_GCM"}
    for name, value in change.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    status, resp = await sim.call("keys/foo/encrypt", body)
    assert (status, resp["errorName"]) == (400, "ValidationException")


async def test_validation_comes_before_key_lookup_and_auth_before_validation(sim: Sim) -> None:
    status, body = await sim.call("keys/non_existing_key/encrypt", {})
    assert (status, body["errorName"]) == (400, "ValidationException")
    bad = Credential(CRED_A.access_key_id, "Invalid" + CRED_A.secret_access_key)
    _, body = await sim.call("keys/non_existing_key/encrypt", {}, cred=bad)
    assert body["errorName"] == "AuthenticationFailedException"


async def test_oversized_inputs_are_501(start_sim: StartSim,
                                        make_config: Callable[..., Config]) -> None:
    sim = await start_sim(make_config(limits=LimitsConfig(max_plaintext_bytes=5000,
                                                          max_aad_bytes=9000)))
    status, body = await sim.encrypt("foo", os.urandom(5001))
    assert (status, body["errorName"]) == (501, "UnsupportedOperationException")
    status, body = await sim.encrypt("foo", b"x", os.urandom(9001))
    assert (status, body["errorName"]) == (501, "UnsupportedOperationException")
    # Size comes after the key check, as in the reference proxy.
    status, body = await sim.encrypt("non_existing_key", os.urandom(5001))
    assert body["errorName"] == "KeyNotFoundException"
    # A body beyond the transport limit is refused the same way, not with a 500.
    status, body = await sim.call("keys/foo/encrypt", raw=b"{" + b" " * 600_000 + b"}")
    assert (status, body["errorName"]) == (501, "UnsupportedOperationException")


async def test_secondary_authorization(start_sim: StartSim,
                                       make_config: Callable[..., Config]) -> None:
    sim = await start_sim(make_config(stores=(
        store(allowed_principals=("arn:aws:iam::123456789012:role/Storage*",)),)))
    status, body = await sim.encrypt("foo", b"x")  # principal user/Alice
    assert (status, body["errorName"]) == (403, "AccessDeniedException")
    # Unknown keys are still KeyNotFound (key before authz), health is never authorized.
    assert (await sim.encrypt("nope", b"x"))[1]["errorName"] == "KeyNotFoundException"
    health = {"requestMetadata": {"kmsOperation": "KmsHealthCheck", "kmsRequestId": "r"}}
    assert (await sim.call("health", health))[0] == 200
    allowed = metadata(awsPrincipalArn="arn:aws:iam::123456789012:role/StorageWriter")
    status, _ = await sim.call("keys/foo/encrypt", {
        "requestMetadata": allowed, "plaintext": b64(b"x"), "encryptionAlgorithm": "AES_GCM"})
    assert status == 200


async def test_quota_throttles_per_prefix(start_sim: StartSim,
                                          make_config: Callable[..., Config]) -> None:
    sim = await start_sim(make_config(stores=(store(quota_rps=5),)))
    results = [(await sim.encrypt("foo", b"x"))[0] for _ in range(12)]
    assert results[:5] == [200] * 5
    assert 429 in results
    status, body = await sim.encrypt("foo", b"x")
    assert (status, body["errorName"]) == (429, "ThrottlingException")
    await asyncio.sleep(0.5)
    assert (await sim.encrypt("foo", b"x"))[0] == 200


async def test_request_log_has_no_secrets(sim: Sim, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ekm_sim.requests")
    plaintext = b"TOP-SECRET-PLAINTEXT-" + os.urandom(8).hex().encode()
    status, sealed = await sim.encrypt("foo", plaintext, b"aad-value-123", cdiv=True)
    assert status == 200
    await sim.decrypt("foo", sealed, b"aad-value-123")
    bad = Credential(CRED_A.access_key_id, "Invalid" + CRED_A.secret_access_key)
    await sim.encrypt("foo", plaintext, cred=bad)
    lines = [r.getMessage() for r in caplog.records if r.name == "ekm_sim.requests"]
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert [r["operation"] for r in records[:2]] == ["Encrypt", "Decrypt"]
    assert all(r["keyId"] == "foo" for r in records[:2])
    assert records[2]["outcome"] == "AuthenticationFailedException"
    assert all(r["latencyMs"] >= 0 and r["kmsRequestId"] for r in records[:2])
    text = "\n".join(caplog.text.splitlines() + lines)
    for secret in (plaintext.decode(), b64(plaintext), CRED_A.secret_access_key,
                   sealed["ciphertext"], b64(b"aad-value-123")):
        assert secret not in text


async def test_concurrent_load_without_errors(sim: Sim) -> None:
    async def one(i: int) -> None:
        data = os.urandom(64 + i % 300)
        status, sealed = await sim.encrypt("foo", data, str(i).encode(), cdiv=i % 3 == 0)
        assert status == 200, sealed
        assert await sim.decrypt("foo", sealed, str(i).encode()) == (
            200, {"plaintext": b64(data)})

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(400))), timeout=60)


async def test_threads_mode_serves_the_same_api(start_sim: StartSim,
                                                make_config: Callable[..., Config],
                                                threads_mode: object) -> None:
    sim = await start_sim(make_config(hsm=threads_mode))

    async def one(i: int) -> None:
        status, sealed = await sim.encrypt("foo", b"data %d" % i, b"aad")
        assert status == 200
        assert (await sim.decrypt("foo", sealed, b"aad"))[1]["plaintext"] == b64(b"data %d" % i)
        status, body = await sim.decrypt("encrypt_only_key", sealed, b"aad")
        assert body["errorName"] in ("InvalidKeyUsageException",)

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(100))), timeout=60)


async def test_plain_http_when_asked(start_sim: StartSim,
                                     make_config: Callable[..., Config]) -> None:
    sim = await start_sim(make_config(tls=False))
    assert sim.url.startswith("http://")
    status, sealed = await sim.encrypt("foo", b"over http")
    assert status == 200
    assert (await sim.decrypt("foo", sealed))[0] == 200


async def test_a_client_that_leaves_mid_body_is_not_an_internal_error(
        sim: Sim, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture) -> None:
    """Headers and part of the body, then the connection closes: logged as a client that
    went away, not as an internal error with a traceback."""
    host, port = sim.url.removeprefix("https://").rsplit(":", 1)
    context = client_context(ca=tls_files.ca, cert=tls_files.client_cert,
                             key=tls_files.client_key)
    await leave_mid_body(host, int(port), context, (
        f"POST /{PREFIX}/kms/xks/v1/keys/foo/encrypt HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        '{"plaintext":').encode(), caplog)


async def test_a_body_that_stops_arriving_is_refused_in_time(
        sim: Sim, tls_files: TLSFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends part of its body and then nothing no longer holds its handler
    and connection for ever (30 s in service; shortened here)."""
    monkeypatch.setattr(serving, "body_timeout_s", 0.3)
    host, port = sim.url.removeprefix("https://").rsplit(":", 1)
    context = client_context(ca=tls_files.ca, cert=tls_files.client_cert,
                             key=tls_files.client_key)
    head, body = await stall_mid_body(host, int(port), context, (
        f"POST /{PREFIX}/kms/xks/v1/keys/foo/encrypt HTTP/1.1\r\nHost: {host}"
        "\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode())
    assert head.startswith(b"HTTP/1.1 400")
    assert body["errorName"] == "ValidationException"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "x-unknown"])
async def test_a_content_encoding_is_refused_not_decoded(sim: Sim, encoding: str,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    """aiohttp decoded it, and a body that did not decode was an unexpected error: 500
    and a traceback, before any signature check. SigV4 signs the bytes sent, so the
    simulator takes the body only as sent."""
    import gzip

    body = json.dumps({"requestMetadata": metadata()}).encode()
    raw = gzip.compress(body) if encoding == "gzip" else body  # Valid gzip, then junk.
    for signed in (True, False):
        status, reply = await sim.call("health", raw=raw, sign=signed,
                                       headers={"Content-Encoding": encoding})
        assert (status, reply["errorName"]) == (400, "ValidationException"), (encoding,
                                                                               reply)
        assert "Content-Encoding" in reply["errorMessage"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_an_empty_or_identity_content_encoding_is_the_body_as_sent(sim: Sim) -> None:
    for encoding in ("", "identity", "Identity"):
        status, reply = await sim.call("health", {"requestMetadata": {
            "kmsRequestId": "r", "kmsOperation": "KmsHealthCheck"}},
            headers={"Content-Encoding": encoding})
        assert status == 200, (encoding, reply)


async def test_an_unknown_expectation_gets_an_xks_error(sim: Sim) -> None:
    """Every answer is XKS JSON: aiohttp answered an unknown Expect with a text/plain 417."""
    status, reply = await sim.call("health", {"requestMetadata": metadata()},
                                   headers={"Expect": "200-ok"})
    assert (status, reply["errorName"]) == (400, "ValidationException")
    # 100-continue is still honoured.
    status, reply = await sim.call("health", {"requestMetadata": {
        "kmsRequestId": "r", "kmsOperation": "KmsHealthCheck"}},
        headers={"Expect": "100-continue"})
    assert status == 200, reply
    # So is the load balancer's /ping.
    async with sim.session.get(sim.url + "/ping", headers={"Expect": "200-ok"}) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/json"
        assert (await resp.json())["errorName"] == "ValidationException"
    async with sim.session.get(sim.url + "/ping", headers={"Expect": "100-continue"}) as resp:
        assert resp.status == 200



async def test_a_refused_expectation_is_logged_and_repeated_fields_count(
        sim: Sim, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ekm_sim.requests")
    status, reply = await sim.call("health", {"requestMetadata": metadata(
        kmsRequestId="REQ-EXPECT-1")}, headers={"Expect": "100-continue, 200-ok"})
    assert (status, reply["errorName"]) == (400, "ValidationException")
    lines = [r.getMessage() for r in caplog.records if r.name == "ekm_sim.requests"]
    assert any("ValidationException" in line for line in lines), lines


async def test_a_refused_body_still_logs_its_request_metadata(
        sim: Sim, caplog: pytest.LogCaptureFixture) -> None:
    """Spec: log each call's request metadata (kmsRequestId above all) and its outcome; a
    body the parser refused logged no kmsRequestId and no keyId."""
    caplog.set_level(logging.INFO, logger="ekm_sim.requests")
    status, reply = await sim.call("keys/foo/encrypt", {
        "requestMetadata": metadata(kmsRequestId="REQ-REFUSED-1"),
        "encryptionAlgorithm": "AES_GCM"})  # No plaintext.
    assert (status, reply["errorName"]) == (400, "ValidationException")
    [line] = [json.loads(r.getMessage()) for r in caplog.records
              if r.name == "ekm_sim.requests"]
    assert (line["kmsRequestId"], line["keyId"], line["outcome"]) == (
        "REQ-REFUSED-1", "foo", "ValidationException")


async def test_the_largest_plaintext_limit_fits_the_body_limit(
        start_sim: StartSim, make_config: Callable[..., Config]) -> None:
    """The configured plaintext limit decides, never the body limit under it."""
    from ekm_sim.config import MAX_PLAINTEXT_LIMIT, LimitsConfig

    sim = await start_sim(make_config(limits=LimitsConfig(
        max_plaintext_bytes=MAX_PLAINTEXT_LIMIT)))
    aad = os.urandom(65535)
    status, sealed = await sim.encrypt("foo", os.urandom(MAX_PLAINTEXT_LIMIT), aad, cdiv=True)
    assert status == 200, sealed
    status, reply = await sim.encrypt("foo", os.urandom(MAX_PLAINTEXT_LIMIT + 1), aad)
    assert (status, reply["errorName"]) == (501, "UnsupportedOperationException"), reply
    assert "plaintext" in reply["errorMessage"]
