"""The request verifier against the official Alibaba Cloud SDK.

Every positive case is signed by the real ``alibabacloud-kms20160120`` client (sync through
``requests`` in a thread, and async through aiohttp), talking plain HTTP to an in-process
aiohttp server whose handler calls ``RequestVerifier.verify`` and answers in Alibaba's JSON
shape. Negative cases alter a request the SDK really sent and replay it byte for byte.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import re
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from alibabacloud_kms20160120 import models
from alibabacloud_kms20160120.client import Client
from alibabacloud_tea_openapi.exceptions import ClientException
from alibabacloud_tea_openapi.models import Config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, MultiDict
from pytest_aiohttp import AiohttpServer
from yarl import URL

from kms_proxy.api.nonce_journal import NonceJournal
from kms_proxy.api.signing import (
    AccessKey,
    NonceCache,
    RequestVerifier,
    SignatureError,
    SignatureErrorCode,
)

ALICE = AccessKey(id="LTAI5tAliceTestKey0001", secret="alice/Secret+with=odd~chars",
                  account_id="1234567890123456", user="alice")
BOB = AccessKey(id="LTAI5tBobTestKey000002", secret="bob-secret-0002",
                account_id="6543210987654321", user="bob")
# Spaces, the characters form and percent encoding treat specially, and non-ASCII.
TRICKY = "a b+c/d=e*f~g %20 &x=y é 密钥 🔑"
CONTEXT = {"purpose": "unit test", "sym": "+/=*~ é"}


@dataclass
class Clock:
    """The real time plus an offset, so SDK-signed requests can be made to look stale."""

    offset: timedelta = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass(frozen=True)
class Captured:
    """One request as the server received it."""

    method: str
    raw_path: str
    query_string: str
    headers: CIMultiDict[str]
    body: bytes
    form: MultiDict[str]

    @property
    def path(self) -> str:
        return self.raw_path.partition("?")[0]


@dataclass
class KMS:
    """A running fake KMS endpoint and what it saw."""

    port: int
    clock: Clock
    verifier: RequestVerifier
    captured: list[Captured] = field(default_factory=list)
    errors: list[SignatureError] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: AccessKey = ALICE, *, scheme: str = "v3",
               secret: str | None = None) -> Client:
        return Client(Config(
            access_key_id=key.id, access_key_secret=secret or key.secret,
            endpoint=f"127.0.0.1:{self.port}", protocol="http",
            signature_algorithm="v2" if scheme == "v2" else None,
        ))

    async def send(self, request: Captured, *, query: str | None = None,
                   headers: dict[str, str | None] | None = None,
                   body: bytes | None = None) -> tuple[int, dict[str, Any]]:
        """Replay ``request`` exactly (or with the given parts replaced); ``None`` headers
        are removed."""
        qs = request.query_string if query is None else query
        url = URL(f"{self.url}{request.path}" + (f"?{qs}" if qs else ""), encoded=True)
        hdrs = CIMultiDict(request.headers)
        hdrs.popall("Content-Length", None)
        for name, value in (headers or {}).items():
            hdrs.popall(name, None)
            if value is not None:
                hdrs[name] = value
        async with ClientSession() as session, session.request(
            request.method, url, headers=hdrs,
            data=request.body if body is None else body,
        ) as resp:
            return resp.status, await resp.json()


STATE = web.AppKey("STATE", KMS)


async def handler(request: web.Request) -> web.Response:
    kms = request.app[STATE]
    body = await request.read()
    form: MultiDict[str] = MultiDict()
    if request.content_type == "application/x-www-form-urlencoded":
        form.extend((k, v) for k, v in (await request.post()).items() if isinstance(v, str))
    kms.captured.append(Captured(request.method, request.raw_path,
                                 request.rel_url.raw_query_string,
                                 CIMultiDict(request.headers), body, form))
    request_id = str(uuid.uuid4()).upper()
    try:
        key = kms.verifier.verify(method=request.method, raw_path=request.raw_path,
                                  query_string=request.rel_url.raw_query_string,
                                  headers=request.headers, body=body, form=form)
    except SignatureError as e:
        kms.errors.append(e)
        return web.json_response({"RequestId": request_id, "HttpStatus": e.status,
                                  "Code": e.code, "Message": e.message}, status=e.status)
    # V3 signs the x-acs-action header; the legacy scheme signs only the Action parameter.
    v3 = "Authorization" in request.headers
    action = request.headers["x-acs-action"] if v3 else request.query["Action"]
    params = {**request.query, **form}
    # Echo what arrived, so the tests see that the verifier and the handler agree on values.
    bodies: dict[str, dict[str, Any]] = {
        "DescribeKey": {"KeyMetadata": {"KeyId": params.get("KeyId"),
                                        "Creator": key.account_id, "Description": key.user}},
        "Encrypt": {"KeyId": params.get("KeyId"), "CiphertextBlob": params.get("Plaintext"),
                    "KeyVersionId": params.get("EncryptionContext")},
        "Decrypt": {"KeyId": "key-1", "Plaintext": params.get("CiphertextBlob"),
                    "CiphertextForRecipient": params.get("Recipient")},
        "GenerateDataKey": {"KeyId": params.get("KeyId"), "KeyVersionId": "v1",
                            "Plaintext": params.get("NumberOfBytes"),
                            "CiphertextBlob": params.get("EncryptionContext")},
    }
    return web.json_response({"RequestId": request_id, **bodies[action]})


StartKMS = Callable[..., Awaitable[KMS]]


@pytest.fixture
async def start_kms(aiohttp_server: AiohttpServer,
                    monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[StartKMS]:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)  # The SDK reads these; 127.0.0.1 is direct.

    async def start(keys: Iterable[AccessKey] = (ALICE, BOB), **kwargs: Any) -> KMS:
        clock = Clock()
        kms = KMS(port=0, clock=clock, verifier=RequestVerifier(keys, clock=clock, **kwargs))
        app = web.Application()
        app[STATE] = kms
        app.router.add_route("*", "/{tail:.*}", handler)
        server = await aiohttp_server(app, host="127.0.0.1")
        assert server.port is not None
        kms.port = server.port
        return kms

    yield start


@pytest.fixture
async def kms(start_kms: StartKMS) -> KMS:
    return await start_kms()


async def call(client: Client, operation: str, request: Any, *, mode: str = "sync") -> Any:
    """Call the SDK; its sync methods block, so they run in a thread while the loop serves."""
    if mode == "sync":
        return await asyncio.to_thread(getattr(client, operation), request)
    return await getattr(client, f"{operation}_async")(request)


async def sdk_error(client: Client, operation: str = "describe_key", request: Any = None,
                    *, mode: str = "sync") -> ClientException:
    request = request or models.DescribeKeyRequest(key_id="key-1")
    with pytest.raises(ClientException) as info:
        await call(client, operation, request, mode=mode)
    return info.value


SCHEMES = pytest.mark.parametrize("scheme", ["v3", "v2"])


# --- The SDK's own requests verify -------------------------------------------------------


@SCHEMES
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_sdk_requests_verify(kms: KMS, scheme: str, mode: str) -> None:
    client = kms.client(scheme=scheme)

    described = await call(client, "describe_key",
                           models.DescribeKeyRequest(key_id="alias/my key"), mode=mode)
    assert described.body.key_metadata.key_id == "alias/my key"
    assert described.body.key_metadata.creator == ALICE.account_id

    encrypted = await call(client, "encrypt", models.EncryptRequest(
        key_id="alias/k+1", plaintext=TRICKY, encryption_context=CONTEXT), mode=mode)
    assert encrypted.body.ciphertext_blob == TRICKY
    assert encrypted.body.key_id == "alias/k+1"
    assert json.loads(encrypted.body.key_version_id) == CONTEXT

    # With a Recipient, Decrypt sends a non-empty form body (signed by its hash in V3, by
    # its parameters in the legacy scheme).
    decrypted = await call(client, "decrypt", models.DecryptRequest(
        ciphertext_blob="Y2lwaGVy+/==", encryption_context=CONTEXT, recipient=TRICKY),
        mode=mode)
    assert decrypted.body.plaintext == "Y2lwaGVy+/=="
    assert decrypted.body.ciphertext_for_recipient == TRICKY
    assert kms.captured[-1].body, "Decrypt with a Recipient should carry a form body"

    generated = await call(client, "generate_data_key", models.GenerateDataKeyRequest(
        key_id="key-1", number_of_bytes=32, encryption_context=CONTEXT), mode=mode)
    assert generated.body.plaintext == "32"

    assert kms.errors == []
    if scheme == "v3":
        assert all(c.headers["Authorization"].startswith("ACS3-HMAC-SHA256 ")
                   for c in kms.captured)
    else:
        assert all("Signature" in c.query_string and "Authorization" not in c.headers
                   for c in kms.captured)


async def test_the_principal_is_the_signing_key(kms: KMS) -> None:
    described = await call(kms.client(BOB), "describe_key",
                           models.DescribeKeyRequest(key_id="k"))
    assert described.body.key_metadata.description == "bob"


async def test_decrypt_without_recipient_sends_an_empty_form(kms: KMS) -> None:
    """Decrypt always sets a form content type, with an empty body unless a Recipient is
    given; the verifier must accept the unsigned aiohttp content type on empty bodies too."""
    for mode in ("sync", "async"):
        await call(kms.client(), "decrypt", models.DecryptRequest(ciphertext_blob="abc"),
                   mode=mode)
    assert [c.body for c in kms.captured] == [b"", b""]
    assert kms.errors == []


# --- Wrong credentials, through the SDK ----------------------------------------------------


@SCHEMES
async def test_wrong_secret(kms: KMS, scheme: str) -> None:
    error = await sdk_error(kms.client(scheme=scheme, secret="not-the-secret"))
    assert (error.code, error.status_code) == ("SignatureDoesNotMatch", 400)
    assert error.data["Message"] == "Specified signature is not matched with our calculation."
    assert ALICE.secret not in error.data["Message"]
    assert not re.search(r"[0-9a-f]{40}", error.data["Message"])


@SCHEMES
async def test_unknown_access_key(kms: KMS, scheme: str) -> None:
    stranger = AccessKey(id="LTAI5tNobodyKnowsMe0", secret="x", account_id="0", user="eve")
    error = await sdk_error(kms.client(stranger, scheme=scheme))
    assert (error.code, error.status_code) == ("InvalidAccessKeyId.NotFound", 404)


@SCHEMES
@pytest.mark.parametrize("offset", [timedelta(minutes=20), timedelta(minutes=-20)])
async def test_skewed_date(kms: KMS, scheme: str, offset: timedelta) -> None:
    kms.clock.offset = offset
    error = await sdk_error(kms.client(scheme=scheme))
    assert (error.code, error.status_code) == ("InvalidTimeStamp.Expired", 400)

    kms.clock.offset = offset * 14 / 20  # Inside the 15-minute window.
    await call(kms.client(scheme=scheme), "describe_key", models.DescribeKeyRequest(key_id="k"))


# --- Altered replays of real SDK requests ---------------------------------------------------


async def captured_request(kms: KMS, scheme: str = "v3", *, operation: str = "encrypt",
                           request: Any = None) -> Captured:
    request = request or models.EncryptRequest(key_id="key-1", plaintext=TRICKY,
                                               encryption_context=CONTEXT)
    await call(kms.client(scheme=scheme), operation, request)
    assert kms.errors == []
    return kms.captured[-1]


def recipient_decrypt() -> models.DecryptRequest:
    return models.DecryptRequest(ciphertext_blob="abc", recipient="attestation doc+/=")


@SCHEMES
async def test_replayed_nonce(kms: KMS, scheme: str) -> None:
    sent = await captured_request(kms, scheme)
    status, body = await kms.send(sent)
    assert (status, body["Code"]) == (400, "SignatureNonceUsed")
    assert body["HttpStatus"] == 400 and body["RequestId"]


async def test_an_unaltered_replay_verifies_on_a_fresh_verifier(start_kms: StartKMS) -> None:
    """The replay harness itself changes nothing: a fresh verifier accepts its bytes."""
    first = await start_kms()
    sent = await captured_request(first)
    second = await start_kms()
    status, body = await second.send(sent)
    assert status == 200, body
    assert body["CiphertextBlob"] == TRICKY


def replace_param(query: str, name: str, value: str) -> str:
    parts = [f"{name}={value}" if p.startswith(f"{name}=") else p for p in query.split("&")]
    assert parts != query.split("&")
    return "&".join(parts)


@SCHEMES
async def test_tampered_query_value(kms: KMS, scheme: str) -> None:
    sent = await captured_request(kms, scheme)
    status, body = await kms.send(sent, query=replace_param(sent.query_string, "KeyId", "key-2"))
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")


@SCHEMES
async def test_added_query_parameter(kms: KMS, scheme: str) -> None:
    sent = await captured_request(kms, scheme)
    status, body = await kms.send(sent, query=sent.query_string + "&DryRun=true")
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")


async def test_plus_and_space_are_not_interchangeable(kms: KMS) -> None:
    """``+`` in the raw query is a space; a literal plus is ``%2B``. Swapping them changes
    the signed value."""
    sent = await captured_request(kms, request=models.EncryptRequest(key_id="a b",
                                                                     plaintext="x"))
    assert "KeyId=a+b" in sent.query_string
    status, body = await kms.send(sent, query=sent.query_string.replace("a+b", "a%2Bb"))
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")


async def test_equivalent_escaping_of_the_same_values_verifies(start_kms: StartKMS) -> None:
    """The signature is over decoded values: ``%20`` for ``+`` or an escaped ``~`` is the
    same request (the async transport really does unescape ``/``, ``*`` and ``:``)."""
    first = await start_kms()
    sent = await captured_request(first)
    reescaped = sent.query_string.replace("+", "%20").replace("~", "%7E").replace("%2F", "/")
    assert reescaped != sent.query_string
    second = await start_kms()
    status, body = await second.send(sent, query=reescaped)
    assert status == 200, body


@pytest.mark.parametrize("header", ["x-acs-action", "user-agent", "Host", "x-acs-date"])
async def test_tampered_signed_header(kms: KMS, header: str) -> None:
    sent = await captured_request(kms)
    signed = re.search(r"SignedHeaders=([^,]+)", sent.headers["Authorization"])
    assert signed and header.lower() in signed[1].split(";")
    value = sent.headers[header]
    altered = {"x-acs-action": "Decrypt", "Host": f"localhost:{kms.port}",
               "x-acs-date": (datetime.now(UTC) - timedelta(seconds=5)).strftime(
                   "%Y-%m-%dT%H:%M:%SZ")}.get(header, value + " evil/1.0")
    assert altered != value
    status, body = await kms.send(sent, headers={header: altered})
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")


async def test_unsigned_headers_may_change(start_kms: StartKMS) -> None:
    first = await start_kms()
    sent = await captured_request(first)
    second = await start_kms()
    status, _ = await second.send(sent, headers={"Accept-Encoding": "br", "X-Forwarded-For":
                                                 "10.0.0.1"})
    assert status == 200


async def test_tampered_body(kms: KMS) -> None:
    sent = await captured_request(kms, operation="decrypt", request=recipient_decrypt())
    assert sent.body
    status, body = await kms.send(sent, body=b"Recipient=someone+else")
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")
    assert "x-acs-content-sha256" in body["Message"]

    # Fixing up the hash header does not help: that header is signed.
    forged = b"Recipient=someone+else"
    status, body = await kms.send(sent, body=forged, headers={
        "x-acs-content-sha256": hashlib.sha256(forged).hexdigest()})
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")


async def test_tampered_form_parameter_v2(kms: KMS) -> None:
    sent = await captured_request(kms, "v2", operation="decrypt", request=recipient_decrypt())
    assert sent.form["Recipient"] == "attestation doc+/="
    status, body = await kms.send(sent, body=b"Recipient=someone+else")
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")


async def test_v2_unsigned_action_header_must_agree(kms: KMS) -> None:
    sent = await captured_request(kms, "v2")
    status, body = await kms.send(sent, headers={"x-acs-action": "Decrypt"})
    assert (status, body["Code"]) == (400, "IncompleteSignature")


async def test_missing_authorization(kms: KMS) -> None:
    sent = await captured_request(kms)
    status, body = await kms.send(sent, headers={"Authorization": None})
    assert (status, body["Code"]) == (400, "IncompleteSignature")


async def test_v2_without_signature(kms: KMS) -> None:
    sent = await captured_request(kms, "v2")
    query = "&".join(p for p in sent.query_string.split("&") if not p.startswith("Signature="))
    status, body = await kms.send(sent, query=query)
    assert (status, body["Code"]) == (400, "IncompleteSignature")


@pytest.mark.parametrize(("name", "value", "code"), [
    ("SignatureMethod", "HMAC-SHA256", "IncompleteSignature"),
    ("SignatureVersion", "2.0", "IncompleteSignature"),
    ("SignatureNonce", "", "IncompleteSignature"),
    ("AccessKeyId", "", "IncompleteSignature"),
    ("Timestamp", "", "IllegalTimestamp"),
    ("Timestamp", "yesterday", "IllegalTimestamp"),
    ("Timestamp", "2026-13-45T10%3A00%3A00Z", "IllegalTimestamp"),
    ("Signature", "AAAAAAAAAAAAAAAAAAAAAAAAAAA%3D", "SignatureDoesNotMatch"),
])
async def test_v2_bad_parameters(kms: KMS, name: str, value: str, code: str) -> None:
    sent = await captured_request(kms, "v2")
    status, body = await kms.send(sent, query=replace_param(sent.query_string, name, value))
    assert (status, body["Code"]) == (400, code)


@pytest.mark.parametrize(("headers", "code", "message"), [
    ({"x-acs-date": None}, "IllegalTimestamp", "x-acs-date"),
    ({"x-acs-date": "2026-11-28 10:00:00"}, "IllegalTimestamp", "ISO 8601"),
    ({"x-acs-signature-nonce": None}, "IncompleteSignature", "nonce"),
    ({"x-acs-signature-nonce": "n" * 129}, "IncompleteSignature", "nonce"),
    ({"x-acs-credentials-provider": None}, "IncompleteSignature",
     "x-acs-credentials-provider is missing"),
    ({"Authorization": "acs LTAI5tAliceTestKey0001:c2ln"}, "IncompleteSignature",
     "well-formed"),
    ({"Authorization": "ACS3-HMAC-SHA256 Credential=LTAI5tAliceTestKey0001"},
     "IncompleteSignature", "well-formed"),
])
async def test_malformed_v3(kms: KMS, headers: dict[str, str | None], code: str,
                            message: str) -> None:
    sent = await captured_request(kms)
    status, body = await kms.send(sent, headers=headers)
    assert (status, body["Code"]) == (400, code)
    assert message in body["Message"]


@pytest.mark.parametrize("algorithm", ["ACS3-HMAC-SM3", "ACS3-RSA-SHA256"])
async def test_unsupported_v3_algorithm(kms: KMS, algorithm: str) -> None:
    sent = await captured_request(kms)
    authorization = sent.headers["Authorization"].replace("ACS3-HMAC-SHA256", algorithm)
    status, body = await kms.send(sent, headers={"Authorization": authorization})
    assert (status, body["Code"]) == (400, "IncompleteSignature")
    assert f"{algorithm} is not supported" in body["Message"]


@pytest.mark.parametrize("drop", ["host", "x-acs-date", "x-acs-content-sha256"])
async def test_required_headers_must_be_signed(kms: KMS, drop: str) -> None:
    sent = await captured_request(kms)
    authorization = re.sub(r"SignedHeaders=([^,]+)",
                           lambda m: "SignedHeaders=" + ";".join(
                               h for h in m[1].split(";") if h != drop),
                           sent.headers["Authorization"])
    status, body = await kms.send(sent, headers={"Authorization": authorization})
    assert (status, body["Code"]) == (400, "IncompleteSignature")
    assert drop in body["Message"]


# --- Direct calls for what HTTP makes awkward ----------------------------------------------


def verify(verifier: RequestVerifier, sent: Captured, **changes: Any) -> AccessKey:
    parts: dict[str, Any] = {"method": sent.method, "raw_path": sent.raw_path,
                             "query_string": sent.query_string, "headers": sent.headers,
                             "body": sent.body, "form": sent.form}
    return verifier.verify(**{**parts, **changes})


async def test_repeated_and_undecodable_parameters(kms: KMS) -> None:
    sent = await captured_request(kms)
    fresh = RequestVerifier([ALICE])
    for query in (sent.query_string + "&KeyId=key-2", sent.query_string + "&Bad=%FF"):
        with pytest.raises(SignatureError) as info:
            verify(fresh, sent, query_string=query)
        assert info.value.code == SignatureErrorCode.INCOMPLETE_SIGNATURE
    assert verify(fresh, sent) == ALICE


async def test_v2_parameter_in_query_and_form(kms: KMS) -> None:
    sent = await captured_request(kms, "v2")
    with pytest.raises(SignatureError) as info:
        verify(RequestVerifier([ALICE]), sent, form=MultiDict(KeyId="key-1"))
    assert info.value.code == SignatureErrorCode.INCOMPLETE_SIGNATURE


async def test_unsigned_content_type_with_a_body(kms: KMS) -> None:
    sent = await captured_request(kms, operation="decrypt", request=recipient_decrypt())
    authorization = sent.headers["Authorization"].replace("content-type;", "")
    headers = CIMultiDict(sent.headers)
    headers["Authorization"] = authorization
    with pytest.raises(SignatureError) as info:
        verify(RequestVerifier([ALICE]), sent, headers=headers)
    assert info.value.code == SignatureErrorCode.INCOMPLETE_SIGNATURE
    assert "content-type" in info.value.message


def test_error_fields_and_safe_repr() -> None:
    error = SignatureError(SignatureErrorCode.INVALID_ACCESS_KEY_ID_NOT_FOUND)
    assert (error.code, error.status) == ("InvalidAccessKeyId.NotFound", 404)
    assert str(error) == error.message == "Specified access key is not found."
    assert ALICE.secret not in repr(ALICE)
    with pytest.raises(ValueError, match="twice"):
        RequestVerifier([ALICE, ALICE])


# --- The nonce cache ----------------------------------------------------------------------


T0 = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW = timedelta(minutes=15)


def test_nonce_cache_refuses_a_replay() -> None:
    cache = NonceCache(max_size=10, window=WINDOW)
    cache.remember(("ak", "n1"), when=T0, now=T0)
    cache.remember(("other-ak", "n1"), when=T0, now=T0)  # Nonces are per AccessKey.
    with pytest.raises(SignatureError) as info:
        cache.remember(("ak", "n1"), when=T0, now=T0 + timedelta(minutes=14))
    assert info.value.code == SignatureErrorCode.SIGNATURE_NONCE_USED


def test_nonce_cache_forgets_what_the_date_check_refuses() -> None:
    cache = NonceCache(max_size=10, window=WINDOW)
    for i in range(5):
        cache.remember(("ak", f"n{i}"), when=T0 + timedelta(minutes=i), now=T0)
    assert len(cache) == 5
    cache.remember(("ak", "late"), when=T0 + timedelta(minutes=17, seconds=30),
                   now=T0 + timedelta(minutes=17, seconds=30))
    # Dated T0+0..2 min are now more than 15 minutes old: a replay fails the date check.
    assert len(cache) == 3
    cache.remember(("ak", "later"), when=T0 + timedelta(hours=1), now=T0 + timedelta(hours=1))
    assert len(cache) == 1


def test_nonce_cache_lives_at_most_two_windows() -> None:
    """A future-dated entry at the front holds later ones back, but never beyond 2 windows."""
    cache = NonceCache(max_size=10, window=WINDOW)
    cache.remember(("ak", "ahead"), when=T0 + WINDOW, now=T0)
    cache.remember(("ak", "now"), when=T0, now=T0)
    cache.remember(("ak", "x"), when=T0 + 2 * WINDOW + timedelta(seconds=1),
                   now=T0 + 2 * WINDOW + timedelta(seconds=1))
    assert len(cache) == 1


def test_nonce_cache_is_bounded_and_fails_closed() -> None:
    cache = NonceCache(max_size=3, window=WINDOW)
    for i in range(10):
        cache.remember(("ak", f"n{i}"), when=T0 + timedelta(seconds=i), now=T0 + timedelta(
            seconds=10))
        assert len(cache) <= 3
    assert cache.horizon == T0 + timedelta(seconds=6)
    # n0 was dropped while still replayable, so anything dated like it is refused...
    with pytest.raises(SignatureError) as info:
        cache.remember(("ak", "n0"), when=T0, now=T0 + timedelta(seconds=11))
    assert info.value.code == SignatureErrorCode.TIMESTAMP_EXPIRED
    # ... while newer requests still pass, and the horizon goes once the date check covers it.
    cache.remember(("ak", "n10"), when=T0 + timedelta(seconds=11), now=T0 + timedelta(
        seconds=11))
    assert cache.horizon == T0 + timedelta(seconds=7)
    cache.remember(("ak", "n11"), when=T0 + WINDOW + timedelta(seconds=12),
                   now=T0 + WINDOW + timedelta(seconds=12))
    assert cache.horizon is None
    assert len(cache) == 1


def _journal(tmp_path: Path) -> NonceJournal:
    return NonceJournal(tmp_path / "kms.db.nonces", window_us=WINDOW // timedelta(microseconds=1))


def test_journaled_nonces_are_refused_by_the_next_process(tmp_path: Path) -> None:
    before = _SmallChunks(max_size=5, window=WINDOW)
    before.journal = _journal(tmp_path)
    for i in range(8):  # Three dropped by size: the next process drops them too.
        before.remember(("ak", f"n{i}"), when=T0 + timedelta(seconds=i), now=T0)
    # No save and no close: what a crash leaves.
    [(_, path)] = _journal(tmp_path).segments()
    assert path.stat().st_mode & 0o777 == 0o600
    after = _SmallChunks(max_size=5, window=WINDOW)
    entries = _journal(tmp_path).load()
    assert entries is not None and len(entries) == 8
    assert after.restore(entries, now=T0 + timedelta(seconds=10)) == 5
    assert after.horizon == before.horizon
    for i in range(3, 8):
        with pytest.raises(SignatureError) as info:
            after.remember(("ak", f"n{i}"), when=T0 + timedelta(seconds=i),
                           now=T0 + timedelta(seconds=11))
        assert info.value.code == SignatureErrorCode.SIGNATURE_NONCE_USED
    with pytest.raises(SignatureError) as info:  # Dropped by size: the horizon.
        after.remember(("ak", "n1"), when=T0 + timedelta(seconds=1),
                       now=T0 + timedelta(seconds=11))
    assert info.value.code == SignatureErrorCode.TIMESTAMP_EXPIRED


def test_the_journal_keeps_only_segments_that_can_matter(tmp_path: Path) -> None:
    cache = NonceCache(max_size=100, window=WINDOW)
    cache.journal = _journal(tmp_path)
    for minute in range(0, 80, 5):
        now = T0 + timedelta(minutes=minute)
        cache.remember(("ak", f"m{minute}"), when=now, now=now)
    # Segments are one window (15 min) long; only the current one and the two before stay.
    assert len(_journal(tmp_path).segments()) == 3
    entries = _journal(tmp_path).load()
    assert entries is not None
    assert {e for e, _ in entries} >= {"2:akm75", "2:akm60", "2:akm45"}
    assert "2:akm0" not in {e for e, _ in entries}


def test_odd_nonces_and_a_torn_line_survive_the_journal(tmp_path: Path) -> None:
    cache = NonceCache(max_size=10, window=WINDOW)
    cache.journal = _journal(tmp_path)
    odd = 'new\nline\t tab "quote" \u00e9 \\ back'
    cache.remember(("ak", odd), when=T0, now=T0)
    [(_, path)] = _journal(tmp_path).segments()
    with path.open("ab") as out:
        out.write(b'123 "torn')  # A crash in the middle of a write.
    after = NonceCache(max_size=10, window=WINDOW)
    entries = _journal(tmp_path).load()
    assert entries is not None and after.restore(entries, now=T0) == 1
    with pytest.raises(SignatureError):
        after.remember(("ak", odd), when=T0, now=T0)


def test_a_journal_that_is_not_private_is_not_trusted(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    assert journal.load() is None  # No segments: nothing was ever journaled here.
    journal.create(0)
    assert journal.load() == []
    [(_, path)] = journal.segments()
    path.chmod(0o644)
    assert journal.load() is None
    path.unlink()
    target = tmp_path / "elsewhere"
    target.write_text("")
    target.chmod(0o600)
    path.symlink_to(target)
    assert journal.load() is None


def test_after_a_stop_without_saving_older_requests_are_refused() -> None:
    cache = NonceCache(max_size=10, window=WINDOW)
    started = T0 + timedelta(seconds=100, microseconds=400_000)
    cache.refuse_before(started)
    with pytest.raises(SignatureError) as info:
        cache.remember(("ak", "n"), when=T0 + timedelta(seconds=99), now=started)
    assert info.value.code == SignatureErrorCode.TIMESTAMP_EXPIRED
    # Dates have whole seconds: the start's own second passes.
    cache.remember(("ak", "n"), when=T0 + timedelta(seconds=100), now=started)


class _ReferenceNonceCache:
    """The cache's contract in its plainest form (an OrderedDict in arrival order), for the
    model-based test below."""

    def __init__(self, *, max_size: int, window: timedelta) -> None:
        self.max_size, self.window = max_size, window
        self.entries: OrderedDict[tuple[str, str], datetime] = OrderedDict()
        self.horizon: datetime | None = None

    def remember(self, key: tuple[str, str], *, when: datetime, now: datetime) -> None:
        limit = now - self.window
        while self.entries and next(iter(self.entries.values())) < limit:
            self.entries.popitem(last=False)
        if self.horizon is not None and self.horizon < limit:
            self.horizon = None
        if when < limit:  # Older than the window: its nonce may be forgotten already.
            raise SignatureError(SignatureErrorCode.TIMESTAMP_EXPIRED)
        if self.horizon is not None and when <= self.horizon:
            raise SignatureError(SignatureErrorCode.TIMESTAMP_EXPIRED)
        if key in self.entries:
            raise SignatureError(SignatureErrorCode.SIGNATURE_NONCE_USED)
        if len(self.entries) >= self.max_size:
            _, dropped = self.entries.popitem(last=False)
            if self.horizon is None or dropped > self.horizon:
                self.horizon = dropped
        self.entries[key] = when


class _SmallChunks(NonceCache):
    _CHUNK = 3  # So a short run crosses many chunk boundaries.


_EDGES = [timedelta(seconds=s) for s in (-WINDOW.total_seconds(), WINDOW.total_seconds())]


@settings(max_examples=400, deadline=None)
@given(max_size=st.integers(1, 12),
       window=st.sampled_from([WINDOW, timedelta(seconds=1.3), timedelta(microseconds=7)]),
       steps=st.lists(st.tuples(
           # ("a", "kx") and ("ak", "x") would be one key if the two were just concatenated.
           st.sampled_from(["ak", "a", "other", "k1:"]),
           st.sampled_from(["x", "kx", "1", ":n", "n1"]),
           # The date's offset from now: anywhere, or exactly on the window's edges.
           st.one_of(st.integers(-20 * 60 * 10**6, 20 * 60 * 10**6).map(
               lambda us: timedelta(microseconds=us)), st.sampled_from(_EDGES)),
           st.integers(0, 8 * 60 * 10**6),  # microseconds the clock moves first
           st.sampled_from([0, 8, -5])),  # the UTC offset the date is written in, hours
           max_size=80))
def test_nonce_cache_behaves_like_the_plain_model(
        max_size: int, window: timedelta,
        steps: list[tuple[str, str, timedelta, int, int]]) -> None:
    """Outcome, size and horizon after every call match the OrderedDict model: chunking
    the arrival order and integer microseconds change nothing a caller sees, whatever the
    time zone, on the window's edges, and for ids that share a prefix with a nonce."""
    cache, model = _SmallChunks(max_size=max_size, window=window), \
        _ReferenceNonceCache(max_size=max_size, window=window)
    now = T0
    for access_key_id, nonce, offset, advance, zone in steps:
        now += timedelta(microseconds=advance)
        when = (now + offset).astimezone(timezone(timedelta(hours=zone)))
        outcomes: list[SignatureErrorCode | None] = []
        for target in (cache, model):
            try:
                target.remember((access_key_id, nonce), when=when, now=now)
                outcomes.append(None)
            except SignatureError as exc:
                outcomes.append(exc.code)
        assert outcomes[0] == outcomes[1]
        assert len(cache) == len(model.entries)
        assert cache.horizon == model.horizon


