"""Every cell of the seed's two capability tables, checked against the running front (the dev
stack: real subprocesses, SoftHSM2, the EKM simulator), with the official SDK as the account's
user and bearer-token clients as cloud services.

The tables are transcribed here from ``shared/reference/seed-digest.md`` on their own, not
imported from the product: a change to the product's capability table that departs from the
seed fails here. A "yes" cell is proved by doing the thing end to end; a "no" cell by the
typed refusal; a conditional cell ("only with the add-on", "symmetric only", "only when first
enabled") by both sides of its condition.

The dev stack's accounts: the first is plain, the second has the paid rotation add-on, the
third's default master key waits for imported material (``kms-proxy dev up``).
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from alibabacloud_kms20160120 import models as m
from alibabacloud_kms20160120.client import Client
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.e2e.stacktools import ServiceClient, call_action, default_key_id, refused, sdk_for

UNSUPPORTED = (400, "Rejected.UnsupportedOperation")

KINDS = ("default master key", "service key", "software key", "hardware key", "external key")
# Seed digest, "Crypto from self-built applications" (server-side encryption is a cloud
# service calling for the account).
CRYPTO = {
    "default master key": ("no", "no", "yes"),
    "service key": ("no", "no", "yes"),
    "software key": ("yes", "yes", "yes"),
    "hardware key": ("yes", "yes", "yes"),
    "external key": ("yes", "no", "yes"),
}
CRYPTO_COLUMNS = ("data encrypt/decrypt", "sign/verify", "server-side encryption")
# Seed digest, "Lifecycle".
LIFECYCLE = {
    "default master key": ("with the add-on", "yes", "yes", "only when first enabled", "no"),
    "service key": ("with the add-on", "no", "no", "no", "no"),
    "software key": ("symmetric only", "yes", "yes", "yes", "yes"),
    # The seed says "symmetric and stored in the HSM only"; the API text (and the issue)
    # allow it only for HsmEncryptedDatabase, which is what is checked (README).
    "hardware key": ("symmetric, HsmEncryptedDatabase", "yes", "yes", "yes", "no"),
    "external key": ("no", "yes", "yes", "no", "no"),
}
LIFECYCLE_COLUMNS = ("rotation", "scheduled deletion", "deletion protection", "BYOK import",
                     "backup")
CELLS = [(kind, column, CRYPTO[kind][i]) for kind in KINDS
         for i, column in enumerate(CRYPTO_COLUMNS)] + [
        (kind, column, LIFECYCLE[kind][i]) for kind in KINDS
        for i, column in enumerate(LIFECYCLE_COLUMNS)]


@dataclass
class World:
    """The running stack's clients and the keys the cells use (made once, on first use)."""

    stack: dict[str, Any]
    users: list[Client]
    services: dict[int, ServiceClient] = field(default_factory=dict)
    made: dict[str, str] = field(default_factory=dict)

    @property
    def accounts(self) -> list[str]:
        return [a["id"] for a in self.stack["accounts"]]

    def instance(self, kind: str, account: int = 0) -> str:
        return str(self.stack["instances_by_account"][self.accounts[account]][kind])

    def oss(self, account: int = 0) -> ServiceClient:
        if account not in self.services:
            self.services[account] = ServiceClient(self.stack, "oss", self.accounts[account])
        return self.services[account]

    def key(self, name: str, make: Callable[[], str]) -> str:
        if name not in self.made:
            self.made[name] = make()
        return self.made[name]

    def create(self, account: int = 0, **request: Any) -> str:
        return str(self.users[account].create_key(m.CreateKeyRequest(**request))
                   .body.key_metadata.key_id)

    def subject(self, kind: str, account: int = 0) -> str:
        """The cells' symmetric key of ``kind`` in ``account``."""
        user = self.users[account]
        makers: dict[str, Callable[[], str]] = {
            "software key": lambda: self.create(account),
            "hardware key": lambda: self.create(
                account, dkmsinstance_id=self.instance("hardware", account),
                key_storage_mechanism="HsmEncryptedDatabase"),
            "external key": lambda: str(call_action(
                user, "CreateKey", DKMSInstanceId=self.instance("external", account),
                ExternalKeyId=self.stack["ekm"]["keys"]["default"])["KeyMetadata"]["KeyId"]),
            "default master key": lambda: default_key_id(user),
            "service key": lambda: str(self.oss(account).call(
                "Encrypt", KeyId="alias/acs/oss", Plaintext="first use")[1]["KeyId"]),
        }
        return self.key(f"{kind}@{account}", makers[kind])

    def state(self, key_id: str, account: int = 0) -> Any:
        return self.users[account].describe_key(m.DescribeKeyRequest(key_id=key_id)
                                                ).body.key_metadata


