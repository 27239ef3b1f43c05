"""The EKM simulator as a real subprocess on each event loop it can run on
(``server.event_loop``): the TLS transport differs (uvloop has its own), so the mTLS subject
allow-list and a signed XKS round trip are checked on both."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from shared.certs import DevCA
from shared.serving import EVENT_LOOPS
from shared.sigv4 import Credential, sign_request
from shared.xks import b64
from tests.conftest import metadata

EKM_SIM = [sys.executable, "-m", "ekm_sim.cli"]


def _post(url: str, body: bytes, headers: dict[str, str], ctx: ssl.SSLContext
          ) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=10) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_mtls_subjects_and_a_signed_call_on_each_event_loop(tmp_path: Path,
                                                             event_loop: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["EKM_SIM__SERVER__EVENT_LOOP"] = event_loop
    workdir = tmp_path / "ekm"
    subprocess.run([*EKM_SIM, "dev", "up", "--workdir", str(workdir)], check=True,
                   capture_output=True, env=env, timeout=120)
    try:
        info = json.loads((workdir / "ekm.json").read_text())
        base = f"{info['url']}/{info['uri_prefix']}/kms/xks/v1"
        intruder = DevCA.load_or_create(workdir / "certs").issue(
            "intruder", common_name="intruder.example", sans=["intruder.example"],
            server=False)
        for cert, key, allowed in ((info["client_cert"], info["client_key"], True),
                                   (intruder.cert, intruder.key, False)):
            ctx = ssl.create_default_context(cafile=info["ca"])
            ctx.load_cert_chain(cert, key)
            url = f"{base}/keys/{info['keys']['default']}/encrypt"
            body = json.dumps({"requestMetadata": metadata(), "encryptionAlgorithm": "AES_GCM",
                               "plaintext": b64(b"on " + event_loop.encode())}).encode()
            headers = sign_request(
                method="POST", url=url, body=body,
                headers={"Content-Type": "application/json"},
                credential=Credential(info["access_key_id"], info["secret_access_key"]),
                region=info["region"], service="kms-xks-proxy")
            status, answer = _post(url, body, headers, ctx)
            if allowed:
                assert status == 200, answer
                assert answer["ciphertext"] and answer["ciphertextMetadata"]
            else:
                assert (status, answer["errorName"]) == (401,
                                                         "AuthenticationFailedException")
                assert "subject" in str(answer["errorMessage"])
    finally:
        subprocess.run([*EKM_SIM, "dev", "down", "--workdir", str(workdir)], check=True,
                       capture_output=True, env=env, timeout=60)