def test_nonce_cache_refuses_a_replay_on_the_window_edge() -> None:
    """Dated exactly ``window`` before now, a request still passes the date check, so its
    nonce must still be known; a microsecond later it is forgotten."""
    window = timedelta(seconds=1.3)
    cache = NonceCache(max_size=10, window=window)
    at = T0 + timedelta(microseconds=6)
    cache.remember(("ak", "edge"), when=at, now=at)
    with pytest.raises(SignatureError) as info:
        cache.remember(("ak", "edge"), when=at, now=at + window)
    assert info.value.code == SignatureErrorCode.SIGNATURE_NONCE_USED
    cache.remember(("ak", "edge"), when=at + window + timedelta(microseconds=1),
                   now=at + window + timedelta(microseconds=1))


def test_nonce_cache_horizon_holds_on_the_window_edge() -> None:
    """A nonce dropped from a full cache stays refused (by the horizon) as long as the date
    check accepts its date: up to and including exactly ``window`` later."""
    cache = NonceCache(max_size=1, window=WINDOW)
    cache.remember(("ak", "dropped"), when=T0, now=T0)
    cache.remember(("ak", "newer"), when=T0 + timedelta(seconds=1),
                   now=T0 + timedelta(seconds=1))
    assert cache.horizon == T0
    with pytest.raises(SignatureError) as info:
        cache.remember(("ak", "dropped"), when=T0, now=T0 + WINDOW)
    assert info.value.code == SignatureErrorCode.TIMESTAMP_EXPIRED