@pytest.fixture(scope="module")
def world(stack: dict[str, Any]) -> Iterator[World]:
    accounts = [a["id"] for a in stack["accounts"]]
    assert [(a["rotation_addon"], a["default_key_material"]) for a in stack["accounts"]] == [
        (False, "kms"), (True, "kms"), (False, "import")]
    yield World(stack, [sdk_for(stack, account) for account in accounts])


def _round_trip(user: Client, key_id: str) -> None:
    blob = user.encrypt(m.EncryptRequest(key_id=key_id, plaintext="cell")).body
    assert user.decrypt(m.DecryptRequest(ciphertext_blob=blob.ciphertext_blob)
                        ).body.plaintext == "cell"


def _refusal_names(call: Callable[[], Any], needle: str) -> None:
    """``call`` is refused as unsupported, and the message names why."""
    with pytest.raises(Exception) as caught:
        call()
    error: Any = caught.value
    assert (error.status_code, error.code) == UNSUPPORTED
    assert needle in str(error.message), error.message


# -- crypto columns -----------------------------------------------------------------------

def data_crypto(w: World, kind: str, cell: str) -> None:
    key_id = w.subject(kind)
    user = w.users[0]
    if cell == "yes":
        _round_trip(user, key_id)
        return
    _refusal_names(lambda: user.encrypt(m.EncryptRequest(key_id=key_id, plaintext="x")),
                   "data encrypt/decrypt")
    # Every other data action too, and a blob the cloud service sealed (Decrypt takes the
    # key from the blob, through a path of its own).
    _refusal_names(lambda: user.generate_data_key(m.GenerateDataKeyRequest(key_id=key_id)),
                   "data encrypt/decrypt")
    _refusal_names(lambda: user.generate_data_key_without_plaintext(
        m.GenerateDataKeyWithoutPlaintextRequest(key_id=key_id)), "data encrypt/decrypt")
    own = user.encrypt(m.EncryptRequest(key_id=w.subject("software key"), plaintext="x"))
    _refusal_names(lambda: user.re_encrypt(m.ReEncryptRequest(
        ciphertext_blob=own.body.ciphertext_blob, destination_key_id=key_id)),
        "data encrypt/decrypt")
    status, sealed = w.oss().call(
        "Encrypt", KeyId="alias/acs/oss" if kind == "service key" else key_id, Plaintext="x")
    assert status == 200, sealed
    _refusal_names(lambda: user.decrypt(m.DecryptRequest(
        ciphertext_blob=sealed["CiphertextBlob"])), "data encrypt/decrypt")


def sign_verify(w: World, kind: str, cell: str) -> None:
    user = w.users[0]
    digest = base64.b64encode(hashlib.sha256(b"cell").digest()).decode()
    if cell == "yes":
        instance = w.instance("software" if kind == "software key" else "hardware")
        for spec, algorithm in (("RSA_2048", "RSA_PSS_SHA_256"), ("EC_P256", "ECDSA_SHA_256")):
            key = user.create_key(m.CreateKeyRequest(dkmsinstance_id=instance, key_spec=spec)
                                  ).body.key_metadata
            value = user.asymmetric_sign(m.AsymmetricSignRequest(
                key_id=key.key_id, key_version_id=key.primary_key_version,
                algorithm=algorithm, digest=digest)).body.value
            assert user.asymmetric_verify(m.AsymmetricVerifyRequest(
                key_id=key.key_id, key_version_id=key.primary_key_version,
                algorithm=algorithm, digest=digest, value=value)).body.value
        return
    key_id = w.subject(kind)
    _refusal_names(lambda: user.asymmetric_sign(m.AsymmetricSignRequest(
        key_id=key_id, key_version_id="any", algorithm="RSA_PSS_SHA_256", digest=digest)),
        "sign/verify")
    if kind == "external key":
        # Nor can an asymmetric key be made in an external instance.
        assert refused(lambda: user.create_key(m.CreateKeyRequest(
            dkmsinstance_id=w.instance("external"), key_spec="RSA_2048"))) == UNSUPPORTED


def server_side_encryption(w: World, kind: str, cell: str) -> None:
    assert cell == "yes"
    key_id = "alias/acs/oss" if kind == "service key" else w.subject(kind)
    oss = w.oss()
    status, sealed = oss.call("Encrypt", KeyId=key_id, Plaintext="at rest")
    assert status == 200, sealed
    status, opened = oss.call("Decrypt", CiphertextBlob=sealed["CiphertextBlob"])
    assert (status, opened["Plaintext"]) == (200, "at rest")


# -- lifecycle columns --------------------------------------------------------------------

