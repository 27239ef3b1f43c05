"""Real parts for every test: a SoftHSM2 token per test, trustme TLS, signed requests.

SoftHSM reads SOFTHSM2_CONF once per process, so one token directory serves the session and
each test gets its own token label inside it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import ClientSession, TCPConnector, web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

from ekm_sim.admin import KeyAdmin, KeyUsage, init_token, write_softhsm_conf
from ekm_sim.app import create_app
from ekm_sim.config import (
    Config,
    HealthConfig,
    HSMConfig,
    LimitsConfig,
    ServerConfig,
    StoreConfig,
    TLSConfig,
)
from ekm_sim.registry import KeyRegistry
from shared.pkcs11pool import DispatchMode, PKCS11Pool
from shared.sigv4 import Credential, sign_request

PREFIX = "example/uri/path/prefix"
REGION = "us-east-1"
CRED_A = Credential("BETWEEN2TENAND3TENCHARACTERS", "PleaseReplaceThisWithSomeSecretOfLength43To64")
CRED_B = Credential("AKIDSECONDSETAKIDSECOND2", "c2Vjb25kLXNlY3JldC1mb3ItdGVzdHMtb25seS0wMDAwMA==")
ALLOWED_CLIENT = "kms-front.test"
PRINCIPAL = "arn:aws:iam::123456789012:user/Alice"
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"

if shutil.which("softhsm2-util") is None:  # pragma: no cover - .ci/run installs it.
    pytest.exit("softhsm2-util is missing: run the README's test command (installs softhsm2)", 2)


@pytest.fixture(scope="session")
def softhsm_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("softhsm")
    conf = base / "softhsm2.conf"
    write_softhsm_conf(base / "tokens", conf)
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return conf


@pytest.fixture
def hsm_config(softhsm_conf: Path) -> HSMConfig:
    config = HSMConfig(token_label=f"t-{uuid.uuid4().hex[:12]}", user_pin="1234-user",
                       so_pin="5678-so", softhsm_conf=softhsm_conf)
    init_token(config)
    return config


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("127.0.0.1", "localhost")


class ServedTestServer(TestServer):
    """aiohttp's test server, run as ``shared.serving`` runs an app: a handler is not
    cancelled when its client goes away (the test server would cancel it), so the code
    path of a client that leaves mid-request is the served one; bodies are not decoded."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        kwargs["handler_cancellation"] = False
        kwargs["auto_decompress"] = False
        return await super()._make_runner(**kwargs)


@dataclass
class TLSFiles:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # allowed subject
    client_key: Path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA,
              server_cert: trustme.LeafCert) -> TLSFiles:
    d = tmp_path_factory.mktemp("tls")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server_cert.private_key_pem.write_to_path(str(d / "server-key.pem"))
    server_cert.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    client = ca.issue_cert(ALLOWED_CLIENT)
    client.private_key_pem.write_to_path(str(d / "client-key.pem"))
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    return TLSFiles(d, d / "ca.pem", d / "server.pem", d / "server-key.pem", d / "client.pem",
                    d / "client-key.pem")


def store(**overrides: Any) -> StoreConfig:
    base = StoreConfig(uri_prefix=PREFIX, region=REGION, credentials=(CRED_A, CRED_B))
    return replace(base, **overrides)


@pytest.fixture
def make_config(tmp_path: Path, hsm_config: HSMConfig, tls_files: TLSFiles
                ) -> Callable[..., Config]:
    def build(*, stores: tuple[StoreConfig, ...] | None = None, mtls: bool = True,
              tls: bool = True, hsm: HSMConfig | None = None, **sections: Any) -> Config:
        tls_config = TLSConfig(enabled=False)
        if tls:
            tls_config = TLSConfig(enabled=True, cert=tls_files.server_cert,
                                   key=tls_files.server_key, client_ca=tls_files.ca,
                                   require_client_cert=mtls,
                                   allowed_client_names=(ALLOWED_CLIENT,) if mtls else ())
        return Config(stores=stores or (store(),), registry=tmp_path / "keys.json",
                      server=sections.get("server", ServerConfig()), tls=tls_config,
                      hsm=hsm or hsm_config, limits=sections.get("limits", LimitsConfig()),
                      health=sections.get("health", HealthConfig()))

    return build


DEMO_KEYS = {"foo": KeyUsage(True, True), "encrypt_only_key": KeyUsage(True, False),
             "decrypt_only_key": KeyUsage(False, True), "impotent_key": KeyUsage(False, False)}


async def provision(config: Config, keys: dict[str, KeyUsage] = DEMO_KEYS) -> None:
    """Create the health key and demo keys in the config's token and registry."""
    async with PKCS11Pool(config.hsm.pool()) as pool:
        admin = KeyAdmin(pool, KeyRegistry(config.registry))
        await admin.ensure_test_key(config.health.test_key)
        for key_id, usage in keys.items():
            await admin.create(key_id, usage)


def server_ssl(config: Config) -> ssl.SSLContext | None:
    from shared.tls import server_context

    if not config.tls.enabled:
        return None
    assert config.tls.cert and config.tls.key
    return server_context(cert=config.tls.cert, key=config.tls.key,
                          client_ca=config.tls.client_ca,
                          require_client_cert=config.tls.require_client_cert)


def client_ssl(tls_files: TLSFiles, *, cert: tuple[Path, Path] | None = None,
               with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(tls_files.ca))
    if with_cert:
        cert_path, key_path = cert or (tls_files.client_cert, tls_files.client_key)
        ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