def test_nonce_cache_keys_do_not_collide() -> None:
    cache = NonceCache(max_size=10, window=WINDOW)
    for pair in (("a", "kx"), ("ak", "x"), ("1", "1:ax"), ("1:a", "x")):
        cache.remember(pair, when=T0, now=T0)
    assert len(cache) == 4


def test_nonce_cache_is_invisible_to_the_garbage_collector() -> None:
    """A full cache must not lengthen every full collection: after one collection neither
    its map nor its arrival chunks are tracked."""
    cache = NonceCache(max_size=100_000, window=WINDOW)
    # 20,000 requests over 20 minutes: the first 5 minutes' are purged on the way.
    for i in range(20_000):
        at = T0 + timedelta(milliseconds=60 * i)
        cache.remember((ALICE.id, uuid.uuid4().hex), when=at, now=at)
    gc.collect()
    assert 15_000 <= len(cache) < 20_000
    assert len(cache._open) < NonceCache._CHUNK
    assert not gc.is_tracked(cache._dates)
    assert cache._chunks and not any(gc.is_tracked(chunk) for chunk in cache._chunks)
    # Still untracked after more entries (strings and ints never make a dict tracked).
    cache.remember((ALICE.id, "one-more"), when=T0 + timedelta(minutes=20),
                   now=T0 + timedelta(minutes=20))
    assert not gc.is_tracked(cache._dates)


