"""The KMS front in-process over real TLS, driven by the official Alibaba Cloud SDK.

Every test gets its own database, audit log, root key and port. The SDK's sync calls block,
so they run in a thread (``asyncio.to_thread``) while the server runs on the test's loop.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, TCPConnector, web
from aiohttp.test_utils import TestServer
from alibabacloud_kms20160120.client import Client
from alibabacloud_tea_openapi import models as open_api_models
from alibabacloud_tea_openapi.exceptions import ClientException
from darabonba.runtime import RuntimeOptions
from yarl import URL

from kms_proxy.app import create_app
from kms_proxy.config import AccessKeyConfig, AccountConfig, Config, InstanceConfig, ServerConfig
from kms_proxy.core.model import InstanceType
from shared.tls import client_context, server_context
from tests.conftest import ServedTestServer, TLSFiles

REGION = "cn-hangzhou"
ACCOUNT_A = "1234567890123456"
ACCOUNT_B = "9876543210987654"
INSTANCE_A = "kst-hzzinstancea0001"
INSTANCE_B = "kst-hzzinstanceb0001"
# Two access keys (two users) for account A, one for account B.
AK_A1 = AccessKeyConfig("LTAI5tAliceIntegration01", "alice/Secret+with=odd~chars-01", "alice")
AK_A2 = AccessKeyConfig("LTAI5tCarolIntegration02", "carol-secret-0000000000000002", "carol")
AK_B1 = AccessKeyConfig("LTAI5tBobIntegration0003", "bob-secret-000000000000000003", "bob")
ACCESS_KEYS = {"a1": AK_A1, "a2": AK_A2, "b1": AK_B1}
SIGNATURES = ("v3", "v2")
TABLES = ("keys", "key_versions", "aliases", "tags")


def build_config(directory: Path, tls_files: TLSFiles, **overrides: Any) -> Config:
    values: dict[str, Any] = dict(
        region=REGION, regions=(REGION, "cn-shanghai"),
        database=directory / "kms.db", root_key=os.urandom(32),
        audit_log=directory / "audit.log", audit_chain_key=os.urandom(32),
        accounts=(AccountConfig(ACCOUNT_A, (AK_A1, AK_A2)), AccountConfig(ACCOUNT_B, (AK_B1,))),
        instances=(
            InstanceConfig(INSTANCE_A, ACCOUNT_A, InstanceType.SOFTWARE, "software-a", 100000),
            InstanceConfig(INSTANCE_B, ACCOUNT_B, InstanceType.SOFTWARE, "software-b", 100000),
        ),
        default_instance={ACCOUNT_A: INSTANCE_A, ACCOUNT_B: INSTANCE_B},
        server=ServerConfig(host="127.0.0.1", port=0, tls=True, cert=tls_files.server_cert,
                            key=tls_files.server_key),
    )
    values.update(overrides)
    return Config(**values)


def sdk_client(port: int, ca: Path, access_key: AccessKeyConfig, signature: str,
               *, secret: str | None = None, access_key_id: str | None = None) -> Client:
    config = open_api_models.Config(
        access_key_id=access_key_id or access_key.id,
        access_key_secret=secret or access_key.secret,
        endpoint=f"127.0.0.1:{port}", protocol="https", ca=str(ca), region_id=REGION)
    if signature == "v2":
        config.signature_algorithm = "v2"
    return Client(config)


def generic_params(action: str) -> open_api_models.Params:
    return open_api_models.Params(
        action=action, version="2016-01-20", protocol="HTTPS", pathname="/", method="POST",
        auth_type="AK", style="RPC", req_body_type="formData", body_type="json")


@dataclass
class Reply:
    """What the server answered: HTTP status and the JSON body (success or error)."""

    status: int
    body: dict[str, Any]

    @property
    def code(self) -> str | None:
        code = self.body.get("Code")
        return str(code) if code is not None else None


def error_reply(exc: ClientException | Exception) -> Reply:
    data = getattr(exc, "data", None)
    status = getattr(exc, "status_code", None)
    assert isinstance(data, dict) and isinstance(status, int), f"not an API error: {exc!r}"
    return Reply(status, data)


@dataclass
class Kms:
    """A running front and clients for it."""

    config: Config
    app: web.Application
    port: int
    tls: TLSFiles
    session: ClientSession
    server: TestServer
    captured: list[dict[str, Any]] = field(default_factory=list)
    _clients: dict[tuple[str, str], Client] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Stop the front: its cleanup flushes and closes the audit log and the store."""
        await self.server.close()

    def client(self, who: str = "a1", signature: str = "v3") -> Client:
        if (who, signature) not in self._clients:
            self._clients[who, signature] = sdk_client(self.port, self.tls.ca,
                                                       ACCESS_KEYS[who], signature)
        return self._clients[who, signature]

    async def sdk(self, client: Client, method: str, request: Any = None) -> Any:
        """Call ``client.<method>(request)`` in a thread; return the response body model."""
        bound: Callable[..., Any] = getattr(client, method)
        response = await asyncio.to_thread(bound, *(() if request is None else (request,)))
        return response.body

    async def sdk_error(self, client: Client, method: str, request: Any = None) -> Reply:
        """Call and expect an API error; return its status and envelope."""
        try:
            await self.sdk(client, method, request)
        except ClientException as exc:
            return error_reply(exc)
        except Exception as exc:  # ServerException and friends carry the same fields.
            if hasattr(exc, "data") and hasattr(exc, "status_code"):
                return error_reply(exc)
            raise
        raise AssertionError(f"{method} succeeded where an error was expected")

    def call_blocking(self, client: Client, action: str,
                      query: Mapping[str, Any] | None = None,
                      body: Mapping[str, Any] | None = None, *,
                      version: str = "2016-01-20") -> Reply:
        """Any action with any parameter values, signed by the SDK (generic ``call_api``).
        Blocking: from the test's loop use :meth:`call`."""
        request = open_api_models.OpenApiRequest(query=dict(query or {}),
                                                 body=dict(body) if body else None)
        params = generic_params(action)
        params.version = version
        try:
            result = client.call_api(params, request, RuntimeOptions(autoretry=False,
                                                                     max_attempts=0))
        except Exception as exc:
            if hasattr(exc, "data") and hasattr(exc, "status_code"):
                return error_reply(exc)
            raise
        return Reply(int(result["statusCode"]), result["body"])

    async def call(self, client: Client, action: str, query: Mapping[str, Any] | None = None,
                   body: Mapping[str, Any] | None = None, *,
                   version: str = "2016-01-20") -> Reply:
        return await asyncio.to_thread(self.call_blocking, client, action, query, body,
                                       version=version)

    async def http(self, method: str, path: str, *, headers: Mapping[str, str] | None = None,
                   data: bytes | None = None) -> tuple[int, str, bytes]:
        """A raw HTTPS request (``path`` already encoded); (status, content type, body)."""
        async with self.session.request(method, URL(self.url + path, encoded=True),
                                        headers=dict(headers or {}), data=data) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), await resp.read()

    def counts(self) -> dict[str, int]:
        """Rows per table, read from the database file opened read-only, beyond what the
        system itself provisions at start-up (each account's default master key)."""
        uri = f"file:{self.config.database}?mode=ro"
        with sqlite3.connect(uri, uri=True) as db:
            rows = {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # noqa: S608
                    for t in TABLES}
        provisioned = len(self.config.accounts)
        rows["keys"] -= provisioned
        rows["key_versions"] -= provisioned
        return rows


