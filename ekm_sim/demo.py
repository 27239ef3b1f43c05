"""A walk through the XKS API against a running simulator, described by its ``ekm.json``.

Usage: ``python -m ekm_sim.demo var/dev/ekm.json``. Every request is SigV4-signed and sent
over mTLS, as KMS would send it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import uuid
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, TCPConnector

from shared import xks
from shared.sigv4 import Credential, sign_request


class DemoClient:
    def __init__(self, info: dict[str, Any], session: ClientSession) -> None:
        self.info, self.session = info, session
        self.credential = Credential(info["access_key_id"], info["secret_access_key"])

    async def call(self, api: str, body: dict[str, Any], *,
                   credential: Credential | None = None) -> tuple[int, dict[str, Any]]:
        url = f"{self.info['url']}/{self.info['uri_prefix']}/kms/xks/v1/{api}"
        data = xks.dumps(body)
        headers = sign_request(method="POST", url=url, body=data,
                               headers={"Content-Type": "application/json"},
                               credential=credential or self.credential,
                               region=self.info["region"], service="kms-xks-proxy")
        async with self.session.post(url, data=data, headers=headers) as resp:
            return resp.status, await resp.json()


def _meta(operation: str) -> xks.RequestMetadata:
    return xks.RequestMetadata(
        kms_request_id=str(uuid.uuid4()), kms_operation=operation,
        aws_principal_arn="arn:aws:iam::123456789012:user/Alice",
        kms_key_arn="arn:aws:kms:us-east-1:123456789012:key/demo")


def _show(step: str, status: int, body: dict[str, Any]) -> None:
    outcome = body.get("errorName") or "OK"
    print(f"  {step:<58} -> HTTP {status} {outcome}")


async def run(info: dict[str, Any]) -> None:
    ctx = ssl.create_default_context(cafile=info["ca"])
    ctx.load_cert_chain(info["client_cert"], info["client_key"])
    async with ClientSession(connector=TCPConnector(ssl=ctx)) as session:
        client = DemoClient(info, session)
        keys = info["keys"]
        print(f"EKM simulator at {info['url']}/{info['uri_prefix']}/kms/xks/v1 (mTLS + SigV4)")

        status, health = await client.call("health", {"requestMetadata": {
            "kmsRequestId": str(uuid.uuid4()), "kmsOperation": "KmsHealthCheck"}})
        fleet = health["ekmFleetDetails"][0]
        print(f"\nGetHealthStatus: HTTP {status}, EKM {fleet['model']!r} is "
              f"{fleet['healthStatus']} (deep check: a real encrypt+decrypt on a test key)")

        print("\nGetKeyMetadata:")
        for role, key_id in keys.items():
            status, meta = await client.call(f"keys/{key_id}/metadata",
                                             {"requestMetadata": _meta("CreateKey").to_wire()})
            print(f"  {key_id:<18} ({role:<12}) {meta['keySpec']} {meta['keyStatus']} "
                  f"usage={meta['keyUsage']}")

        print("\nEncrypt and decrypt with AAD and a ciphertext integrity value (CDIV):")
        plaintext, aad = b"a data key from KMS, 32 bytes..", b"project=nile,department=marketing"
        request = xks.EncryptRequest(metadata=_meta("Encrypt"), plaintext=plaintext, aad=aad,
                                     want_cdiv=True)
        status, body = await client.call(f"keys/{keys['default']}/encrypt", request.to_wire())
        _show("Encrypt with foo", status, body)
        sealed = xks.EncryptResponse.from_wire(body)
        recomputed = xks.cdiv(aad, sealed.ciphertext_metadata, sealed.iv, sealed.ciphertext,
                              sealed.tag)
        print(f"  CDIV recomputed by the caller matches: {recomputed == sealed.cdiv}; "
              f"ciphertextMetadata = {sealed.ciphertext_metadata!r} (format 1, key version)")

        def decrypt(sealed: xks.EncryptResponse, aad: bytes | None) -> dict[str, Any]:
            return xks.DecryptRequest(
                metadata=_meta("Decrypt"), ciphertext=sealed.ciphertext, iv=sealed.iv,
                tag=sealed.tag, aad=aad, ciphertext_metadata=sealed.ciphertext_metadata,
            ).to_wire()

        status, body = await client.call(f"keys/{keys['default']}/decrypt", decrypt(sealed, aad))
        _show("Decrypt with the same AAD", status, body)
        print(f"  plaintext round-trips: {xks.b64(plaintext) == body.get('plaintext')}")

        print("\nWhat the simulator refuses, with the spec's error names:")
        status, body = await client.call(f"keys/{keys['default']}/decrypt",
                                         decrypt(sealed, b"project=blue"))
        _show("Decrypt with another AAD", status, body)
        status, body = await client.call(f"keys/{keys['encrypt_only']}/encrypt",
                                         request.to_wire())
        _show("Encrypt+CDIV with encrypt_only_key (CDIV verify decrypts)", status, body)
        status, body = await client.call(f"keys/{keys['impotent']}/encrypt", xks.EncryptRequest(
            metadata=_meta("Encrypt"), plaintext=b"x").to_wire())
        _show("Encrypt with impotent_key", status, body)
        status, body = await client.call("keys/no_such_key/encrypt", request.to_wire())
        _show("Encrypt with an unknown key", status, body)
        wrong = Credential(client.credential.access_key_id, "W" * 43)
        status, body = await client.call("health", {"requestMetadata": {
            "kmsRequestId": "1", "kmsOperation": "KmsHealthCheck"}}, credential=wrong)
        _show("Health with a wrong SigV4 secret", status, body)
        status, body = await client.call(f"keys/{keys['default']}/encrypt", {"plaintext": "!"})
        _show("Encrypt with a malformed body", status, body)


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "var/dev/ekm.json")
    asyncio.run(run(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
