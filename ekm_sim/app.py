"""The XKS edge: routes, middlewares and error rendering. Thin: parse, call the key store,
serialise.

Middlewares, from the outside in:
1. ``_request_log``: one JSON line per request (never plaintext, keys or secrets); it is
   outermost so that it also sees the rendered errors;
2. ``_errors``: every failure, framework rejections included, becomes an XKS error body;
3. ``_client_subject``: a verified client certificate whose subject is not allow-listed
   gets 401 before any work;
then, per key store (a sub-app mounted at its URI prefix):
4. ``_sigv4``: the store's credentials;
5. ``_quota``: the store's request quota.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from ekm_sim import __version__
from ekm_sim.config import Config, StoreConfig
from ekm_sim.errors import (
    AccessDenied,
    EKMError,
    HSMFailure,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
    KeyUsageNotPermitted,
    Overloaded,
    TooLarge,
)
from ekm_sim.keystore import KeyStore
from ekm_sim.registry import KeyRegistry, RegistryError
from shared import xks
from shared.pkcs11pool import PKCS11Pool
from shared.ratelimit import TokenBucket
from shared.serving import (
    BODY_TIMEOUT_S,
    CLIENT_CLOSED_REQUEST,
    BodyRefused,
    continue_if_expected,
    expectation_refused,
    line_writer,
    read_body,
)
from shared.sigv4 import SigV4Error, SigV4Verifier
from shared.tls import names_allowed, peer_names
from shared.xks import ErrorName, XKSError

__all__ = ["CONFIG", "KEYSTORE", "create_app", "reload_credentials", "unparsable_answer"]

CONFIG: Final = web.AppKey("config", Config)
KEYSTORE: Final = web.AppKey("keystore", KeyStore)
STORE: Final = web.AppKey("store", StoreConfig)
VERIFIER: Final = web.AppKey("verifier", SigV4Verifier)
BUCKET: Final = web.AppKey("bucket", TokenBucket)
# Each store's verifier by URI prefix, so that credentials can be rotated while running.
VERIFIERS: Final = web.AppKey("verifiers", dict)
# What the request log records about this request, filled in as the request goes.
LOG_FIELDS: Final = web.RequestKey("log_fields", dict)
# Writes one request-log line (shared.serving.line_writer, chosen when the app is made).
LOG_LINE: Final[web.AppKey[Callable[[str], None]]] = web.AppKey("log_line")

request_log = logging.getLogger("ekm_sim.requests")
log = logging.getLogger("ekm_sim.xks")

SERVICE: Final = "kms-xks-proxy"
_MAX_BODY: Final = 512 * 1024

# Each key store error's XKS name, in one place.
_ERROR_NAMES: Final[dict[type[EKMError], ErrorName]] = {
    KeyNotFound: ErrorName.KEY_NOT_FOUND,
    AccessDenied: ErrorName.ACCESS_DENIED,
    TooLarge: ErrorName.UNSUPPORTED_OPERATION,
    KeyDisabled: ErrorName.INVALID_STATE,
    KeyUsageNotPermitted: ErrorName.INVALID_KEY_USAGE,
    InvalidCiphertext: ErrorName.INVALID_CIPHERTEXT,
    Overloaded: ErrorName.THROTTLING,
    HSMFailure: ErrorName.INTERNAL,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(obj: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=xks.dumps(obj), status=status, content_type="application/json")


def render_error(error: XKSError, *, status: int | None = None) -> web.Response:
    return _json(error.body(), status or error.status)


def unparsable_answer(status: int) -> web.Response:
    """The answer to a request that is not valid HTTP (``shared.unparsable``), without the
    parser's message, which quotes the request."""
    return render_error(XKSError(ErrorName.VALIDATION, "the request is not valid HTTP/1.1"),
                        status=status)