def test_nonce_cache_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="nonce_cache_size"):
        NonceCache(max_size=0, window=WINDOW)
    with pytest.raises(ValueError, match="max_skew"):
        RequestVerifier([ALICE], max_skew=timedelta(0))


async def test_full_nonce_cache_refuses_old_replays(start_kms: StartKMS) -> None:
    kms = await start_kms(nonce_cache_size=2)
    client = kms.client()
    for _ in range(3):
        await call(client, "describe_key", models.DescribeKeyRequest(key_id="k"))
    status, body = await kms.send(kms.captured[0])
    assert (status, body["Code"]) == (400, "InvalidTimeStamp.Expired")


# --- Property: any plaintext the SDK signs verifies ----------------------------------------


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plaintext=st.text(max_size=200), context_value=st.text(max_size=20),
       scheme=st.sampled_from(["v3", "v2"]))
async def test_any_plaintext_verifies(kms: KMS, plaintext: str, context_value: str,
                                      scheme: str) -> None:
    # The fixture is shared by all examples, which is fine: each request has its own nonce.
    response = await call(kms.client(scheme=scheme), "encrypt", models.EncryptRequest(
        key_id="key-1", plaintext=plaintext, encryption_context={"k": context_value}))
    assert kms.errors == []
    assert response.body.ciphertext_blob == plaintext
    assert json.loads(response.body.key_version_id) == {"k": context_value}



