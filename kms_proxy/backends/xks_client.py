"""The KMS front's XKS Proxy API v1 client: one persistent mTLS connection pool, SigV4 on
every call, a whole-call time budget, and failures as two typed errors.

It builds requests and parses responses with the same wire models as the EKM simulator
(``shared.xks``), so the two sides cannot drift apart.

Transport choices, each for a reason:

* **One ``ClientSession`` per external instance**, opened and closed as an async context
  manager (the app's ``cleanup_ctx``). Its ``TCPConnector`` keeps connections alive, so a
  call costs one HTTP round trip and no TCP or TLS handshake (XKS section 9: the 250 ms
  budget covers TCP, TLS and HTTP, and the advised RTT is 35 ms).
* **Pool size** (``limit``, default 64): KMS sends at most 1800 requests/s to one external
  key store, and at the advised 35 ms per call that is 1800 x 0.035 = 63 calls in flight
  (Little's law). Callers beyond the limit queue for a connection inside their budget, so
  a slow EKM cannot make the front open hundreds of sockets.
* **Keep-alive** (``keepalive``, default 30 s): shorter than aiohttp's server idle timeout
  (75 s) and common load balancer idle timeouts (60 s), so the client closes an idle
  connection before the server does, which avoids most reuse races. The health probe
  keeps at least one connection warm.
* **Budget**: every call runs under ``asyncio.timeout(connection.timeout)`` (default
  0.25 s), covering queueing for a connection, connect, TLS, the request, the response and
  any retry. aiohttp's own timeouts are switched off so that there is exactly one clock.
* **Connections outlive impatient callers**: one being set up when its caller's budget
  runs out is finished and pooled, so a short stall under load does not empty the pool;
  and one that received bytes while idle in the pool is closed, never handed out.
* **Answers are bounded**: at most 1 MiB, never compressed (no ``Accept-Encoding``; an
  encoded answer is refused).
* **Retries only where nothing can have been executed twice**, and only inside the budget:
  a connect that failed (refused, reset, DNS) before a byte was sent; a keep-alive
  connection taken from the pool that the server had already closed (RFC 9112 section
  9.3.1; XKS calls change no state in the EKM, so even that rare case is harmless); and an
  ``AuthenticationFailedException`` when another configured credential remains (rotation,
  XKS section 6.3: the request was refused before any work). TLS and pin failures,
  timeouts and every other answer are final.
* **Certificate pinning** with ``aiohttp.Fingerprint`` (SHA-256 of the DER leaf). aiohttp
  takes one ``ssl=`` value that is *either* an ``SSLContext`` *or* a ``Fingerprint``; given
  only a ``Fingerprint`` it connects with its module-level *unverified* context, which
  checks no chain and presents no client certificate (aio-libs/aiohttp#3679, open). The
  connector (checked in 3.9, 3.13, 3.14 and master) resolves the two separately: the
  TLS context comes from the request's ``ssl=`` when that is an ``SSLContext``, and the
  fingerprint from the request's *or the connector's* ``ssl=`` (``_get_ssl_context`` and
  ``_get_fingerprint``). So the connector carries the ``Fingerprint`` and every request
  carries our verifying ``SSLContext`` with the client certificate: the chain and host
  name are verified, the client certificate is presented, and the leaf is pinned, before
  any request byte is sent. The tests prove all three, so an aiohttp change that broke the
  combination would fail them rather than silently unpin.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import re
import ssl
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeVar

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest, ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

from shared.sigv4 import Credential, Signer
from shared.tls import client_context
from shared.xks import (
    EXTERNAL_KEY_ID,
    DecryptRequest,
    EncryptRequest,
    EncryptResponse,
    ErrorName,
    HealthResponse,
    KeyMetadataResponse,
    RequestMetadata,
    XKSError,
    cdiv,
    dumps,
    parse_decrypt_response,
    parse_health_response,
    parse_key_metadata_response,
)

__all__ = [
    "SERVICE",
    "UnavailableKind",
    "XKSClient",
    "XKSClientError",
    "XKSConnection",
    "XKSInvalidResponse",
    "XKSRejected",
    "XKSUnavailable",
    "parse_fingerprint",
]

SERVICE: Final = "kms-xks-proxy"
_URI_PREFIX: Final = re.compile(r"[A-Za-z0-9/_-]{0,128}")
_MAX_ATTEMPTS: Final = 2
MAX_RESPONSE_BYTES: Final = 1 << 20
# A refused connect is retried after this pause (a listener restarting, a load balancer
# swapping targets); a stale pooled connection is retried at once.
_CONNECT_RETRY_PAUSE: Final = 0.02

log = logging.getLogger("kms_proxy.xks")


# -- errors ------------------------------------------------------------------------------


class XKSClientError(Exception):
    """Base of the client's errors. Messages never hold plaintext, keys or secrets."""