def _from_http(exc: web.HTTPException) -> tuple[XKSError, int | None]:
    if exc.status == 404:
        return XKSError(ErrorName.INVALID_URI_PATH, "no XKS API at this path"), None
    if exc.status == 405:
        # "A GET on any of the four API URIs MUST return 405" (spec L114-120): the one status
        # outside the spec's error table, so it keeps its own code with a readable body.
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()))) or "POST"
        what = "XKS APIs accept" if allowed == "POST" else "this path accepts"
        return XKSError(ErrorName.VALIDATION, f"{what} only {allowed}"), 405
    if exc.status == 413:
        return XKSError(ErrorName.UNSUPPORTED_OPERATION,
                        f"request body larger than {_MAX_BODY} bytes"), None
    return XKSError(ErrorName.VALIDATION, exc.reason), None


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    fields = request[LOG_FIELDS]
    allow = "POST"
    try:
        if expectation_refused(request):
            raise _expect_refused()
        return await handler(request)
    except XKSError as exc:
        error, status = exc, None
    except EKMError as exc:
        error, status = XKSError(_ERROR_NAMES[type(exc)], str(exc)), None
    except SigV4Error as exc:
        error, status = XKSError(ErrorName.AUTHENTICATION_FAILED, str(exc)), None
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error, status = _from_http(exc)
        allow = ", ".join(sorted(getattr(exc, "allowed_methods", ()))) or allow
    except ConnectionResetError:
        # The client went away before its request was read (a partial body): no one is
        # left to answer, and it is not the simulator's failure.
        log.info("client disconnected in the middle of its request")
        fields["outcome"] = "ClientDisconnected"
        return web.Response(status=CLIENT_CLOSED_REQUEST, reason="Client Closed Request")
    except RegistryError:
        log.exception("key registry unreadable")
        error, status = XKSError(ErrorName.INTERNAL, "key registry unavailable"), None
    except Exception:
        # Tracebacks go to our log only; the caller gets a generic, typed error.
        log.exception("unexpected failure")
        error, status = XKSError(ErrorName.INTERNAL, "internal error"), None
    fields["outcome"] = str(error.name)
    response = render_error(error, status=status)
    if status == 405:
        response.headers["Allow"] = allow
    return response


_LOG_JSON: Final = json.JSONEncoder(separators=(",", ":"))
_log_clock: tuple[int, str] = (-1, "")  # The last second formatted, and its text.


def _log_time() -> str:
    # Formatted once a second, not per request.
    global _log_clock
    second = int(time.time())
    if second != _log_clock[0]:
        _log_clock = (second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)))
    return _log_clock[1]


@web.middleware
async def _request_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    fields = request[LOG_FIELDS] = {}
    response = await handler(request)
    if request_log.isEnabledFor(logging.INFO):
        record = {
            "time": _log_time(),
            "kmsRequestId": fields.get("kmsRequestId"),
            "operation": fields.get("operation"),
            "kmsOperation": fields.get("kmsOperation"),
            "uriPrefix": fields.get("uriPrefix"),
            "keyId": fields.get("keyId"),
            "principal": fields.get("principal"),
            "accessKeyId": fields.get("accessKeyId"),
            "outcome": fields.get("outcome", "ok" if response.status < 400 else "error"),
            "status": response.status,
            "latencyMs": round((time.perf_counter() - started) * 1000, 3),
            "remote": request.remote,
        }
        request.app[LOG_LINE](_LOG_JSON.encode(record))
    return response