async def test_a_name_holding_the_next_parameter_does_not_reuse_the_signature(
        kms: KMS) -> None:
    """Canonical V3 names were not re-encoded, so one percent-encoded name "A=<a>&B" with
    B's value made the same canonical query as A and B: a signed request could be re-cut
    on the path to drop signed parameters (a KeySpec, a ProtectionLevel)."""
    from urllib.parse import parse_qsl, quote

    sent = await captured_request(kms)
    params = sorted(parse_qsl(sent.query_string, keep_blank_values=True))
    (first, first_value), (second, second_value), *rest = params

    def pct(text: str) -> str:
        return quote(text, safe="~")

    merged = quote(f"{first}={pct(first_value)}&{second}", safe="")
    recut = "&".join([f"{merged}={quote(second_value, safe='')}",
                      *(f"{quote(n, safe='')}={quote(v, safe='')}" for n, v in rest)])
    fresh = RequestVerifier([ALICE])
    with pytest.raises(SignatureError) as info:
        verify(fresh, sent, query_string=recut)
    assert info.value.code == SignatureErrorCode.SIGNATURE_DOES_NOT_MATCH
    assert verify(fresh, sent) == ALICE  # The request as sent still verifies.


async def test_a_signed_header_that_is_not_utf8_is_refused_not_a_500(kms: KMS) -> None:
    """aiohttp gives non-UTF-8 header bytes as lone surrogates; encoding the canonical
    request then raised UnicodeEncodeError: a 500 with a traceback, before any key."""
    sent = await captured_request(kms)
    headers = CIMultiDict(sent.headers)
    headers["user-agent"] = "pr\udcffobe"
    with pytest.raises(SignatureError) as info:
        verify(RequestVerifier([ALICE]), sent, headers=headers)
    assert info.value.code == SignatureErrorCode.INCOMPLETE_SIGNATURE


