"""A walk through the KMS front with the official Alibaba Cloud KMS SDK, unmodified, pointed
at the dev stack (``stack.json``). Usage: ``python -m kms_proxy.demo var/stack/stack.json``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alibabacloud_kms20160120 import models as m
from alibabacloud_kms20160120.client import Client
from alibabacloud_tea_openapi import models as open_api
from alibabacloud_tea_openapi.models import Config
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys
from darabonba.runtime import RuntimeOptions

from kms_proxy import devstack


def client(stack: dict[str, Any], index: int = 0, *, v2: bool = False) -> Client:
    key = stack["access_keys"][index]
    config = Config(access_key_id=key["id"], access_key_secret=key["secret"],
                    endpoint=stack["kms"]["endpoint"], protocol=stack["kms"]["protocol"],
                    ca=stack["kms"]["ca"], region_id=stack["region"])
    if v2:
        config.signature_algorithm = "v2"
    return Client(config)


def params_for(action: str) -> open_api.Params:
    """For the SDK's generic call_api: an action it has no method for, or a parameter it
    does not send (ExternalKeyId, this project's extension)."""
    return open_api.Params(action=action, version="2016-01-20", protocol="HTTPS",
                           pathname="/", method="POST", auth_type="AK", style="RPC",
                           req_body_type="formData", body_type="json")


# Steps whose outcome was not the one expected; main() fails if there is any, so that
# the README's main command cannot print a refusal that did not happen as a success.
UNEXPECTED: list[str] = []


def _check(step: str, outcome: str, expect: str, shown: str | None = None) -> None:
    """Print ``step -> shown`` (by default ``OK`` or ``refused: <outcome>``), marked and
    counted if ``outcome`` is not ``expect``."""
    mark = ""
    if outcome != expect:
        UNEXPECTED.append(f"{step}: {outcome}, expected {expect}")
        mark = f"   <-- UNEXPECTED, expected {expect}"
    if shown is None:
        shown = "OK" if outcome == "OK" else f"refused: {outcome}"
    print(f"  {step:<62} -> {shown}{mark}")


def attempt(step: str, call: Callable[[], Any], expect: str) -> Any:
    """Run one SDK call, print its outcome (``OK`` or the HTTP status and Alibaba error
    code of the refusal) and note it if it is not ``expect``."""
    try:
        result = call()
    except Exception as exc:
        code = getattr(exc, "code", None) or type(exc).__name__
        status = getattr(exc, "status_code", None) or getattr(exc, "statusCode", "")
        _check(step, f"{status} {code}", expect)
        return None
    _check(step, "OK", expect)
    return result


class ServicePrincipal:
    """A cloud product calling the RPC API with ``Authorization: Bearer <JWT>``."""

    def __init__(self, stack: dict[str, Any], product: str, *, account: str | None = None,
                 token: str | None = None) -> None:
        """``token`` defaults to one the dev stack's issuer signs for ``account`` (the
        stack's main account by default)."""
        self.endpoint = stack["kms"]["endpoint"]
        self.context = ssl.create_default_context(cafile=stack["kms"]["ca"])
        self.token = token or devstack.token(Path(stack["config"]).parent, product=product,
                                             account=account or stack["account_id"])

    def call(self, action: str, **params: str) -> tuple[int, dict[str, Any]]:
        query = urllib.parse.urlencode({"Action": action, "Version": "2016-01-20", **params})
        request = urllib.request.Request(
            f"https://{self.endpoint}/?{query}", method="POST",
            headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, context=self.context,  # noqa: S310
                                        timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


_UNSUPPORTED = "400 Rejected.UnsupportedOperation"


def main() -> int:
    stack = json.loads(Path(sys.argv[1] if len(sys.argv) > 1
                            else "var/stack/stack.json").read_text())
    kms = client(stack)
    print(f"KMS front at https://{stack['kms']['endpoint']} (official SDK "
          f"alibabacloud-kms20160120, ACS3-HMAC-SHA256 signatures), account "
          f"{stack['account_id']}, region {stack['region']}")

    print("\nSoftware key management instance "
          f"{stack['instances']['software']}: symmetric keys")
    key = kms.create_key(m.CreateKeyRequest(
        description="demo data key wrapper",
        tags=json.dumps([{"TagKey": "team", "TagValue": "payments"}]))).body.key_metadata
    print(f"  CreateKey -> {key.key_id} {key.key_spec} {key.key_usage} {key.key_state} "
          f"in {key.dkmsinstance_id}")
    alias = f"alias/demo-{key.key_id[-6:]}"
    kms.create_alias(m.CreateAliasRequest(alias_name=alias, key_id=key.key_id))
    context = {"order": "42", "tenant": "acme"}
    sealed = kms.encrypt(m.EncryptRequest(key_id=alias, plaintext="card 4111 1111 1111 1111",
                                          encryption_context=context)).body
    print(f"  Encrypt via {alias} -> blob of {len(sealed.ciphertext_blob)} Base64 chars, "
          f"version {sealed.key_version_id[:8]}...")
    opened = kms.decrypt(m.DecryptRequest(ciphertext_blob=sealed.ciphertext_blob,
                                          encryption_context={"tenant": "acme",
                                                              "order": "42"})).body
    print(f"  Decrypt (same context, other key order) -> {opened.plaintext!r}")
    data_key = kms.generate_data_key(m.GenerateDataKeyRequest(key_id=key.key_id)).body
    print(f"  GenerateDataKey -> {len(base64.b64decode(data_key.plaintext))}-byte data key "
          "and its encrypted copy")
    legacy = client(stack, v2=True)
    attempt("Decrypt with the legacy HMAC-SHA1 signature (signature v2)",
            lambda: legacy.decrypt(m.DecryptRequest(ciphertext_blob=data_key.ciphertext_blob)),
            "OK")

    print("\nAsymmetric keys")
    rsa = kms.create_key(m.CreateKeyRequest(key_spec="RSA_2048",
                                            key_usage="SIGN/VERIFY")).body.key_metadata
    digest = base64.b64encode(hashlib.sha256(b"release v1.0").digest()).decode()
    signature = kms.asymmetric_sign(m.AsymmetricSignRequest(
        key_id=rsa.key_id, key_version_id=rsa.primary_key_version,
        algorithm="RSA_PSS_SHA_256", digest=digest)).body.value
    verified = kms.asymmetric_verify(m.AsymmetricVerifyRequest(
        key_id=rsa.key_id, key_version_id=rsa.primary_key_version,
        algorithm="RSA_PSS_SHA_256", digest=digest, value=signature)).body.value
    print(f"  RSA_2048 AsymmetricSign + AsymmetricVerify -> {verified}")

    print("\nHardware key management instance "
          f"{stack['instances']['hardware']}: keys inside a PKCS#11 token (SoftHSM2)")
    hardware = kms.create_key(m.CreateKeyRequest(
        dkmsinstance_id=stack["instances"]["hardware"])).body.key_metadata
    sealed_hw = kms.encrypt(m.EncryptRequest(key_id=hardware.key_id, plaintext="hsm data")).body
    print(f"  CreateKey -> {hardware.key_id} ProtectionLevel={hardware.protection_level}; "
          "Encrypt + Decrypt -> "
          f"{kms.decrypt(m.DecryptRequest(ciphertext_blob=sealed_hw.ciphertext_blob)).body.plaintext!r}")
    wrapped = kms.create_key(m.CreateKeyRequest(
        dkmsinstance_id=stack["instances"]["hardware"],
        key_storage_mechanism="HsmEncryptedDatabase")).body.key_metadata
    sealed_db = kms.encrypt(m.EncryptRequest(key_id=wrapped.key_id, plaintext="db data")).body
    kms.create_key_version(m.CreateKeyVersionRequest(key_id=wrapped.key_id))
    print(f"  CreateKey KeyStorageMechanism=HsmEncryptedDatabase -> {wrapped.key_id} "
          "(wrapped by the token, bound to its version); CreateKeyVersion, and the first "
          "blob still decrypts -> "
          f"{kms.decrypt(m.DecryptRequest(ciphertext_blob=sealed_db.ciphertext_blob)).body.plaintext!r}")

    print("\nExternal key management instance "
          f"{stack['instances']['external']}: keys in the EKM, reached over XKI "
          "(XKS API, mTLS + SigV4)")
    external_metadata = kms.call_api(params_for("CreateKey"), open_api.OpenApiRequest(query={
        "DKMSInstanceId": stack["instances"]["external"],
        "ExternalKeyId": stack["ekm"]["keys"]["default"]}), RuntimeOptions()
    )["body"]["KeyMetadata"]
    external = external_metadata["KeyId"]
    sealed_ext = kms.encrypt(m.EncryptRequest(key_id=external, plaintext="hyok data",
                                              encryption_context=context)).body
    opened_ext = kms.decrypt(m.DecryptRequest(ciphertext_blob=sealed_ext.ciphertext_blob,
                                              encryption_context=context)).body
    print(f"  CreateKey (ExternalKeyId={stack['ekm']['keys']['default']}) -> {external}; "
          f"Encrypt + Decrypt through the EKM -> {opened_ext.plaintext!r}")
    status = kms.get_kms_instance(m.GetKmsInstanceRequest(
        kms_instance_id=stack["instances"]["external"])).body.kms_instance.status
    _check("GetKmsInstance of the external instance: Status", str(status), "Connected",
           f"{status} (XKS health probe, and each call)")

    print("\nDefault keys and a cloud service (bearer JWT from the dev stack's issuer)")
    oss = ServicePrincipal(stack, "oss")
    default = next(k.key_id for k in kms.list_keys(m.ListKeysRequest(page_size=100))
                   .body.keys.key if not k.key_id.startswith("key-")
                   and kms.describe_key(m.DescribeKeyRequest(key_id=k.key_id))
                   .body.key_metadata.creator == "Aliyun")
    print(f"  default master key {default} (one per account and region, made by the system)")
    code = oss.call("GenerateDataKey", KeyId=default)[0]
    _check("oss (service principal) GenerateDataKey with it", str(code), "200", str(code))
    code, body = oss.call("Encrypt", KeyId="alias/acs/oss", Plaintext="object key")
    _check("oss Encrypt with alias/acs/oss (service key made on first use)", str(code),
           "200", f"{code} KeyId {body.get('KeyId')}")

    print("\nA key migrated from KMS 1.0 (kms-proxy keys import-migrated): read-only")
    migrated = stack["keys"]["migrated"]
    attempt("DescribeKey of the migrated key",
            lambda: kms.describe_key(m.DescribeKeyRequest(key_id=migrated)), "OK")
    attempt("Encrypt with the migrated key",
            lambda: kms.encrypt(m.EncryptRequest(key_id=migrated, plaintext="x")),
            _UNSUPPORTED)
    attempt("DisableKey of the migrated key",
            lambda: kms.disable_key(m.DisableKeyRequest(key_id=migrated)), _UNSUPPORTED)

    print("\nKey lifecycle")
    version = kms.create_key_version(m.CreateKeyVersionRequest(key_id=key.key_id)).body
    first = kms.decrypt(m.DecryptRequest(ciphertext_blob=sealed.ciphertext_blob,
                                         encryption_context=context)).body.plaintext
    print(f"  CreateKeyVersion -> new primary version "
          f"{version.key_version.key_version_id[:8]}...; the first blob still decrypts -> "
          f"{first!r}")
    kms.update_rotation_policy(m.UpdateRotationPolicyRequest(
        key_id=key.key_id, enable_automatic_rotation=True, rotation_interval="30d"))
    described = kms.describe_key(m.DescribeKeyRequest(key_id=key.key_id)).body.key_metadata
    print(f"  UpdateRotationPolicy 30d -> AutomaticRotation {described.automatic_rotation}, "
          f"next {described.next_rotation_date}")
    byok = kms.create_key(m.CreateKeyRequest(origin="EXTERNAL")).body.key_metadata
    parameters = kms.get_parameters_for_import(m.GetParametersForImportRequest(
        key_id=byok.key_id, wrapping_key_spec="RSA_2048",
        wrapping_algorithm="RSAES_OAEP_SHA_256")).body
    wrapping = serialization.load_der_public_key(base64.b64decode(parameters.public_key))
    assert isinstance(wrapping, rsa_keys.RSAPublicKey)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                        label=None)
    kms.import_key_material(m.ImportKeyMaterialRequest(
        key_id=byok.key_id, import_token=parameters.import_token,
        encrypted_key_material=base64.b64encode(
            wrapping.encrypt(os.urandom(32), oaep)).decode()))
    state = kms.describe_key(m.DescribeKeyRequest(key_id=byok.key_id)).body.key_metadata
    print(f"  BYOK: CreateKey Origin=EXTERNAL ({byok.key_state}) -> GetParametersForImport "
          f"-> ImportKeyMaterial -> {state.key_state}")
    kms.set_deletion_protection(m.SetDeletionProtectionRequest(
        protected_resource_arn=key.arn, enable_deletion_protection=True,
        deletion_protection_description="demo"))
    attempt("ScheduleKeyDeletion of a key with deletion protection",
            lambda: kms.schedule_key_deletion(m.ScheduleKeyDeletionRequest(
                key_id=key.key_id, pending_window_in_days=7)),
            "403 Forbidden.NoPermission")
    kms.schedule_key_deletion(m.ScheduleKeyDeletionRequest(key_id=byok.key_id,
                                                           pending_window_in_days=7))
    pending = kms.describe_key(m.DescribeKeyRequest(key_id=byok.key_id)).body.key_metadata
    print(f"  ScheduleKeyDeletion (7 days) of the BYOK key -> {pending.key_state} until "
          f"{pending.delete_date}; CancelKeyDeletion undoes it")
    kms.cancel_key_deletion(m.CancelKeyDeletionRequest(key_id=byok.key_id))
    backup = kms.call_api(params_for("BackupKey"), open_api.OpenApiRequest(
        query={"KeyId": key.key_id}), RuntimeOptions())["body"]["KeyBackup"]
    print(f"  BackupKey (this project's extension) -> {len(backup)} Base64 chars, sealed by "
          "the root key")

    print("\nRefusals, with Alibaba's error codes")
    attempt("Rotate an external key (the EKM rotates it)",
            lambda: kms.create_key_version(m.CreateKeyVersionRequest(key_id=external)),
            _UNSUPPORTED)
    attempt("Rotate an HsmInternal hardware key",
            lambda: kms.create_key_version(m.CreateKeyVersionRequest(key_id=hardware.key_id)),
            _UNSUPPORTED)
    attempt("Rotate the default master key without the paid add-on",
            lambda: kms.create_key_version(m.CreateKeyVersionRequest(key_id=default)),
            _UNSUPPORTED)
    attempt("Back up a hardware key (software keys only)",
            lambda: kms.call_api(params_for("BackupKey"), open_api.OpenApiRequest(
                query={"KeyId": hardware.key_id}), RuntimeOptions()),
            _UNSUPPORTED)
    attempt("An application Encrypts with the default master key",
            lambda: kms.encrypt(m.EncryptRequest(key_id=default, plaintext="x")),
            _UNSUPPORTED)
    attempt("An application Encrypts with oss's service key",
            lambda: kms.encrypt(m.EncryptRequest(key_id="alias/acs/oss", plaintext="x")),
            _UNSUPPORTED)
    attempt("An RSA key in the external instance (external keys: symmetric)",
            lambda: kms.create_key(m.CreateKeyRequest(
                dkmsinstance_id=stack["instances"]["external"], key_spec="RSA_2048")),
            _UNSUPPORTED)
    attempt("Sign with an external key (external keys: encrypt/decrypt only)",
            lambda: kms.asymmetric_sign(m.AsymmetricSignRequest(
                key_id=external, key_version_id=external_metadata["PrimaryKeyVersion"],
                algorithm="RSA_PSS_SHA_256", digest=digest)), _UNSUPPORTED)
    rds = ServicePrincipal(stack, "rds")
    code, body = rds.call("Encrypt", KeyId="alias/acs/oss", Plaintext="x")
    _check("rds (another product) uses oss service key", f"{code} {body.get('Code')}",
           "403 Forbidden.NoPermission")
    attempt("Decrypt with a different EncryptionContext",
            lambda: kms.decrypt(m.DecryptRequest(ciphertext_blob=sealed.ciphertext_blob,
                                                 encryption_context={"order": "43"})),
            "400 InvalidParameter")
    attempt("Create alias/acs/oss (reserved for service keys)",
            lambda: kms.create_alias(m.CreateAliasRequest(alias_name="alias/acs/oss",
                                                          key_id=key.key_id)),
            "400 Unsupported.Alias")
    attempt("Create an EC_SM2 key (no maintained SM2 library)",
            lambda: kms.create_key(m.CreateKeyRequest(key_spec="EC_SM2")),
            _UNSUPPORTED)
    attempt("Sign with an ENCRYPT/DECRYPT key",
            lambda: kms.asymmetric_sign(m.AsymmetricSignRequest(
                key_id=key.key_id, key_version_id=key.primary_key_version,
                algorithm="RSA_PSS_SHA_256", digest=digest)),
            _UNSUPPORTED)
    other = client(stack, 2)
    attempt("Another account uses this key by ARN (no key policy grants it)",
            lambda: other.encrypt(m.EncryptRequest(key_id=key.arn, plaintext="x")),
            "403 Forbidden.NoPermission")
    kms.disable_key(m.DisableKeyRequest(key_id=key.key_id))
    attempt("Encrypt with a disabled key",
            lambda: kms.encrypt(m.EncryptRequest(key_id=key.key_id, plaintext="x")),
            "409 Rejected.Disabled")
    kms.enable_key(m.EnableKeyRequest(key_id=key.key_id))
    attempt("Encrypt again after EnableKey",
            lambda: kms.encrypt(m.EncryptRequest(key_id=key.key_id, plaintext="x")),
            "OK")
    print("\nEvery call above is in the hash-chained audit log; check it with\n"
          f"  kms-proxy audit verify --config {stack['config']}")
    if UNEXPECTED:
        print(f"\n{len(UNEXPECTED)} step(s) did not behave as expected:", file=sys.stderr)
        for line in UNEXPECTED:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
