"""Demo keys of every kind for the dev stack, made through the running front the way users
make them: the official SDK for user keys, a service-principal token for the service key,
and the migration import for a KMS 1.0 key. Dev tooling only (it needs the SDK)."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from alibabacloud_kms20160120 import models as m
from alibabacloud_kms20160120.client import Client
from alibabacloud_tea_openapi import models as open_api
from alibabacloud_tea_openapi.models import Config
from darabonba.runtime import RuntimeOptions

__all__ = ["MIGRATED_KEY_ID", "make_demo_keys"]

MIGRATED_KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"


def _alias(kms: Client, name: str, key_id: str) -> None:
    kms.create_alias(m.CreateAliasRequest(alias_name=name, key_id=key_id))


def make_demo_keys(stack: dict[str, Any], service_token: str) -> dict[str, str]:
    """Create one key of each kind (idempotent callers keep the result); returns their ids.

    Aliases: ``alias/demo/software``, ``alias/demo/hardware``, ``alias/demo/external``;
    the service key is ``alias/acs/oss``.
    """
    key = stack["access_keys"][0]
    kms = Client(Config(access_key_id=key["id"], access_key_secret=key["secret"],
                        endpoint=stack["kms"]["endpoint"], protocol="https",
                        ca=stack["kms"]["ca"], region_id=stack["region"]))
    instances = stack["instances"]
    keys: dict[str, str] = {}
    keys["software"] = kms.create_key(m.CreateKeyRequest(
        description="demo software key")).body.key_metadata.key_id
    keys["hardware"] = kms.create_key(m.CreateKeyRequest(
        dkmsinstance_id=instances["hardware"],
        description="demo hardware key")).body.key_metadata.key_id
    params = open_api.Params(action="CreateKey", version="2016-01-20", protocol="HTTPS",
                             pathname="/", method="POST", auth_type="AK", style="RPC",
                             req_body_type="formData", body_type="json")
    keys["external"] = kms.call_api(params, open_api.OpenApiRequest(query={
        "DKMSInstanceId": instances["external"], "ExternalKeyId": stack["ekm"]["keys"]
        ["default"], "Description": "demo external key"}), RuntimeOptions()
    )["body"]["KeyMetadata"]["KeyId"]
    for kind in ("software", "hardware", "external"):
        _alias(kms, f"alias/demo/{kind}", keys[kind])
    for listed in kms.list_keys(m.ListKeysRequest(page_size=100)).body.keys.key:
        metadata = kms.describe_key(m.DescribeKeyRequest(key_id=listed.key_id)).body
        if metadata.key_metadata.creator == "Aliyun":
            keys["default"] = listed.key_id
    # The service key appears the first time its product uses alias/acs/<product>.
    query = urllib.parse.urlencode({"Action": "GenerateDataKey", "Version": "2016-01-20",
                                    "KeyId": "alias/acs/oss"})
    request = urllib.request.Request(
        f"https://{stack['kms']['endpoint']}/?{query}", method="POST",
        headers={"Authorization": f"Bearer {service_token}"})
    context = ssl.create_default_context(cafile=stack["kms"]["ca"])
    with urllib.request.urlopen(request, context=context, timeout=10) as response:  # noqa: S310
        keys["service"] = json.loads(response.read())["KeyId"]
    imported = subprocess.run(
        [sys.executable, "-m", "kms_proxy.cli", "keys", "import-migrated", "--config",
         stack["config"], "--account", stack["account_id"], "--key-id", MIGRATED_KEY_ID],
        capture_output=True, text=True, check=False, timeout=60)
    if imported.returncode not in (0, 2):  # 2: imported by an earlier dev up
        raise RuntimeError(f"migrated key import failed: {imported.stderr.strip()}")
    keys["migrated"] = MIGRATED_KEY_ID
    return keys
