"""Micro-benchmark: botocore SigV4 signing of one XKS Encrypt request three ways: a new
``SigV4Auth`` per call (``sign_request``); one kept per credential (``Signer``); and that
with the ``Host`` header given, so botocore does not parse the URL for it (what the XKS
client does). Interleaved rounds, median per-call µs and ratios to the first, so a noisy
machine affects all alike.

    .venv/bin/python benchmarks/sigv4_sign.py [--rounds 7] [--calls 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

from shared.sigv4 import Credential, Signer, sign_request

URL = "https://127.0.0.1:8443/example/uri/path/prefix/kms/xks/v1/keys/foo/encrypt"
BODY = (b'{"requestMetadata":{"awsPrincipalArn":"acs:ram::1234567890123456:user/dev0",'
        b'"kmsKeyArn":"acs:kms:cn-hangzhou:1234567890123456:key/key-hzz0123456789",'
        b'"kmsOperation":"Encrypt","kmsRequestId":"5f0c6f0e-0000-4000-8000-000000000000"},'
        b'"plaintext":"aGVsbG8gd29ybGQ=","encryptionAlgorithm":"AES_GCM",'
        b'"ciphertextDataIntegrityValueAlgorithm":"SHA_256"}')
HEADERS = {"Content-Type": "application/json"}
CREDENTIAL = Credential("BETWEEN2TENAND3TENCHARACTERS",
                        "PleaseReplaceThisWithSomeSecretOfLength43To64")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    signer = Signer(region="us-east-1", service="kms-xks-proxy")
    with_host = {**HEADERS, "Host": URL.split("/")[2]}
    fresh, kept, hosted = [], [], []
    for _ in range(args.rounds):
        started = time.perf_counter()
        for _ in range(args.calls):
            sign_request(method="POST", url=URL, body=BODY, headers=HEADERS,
                         credential=CREDENTIAL, region="us-east-1", service="kms-xks-proxy")
        fresh.append((time.perf_counter() - started) / args.calls * 1e6)
        started = time.perf_counter()
        for _ in range(args.calls):
            signer.sign(method="POST", url=URL, body=BODY, headers=HEADERS,
                        credential=CREDENTIAL)
        kept.append((time.perf_counter() - started) / args.calls * 1e6)
        started = time.perf_counter()
        for _ in range(args.calls):
            signer.sign(method="POST", url=URL, body=BODY, headers=with_host,
                        credential=CREDENTIAL)
        hosted.append((time.perf_counter() - started) / args.calls * 1e6)
    a, b, c = (statistics.median(x) for x in (fresh, kept, hosted))
    print(f"new SigV4Auth per call: {a:.1f} us; kept per credential: {b:.1f} us "
          f"(x{b / a:.2f}); kept, Host given: {c:.1f} us (x{c / a:.2f}) "
          f"({args.rounds} rounds x {args.calls} calls, medians)")


if __name__ == "__main__":
    main()
