"""The front's XKS client and external-key backend against the real EKM simulator, over real
mTLS with SigV4: in-process simulators for the protocol, a ``ekm-sim dev up`` subprocess
for an EKM that hangs, stops and comes back."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import signal
import socket
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer

from ekm_sim.admin import KeyAdmin
from ekm_sim.config import Config
from ekm_sim.registry import KeyRegistry
from kms_proxy.backends.external import (
    _REJECTIONS,
    ConnectionState,
    ExternalBackend,
    HealthProbe,
    pack_sealed,
    unpack_sealed,
)
from kms_proxy.backends.xks_client import (
    MAX_RESPONSE_BYTES,
    UnavailableKind,
    XKSClient,
    XKSConnection,
    XKSInvalidResponse,
    XKSRejected,
    XKSUnavailable,
)
from kms_proxy.core.errors import (
    DependencyUnavailable,
    InvalidCiphertext,
    InvalidParameter,
    KeyStateInvalid,
    UnsupportedOperation,
)
from kms_proxy.core.model import CallInfo, KeySpec, KeyStorageMechanism, KeyVersion
from shared.pkcs11pool import PKCS11Pool
from shared.sigv4 import Credential
from shared.tls import server_context
from shared.xks import (
    EncryptRequest,
    ErrorName,
    HealthStatus,
    RequestMetadata,
    XKSError,
    b64,
    cdiv,
)
from tests.conftest import CRED_A, PREFIX, PRINCIPAL, REGION, Sim, StartSim, TLSFiles

KEY_ARN = "acs:kms:cn-hangzhou:1234567890123456:key/key-hzz0123456789abcdef0"
CONTEXT_AAD = b'{"department":"marketing","project":"nile"}'
# Generous for in-process simulators sharing the test's event loop; the budget itself is
# tested against a subprocess simulator with the default 250 ms.
BUDGET = 2.0

FakeProxy = Callable[[dict[str, Any]], Awaitable[str]]


def call(operation: str = "Encrypt", request_id: str | None = None) -> CallInfo:
    return CallInfo(request_id=request_id or str(uuid.uuid4()), principal_arn=PRINCIPAL,
                    operation=operation, key_arn=KEY_ARN)


def version(external_key_id: str = "foo") -> KeyVersion:
    return KeyVersion("key-1", str(uuid.uuid4()), "2026-01-01T00:00:00Z",
                      external_key_id.encode())


def connection(url: str, tls: TLSFiles, **overrides: Any) -> XKSConnection:
    values: dict[str, Any] = dict(
        endpoint=url, uri_prefix=PREFIX, region=REGION, credentials=(CRED_A,), ca=tls.ca,
        client_cert=tls.client_cert, client_key=tls.client_key, timeout=BUDGET)
    values.update(overrides)
    return XKSConnection(**values)


def fingerprint(cert: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


@pytest.fixture
async def client(sim: Sim, tls_files: TLSFiles) -> AsyncIterator[XKSClient]:
    async with XKSClient(connection(sim.url, tls_files)) as c:
        yield c


@pytest.fixture
def backend(client: XKSClient) -> ExternalBackend:
    return ExternalBackend(client)


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("aad", [b"", CONTEXT_AAD])
async def test_round_trip_through_the_backend(backend: ExternalBackend, aad: bytes) -> None:
    material = await backend.generate(version_id="v", spec=KeySpec.AES_256,
                                      external_key_id="foo", call=call("CreateKey"))
    assert material == b"foo"
    sealed = await backend.seal(version(), KeySpec.AES_256, b"secret data", aad, call=call())
    iv, ctm, tag, ciphertext = unpack_sealed(sealed)
    assert sealed[0] == 1 and len(iv) == 12 and len(tag) == 16
    assert ctm is not None and 0 < len(ctm) <= 20
    assert len(ciphertext) == len(b"secret data")
    assert b"secret data" not in sealed
    assert await backend.unseal(version(), KeySpec.AES_256, sealed, aad,
                                call=call("Decrypt")) == b"secret data"


async def test_spec_minimum_sizes(backend: ExternalBackend) -> None:
    plaintext, aad = os.urandom(4300), os.urandom(8192)
    sealed = await backend.seal(version(), KeySpec.AES_256, plaintext, aad, call=call())
    assert await backend.unseal(version(), KeySpec.AES_256, sealed, aad,
                                call=call("Decrypt")) == plaintext
    with pytest.raises(InvalidParameter, match="EncryptionContext"):
        await backend.seal(version(), KeySpec.AES_256, b"x", b"a" * 65536, call=call())


async def test_cdiv_is_requested_and_matches(client: XKSClient) -> None:
    request = EncryptRequest(metadata=RequestMetadata("r-1", "Encrypt", PRINCIPAL, KEY_ARN),
                             plaintext=b"Hello World!", aad=CONTEXT_AAD, want_cdiv=True)
    response = await client.encrypt("foo", request)
    assert response.cdiv == cdiv(CONTEXT_AAD, response.ciphertext_metadata, response.iv,
                                 response.ciphertext, response.tag)


async def test_request_metadata_reaches_the_ekm(backend: ExternalBackend,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ekm_sim.requests")
    encrypt_id, decrypt_id = str(uuid.uuid4()), str(uuid.uuid4())
    sealed = await backend.seal(version(), KeySpec.AES_256, b"data", CONTEXT_AAD,
                                call=call("GenerateDataKey", encrypt_id))
    await backend.unseal(version(), KeySpec.AES_256, sealed, CONTEXT_AAD,
                         call=call("Decrypt", decrypt_id))
    records = {r["kmsRequestId"]: r for r in
               (json.loads(rec.getMessage()) for rec in caplog.records
                if rec.name == "ekm_sim.requests")}
    assert records[encrypt_id] | {"latencyMs": 0, "time": "", "remote": ""} == {
        "kmsRequestId": encrypt_id, "operation": "Encrypt", "kmsOperation": "GenerateDataKey",
        "uriPrefix": PREFIX, "keyId": "foo", "principal": PRINCIPAL,
        "accessKeyId": CRED_A.access_key_id, "outcome": "ok", "status": 200,
        "latencyMs": 0, "time": "", "remote": ""}
    assert records[decrypt_id]["operation"] == "Decrypt"
    assert records[decrypt_id]["kmsOperation"] == "Decrypt"
    assert records[decrypt_id]["principal"] == PRINCIPAL


async def test_health(client: XKSClient) -> None:
    health = await client.health()
    assert health.fleet_size == 1
    assert health.ekm_fleet[0].health_status is HealthStatus.ACTIVE


# -- GetKeyMetadata at CreateKey -----------------------------------------------------------


@pytest.mark.parametrize(("key_id", "reason"), [
    ("encrypt_only_key", "lacks DECRYPT"),
    ("decrypt_only_key", "lacks ENCRYPT"),
    ("impotent_key", "lacks ENCRYPT and DECRYPT (it has none)"),
    ("non_existing_key", "has no such key"),
])
async def test_generate_refuses_unusable_external_keys(backend: ExternalBackend, key_id: str,
                                                       reason: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        await backend.generate(version_id="v", spec=KeySpec.AES_256, external_key_id=key_id,
                               call=call("CreateKey"))
    assert info.value.name == "ExternalKeyId"
    assert reason in info.value.reason and key_id in info.value.reason


async def test_generate_refuses_a_disabled_external_key(sim: Sim,
                                                         backend: ExternalBackend) -> None:
    KeyRegistry(sim.config.registry).set_enabled("foo", False)
    await asyncio.sleep(0.6)  # the simulator re-reads its registry at most every 0.5 s
    with pytest.raises(InvalidParameter, match="DISABLED in the external key manager"):
        await backend.generate(version_id="v", spec=KeySpec.AES_256, external_key_id="foo",
                               call=call("CreateKey"))


@pytest.mark.parametrize(("kwargs", "error", "name"), [
    ({}, InvalidParameter, "ExternalKeyId"),
    ({"external_key_id": "../health"}, InvalidParameter, "ExternalKeyId"),
    # Dot segments: the URL .../keys/../metadata loses them, so the EKM was asked at the
    # wrong path and the instance was marked Disconnected.
    ({"external_key_id": ".."}, InvalidParameter, "ExternalKeyId"),
    ({"external_key_id": "."}, InvalidParameter, "ExternalKeyId"),
    ({"external_key_id": "x" * 129}, InvalidParameter, "ExternalKeyId"),
    ({"external_key_id": "foo", "storage": KeyStorageMechanism.HSM_INTERNAL},
     InvalidParameter, "KeyStorageMechanism"),
    ({"external_key_id": "foo", "spec": KeySpec.RSA_2048}, UnsupportedOperation, None),
])
async def test_generate_checks_its_parameters_before_calling(
        tls_files: TLSFiles, kwargs: dict[str, Any], error: type[Exception],
        name: str | None) -> None:
    # Port 9 (discard) on loopback: nothing listens, so any call would fail differently.
    async with XKSClient(connection("https://127.0.0.1:9", tls_files)) as c:
        with pytest.raises(error) as info:
            await ExternalBackend(c).generate(
                version_id="v", **{"spec": KeySpec.AES_256, **kwargs}, call=call("CreateKey"))
    if name is not None:
        assert getattr(info.value, "name", None) == name


async def test_symmetric_only(backend: ExternalBackend) -> None:
    v, spec = version(), KeySpec.AES_256
    for attempt in (backend.sign(v, spec, "RSA_PSS_SHA_256", b"\0" * 32),
                    backend.verify(v, spec, "RSA_PSS_SHA_256", b"\0" * 32, b""),
                    backend.asymmetric_encrypt(v, spec, "RSAES_OAEP_SHA_256", b"x"),
                    backend.asymmetric_decrypt(v, spec, "RSAES_OAEP_SHA_256", b"x"),
                    backend.public_key_pem(v, spec)):
        with pytest.raises(UnsupportedOperation, match="symmetric only"):
            await attempt


# -- EKM-side state ------------------------------------------------------------------------


async def test_key_disabled_in_the_ekm(sim: Sim, backend: ExternalBackend) -> None:
    sealed = await backend.seal(version(), KeySpec.AES_256, b"data", CONTEXT_AAD, call=call())
    KeyRegistry(sim.config.registry).set_enabled("foo", False)
    await asyncio.sleep(0.6)
    for attempt in (backend.seal(version(), KeySpec.AES_256, b"data", CONTEXT_AAD,
                                 call=call()),
                    backend.unseal(version(), KeySpec.AES_256, sealed, CONTEXT_AAD,
                                   call=call("Decrypt"))):
        with pytest.raises(KeyStateInvalid) as info:
            await attempt
        assert info.value.code == "Rejected.Disabled"
        assert "'foo' is disabled in the external key manager" in str(info.value)
    KeyRegistry(sim.config.registry).set_enabled("foo", True)
    await asyncio.sleep(0.6)
    assert await backend.unseal(version(), KeySpec.AES_256, sealed, CONTEXT_AAD,
                                call=call("Decrypt")) == b"data"


async def test_ekm_rotation_keeps_old_ciphertexts(sim: Sim, backend: ExternalBackend) -> None:
    old = await backend.seal(version(), KeySpec.AES_256, b"before", CONTEXT_AAD, call=call())
    async with PKCS11Pool(sim.config.hsm.pool()) as pool:
        record = await KeyAdmin(pool, KeyRegistry(sim.config.registry)).rotate("foo")
    assert record.versions == (1, 2)
    await asyncio.sleep(0.6)
    new = await backend.seal(version(), KeySpec.AES_256, b"after", CONTEXT_AAD, call=call())
    assert unpack_sealed(new)[1] != unpack_sealed(old)[1]  # the EKM's key version in ctm
    for sealed, plaintext in ((old, b"before"), (new, b"after")):
        assert await backend.unseal(version(), KeySpec.AES_256, sealed, CONTEXT_AAD,
                                    call=call("Decrypt")) == plaintext


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("tamper", [
    "ciphertext", "tag", "iv", "ctm", "aad", "no_aad", "format", "iv_length", "ctm_length",
    "truncated", "empty", "header_only", "no_ciphertext", "drop_ctm", "other_key"])
async def test_tampered_blobs_are_invalid_ciphertext(backend: ExternalBackend,
                                                     tamper: str) -> None:
    sealed = await backend.seal(version(), KeySpec.AES_256, b"secret data", CONTEXT_AAD,
                                call=call())
    iv, ctm, tag, ciphertext = unpack_sealed(sealed)
    assert ctm is not None
    aad, key = CONTEXT_AAD, "foo"
    ctm_at = 2 + len(iv) + 1
    variants = {
        "ciphertext": _flip(sealed, len(sealed) - 1),
        "tag": _flip(sealed, ctm_at + len(ctm)),
        "iv": _flip(sealed, 2),
        "ctm": _flip(sealed, ctm_at + len(ctm) - 1),
        "format": b"\x02" + sealed[1:],
        "iv_length": sealed[:1] + b"\x0d" + sealed[2:],
        "ctm_length": sealed[:ctm_at - 1] + b"\x15" + sealed[ctm_at:],
        "truncated": sealed[:ctm_at + len(ctm) + 16],
        "empty": b"",
        "header_only": sealed[:2],
        "no_ciphertext": pack_sealed(iv, ctm, tag, b""),
        "drop_ctm": pack_sealed(iv, None, tag, ciphertext),
    }
    changed = variants.get(tamper, sealed)
    if tamper == "aad":
        aad = b'{"project":"blue"}'
    elif tamper == "no_aad":
        aad = b""
    elif tamper == "other_key":
        key = "decrypt_only_key"
    with pytest.raises(InvalidCiphertext):
        await backend.unseal(version(key), KeySpec.AES_256, changed, aad, call=call("Decrypt"))


# -- TLS, pinning, credentials -------------------------------------------------------------


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A CA the simulator does not trust, with a client certificate of the allowed name
    and a server certificate for loopback: (ca, cert, key)."""
    other = trustme.CA()
    d = tmp_path_factory.mktemp("stranger")
    leaf = other.issue_cert("kms-front.test", "127.0.0.1")
    other.cert_pem.write_to_path(str(d / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(d / "key.pem"))
    return d / "ca.pem", d / "cert.pem", d / "key.pem"


async def test_client_certificate_from_another_ca_is_refused(
        sim: Sim, tls_files: TLSFiles, stranger: tuple[Path, Path, Path]) -> None:
    _, cert, key = stranger
    async with XKSClient(connection(sim.url, tls_files, client_cert=cert,
                                    client_key=key)) as c:
        with pytest.raises(XKSUnavailable, match="client certificate") as info:
            await c.health()
        # The server refuses it after the client's side of the TLS 1.3 handshake is done:
        # an alert the client can read, or (usually, with asyncio servers) a reset.
        assert info.value.kind in (UnavailableKind.TLS, UnavailableKind.CONNECTION_LOST)
        with pytest.raises(DependencyUnavailable, match="unreachable"):
            await ExternalBackend(c).seal(version(), KeySpec.AES_256, b"x", b"", call=call())


async def test_client_certificate_with_another_name_is_refused(
        sim: Sim, tls_files: TLSFiles, ca: trustme.CA, tmp_path: Path) -> None:
    leaf = ca.issue_cert("someone-else.test")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    async with XKSClient(connection(sim.url, tls_files, client_cert=tmp_path / "c.pem",
                                    client_key=tmp_path / "k.pem")) as c:
        with pytest.raises(XKSRejected) as info:
            await c.health()
        assert info.value.error.name is ErrorName.AUTHENTICATION_FAILED


async def test_untrusted_server_is_refused(sim: Sim, tls_files: TLSFiles,
                                           stranger: tuple[Path, Path, Path]) -> None:
    other_ca, _, _ = stranger
    async with XKSClient(connection(sim.url, tls_files, ca=other_ca)) as c:
        with pytest.raises(XKSUnavailable, match="not trusted") as info:
            await c.health()
    assert info.value.kind is UnavailableKind.TLS


async def test_pinned_fingerprint(sim: Sim, tls_files: TLSFiles,
                                  stranger: tuple[Path, Path, Path]) -> None:
    right = fingerprint(tls_files.server_cert)
    # The right pin works, with the client certificate presented (the simulator requires it).
    async with XKSClient(connection(sim.url, tls_files,
                                    server_fingerprint_sha256=right)) as c:
        backend = ExternalBackend(c)
        sealed = await backend.seal(version(), KeySpec.AES_256, b"x", b"", call=call())
        assert await backend.unseal(version(), KeySpec.AES_256, sealed, b"",
                                    call=call("Decrypt")) == b"x"
    # A wrong pin is refused even though the chain is valid.
    wrong = right.replace(right[:2], "00" if right[:2] != "00" else "11", 1)
    async with XKSClient(connection(sim.url, tls_files,
                                    server_fingerprint_sha256=wrong.lower())) as c:
        with pytest.raises(XKSUnavailable, match="pinned") as info:
            await c.health()
        assert info.value.kind is UnavailableKind.PIN
        with pytest.raises(DependencyUnavailable, match="pinned"):
            await ExternalBackend(c).seal(version(), KeySpec.AES_256, b"x", b"", call=call())
    # The pin does not replace chain verification: the right pin with an untrusted CA fails.
    async with XKSClient(connection(sim.url, tls_files, ca=stranger[0],
                                    server_fingerprint_sha256=right)) as c:
        with pytest.raises(XKSUnavailable, match="not trusted"):
            await c.health()


@pytest.mark.parametrize("value", ["abc", "zz" * 32, "00" * 31, "00" * 33])
def test_bad_pins_are_refused_at_configuration(tls_files: TLSFiles, value: str) -> None:
    with pytest.raises(ValueError, match="server_fingerprint_sha256"):
        connection("https://127.0.0.1:1", tls_files, server_fingerprint_sha256=value)


@pytest.mark.parametrize(("field", "value"), [
    ("endpoint", "http://127.0.0.1:1"), ("endpoint", "https://host/path"),
    ("endpoint", "https://"), ("uri_prefix", "bad prefix!"), ("credentials", ()),
    ("timeout", 0)])
def test_bad_connections_are_refused_at_configuration(tls_files: TLSFiles, field: str,
                                                      value: Any) -> None:
    overrides = {field: value}
    url = overrides.pop("endpoint", "https://127.0.0.1:1")
    with pytest.raises(ValueError, match=field):
        connection(url, tls_files, **overrides)


async def test_rotated_credential_is_tried_and_kept(sim: Sim, tls_files: TLSFiles,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ekm_sim.requests")
    retired = Credential("RETIREDRETIREDRETIRED234", "cmV0aXJlZC1zZWNyZXQtMDAwMDAwMDAwMDAwMDAwMA==")
    async with XKSClient(connection(sim.url, tls_files, credentials=(retired, CRED_A))) as c:
        await c.health()
        await c.health()

    def used() -> list[tuple[str | None, int]]:
        return [(r["accessKeyId"], r["status"]) for r in
                (json.loads(rec.getMessage()) for rec in caplog.records
                 if rec.name == "ekm_sim.requests")]

    # The first call falls back once; the second starts with the credential that worked.
    assert used() == [(None, 401), (CRED_A.access_key_id, 200), (CRED_A.access_key_id, 200)]
    assert CRED_A.secret_access_key not in caplog.text


def test_every_xks_error_has_a_core_error() -> None:
    assert set(_REJECTIONS) == set(ErrorName)


# -- a misbehaving proxy ---------------------------------------------------------------------


@pytest.fixture
async def fake_proxy(tls_files: TLSFiles) -> AsyncIterator[FakeProxy]:
    """Start TLS servers (client certificates required) that answer every POST with the
    given JSON body; each start returns the server's URL."""
    servers: list[TestServer] = []
    ctx = server_context(cert=tls_files.server_cert, key=tls_files.server_key,
                         client_ca=tls_files.ca, require_client_cert=True)

    async def start(answer: dict[str, Any]) -> str:
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(answer)

        app = web.Application()
        app.router.add_post("/{tail:.*}", handler)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server(ssl=ctx)
        servers.append(server)
        return f"https://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        await server.close()


_GOOD = {"ciphertext": b64(b"abcd"), "initializationVector": b64(b"\0" * 12),
         "authenticationTag": b64(b"\0" * 16), "ciphertextMetadata": b64(b"\x01\0\0\0\x01")}


@pytest.mark.parametrize(("answer", "message"), [
    ({**_GOOD, "ciphertextDataIntegrityValue": b64(b"\0" * 32)}, "integrity check"),
    (_GOOD, "lacks the requested ciphertextDataIntegrityValue"),
    ({**_GOOD, "ciphertext": b64(b"abcdef")}, "wrong length"),
    ({**_GOOD, "authenticationTag": b64(b"\0" * 12)}, "unreadable"),
])
async def test_bad_encrypt_responses_are_refused(fake_proxy: FakeProxy, tls_files: TLSFiles,
                                                 answer: dict[str, Any], message: str) -> None:
    url = await fake_proxy(answer)
    async with XKSClient(connection(url, tls_files)) as c:
        request = EncryptRequest(metadata=RequestMetadata("r", "Encrypt", PRINCIPAL, KEY_ARN),
                                 plaintext=b"data", want_cdiv=True)
        with pytest.raises(XKSInvalidResponse, match=message):
            await c.encrypt("foo", request)
        with pytest.raises(DependencyUnavailable, match="invalid response"):
            await ExternalBackend(c).seal(version(), KeySpec.AES_256, b"data", b"",
                                          call=call())


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_answer_over_a_mebibyte_is_refused(tls_files: TLSFiles,
                                                    framing: str) -> None:
    """A proxy that sends megabytes within the budget must not make the front hold them."""
    huge = b'{"ciphertext": "' + b"A" * (2 << 20) + b'"}'

    async def handler(request: web.Request) -> web.StreamResponse:
        if framing == "content-length":
            return web.Response(body=huge, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(huge), 256 << 10):
            await response.write(huge[start:start + (256 << 10)])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server(ssl=server_context(
        cert=tls_files.server_cert, key=tls_files.server_key, client_ca=tls_files.ca,
        require_client_cert=True))
    try:
        budget = dataclasses.replace(connection(f"https://127.0.0.1:{server.port}",
                                                tls_files), timeout=5)
        async with XKSClient(budget) as c:
            request = EncryptRequest(metadata=RequestMetadata("r", "Encrypt", PRINCIPAL,
                                                              KEY_ARN), plaintext=b"data")
            with pytest.raises(XKSInvalidResponse, match=str(MAX_RESPONSE_BYTES)):
                await c.encrypt("foo", request)
    finally:
        await server.close()


# -- keep-alive connections the proxy drops ------------------------------------------------

_HEALTH = json.dumps({"xksProxyFleetSize": 1, "xksProxyVendor": "v", "xksProxyModel": "m",
                      "ekmVendor": "e", "ekmFleetDetails": [
                          {"id": "h1", "model": "m", "healthStatus": "ACTIVE"}]}).encode()


async def _read_request(reader: asyncio.StreamReader) -> None:
    """Read one HTTP/1.1 request with a Content-Length body (what the client sends)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)


class _DroppingProxy:
    """A raw TLS HTTP/1.1 server that answers at most ``answers`` requests per connection and
    then closes the connection when the next request arrives, without answering it: what a
    client sees when it reuses a keep-alive connection the server has just timed out."""

    def __init__(self, answers: int) -> None:
        self.answers = answers
        self.requests = 0
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = 0
        try:
            while True:
                await _read_request(reader)
                self.requests += 1
                if answered == self.answers:
                    break
                answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(_HEALTH), _HEALTH))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def dropping_proxy(tls_files: TLSFiles) -> AsyncIterator[Callable[[int], Awaitable[
        tuple[str, _DroppingProxy]]]]:
    ctx = server_context(cert=tls_files.server_cert, key=tls_files.server_key,
                         client_ca=tls_files.ca, require_client_cert=True)
    servers: list[asyncio.Server] = []

    async def start(answers: int) -> tuple[str, _DroppingProxy]:
        proxy = _DroppingProxy(answers)
        server = await asyncio.start_server(proxy.serve, "127.0.0.1", 0, ssl=ctx)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"https://127.0.0.1:{port}", proxy

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_a_pooled_connection_the_proxy_dropped_is_retried_once(
        dropping_proxy: Callable[[int], Awaitable[tuple[str, _DroppingProxy]]],
        tls_files: TLSFiles) -> None:
    url, proxy = await dropping_proxy(1)
    async with XKSClient(connection(url, tls_files)) as c:
        assert (await c.health()).fleet_size == 1  # a fresh connection, answered
        # The pooled connection is dropped on the next request: one retry, on a new one.
        assert (await c.health()).fleet_size == 1
    assert (proxy.connections, proxy.requests) == (2, 3)


async def test_a_fresh_connection_the_proxy_dropped_is_not_retried(
        dropping_proxy: Callable[[int], Awaitable[tuple[str, _DroppingProxy]]],
        tls_files: TLSFiles) -> None:
    url, proxy = await dropping_proxy(0)
    async with XKSClient(connection(url, tls_files)) as c:
        with pytest.raises(XKSUnavailable) as caught:
            await c.health()
    assert caught.value.kind is UnavailableKind.CONNECTION_LOST
    assert (proxy.connections, proxy.requests) == (1, 1)


# -- an EKM that hangs, stops and comes back (a real subprocess) ----------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    # The dev stack has its own token directory; the in-process tests' one must not leak in.
    return {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}


async def _dev(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ekm_sim.cli", "dev", *args, env=_env(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await process.communicate()
    assert process.returncode == 0, err.decode()


@pytest.fixture(scope="module")
def ekm_workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A ``dev up`` simulator on a fixed port (kept across restarts by its config)."""
    import subprocess

    workdir = tmp_path_factory.mktemp("ekm")
    command = [sys.executable, "-m", "ekm_sim.cli", "dev"]
    subprocess.run([*command, "up", "--workdir", str(workdir), "--port", str(_free_port())],
                   env=_env(), check=True, capture_output=True, timeout=120)
    try:
        yield workdir
    finally:
        subprocess.run([*command, "down", "--workdir", str(workdir)], env=_env(),
                       check=False, capture_output=True, timeout=60)


def _info(workdir: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads((workdir / "ekm.json").read_text())
    return info


def _dev_connection(info: dict[str, Any], **overrides: Any) -> XKSConnection:
    values: dict[str, Any] = dict(
        endpoint=info["url"], uri_prefix=info["uri_prefix"], region=info["region"],
        credentials=(Credential(info["access_key_id"], info["secret_access_key"]),),
        ca=Path(info["ca"]), client_cert=Path(info["client_cert"]),
        client_key=Path(info["client_key"]))
    values.update(overrides)
    return XKSConnection(**values)  # the default 250 ms budget


async def _until(probe: HealthProbe, state: ConnectionState, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while probe.status is not state:
        assert time.monotonic() < deadline, f"still {probe.status}: {probe.last_error}"
        await asyncio.sleep(0.05)


async def test_ekm_that_hangs_times_out_within_the_budget(ekm_workdir: Path) -> None:
    info = _info(ekm_workdir)
    async with XKSClient(_dev_connection(info)) as c:
        backend = ExternalBackend(c)
        sealed = await backend.seal(version(), KeySpec.AES_256, b"x", b"", call=call())
        budget = c.timeout
        os.kill(info["pid"], signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(DependencyUnavailable, match="did not answer within 250 ms"):
                await backend.unseal(version(), KeySpec.AES_256, sealed, b"",
                                     call=call("Decrypt"))
            elapsed = time.monotonic() - started
        finally:
            os.kill(info["pid"], signal.SIGCONT)
        assert budget <= elapsed < 2 * budget + 0.1
        assert await backend.unseal(version(), KeySpec.AES_256, sealed, b"",
                                    call=call("Decrypt")) == b"x"


async def test_ekm_stopped_and_restarted(ekm_workdir: Path) -> None:
    info = _info(ekm_workdir)
    async with XKSClient(_dev_connection(info)) as c, \
            HealthProbe(c, interval=0.1) as probe:
        assert probe.status is ConnectionState.CONNECTED
        backend = ExternalBackend(c)
        sealed = await backend.seal(version(), KeySpec.AES_256, b"kept", CONTEXT_AAD,
                                    call=call())

        await _dev("down", "--workdir", str(ekm_workdir))
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable) as info_exc:
            await backend.seal(version(), KeySpec.AES_256, b"x", b"", call=call())
        elapsed = time.monotonic() - started
        assert elapsed < 2 * c.timeout + 0.1
        assert "external key manager is unreachable" in str(info_exc.value)
        assert info_exc.value.backend == "external"
        await _until(probe, ConnectionState.DISCONNECTED)
        assert probe.last_error and "cannot connect" in probe.last_error

        await _dev("up", "--workdir", str(ekm_workdir))
        assert _info(ekm_workdir)["url"] == info["url"]  # same port: the client needs no change
        await _until(probe, ConnectionState.CONNECTED)
        assert probe.last_error is None
        assert await backend.unseal(version(), KeySpec.AES_256, sealed, CONTEXT_AAD,
                                    call=call("Decrypt")) == b"kept"


async def test_calls_tell_the_probe_what_they_learnt(client: XKSClient) -> None:
    """Between probes, each call's outcome moves the instance's state: unreachable or slow
    is Disconnected, any answer is Connected, a broken answer leaves it as it was."""
    probe = HealthProbe(client, interval=60)
    assert probe.status is ConnectionState.DISCONNECTED  # not probed yet
    probe.observe(None)
    assert (probe.status, probe.last_error) == (ConnectionState.CONNECTED, None)
    probe.observe(XKSInvalidResponse("unreadable"))
    assert probe.status is ConnectionState.CONNECTED
    probe.observe(XKSUnavailable("connection refused", kind=UnavailableKind.CONNECT))
    assert probe.status is ConnectionState.DISCONNECTED
    assert probe.last_error == "connection refused"
    probe.observe(XKSInvalidResponse("unreadable"))
    assert probe.status is ConnectionState.DISCONNECTED
    probe.observe(XKSRejected(XKSError(ErrorName.KEY_NOT_FOUND)))
    assert probe.status is ConnectionState.CONNECTED
    # Refusals of the link itself are what the probe's own check calls Disconnected.
    for name in (ErrorName.AUTHENTICATION_FAILED, ErrorName.INTERNAL,
                 ErrorName.DEPENDENCY_TIMEOUT, ErrorName.INVALID_URI_PATH):
        probe.observe(None)
        probe.observe(XKSRejected(XKSError(name)))
        assert probe.status is ConnectionState.DISCONNECTED, name
    # Key-level refusals say the link works; throttling says nothing.
    for name in (ErrorName.VALIDATION, ErrorName.INVALID_STATE, ErrorName.INVALID_CIPHERTEXT,
                 ErrorName.INVALID_KEY_USAGE, ErrorName.ACCESS_DENIED,
                 ErrorName.UNSUPPORTED_OPERATION):
        probe.observe(XKSUnavailable("down", kind=UnavailableKind.TIMEOUT))
        probe.observe(XKSRejected(XKSError(name)))
        assert probe.status is ConnectionState.CONNECTED, name
    probe.observe(XKSRejected(XKSError(ErrorName.THROTTLING)))
    assert probe.status is ConnectionState.CONNECTED
    probe.observe(XKSUnavailable("down", kind=UnavailableKind.TIMEOUT))
    probe.observe(XKSRejected(XKSError(ErrorName.THROTTLING)))
    assert probe.status is ConnectionState.DISCONNECTED


async def test_health_probe_reports_every_ekm_unavailable(
        start_sim: StartSim, make_config: Callable[..., Config], tls_files: TLSFiles) -> None:
    from ekm_sim.config import HealthConfig

    sim = await start_sim(make_config(health=HealthConfig(test_key="missing", cache_seconds=0)),
                          provision_keys=False)
    async with XKSClient(connection(sim.url, tls_files)) as c:
        probe = HealthProbe(c, interval=60)
        assert await probe.check() is ConnectionState.DISCONNECTED
        assert probe.last_error is not None and "UNAVAILABLE" in probe.last_error


# -- a proxy that misbehaves ---------------------------------------------------------------


async def _raw_proxy(tls_files: TLSFiles, answer: Callable[[int], bytes], *,
                     repeat_after: float | None = None
                     ) -> tuple[asyncio.Server, str, list[int]]:
    """A raw TLS HTTP/1.1 server: the n-th request gets ``answer(n)`` (a whole response);
    with ``repeat_after`` it sends that response again on the idle connection later."""
    ctx = server_context(cert=tls_files.server_cert, key=tls_files.server_key,
                         client_ca=tls_files.ca, require_client_cert=True)
    served: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await _read_request(reader)
                served.append(len(served) + 1)
                response = answer(served[-1])
                writer.write(response)
                await writer.drain()
                if repeat_after is not None:
                    await asyncio.sleep(repeat_after)
                    writer.write(response)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    return server, f"https://127.0.0.1:{port}", served


def _health_answer(fleet_size: object, *, extra_headers: bytes = b"",
                   body: bytes | None = None) -> bytes:
    if body is None:
        body = json.dumps({"xksProxyFleetSize": fleet_size, "xksProxyVendor": "v",
                           "xksProxyModel": "m", "ekmVendor": "e", "ekmFleetDetails": [
                               {"id": "h1", "model": "m", "healthStatus": "ACTIVE"}]}).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra_headers
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def test_an_answer_sent_twice_never_becomes_the_next_callers(tls_files: TLSFiles) -> None:
    """The proxy repeats its answer on the idle keep-alive connection: the next call must
    not read it as its own (it could be another caller's plaintext)."""
    server, url, served = await _raw_proxy(tls_files, lambda n: _health_answer(n),
                                           repeat_after=0.02)
    try:
        async with XKSClient(connection(url, tls_files)) as c:
            assert (await c.health()).fleet_size == 1
            await asyncio.sleep(0.1)  # The repeat arrives while the connection is idle.
            assert (await c.health()).fleet_size == 2
    finally:
        server.close()
    assert served == [1, 2]


@pytest.mark.parametrize("case", ["gzip", "nested", "infinity", "fleet-0", "fleet-text"])
async def test_answers_that_break_the_protocol_are_invalid_not_crashes(
        tls_files: TLSFiles, case: str) -> None:
    answers = {
        "gzip": _health_answer(None, extra_headers=b"Content-Encoding: gzip\r\n",
                               body=gzip.compress(_health_answer(1).split(b"\r\n\r\n")[1])),
        "nested": _health_answer(None, body=b"[" * 100_000 + b"]" * 100_000),
        "infinity": _health_answer(None, body=_health_answer(1).split(b"\r\n\r\n")[1]
                                   .replace(b'"xksProxyFleetSize": 1',
                                            b'"xksProxyFleetSize": Infinity')),
        "fleet-0": _health_answer(0),
        "fleet-text": _health_answer("3"),
    }
    server, url, _ = await _raw_proxy(tls_files, lambda n: answers[case])
    try:
        async with XKSClient(connection(url, tls_files)) as c:
            with pytest.raises(XKSInvalidResponse):
                await c.health()
            probe = HealthProbe(c, interval=60)
            async with probe:
                assert probe.status is ConnectionState.DISCONNECTED
    finally:
        server.close()


async def test_a_plain_http_endpoint_is_a_typed_tls_failure(tls_files: TLSFiles) -> None:
    app = web.Application()
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()  # No TLS.
    try:
        async with XKSClient(connection(f"https://127.0.0.1:{server.port}", tls_files)) as c:
            with pytest.raises(XKSUnavailable) as caught:
                await c.health()
            assert caught.value.kind in (UnavailableKind.TLS, UnavailableKind.CONNECTION_LOST)
    finally:
        await server.close()


async def test_the_proxys_text_reaches_callers_bounded_and_printable(
        tls_files: TLSFiles) -> None:
    odd = "AES\r\n\x1b[31mINJECTED" + "x" * 3000
    body = json.dumps({"keySpec": odd, "keyUsage": ["ENCRYPT", "DECRYPT"],
                       "keyStatus": "ENABLED"}).encode()
    server, url, _ = await _raw_proxy(tls_files, lambda n: _health_answer(None, body=body))
    try:
        async with XKSClient(connection(url, tls_files)) as c:
            with pytest.raises(InvalidParameter) as caught:
                await ExternalBackend(c).generate(version_id="v", spec=KeySpec.AES_256,
                                                  external_key_id="foo", call=call())
    finally:
        server.close()
    message = str(caught.value)
    assert all(" " <= ch <= "~" for ch in message), message
    assert len(message) < 400 and "INJECTED" in message


async def test_a_connection_whose_caller_gave_up_still_joins_the_pool(
        tls_files: TLSFiles) -> None:
    """The handshake outlasts the first caller's budget (the server accepts late); the
    connection is finished anyway and the next call uses it, so a stall under load does
    not leave the pool empty."""
    ctx = server_context(cert=tls_files.server_cert, key=tls_files.server_key,
                         client_ca=tls_files.ca, require_client_cert=True)
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                await _read_request(reader)
                writer.write(_health_answer(1))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    # Listening but not accepting yet: the kernel completes TCP and keeps the ClientHello.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    url = f"https://127.0.0.1:{listener.getsockname()[1]}"
    loop = asyncio.get_running_loop()
    accepted = 0
    serving: list[asyncio.Future[None]] = []

    async def accept_all() -> None:
        nonlocal accepted
        while True:
            sock, _ = await loop.sock_accept(listener)
            accepted += 1
            reader = asyncio.StreamReader()
            protocol = asyncio.StreamReaderProtocol(reader)
            try:
                transport, _ = await loop.connect_accepted_socket(
                    lambda made=protocol: made, sock, ssl=ctx)
            except (ssl.SSLError, ConnectionError, OSError):
                continue  # A client that left in the middle of its handshake.
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            serving.append(asyncio.ensure_future(serve(reader, writer)))

    acceptor: asyncio.Task[None] | None = None
    try:
        async with XKSClient(connection(url, tls_files, timeout=0.25)) as c:
            with pytest.raises(XKSUnavailable):
                await c.health()
            # Accepting now completes the handshake the first caller gave up on.
            acceptor = asyncio.ensure_future(accept_all())
            await asyncio.sleep(0.3)
            assert (await c.health()).fleet_size == 1
    finally:
        for task in (acceptor, *serving):
            if task is not None:
                task.cancel()
        listener.close()
    assert (accepted, connections) == (1, 1)
