"""The front killed (SIGKILL: no clean-up runs) and started again by ``dev up``: a request
it accepted before the crash, even one dated ahead of the server's clock, cannot be
replayed, because accepted nonces are journaled as they are accepted."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import ssl
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from tests.e2e.stacktools import run


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Path]:
    """A stack of this test's own: it kills the front, which would move others' endpoint."""
    run("dev", "up", "--workdir", str(tmp_path))
    try:
        yield tmp_path
    finally:
        run("dev", "down", "--workdir", str(tmp_path))


def _signed_form(stack: dict[str, Any], when: datetime, **params: str) -> bytes:
    """A legacy RPC request in a form body, signed by the documented HMAC-SHA1 algorithm."""
    def pe(value: str) -> str:
        return quote(value, safe="-_.~")

    key = stack["access_keys"][0]
    signed = {"Format": "JSON", "Version": "2016-01-20", "AccessKeyId": key["id"],
              "SignatureMethod": "HMAC-SHA1", "SignatureVersion": "1.0",
              "Timestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
              "SignatureNonce": uuid.uuid4().hex, **params}
    canonical = "&".join(f"{pe(k)}={pe(v)}" for k, v in sorted(signed.items()))
    digest = hmac.new(f"{key['secret']}&".encode(), f"POST&%2F&{pe(canonical)}".encode(),
                      hashlib.sha1).digest()
    return urlencode({**signed, "Signature": base64.b64encode(digest).decode()}).encode()


def _post(stack: dict[str, Any], body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"https://{stack['kms']['endpoint']}/", data=body, method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    context = ssl.create_default_context(cafile=stack["kms"]["ca"])
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_request_accepted_before_a_crash_is_not_carried_out_again(own_stack: Path) -> None:
    stack = json.loads((own_stack / "stack.json").read_text())
    ahead = _signed_form(stack, datetime.now(UTC) + timedelta(minutes=10),
                         Action="CreateKey", Description="accepted before the crash")
    status, body = _post(stack, ahead)
    assert status == 200, body
    os.kill(int(stack["pid"]), signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(int(stack["pid"]), 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    restarted = json.loads(run("dev", "up", "--workdir", str(own_stack)))
    assert restarted["pid"] != stack["pid"]
    status, body = _post(restarted, ahead)
    assert (status, body["Code"]) == (400, "SignatureNonceUsed")
    status, body = _post(restarted, _signed_form(restarted, datetime.now(UTC),
                                                 Action="DescribeRegions"))
    assert status == 200, body