def _client_subject_middleware(allowed: tuple[str, ...]) -> Any:
    @web.middleware
    async def _client_subject(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport else None
        if peercert is not None and not names_allowed(peer_names(peercert), allowed):
            raise XKSError(ErrorName.AUTHENTICATION_FAILED,
                           "client certificate subject is not allowed")
        return await handler(request)

    return _client_subject


@web.middleware
async def _sigv4(request: web.Request, handler: Handler) -> web.StreamResponse:
    store = request.app[STORE]
    request[LOG_FIELDS]["uriPrefix"] = store.uri_prefix
    # Route and method come first (the reference proxy's order): a request to an unknown
    # path or with GET gets 404/405 whether or not it is signed.
    unmatched = request.match_info.http_exception
    if unmatched is not None:
        raise unmatched
    try:
        body = await read_body(request)
    except TimeoutError:
        raise XKSError(ErrorName.VALIDATION, "the request body did not arrive within "
                       f"{BODY_TIMEOUT_S:.0f} s") from None
    except BodyRefused as exc:
        raise XKSError(ErrorName.VALIDATION, str(exc)) from None
    access_key_id = request.app[VERIFIER].verify(
        method=request.method,
        raw_path=request.raw_path.split("?", 1)[0],
        query_string=request.query_string,
        headers=request.headers,
        body=body,
    )
    request[LOG_FIELDS]["accessKeyId"] = access_key_id
    return await handler(request)


@web.middleware
async def _quota(request: web.Request, handler: Handler) -> web.StreamResponse:
    bucket = request.app.get(BUCKET)
    if bucket is not None and not bucket.take():
        raise XKSError(ErrorName.THROTTLING,
                       f"more than {request.app[STORE].quota_rps:g} requests/s for this prefix")
    return await handler(request)


async def _body(request: web.Request, operation: str) -> Any:
    request[LOG_FIELDS]["operation"] = operation
    if request.content_type != "application/json":
        raise XKSError(ErrorName.VALIDATION, "Content-Type must be application/json")
    fields = request[LOG_FIELDS]
    fields["keyId"] = request.match_info.get("key_id")
    try:
        body = json.loads(await request.read())
    except (ValueError, RecursionError):
        # ValueError covers UnicodeDecodeError; RecursionError is nesting deeper than the
        # parser's recursion limit (400 KB of "[" is under the body limit).
        raise XKSError(ErrorName.VALIDATION, "the body is not valid JSON") from None
    # Logged before validation too (spec: log each call's request metadata, and whether it
    # failed): a request the parser refuses still names its kmsRequestId.
    metadata = body.get("requestMetadata") if isinstance(body, dict) else None
    if isinstance(metadata, dict):
        for log_name, wire_name in (("kmsRequestId", "kmsRequestId"),
                                    ("kmsOperation", "kmsOperation"),
                                    ("principal", "awsPrincipalArn")):
            value = metadata.get(wire_name)
            if isinstance(value, str):
                fields[log_name] = value[:512]
    return body


def _note(request: web.Request, metadata: xks.RequestMetadata, key_id: str | None) -> None:
    fields = request[LOG_FIELDS]
    fields["kmsRequestId"] = metadata.kms_request_id
    fields["kmsOperation"] = metadata.kms_operation
    fields["principal"] = metadata.aws_principal_arn
    fields["keyId"] = key_id


async def get_key_metadata(request: web.Request) -> web.Response:
    body = await _body(request, "GetKeyMetadata")
    metadata, key_id = xks.parse_metadata(body), request.match_info["key_id"]
    _note(request, metadata, key_id)
    info = await request.config_dict[KEYSTORE].describe(
        request.app[STORE], key_id, principal=metadata.aws_principal_arn)
    return _json(xks.KeyMetadataResponse(
        key_spec=info.spec, key_usage=info.usage,
        key_status="ENABLED" if info.enabled else "DISABLED").to_wire())


async def encrypt(request: web.Request) -> web.Response:
    body = await _body(request, "Encrypt")
    req, key_id = xks.parse_encrypt(body), request.match_info["key_id"]
    _note(request, req.metadata, key_id)
    sealed = await request.config_dict[KEYSTORE].encrypt(
        request.app[STORE], key_id, req.plaintext, req.aad, want_cdiv=req.want_cdiv,
        principal=req.metadata.aws_principal_arn)
    return _json(xks.EncryptResponse(
        ciphertext=sealed.ciphertext, iv=sealed.iv, tag=sealed.tag,
        ciphertext_metadata=sealed.ciphertext_metadata, cdiv=sealed.cdiv).to_wire())


async def decrypt(request: web.Request) -> web.Response:
    body = await _body(request, "Decrypt")
    req, key_id = xks.parse_decrypt(body), request.match_info["key_id"]
    _note(request, req.metadata, key_id)
    plaintext = await request.config_dict[KEYSTORE].decrypt(
        request.app[STORE], key_id, req.ciphertext, iv=req.iv, tag=req.tag, aad=req.aad,
        ctm=req.ciphertext_metadata, principal=req.metadata.aws_principal_arn)
    return _json({"plaintext": xks.b64(plaintext)})


async def get_health_status(request: web.Request) -> web.Response:
    body = await _body(request, "GetHealthStatus")
    _note(request, xks.parse_health(body), None)
    config = request.config_dict[CONFIG]
    health = await request.config_dict[KEYSTORE].health()
    status = (xks.HealthStatus.UNAVAILABLE if not health.healthy
              else xks.HealthStatus.DEGRADED if health.degraded else xks.HealthStatus.ACTIVE)
    token = health.token
    return _json(xks.HealthResponse(
        fleet_size=config.server.workers,
        proxy_vendor="ekm-reference",
        proxy_model=f"ekm-sim {__version__}",
        ekm_vendor=token.get("manufacturer") or "unknown",
        ekm_fleet=(xks.FleetEntry(
            id=token.get("serial") or token.get("label", "token"),
            model=f"{token.get('model', 'unknown')} token {token.get('label', '')}".strip(),
            health_status=status),),
    ).to_wire())


def _expect_refused() -> XKSError:
    """Every answer here is JSON, also to an Expect other than 100-continue."""
    return XKSError(ErrorName.VALIDATION, "only Expect: 100-continue is understood")


async def ping(request: web.Request) -> web.Response:
    """Load balancer health check (spec L718-721): no auth, no crypto. Also served on the
    plain-HTTP ``ping_port``, which has no middleware: the Expect check is repeated here."""
    if expectation_refused(request):
        return render_error(_expect_refused())
    return web.Response(text=f"pong from ekm-sim {__version__}")


def _store_app(store: StoreConfig, verifier: SigV4Verifier) -> web.Application:
    app = web.Application(middlewares=[_sigv4, _quota], client_max_size=_MAX_BODY)
    app[STORE] = store
    app[VERIFIER] = verifier
    if store.quota_rps > 0:
        app[BUCKET] = TokenBucket(rate=store.quota_rps, burst=max(1.0, store.quota_rps))
    for path, handler in (("/keys/{key_id:[A-Za-z0-9._-]{1,128}}/metadata", get_key_metadata),
                          ("/keys/{key_id:[A-Za-z0-9._-]{1,128}}/encrypt", encrypt),
                          ("/keys/{key_id:[A-Za-z0-9._-]{1,128}}/decrypt", decrypt),
                          ("/health", get_health_status)):
        app.router.add_post(path, handler, expect_handler=continue_if_expected)
    return app


def create_app(config: Config, *, pool: PKCS11Pool | None = None) -> web.Application:
    """The simulator's application. Opens the token in ``cleanup_ctx``.

    ``pool`` lets a caller share an already open pool (tests, several apps in one process).
    """
    middlewares: list[Any] = [_request_log, _errors]
    if config.tls.enabled and config.tls.allowed_client_names:
        middlewares.append(_client_subject_middleware(config.tls.allowed_client_names))
    app = web.Application(middlewares=middlewares, client_max_size=_MAX_BODY)
    app[CONFIG] = config
    app[LOG_LINE] = line_writer(request_log)

    async def keystore_ctx(app: web.Application) -> Any:
        registry = KeyRegistry(config.registry)
        if pool is not None:
            app[KEYSTORE] = KeyStore(pool=pool, registry=registry, limits=config.limits,
                                     health=config.health,
                                     iv_from_hsm=config.hsm.iv_source == "hsm")
            yield
            return
        async with PKCS11Pool(config.hsm.pool()) as own_pool:
            app[KEYSTORE] = KeyStore(pool=own_pool, registry=registry, limits=config.limits,
                                     health=config.health,
                                     iv_from_hsm=config.hsm.iv_source == "hsm")
            yield

    app.cleanup_ctx.append(keystore_ctx)
    app.router.add_get("/ping", ping, expect_handler=continue_if_expected)
    verifiers: dict[str, SigV4Verifier] = {}
    for store in config.stores:
        verifiers[store.uri_prefix] = SigV4Verifier(service=SERVICE, region=store.region,
                                                    credentials=store.credentials)
        app.add_subapp(store.base_path, _store_app(store, verifiers[store.uri_prefix]))
    app[VERIFIERS] = verifiers
    return app


def reload_credentials(app: web.Application, config: Config) -> list[str]:
    """Take each existing store's SigV4 credentials from ``config`` (spec L683-690: changes
    SHOULD take effect without a restart). Other changes need a restart; the returned
    warnings say which were ignored.
    """
    verifiers: dict[str, SigV4Verifier] = app[VERIFIERS]
    running: Config = app[CONFIG]
    before = {s.uri_prefix: s for s in running.stores}
    warnings = []
    for store in config.stores:
        verifier = verifiers.get(store.uri_prefix)
        if verifier is None:
            warnings.append(f"new store {store.uri_prefix!r} needs a restart")
            continue
        verifier.set_credentials(store.credentials)
        old = before.get(store.uri_prefix)
        changed = _changed_fields(old, store, ignore={"credentials"}) if old else []
        if changed:
            warnings.append(f"store {store.uri_prefix!r}: {', '.join(changed)} changed; "
                            "only credentials are reloaded, restart for the rest")
    for prefix in verifiers.keys() - {s.uri_prefix for s in config.stores}:
        warnings.append(f"store {prefix!r} was removed from the config; it stays until restart")
    changed = _changed_fields(running, config, ignore={"stores"})
    if changed:
        warnings.append(f"{', '.join(changed)} changed; restart to apply")
    return warnings


def _changed_fields(old: Any, new: Any, *, ignore: set[str]) -> list[str]:
    """The names of the dataclass fields that differ between ``old`` and ``new``."""
    return [f.name for f in dataclasses.fields(old)
            if f.name not in ignore and getattr(old, f.name) != getattr(new, f.name)]