class UnavailableKind(StrEnum):
    TIMEOUT = "timeout"
    CONNECT = "connect"
    TLS = "tls"
    PIN = "pin"
    CONNECTION_LOST = "connection-lost"


class XKSUnavailable(XKSClientError):
    """The proxy could not be reached or did not answer in time; ``kind`` says which."""

    def __init__(self, reason: str, *, kind: UnavailableKind) -> None:
        super().__init__(reason)
        self.reason, self.kind = reason, kind


class XKSRejected(XKSClientError):
    """The proxy answered with an XKS error (``error.name``, ``error.status``)."""

    def __init__(self, error: XKSError) -> None:
        super().__init__(f"the XKS proxy refused the request: {error.name} "
                         f"(HTTP {error.status})")
        self.error = error


class XKSInvalidResponse(XKSClientError):
    """A 200 answer that breaks the protocol: unreadable, wrong sizes, or a ciphertext data
    integrity value (CDIV) that is missing or does not match (XKS section 4.5)."""


# -- configuration -----------------------------------------------------------------------


def parse_fingerprint(value: str) -> bytes:
    """A SHA-256 fingerprint from hex, with or without colons (``AB:CD:...``).

    :raises ValueError: if it is not 32 bytes of hex.
    """
    try:
        raw = bytes.fromhex(value.replace(":", "").strip())
    except ValueError:
        raise ValueError("server_fingerprint_sha256 must be hex (colons allowed)") from None
    if len(raw) != 32:
        raise ValueError("server_fingerprint_sha256 must be a SHA-256 digest (32 bytes)")
    return raw


@dataclass(frozen=True, slots=True)
class XKSConnection:
    """How an external instance reaches its XKS proxy (the XKI connection).

    ``credentials`` are SigV4 credential sets: the first signs, the others are tried in
    turn when the proxy refuses it, so that credentials can be rotated on either side
    first (XKS section 6.3).
    """

    endpoint: str
    uri_prefix: str
    region: str
    credentials: tuple[Credential, ...] = field(repr=False)
    ca: Path
    client_cert: Path
    client_key: Path
    server_fingerprint_sha256: str | None = None
    timeout: float = 0.25

    def __post_init__(self) -> None:
        authority = self.endpoint.removeprefix("https://")
        if authority == self.endpoint or not authority or "/" in authority:
            raise ValueError("endpoint must be https://host[:port], without a path")
        if not _URI_PREFIX.fullmatch(self.uri_prefix.strip("/")):
            raise ValueError("uri_prefix must be up to 128 characters of A-Z a-z 0-9 / _ -")
        if not self.credentials:
            raise ValueError("credentials needs at least one credential set")
        if not 0 < self.timeout <= 60:
            raise ValueError("timeout must be more than 0 and at most 60 seconds")
        if self.server_fingerprint_sha256 is not None:
            parse_fingerprint(self.server_fingerprint_sha256)

    @property
    def base_url(self) -> str:
        """``https://host:port[/prefix]/kms/xks/v1`` (XKS section 3)."""
        prefix = self.uri_prefix.strip("/")
        return f"{self.endpoint}/{prefix}/kms/xks/v1" if prefix else \
            f"{self.endpoint}/kms/xks/v1"


# -- the client --------------------------------------------------------------------------


@dataclass(slots=True)
class _Attempt:
    """What one request attempt learnt about its connection (set by the connector)."""

    reused: bool = False


# The attempt being made by the current task: the connector marks it, the retry loop reads it.
_ATTEMPT: ContextVar[_Attempt | None] = ContextVar("xks_attempt", default=None)