def metadata(operation: str = "Encrypt", **extra: Any) -> dict[str, Any]:
    return {"awsPrincipalArn": PRINCIPAL, "kmsKeyArn": KEY_ARN, "kmsOperation": operation,
            "kmsRequestId": str(uuid.uuid4()), **extra}


@dataclass
class Sim:
    """A running simulator and a client that signs like KMS does."""

    url: str
    host: str
    config: Config
    session: ClientSession
    app: web.Application
    calls: list[str] = field(default_factory=list)

    async def call(self, api: str, body: Any = None, *, cred: Credential = CRED_A,
                   prefix: str = PREFIX, method: str = "POST", region: str = REGION,
                   raw: bytes | None = None, headers: dict[str, str] | None = None,
                   sign: bool = True) -> tuple[int, dict[str, Any]]:
        """POST (by default) a signed JSON body to ``/<prefix>/kms/xks/v1/<api>``."""
        path = f"/{prefix}/kms/xks/v1/{api}" if prefix else f"/kms/xks/v1/{api}"
        data = raw if raw is not None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if sign:
            hdrs = sign_request(method=method, url=f"{self.url}{path}", body=data, headers=hdrs,
                                credential=cred, region=region, service="kms-xks-proxy")
        async with self.session.request(method, f"{self.url}{path}", data=data,
                                        headers=hdrs) as resp:
            text = await resp.read()
            assert resp.headers.get("Content-Type", "").startswith("application/json"), text
            assert b"\n" not in text.rstrip(b"\n"), "XKS bodies must be single-line JSON"
            return resp.status, json.loads(text)

    async def encrypt(self, key_id: str, plaintext: bytes, aad: bytes | None = None, *,
                      cdiv: bool = False, **kw: Any) -> tuple[int, dict[str, Any]]:
        from shared.xks import b64

        body: dict[str, Any] = {"requestMetadata": metadata("Encrypt"),
                                "plaintext": b64(plaintext), "encryptionAlgorithm": "AES_GCM"}
        if aad is not None:
            body["additionalAuthenticatedData"] = b64(aad)
        if cdiv:
            body["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256"
        return await self.call(f"keys/{key_id}/encrypt", body, **kw)

    async def decrypt(self, key_id: str, sealed: dict[str, Any], aad: bytes | None = None,
                      **kw: Any) -> tuple[int, dict[str, Any]]:
        from shared.xks import b64

        body: dict[str, Any] = {
            "requestMetadata": metadata("Decrypt"), "encryptionAlgorithm": "AES_GCM",
            **{k: sealed[k] for k in ("ciphertext", "initializationVector",
                                      "authenticationTag", "ciphertextMetadata") if k in sealed},
        }
        if aad is not None:
            body["additionalAuthenticatedData"] = b64(aad)
        return await self.call(f"keys/{key_id}/decrypt", body, **kw)


StartSim = Callable[..., Awaitable[Sim]]


@pytest.fixture
async def start_sim(tls_files: TLSFiles) -> AsyncIterator[StartSim]:
    """Start simulators over real TLS on loopback; all are stopped at the end of the test."""
    servers: list[TestServer] = []
    sessions: list[ClientSession] = []

    async def start(config: Config, *, provision_keys: bool = True,
                    client_cert: tuple[Path, Path] | None = None) -> Sim:
        if provision_keys:
            await provision(config)
        app = create_app(config)
        server = ServedTestServer(app, host="127.0.0.1", port=0)
        await server.start_server(ssl=server_ssl(config))
        servers.append(server)
        ctx = client_ssl(tls_files, cert=client_cert) if config.tls.enabled else None
        session = ClientSession(connector=TCPConnector(ssl=ctx if ctx else False))
        sessions.append(session)
        scheme = "https" if config.tls.enabled else "http"
        return Sim(url=f"{scheme}://127.0.0.1:{server.port}", host=f"127.0.0.1:{server.port}",
                   config=config, session=session, app=app)

    yield start
    for session in sessions:
        await session.close()
    for server in servers:
        await server.close()


@pytest.fixture
async def sim(start_sim: StartSim, make_config: Callable[..., Config]) -> Sim:
    """The default simulator: mTLS with an allowed client certificate, the demo keys."""
    return await start_sim(make_config())


@pytest.fixture
def threads_mode(hsm_config: HSMConfig) -> Iterator[HSMConfig]:
    yield replace(hsm_config, mode=DispatchMode.THREADS, workers=2)


async def leave_mid_body(host: str, port: int, context: ssl.SSLContext, head: bytes,
                         caplog: pytest.LogCaptureFixture) -> None:
    """Send ``head`` (a request's headers and the start of its body), close the connection,
    and wait until the server has logged that the client left; it must log no error."""
    caplog.set_level(logging.INFO)
    _, writer = await asyncio.open_connection(host, port, ssl=context)
    writer.write(head)
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    for _ in range(50):
        if any("disconnected" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.05)
    assert any("disconnected" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def stall_mid_body(host: str, port: int, context: ssl.SSLContext,
                         head: bytes) -> tuple[bytes, dict[str, Any]]:
    """Send ``head`` (headers and the start of a body), then nothing: the server's answer
    (it must come), as the status line and the JSON body."""
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        writer.write(head)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), timeout=5)
    finally:
        writer.close()
    status_head, _, body = answer.partition(b"\r\n\r\n")
    parsed: dict[str, Any] = json.loads(body)
    return status_head, parsed