def rotation(w: World, kind: str, cell: str) -> None:
    user = w.users[0]
    if cell == "no":
        _refusal_names(lambda: user.create_key_version(m.CreateKeyVersionRequest(
            key_id=w.subject(kind))), "rotation")
        return
    if cell == "with the add-on":
        # Without the add-on (first account): refused, naming it, by hand or as a policy.
        _refusal_names(lambda: user.create_key_version(m.CreateKeyVersionRequest(
            key_id=w.subject(kind))), "add-on")
        _refusal_names(lambda: user.update_rotation_policy(m.UpdateRotationPolicyRequest(
            key_id=w.subject(kind), enable_automatic_rotation=True,
            rotation_interval="365d")), "add-on")
        # With it (second account): a new primary version; the old one still decrypts.
        key_id, addon_user = w.subject(kind, 1), w.users[1]
        oss = w.oss(1)
        status, before = oss.call("Encrypt", KeyId=key_id, Plaintext="v1")
        assert status == 200
        version = addon_user.create_key_version(m.CreateKeyVersionRequest(key_id=key_id)
                                                ).body.key_version
        assert version.key_version_id != before["KeyVersionId"]
        assert w.state(key_id, 1).primary_key_version == version.key_version_id
        assert oss.call("Decrypt", CiphertextBlob=before["CiphertextBlob"])[1][
            "Plaintext"] == "v1"
        addon_user.update_rotation_policy(m.UpdateRotationPolicyRequest(
            key_id=key_id, enable_automatic_rotation=True, rotation_interval="365d"))
        assert w.state(key_id, 1).automatic_rotation == "Enabled"
        return
    # "symmetric only" / "symmetric, HsmEncryptedDatabase": the symmetric subject rotates (the
    # hardware subject is HsmEncryptedDatabase) ...
    key_id = w.subject(kind)
    before = user.encrypt(m.EncryptRequest(key_id=key_id, plaintext="v1")).body
    version = user.create_key_version(m.CreateKeyVersionRequest(key_id=key_id)).body
    assert version.key_version.key_version_id != before.key_version_id
    assert user.decrypt(m.DecryptRequest(ciphertext_blob=before.ciphertext_blob)
                        ).body.plaintext == "v1"
    user.update_rotation_policy(m.UpdateRotationPolicyRequest(
        key_id=key_id, enable_automatic_rotation=True, rotation_interval="30d"))
    metadata = w.state(key_id)
    assert (metadata.automatic_rotation, metadata.rotation_interval) == ("Enabled",
                                                                          "2592000s")
    # ... an asymmetric one does not ...
    instance = w.instance("software" if kind == "software key" else "hardware")
    rsa_key = w.create(dkmsinstance_id=instance, key_spec="RSA_2048",
                       **({"key_storage_mechanism": "HsmEncryptedDatabase"}
                          if kind == "hardware key" else {}))
    _refusal_names(lambda: user.create_key_version(m.CreateKeyVersionRequest(
        key_id=rsa_key)), "asymmetric")
    if kind == "hardware key":
        # ... and a hardware key rotates only when stored in the HSM's encrypted database.
        internal = w.create(dkmsinstance_id=instance, key_storage_mechanism="HsmInternal")
        _refusal_names(lambda: user.update_rotation_policy(m.UpdateRotationPolicyRequest(
            key_id=internal, enable_automatic_rotation=True, rotation_interval="30d")),
            "HsmEncryptedDatabase")


def scheduled_deletion(w: World, kind: str, cell: str) -> None:
    user, key_id = w.users[0], w.subject(kind)
    schedule = m.ScheduleKeyDeletionRequest(key_id=key_id, pending_window_in_days=7)
    if cell == "no":
        _refusal_names(lambda: user.schedule_key_deletion(schedule), "scheduled deletion")
        assert w.state(key_id).key_state == "Enabled"
        return
    user.schedule_key_deletion(schedule)
    try:
        metadata = w.state(key_id)
        assert metadata.key_state == "PendingDeletion" and metadata.delete_date
    finally:
        user.cancel_key_deletion(m.CancelKeyDeletionRequest(key_id=key_id))
    assert w.state(key_id).key_state == "Enabled"


def deletion_protection(w: World, kind: str, cell: str) -> None:
    user, key_id = w.users[0], w.subject(kind)
    arn = w.state(key_id).arn
    protect = m.SetDeletionProtectionRequest(protected_resource_arn=arn,
                                             enable_deletion_protection=True,
                                             deletion_protection_description="cells")
    if cell == "no":
        _refusal_names(lambda: user.set_deletion_protection(protect), "deletion protection")
        return
    user.set_deletion_protection(protect)
    try:
        described = user.describe_key(m.DescribeKeyRequest(key_id=key_id)).body.key_metadata
        assert described.deletion_protection == "Enabled"
        assert refused(lambda: user.schedule_key_deletion(m.ScheduleKeyDeletionRequest(
            key_id=key_id, pending_window_in_days=7))) == (403, "Forbidden.NoPermission")
        assert w.state(key_id).key_state == "Enabled"
    finally:
        user.set_deletion_protection(m.SetDeletionProtectionRequest(
            protected_resource_arn=arn, enable_deletion_protection=False))


