"""Clients for a running dev stack (``kms-proxy dev up``): the official SDK for an account's
user, a bearer-token client for a cloud service, and small helpers the e2e tests share."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from alibabacloud_kms20160120 import models as m
from alibabacloud_kms20160120.client import Client
from alibabacloud_tea_openapi import models as open_api
from alibabacloud_tea_openapi.models import Config
from darabonba.runtime import RuntimeOptions

from kms_proxy.demo import ServicePrincipal

KMS_PROXY = [sys.executable, "-m", "kms_proxy.cli"]


def run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    return subprocess.run([*KMS_PROXY, *args], capture_output=True, text=True, check=True,
                          env=env, timeout=180).stdout


def sdk_for(stack: dict[str, Any], account: str | None = None) -> Client:
    """The SDK as the first user of ``account`` (the stack's main account by default)."""
    account = account or stack["account_id"]
    key = next(k for k in stack["access_keys"] if k["account_id"] == account)
    return Client(Config(access_key_id=key["id"], access_key_secret=key["secret"],
                         endpoint=stack["kms"]["endpoint"], protocol="https",
                         ca=stack["kms"]["ca"], region_id=stack["region"]))


class ServiceClient(ServicePrincipal):
    """A cloud product calling the same RPC API with ``Authorization: Bearer <JWT>``, its
    token minted by the CLI (``kms-proxy dev token``), as a compose stack would."""

    def __init__(self, stack: dict[str, Any], product: str, account: str | None = None
                 ) -> None:
        super().__init__(stack, product, token=run(
            "dev", "token", "--workdir", str(stack["workdir"]), "--product", product,
            "--account", account or stack["account_id"]).strip())


def call_action(sdk: Client, action: str, **query: str) -> dict[str, Any]:
    """Any action (this project's extensions included) through the SDK's generic call_api;
    raises the SDK's exception on an error answer."""
    params = open_api.Params(action=action, version="2016-01-20", protocol="HTTPS",
                             pathname="/", method="POST", auth_type="AK", style="RPC",
                             req_body_type="formData", body_type="json")
    body: dict[str, Any] = sdk.call_api(params, open_api.OpenApiRequest(query=query),
                                        RuntimeOptions(autoretry=False, max_attempts=0)
                                        )["body"]
    return body


def refused(call: Any) -> tuple[int, str]:
    with pytest.raises(Exception) as caught:
        call()
    return int(caught.value.status_code), str(caught.value.code)  # type: ignore[attr-defined]


def default_key_id(sdk: Client) -> str:
    keys = sdk.list_keys(m.ListKeysRequest(page_size=100)).body.keys.key
    [default] = [k.key_id for k in keys if not k.key_id.startswith("key-")
                 and sdk.describe_key(m.DescribeKeyRequest(key_id=k.key_id)).body
                 .key_metadata.creator == "Aliyun"]
    return default