def test_a_line_after_a_torn_one_stands_alone(tmp_path: Path) -> None:
    """The next process appends to a segment a crash left torn: its first line was glued
    to the torn one and lost with it."""
    cache = NonceCache(max_size=10, window=WINDOW)
    cache.journal = _journal(tmp_path)
    cache.remember(("ak", "first"), when=T0, now=T0)
    [(_, path)] = _journal(tmp_path).segments()
    with path.open("ab") as out:
        out.write(b'123 "torn')
    later = NonceCache(max_size=10, window=WINDOW)
    later.journal = _journal(tmp_path)
    later.remember(("ak", "after-the-crash"), when=T0, now=T0)
    entries = _journal(tmp_path).load()
    assert entries is not None
    assert {e for e, _ in entries} == {"2:akfirst", "2:akafter-the-crash"}


def test_a_database_name_with_glob_characters_finds_its_journal(tmp_path: Path) -> None:
    journal = NonceJournal(tmp_path / "kms[prod]*.db.nonces",
                           window_us=WINDOW // timedelta(microseconds=1))
    journal.append("2:ak1", 1, 1)
    journal.close()
    (tmp_path / "kmsp.db.nonces.0").write_text("a neighbour's segment, not ours\n")
    reread = NonceJournal(tmp_path / "kms[prod]*.db.nonces",
                          window_us=WINDOW // timedelta(microseconds=1))
    assert [n for n, _ in reread.segments()] == [0]
    assert reread.load() == [("2:ak1", 1)]


def test_a_short_journal_write_takes_the_request_back(tmp_path: Path) -> None:
    """A full disk (here a file-size limit) lets a write take only part of a line: that
    was taken for success, so the request was accepted with its nonce not journaled."""
    import subprocess
    import sys

    script = f"""
import os, resource, signal
from pathlib import Path
from kms_proxy.api.nonce_journal import NonceJournal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
journal = NonceJournal(Path({str(tmp_path / "kms.db.nonces")!r}), window_us=10**9)
journal.append("2:akfits", 1, 1)
size = os.path.getsize({str(tmp_path / "kms.db.nonces.0")!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, size + 10))
try:
    journal.append("2:ak" + "x" * 40, 2, 2)
except OSError as exc:
    print("refused", exc.errno)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ,
                                                        "PYTHONPATH": str(Path.cwd())})
    assert done.stdout.strip().startswith("refused"), done.stderr
    segment = tmp_path / "kms.db.nonces.0"
    assert segment.read_bytes().endswith(b"\n")
    reread = NonceJournal(tmp_path / "kms.db.nonces", window_us=10**9)
    assert reread.load() == [("2:akfits", 1)]


def test_a_clock_that_steps_back_does_not_reopen_the_replay_window() -> None:
    """Nonces are purged by the clock; after a jump forward the cache forgot a nonce, and
    when the clock stepped back the date check let its replay through."""
    cache = NonceCache(max_size=100, window=WINDOW)
    cache.remember(("ak", "used"), when=T0, now=T0)
    cache.remember(("ak", "later"), when=T0 + timedelta(minutes=16),
                   now=T0 + timedelta(minutes=16))  # The clock jumped forward ...
    with pytest.raises(SignatureError) as info:  # ... and back: T0's request comes again.
        cache.remember(("ak", "used"), when=T0, now=T0 + timedelta(minutes=1))
    assert info.value.code == SignatureErrorCode.TIMESTAMP_EXPIRED
    # A request dated within the window of the latest clock still passes.
    cache.remember(("ak", "fresh"), when=T0 + timedelta(minutes=2),
                   now=T0 + timedelta(minutes=2))