StartKms = Callable[..., Any]


@pytest.fixture
async def start_kms(tmp_path: Path, tls_files: TLSFiles) -> AsyncIterator[StartKms]:
    """Start fronts (each on its own port); stop all at the end of the test."""
    servers: list[TestServer] = []
    sessions: list[ClientSession] = []

    async def start(*, capture: bool = False, directory: Path | None = None,
                    **overrides: Any) -> Kms:
        config = build_config(directory or tmp_path, tls_files, **overrides)
        app = create_app(config)
        captured: list[dict[str, Any]] = []
        if capture:
            @web.middleware
            async def record(request: web.Request, handler: Any) -> web.StreamResponse:
                captured.append({"method": request.method, "path_qs": request.raw_path,
                                 "headers": dict(request.headers),
                                 "body": await request.read()})
                response: web.StreamResponse = await handler(request)
                return response

            app.middlewares.append(record)
        # As in production (shared.serving): no aiohttp access log, whose request line
        # would carry the query string, and no cancelling a handler whose client left.
        server = ServedTestServer(app, host="127.0.0.1", port=0)
        assert config.server.cert is not None and config.server.key is not None
        await server.start_server(ssl=server_context(cert=config.server.cert,
                                                     key=config.server.key),
                                  access_log=None)
        servers.append(server)
        session = ClientSession(connector=TCPConnector(ssl=client_context(ca=tls_files.ca)))
        sessions.append(session)
        assert server.port is not None
        return Kms(config=config, app=app, port=server.port, tls=tls_files, session=session,
                   server=server, captured=captured)

    yield start
    for session in sessions:
        await session.close()
    for server in servers:
        await server.close()


@pytest.fixture
async def kms(start_kms: StartKms) -> Kms:
    kms: Kms = await start_kms()
    return kms


@pytest.fixture(params=SIGNATURES)
def sig(request: pytest.FixtureRequest) -> str:
    """The SDK's signature scheme: V3 (ACS3-HMAC-SHA256, default) or legacy RPC v2."""
    return str(request.param)


@pytest.fixture
def client(kms: Kms, sig: str) -> Client:
    """Account A's first user, with the parametrized signature scheme."""
    return kms.client("a1", sig)


ENVELOPE = frozenset({"RequestId", "HttpStatus", "Code", "Message"})


def assert_error(reply: Reply, status: int, code: str, *, names: str | None = None) -> None:
    """An Alibaba error envelope with this status and code (and naming ``names``)."""
    assert reply.status == status, reply
    assert ENVELOPE <= reply.body.keys(), reply
    assert reply.body["HttpStatus"] == status, reply
    assert reply.body["Code"] == code, reply
    assert isinstance(reply.body["RequestId"], str) and reply.body["RequestId"], reply
    if names is not None:
        assert f'"{names}"' in reply.body["Message"], reply