class _PoolConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` that tells the current attempt whether its connection came from
    the keep-alive pool (a protocol it has handed out before).

    aiohttp's tracing can say the same (``on_connection_reuseconn``), but a session with a
    trace config builds and awaits every signal of every request: about 14% of the
    client's CPU per call (a local TLS server, ``async with session.post``, 2 runs of
    5 x 4000 calls: 118 vs 136 and 158 vs 181 µs).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handed_out: weakref.WeakSet[Any] = weakref.WeakSet()

    async def connect(self, req: ClientRequest, traces: list[Trace],
                      timeout: aiohttp.ClientTimeout) -> Connection:  # noqa: ASYNC109 (aiohttp's)
        while True:
            connection = await super().connect(req, traces, timeout)
            protocol = connection.protocol
            if protocol is None:
                return connection
            if protocol not in self._handed_out:
                self._handed_out.add(protocol)
                return connection
            if protocol.should_close:
                # Bytes arrived while it sat in the pool (an answer sent twice, an idle
                # 408): they would be read as this request's answer, another caller's
                # plaintext perhaps. Such a connection is closed, never reused.
                log.warning("XKS proxy sent data on an idle connection; closing it")
                connection.close()
                continue
            attempt = _ATTEMPT.get()
            if attempt is not None:
                attempt.reused = True
            return connection

    async def _create_connection(
            self, req: ClientRequest, traces: list[Trace],
            timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> ResponseHandler:
        """A new connection, finished even when its caller's budget runs out meanwhile:
        it then goes to the pool for the next call (``BaseConnector._release``: the hook
        subclasses of aiohttp's connectors use). Only new connections pay the extra task;
        a call that takes one from the pool does not come here.

        Otherwise, after a short stall under load, every call that timed out aborted its
        handshake, the pool never refilled and nearly every later call timed out in a
        handshake too, for as long as the load lasted (400 ms of stall at 600 calls/s: 3
        to 28% of calls succeeded for the next 4 s)."""
        task = asyncio.ensure_future(super()._create_connection(req, traces, timeout))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            key = req.connection_key
            task.add_done_callback(lambda done: self._pool_late(key, done))
            raise

    def _pool_late(self, key: ConnectionKey, done: asyncio.Future[ResponseHandler]) -> None:
        if not done.cancelled() and done.exception() is None:
            self._release(key, done.result())


class XKSClient:
    """XKS Proxy API v1 calls over one persistent mTLS + SigV4 connection pool.

    Use as an async context manager; every method needs the session to be open.
    """

    def __init__(self, connection: XKSConnection, *, limit: int = 64,
                 keepalive: float = 30.0) -> None:
        self.connection = connection
        self._limit = limit
        self._keepalive = keepalive
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | None = None
        # The credential that last worked; rotation moves it, later calls start there.
        self._credential_index = 0
        self._signer = Signer(region=connection.region, service=SERVICE)
        # Host given, not left to botocore: it would parse the URL twice per signature, a
        # third of the signing time (benchmarks/sigv4_sign.py). aiohttp sends this value.
        self._headers = MappingProxyType({
            "Content-Type": "application/json",
            "Host": connection.endpoint.removeprefix("https://")})

    async def __aenter__(self) -> XKSClient:
        conn = self.connection
        # Loading certificates reads files: off the event loop.
        self._ssl = await asyncio.to_thread(client_context, ca=conn.ca,
                                            cert=conn.client_cert, key=conn.client_key)
        pin: ssl.SSLContext | aiohttp.Fingerprint = self._ssl
        if conn.server_fingerprint_sha256 is not None:
            # The connector carries the pin, each request the verifying context (see the
            # module docstring for why both are needed).
            pin = aiohttp.Fingerprint(parse_fingerprint(conn.server_fingerprint_sha256))
        connector = _PoolConnector(ssl=pin, limit=self._limit, limit_per_host=self._limit,
                                   keepalive_timeout=self._keepalive)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # One clock: the per-call asyncio.timeout. aiohttp's 5-minute default is off.
            timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_read=None,
                                          sock_connect=None),
            # Never read proxy settings or netrc from the environment after startup.
            trust_env=False, raise_for_status=False,
            # XKS answers are small JSON: no compression asked for, none undone. A
            # compressed answer would get past the size cap (a 1 MB gzip of 1 GB).
            auto_decompress=False, skip_auto_headers=("Accept-Encoding",))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def timeout(self) -> float:
        return self.connection.timeout

    # -- API -------------------------------------------------------------------------------

    async def get_key_metadata(self, external_key_id: str,
                               metadata: RequestMetadata) -> KeyMetadataResponse:
        """GetKeyMetadata (XKS section 4.2).

        :raises XKSUnavailable: :raises XKSRejected: :raises XKSInvalidResponse:
        """
        body = await self._call(f"keys/{_key_path(external_key_id)}/metadata",
                                {"requestMetadata": metadata.to_wire()})
        return _parsed("GetKeyMetadata", parse_key_metadata_response, body)

    async def encrypt(self, external_key_id: str, request: EncryptRequest) -> EncryptResponse:
        """Encrypt (XKS section 4.3). When ``request.want_cdiv`` is set, the response's
        CDIV is recomputed here and must match (XKS section 4.5).

        :raises XKSUnavailable: :raises XKSRejected:
        :raises XKSInvalidResponse: also for a missing or wrong CDIV.
        """
        body = await self._call(f"keys/{_key_path(external_key_id)}/encrypt",
                                request.to_wire())
        response = _parsed("Encrypt", EncryptResponse.from_wire, body)
        if len(response.ciphertext) != len(request.plaintext):
            # AES-GCM adds no padding: the ciphertext has the plaintext's length (XKS 4.3).
            raise XKSInvalidResponse("Encrypt returned a ciphertext of the wrong length")
        if request.want_cdiv:
            if response.cdiv is None:
                raise XKSInvalidResponse("Encrypt response lacks the requested "
                                         "ciphertextDataIntegrityValue")
            expected = cdiv(request.aad, response.ciphertext_metadata, response.iv,
                            response.ciphertext, response.tag)
            if not hmac.compare_digest(expected, response.cdiv):
                raise XKSInvalidResponse("Encrypt response failed its integrity check "
                                         "(ciphertextDataIntegrityValue mismatch)")
        return response

    async def decrypt(self, external_key_id: str, request: DecryptRequest) -> bytes:
        """Decrypt (XKS section 4.6); returns the plaintext.

        :raises XKSUnavailable: :raises XKSRejected: :raises XKSInvalidResponse:
        """
        body = await self._call(f"keys/{_key_path(external_key_id)}/decrypt",
                                request.to_wire())
        plaintext = _parsed("Decrypt", parse_decrypt_response, body)
        if len(plaintext) != len(request.ciphertext):
            raise XKSInvalidResponse("Decrypt returned a plaintext of the wrong length")
        return plaintext

    async def health(self, metadata: RequestMetadata | None = None) -> HealthResponse:
        """GetHealthStatus (XKS section 4.7), by default as the periodic ``KmsHealthCheck``.

        :raises XKSUnavailable: :raises XKSRejected: :raises XKSInvalidResponse:
        """
        metadata = metadata or RequestMetadata(kms_request_id=str(uuid.uuid4()),
                                               kms_operation="KmsHealthCheck")
        body = await self._call("health", {"requestMetadata": metadata.to_wire()})
        return _parsed("GetHealthStatus", parse_health_response, body)

    # -- transport -------------------------------------------------------------------------

    async def _call(self, api: str, wire: Mapping[str, Any]) -> Any:
        """POST ``wire`` to ``<base>/<api>`` under the budget and return the parsed JSON."""
        if self._session is None or self._ssl is None:
            raise RuntimeError("XKSClient used outside its 'async with' block")
        url = f"{self.connection.base_url}/{api}"
        data = dumps(wire)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                return await self._with_retries(url, data)
        except TimeoutError:
            elapsed = (time.monotonic() - started) * 1000
            raise XKSUnavailable(
                f"the XKS proxy did not answer within {self.timeout * 1000:.0f} ms "
                f"(gave up after {elapsed:.0f} ms)", kind=UnavailableKind.TIMEOUT) from None

    async def _with_retries(self, url: str, data: bytes) -> Any:
        credentials = self.connection.credentials
        tried_credentials = 0
        attempts = 0
        while True:
            attempts += 1
            index = self._credential_index
            attempt = _Attempt()
            try:
                status, body = await self._post(url, data, credentials[index], attempt)
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc, aiohttp.ClientSSLError) or attempts >= _MAX_ATTEMPTS:
                    raise _unavailable(exc) from exc
                # Nothing was sent: the connection never opened.
                log.debug("XKS connect failed (%s); retrying once", exc.os_error)
                await asyncio.sleep(_CONNECT_RETRY_PAUSE)
                continue
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if not attempt.reused or attempts >= _MAX_ATTEMPTS:
                    raise _unavailable(exc, fresh=not attempt.reused) from exc
                # A pooled keep-alive connection the server had already closed.
                log.debug("XKS pooled connection was closed by the proxy; retrying once")
                continue
            except aiohttp.ClientError as exc:
                raise _unavailable(exc) from exc
            if status == 200:
                try:
                    return json.loads(body)
                except (ValueError, RecursionError):
                    raise XKSInvalidResponse("the XKS proxy answered 200 with a body that "
                                             "is not JSON") from None
            error = XKSError.from_body(status, body)
            if (error.name is ErrorName.AUTHENTICATION_FAILED
                    and tried_credentials + 1 < len(credentials)):
                # Refused before any work: try the next credential set (rotation).
                tried_credentials += 1
                self._credential_index = (index + 1) % len(credentials)
                log.warning("XKS proxy refused access key %s; trying the next configured "
                            "credential", credentials[index].access_key_id)
                continue
            log.warning("XKS proxy answered %s (HTTP %d): %s", error.name, status,
                        error.message)
            raise XKSRejected(error)

    async def _post(self, url: str, data: bytes, credential: Credential,
                    attempt: _Attempt) -> tuple[int, bytes]:
        assert self._session is not None and self._ssl is not None
        headers = self._signer.sign(method="POST", url=url, body=data,
                                    headers=self._headers, credential=credential)
        token = _ATTEMPT.set(attempt)
        try:
            async with self._session.post(url, data=data, headers=headers, ssl=self._ssl,
                                          allow_redirects=False) as response:
                return response.status, await _bounded_body(response)
        finally:
            _ATTEMPT.reset(token)


# -- helpers -------------------------------------------------------------------------------


async def _bounded_body(response: aiohttp.ClientResponse) -> bytes:
    """The answer's body, refused past ``MAX_RESPONSE_BYTES``: an XKS answer is small (a
    4 KiB plaintext is under 6 KiB of JSON), and a proxy that sends megabytes within the
    budget must not make the front hold them.

    :raises XKSInvalidResponse:
    """
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise XKSInvalidResponse("the XKS proxy answered with a Content-Encoding this client "
                                 "did not ask for")
    declared = response.content_length
    if declared is not None and declared <= MAX_RESPONSE_BYTES:
        return await response.read()  # aiohttp reads no more than it declared.
    if declared is not None:
        raise XKSInvalidResponse(f"the XKS proxy's answer declares {declared} bytes, over "
                                 f"the {MAX_RESPONSE_BYTES} this client reads")
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise XKSInvalidResponse(f"the XKS proxy's answer exceeds the "
                                     f"{MAX_RESPONSE_BYTES} bytes this client reads")
        chunks.append(chunk)
    return b"".join(chunks)


def _key_path(external_key_id: str) -> str:
    if not EXTERNAL_KEY_ID.fullmatch(external_key_id):
        raise ValueError("an external key id is 1-128 characters of A-Z a-z 0-9 . _ -")
    return external_key_id


def _unavailable(exc: aiohttp.ClientError, *, fresh: bool = False) -> XKSUnavailable:
    """A transport failure as a typed error whose message says what to check."""
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return XKSUnavailable("the XKS proxy's certificate does not match the pinned "
                              "SHA-256 fingerprint", kind=UnavailableKind.PIN)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cause = exc.certificate_error
        detail = getattr(cause, "verify_message", None) or type(cause).__name__
        return XKSUnavailable(f"the XKS proxy's certificate is not trusted: {detail}",
                              kind=UnavailableKind.TLS)
    if isinstance(exc, aiohttp.ClientSSLError):
        return XKSUnavailable(f"the TLS handshake with the XKS proxy failed: {_ssl_reason(exc)}",
                              kind=UnavailableKind.TLS)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return XKSUnavailable(f"cannot connect to the XKS proxy at {exc.host}:{exc.port}: "
                              f"{exc.os_error.strerror or exc.os_error}",
                              kind=UnavailableKind.CONNECT)
    if isinstance(exc, aiohttp.ClientOSError) and _ssl_cause(exc) is not None:
        # With TLS 1.3 the server checks the client certificate after the client thinks
        # the handshake is done, so a refused certificate shows up on the first read.
        return XKSUnavailable("the XKS proxy closed the TLS connection: "
                              f"{_ssl_reason(exc)} (is the client certificate accepted?)",
                              kind=UnavailableKind.TLS)
    detail = (exc.strerror if isinstance(exc, aiohttp.ClientOSError) and exc.strerror
              else type(exc).__name__)
    hint = ""
    if fresh and (isinstance(exc, aiohttp.ServerDisconnectedError) or (
            isinstance(exc, aiohttp.ClientOSError) and exc.errno == errno.ECONNRESET)):
        # A TLS 1.3 server that refuses the client certificate does so after the client's
        # side of the handshake: it resets or closes the new connection, often without an
        # alert the client can read.
        hint = " (on a new connection: is the client certificate accepted?)"
    return XKSUnavailable(f"the connection to the XKS proxy was lost: {detail}{hint}",
                          kind=UnavailableKind.CONNECTION_LOST)


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _ssl_reason(exc: BaseException) -> str:
    cause = _ssl_cause(exc)
    if cause is None:
        return type(exc).__name__
    return str(getattr(cause, "reason", None) or getattr(cause, "strerror", None)
               or type(cause).__name__)


T = TypeVar("T")


def _parsed(api: str, parse: Callable[[Any], T], body: Any) -> T:
    """Parse a 200 answer with the shared wire models; a malformed one is the proxy's fault."""
    try:
        return parse(body)
    except XKSError as exc:
        raise XKSInvalidResponse(f"unreadable {api} response: {exc.message}") from None