def _import(user: Client, key_id: str, material: bytes) -> None:
    """GetParametersForImport, wrap ``material`` with RSAES_OAEP_SHA_256, ImportKeyMaterial."""
    parameters = user.get_parameters_for_import(m.GetParametersForImportRequest(
        key_id=key_id, wrapping_key_spec="RSA_2048",
        wrapping_algorithm="RSAES_OAEP_SHA_256")).body
    public = serialization.load_der_public_key(base64.b64decode(parameters.public_key))
    assert isinstance(public, rsa.RSAPublicKey)
    wrapped = public.encrypt(material, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                                                    algorithm=hashes.SHA256(), label=None))
    user.import_key_material(m.ImportKeyMaterialRequest(
        key_id=key_id, import_token=parameters.import_token,
        encrypted_key_material=base64.b64encode(wrapped).decode()))


def byok_import(w: World, kind: str, cell: str) -> None:
    user = w.users[0]
    parameters = m.GetParametersForImportRequest(key_id=w.subject(kind),
                                                 wrapping_key_spec="RSA_2048",
                                                 wrapping_algorithm="RSAES_OAEP_SHA_256")
    if cell == "no":
        _refusal_names(lambda: user.get_parameters_for_import(parameters), "BYOK import")
        if kind == "external key":
            assert refused(lambda: user.create_key(m.CreateKeyRequest(
                dkmsinstance_id=w.instance("external"), origin="EXTERNAL"))) == (
                400, "Unsupported.Origin")
        return
    if cell == "only when first enabled":
        # A default key enabled with KMS material (first account) takes none.
        assert refused(lambda: user.get_parameters_for_import(parameters)) == (
            400, "Unsupported.Origin")
        # The third account's default key waits for material: imported once, it is enabled
        # and serves server-side encryption; after that it takes no more.
        third = w.users[2]
        key_id = w.subject(kind, 2)
        before = w.state(key_id, 2)
        assert (before.key_state, before.origin) == ("PendingImport", "EXTERNAL")
        _import(third, key_id, os.urandom(32))
        assert w.state(key_id, 2).key_state == "Enabled"
        status, body = w.oss(2).call("GenerateDataKey", KeyId=key_id)
        assert status == 200, body
        _refusal_names(lambda: third.get_parameters_for_import(m.GetParametersForImportRequest(
            key_id=key_id, wrapping_key_spec="RSA_2048",
            wrapping_algorithm="RSAES_OAEP_SHA_256")), "first enabled")
        return
    assert cell == "yes"
    instance = w.instance("software" if kind == "software key" else "hardware")
    key_id = w.create(dkmsinstance_id=instance, origin="EXTERNAL")
    assert w.state(key_id).key_state == "PendingImport"
    _import(user, key_id, os.urandom(32))
    assert w.state(key_id).key_state == "Enabled"
    _round_trip(user, key_id)


def backup(w: World, kind: str, cell: str) -> None:
    user, key_id = w.users[0], w.subject(kind)
    if cell == "no":
        _refusal_names(lambda: call_action(user, "BackupKey", KeyId=key_id), "backup")
        return
    answer = call_action(user, "BackupKey", KeyId=key_id)
    assert answer["KeyId"] == key_id and len(base64.b64decode(answer["KeyBackup"])) > 64


PROBES: dict[str, Callable[[World, str, str], None]] = {
    "data encrypt/decrypt": data_crypto, "sign/verify": sign_verify,
    "server-side encryption": server_side_encryption, "rotation": rotation,
    "scheduled deletion": scheduled_deletion, "deletion protection": deletion_protection,
    "BYOK import": byok_import, "backup": backup,
}


@pytest.mark.parametrize(("kind", "column", "cell"), CELLS,
                         ids=[f"{k}|{c}|{v}" for k, c, v in CELLS])
def test_every_cell_of_the_seed_capability_tables(world: World, kind: str, column: str,
                                                  cell: str) -> None:
    PROBES[column](world, kind, cell)


def test_the_cells_cover_both_tables() -> None:
    assert len(CELLS) == len(KINDS) * (len(CRYPTO_COLUMNS) + len(LIFECYCLE_COLUMNS)) == 40
