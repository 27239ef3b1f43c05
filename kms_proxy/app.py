"""The Alibaba RPC edge: ``POST /`` (and ``GET /``) with the action in ``x-acs-action`` or
``Action``. Thin: authenticate, parse, one core call, serialise, audit.

Middleware, outermost first: ``_envelope`` gives each request its id, renders every
failure (framework rejections included) as the Alibaba error envelope, and never lets a
traceback out. Authentication happens in ``rpc`` because the action and the signature come
from the same parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any, Final
from urllib.parse import parse_qsl

from aiohttp import web

from kms_proxy.api.actions import ACTIONS, NOT_IMPLEMENTED, Call
from kms_proxy.api.errors import ApiError, error_body, from_core
from kms_proxy.api.jwt_auth import TokenError, TokenVerifier, TrustedIssuer
from kms_proxy.api.nonce_journal import NonceJournal
from kms_proxy.api.params import Params
from kms_proxy.api.signing import AccessKey, RequestVerifier, SignatureError
from kms_proxy.backends.base import KeyBackend
from kms_proxy.backends.external import ExternalBackend, HealthProbe
from kms_proxy.backends.hsm import HSMBackend
from kms_proxy.backends.software import SoftwareBackend
from kms_proxy.backends.xks_client import XKSClient, XKSConnection
from kms_proxy.config import Config, ConfigError, HSMTokenConfig, XKIConfig
from kms_proxy.core.audit import AuditEvent, AuditLog, Outcome
from kms_proxy.core.calls import REQUEST_ID as REQUEST_ID_VAR
from kms_proxy.core.calls import RESOLVED_KEY, RESOLVED_KEYS
from kms_proxy.core.capabilities import Op, require_principal
from kms_proxy.core.errors import KmsError
from kms_proxy.core.lifecycle import SystemEvent
from kms_proxy.core.model import Instance, KeyKind, Principal, PrincipalKind
from kms_proxy.core.service import KeyService, ServiceConfig
from kms_proxy.openapi import openapi_document
from kms_proxy.store.sqlite import SQLiteStore
from shared.pkcs11pool import DispatchMode, PKCS11Pool, PoolConfig
from shared.serving import (
    BODY_TIMEOUT_S,
    CLIENT_CLOSED_REQUEST,
    BodyRefused,
    continue_if_expected,
    expectation_refused,
    read_body,
)
from shared.sigv4 import Credential

__all__ = ["AUDIT", "CONFIG", "SERVICE", "create_app", "unparsable_answer"]

CONFIG: Final = web.AppKey("config", Config)
SERVICE: Final = web.AppKey("service", KeyService)
AUDIT: Final = web.AppKey("audit", AuditLog)
VERIFIER: Final = web.AppKey("verifier", RequestVerifier)
TOKENS: Final = web.AppKey("tokens", TokenVerifier)
# The accounts this front hosts: a service token acting for any other is refused.
ACCOUNT_IDS: Final = web.AppKey("account_ids", frozenset[str])
REQUEST_ID: Final = web.RequestKey("request_id", str)

API_VERSION: Final = "2016-01-20"
# Parameters of the signature protocol itself, not of the action (legacy RPC scheme).
# RegionId is a common parameter too, but the batch tag actions take it as their own: it
# stays among the business parameters (the others ignore it).
_PROTOCOL_PARAMS: Final = frozenset({
    "Action", "Version", "Format", "Timestamp", "SignatureNonce", "SignatureMethod",
    "SignatureVersion", "AccessKeyId", "Signature", "SecurityToken",
})
log = logging.getLogger("kms_proxy.api")
access_log = logging.getLogger("kms_proxy.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")


def _from_http(exc: web.HTTPException) -> ApiError:
    if exc.status == 404:
        return ApiError("InvalidAction.NotFound", 404, "Specified api is not found.")
    if exc.status == 405:
        return ApiError("UnsupportedHTTPMethod", 403, "The HTTP method is not supported.")
    if exc.status == 413:
        return ApiError("InvalidParameter", 400, "The request is too large.")
    return ApiError("InvalidParameter", 400, exc.reason)


def unparsable_answer(status: int) -> web.Response:
    """The answer to a request that is not valid HTTP (``shared.unparsable``): the parser's
    message is not repeated, since it quotes the request, e.g. a query's Plaintext."""
    error = ApiError("InvalidParameter", status, "The request is not valid HTTP/1.1.")
    return _json(error_body(error, str(uuid.uuid4()).upper()), status)


@web.middleware
async def _envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request[REQUEST_ID] = str(uuid.uuid4()).upper()
    # The core reads it when it tells a backend (an external key manager) who calls.
    REQUEST_ID_VAR.set(request_id)
    # Whatever context this request's task started from, no earlier request's key counts.
    RESOLVED_KEY.set(None)
    RESOLVED_KEYS.set(())
    started = time.perf_counter()
    try:
        if expectation_refused(request):
            raise ApiError("InvalidParameter", 400, 'The specified parameter "Expect" is not '
                           "valid. Only Expect: 100-continue is understood.")
        response = await handler(request)
    except ApiError as exc:
        response = _json(error_body(exc, request_id), exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _from_http(exc)
        response = _json(error_body(error, request_id), error.status)
    except ConnectionResetError:
        # The client went away before its request was read (a partial body): no one is
        # left to answer, and it is not the front's failure.
        log.info("request %s: the client disconnected in the middle of it", request_id)
        response = web.Response(status=CLIENT_CLOSED_REQUEST, reason="Client Closed Request")
    except Exception:
        log.exception("unexpected failure in request %s", request_id)
        error = ApiError("InternalFailure", 500, "Internal Failure.")
        response = _json(error_body(error, request_id), 500)
    if access_log.isEnabledFor(logging.INFO):
        access_log.info("%s %s %s %d %.2fms", request_id, request.remote, request.method,
                        response.status, (time.perf_counter() - started) * 1000)
    return response


async def _parameters(request: web.Request) -> tuple[dict[str, str], dict[str, str], bytes]:
    """Query and form parameters (each name once) and the raw body."""
    try:
        body = await read_body(request)
    except TimeoutError:
        raise ApiError("InvalidParameter", 400, "The request body did not arrive within "
                       f"{BODY_TIMEOUT_S:.0f} s.") from None
    except BodyRefused as exc:
        message = str(exc)
        raise ApiError("InvalidParameter", 400, f"{message[:1].upper()}{message[1:]}.") from None
    query: dict[str, str] = {}
    try:
        # Strict: invalid UTF-8 after percent-decoding is refused, not replaced by U+FFFD
        # (a Plaintext would be encrypted changed).
        query_pairs = parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True,
                                errors="strict")
    except UnicodeDecodeError:
        raise ApiError("InvalidParameter", 400, "The query string is not valid UTF-8.") \
            from None
    for name, value in query_pairs:
        if name in query:
            raise ApiError("InvalidParameter", 400, f'The parameter "{name}" is repeated.')
        query[name] = value
    form: dict[str, str] = {}
    if request.content_type == "application/x-www-form-urlencoded" and body:
        try:
            pairs = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=True,
                              errors="strict")
        except UnicodeDecodeError:
            raise ApiError("InvalidParameter", 400,
                           "The form body is not valid UTF-8.") from None
        except ValueError:
            raise ApiError("InvalidParameter", 400, "The form body is malformed.") from None
        for name, value in pairs:
            if name in form or name in query:
                raise ApiError("InvalidParameter", 400,
                               f'The parameter "{name}" is repeated.')
            form[name] = value
    return query, form, body


def _authenticate(request: web.Request, query: dict[str, str], form: dict[str, str],
                  body: bytes) -> Principal:
    """An AccessKey user (ACS3 or legacy signature) or a cloud service (bearer JWT)."""
    authorization = request.headers.getall("Authorization", [])
    scheme, _, token = (authorization[0].strip() if authorization else "").partition(" ")
    if scheme.lower() == "bearer":  # An auth scheme is case-insensitive (RFC 9110 11.1).
        if len(authorization) != 1:
            raise ApiError("IncompleteSignature", 400,
                           "Exactly one Authorization header is required.")
        try:
            claims = request.app[TOKENS].verify(token.strip())
        except TokenError as exc:
            raise ApiError(exc.code, exc.status, exc.message) from None
        if claims.account_id not in request.app[ACCOUNT_IDS]:
            # A trusted issuer's token for an account this front does not host: refused
            # before anything (a service key) could be made for it.
            raise ApiError("Forbidden.KmsServiceNotEnabled", 403,
                           "KMS is not enabled for the account the bearer token acts for.")
        return Principal(account_id=claims.account_id, name=claims.product,
                         kind=PrincipalKind.SERVICE, product=claims.product)
    try:
        access_key = request.app[VERIFIER].verify(
            method=request.method, raw_path=request.raw_path,
            query_string=request.rel_url.raw_query_string, headers=request.headers,
            body=body, form=form)
    except SignatureError as exc:
        raise ApiError(str(exc.code), exc.status, exc.message) from None
    return Principal(account_id=access_key.account_id, name=access_key.user)


def _audit_key(body: dict[str, Any], params: dict[str, str]) -> tuple[str | None, bool]:
    """The key an action used: the one its answer names, else the one the core resolved
    for it (by id, alias, ARN or a blob's head; ``RESOLVED_KEY``), else the reference as
    the caller gave it (a request refused before any key was found); and whether it is a
    key of the caller's account (the first two are: the core resolves no other)."""
    metadata = body.get("KeyMetadata")
    if isinstance(metadata, dict):
        return str(metadata.get("KeyId")), True
    if body.get("KeyId"):
        return str(body["KeyId"]), True
    resolved = RESOLVED_KEY.get()
    if resolved is not None:
        return resolved.key_id, True
    # A one-key batch (TagResources) refused before its key was found; a longer one is
    # listed in the details instead (RESOLVED_KEYS), naming no key.
    one_resource = params.get("ResourceId.1") if "ResourceId.2" not in params else None
    named = params.get("KeyId") or params.get("DestinationKeyId") or one_resource
    arn = params.get("ProtectedResourceArn", "")
    if not named and ":key/" in arn:
        named = arn.rsplit(":key/", 1)[1]
    if not named:
        return None, False
    return named[:256], False


def _audit(request: web.Request, action: str, principal: Principal, outcome: Outcome,
           error_code: str | None, result: dict[str, Any], params: dict[str, str]) -> None:
    """One audit event per authenticated action, successful or not (never plaintext)."""
    audit = request.app[AUDIT]
    key_id, resolved = _audit_key(result, params)
    key_arn = None
    if key_id and resolved:
        key_arn = f"acs:kms:{request.app[SERVICE].region}:{principal.account_id}:key/{key_id}"
    details: dict[str, str | int | bool | None] = {}
    version = result.get("KeyVersion")
    if "KeyVersionId" in result:
        details["KeyVersionId"] = str(result["KeyVersionId"])
    elif isinstance(version, dict) and "KeyVersionId" in version:  # CreateKeyVersion
        details["KeyVersionId"] = str(version["KeyVersionId"])
    if "AliasName" in params:
        details["AliasName"] = params["AliasName"][:256]
    batch = RESOLVED_KEYS.get()
    if len(batch) > 1:  # TagResources and its kind: every key named (at most 50).
        details["ResourceIds"] = ",".join(batch)
    audit.append(AuditEvent(
        time=audit.now(), request_id=request[REQUEST_ID], principal=principal.arn,
        account_id=principal.account_id, action=action, key_id=key_id, key_arn=key_arn,
        outcome=str(outcome), error_code=error_code, source_ip=request.remote,
        details=details))


def _trusted_issuers(config: Config) -> list[TrustedIssuer]:
    """The issuers' key files read and checked; a bad one is a configuration error."""
    issuers = []
    for n, i in enumerate(config.trusted_issuers):
        try:
            issuers.append(TrustedIssuer.from_files(
                issuer=i.issuer, audience=i.audience, algorithms=i.algorithms,
                jwks_file=i.jwks_file, pem_file=i.pem_file, max_lifetime_s=i.max_lifetime_s,
                products=i.products))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"trusted_issuers[{n}] ({i.issuer[:100]}): {exc}") from None
    return issuers


# What an action name can be (Alibaba's are CamelCase words); anything else is not echoed.
_ACTION_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")


async def rpc(request: web.Request) -> web.Response:
    """Every OpenAPI action."""
    request_id = request[REQUEST_ID]
    query, form, body = await _parameters(request)
    # Authenticate first, so an anonymous caller learns nothing about actions or versions.
    principal = _authenticate(request, query, form, body)
    action = request.headers.get("x-acs-action") or query.get("Action") or form.get("Action")
    # The legacy signature may carry every parameter, Version too, in a form body.
    version = (request.headers.get("x-acs-version") or query.get("Version")
               or form.get("Version"))
    params = {k: v for k, v in {**query, **form}.items() if k not in _PROTOCOL_PARAMS}
    outcome, result = Outcome.FAILURE, {}
    error_code: str | None = "InternalFailure"
    # Every authenticated request is audited, also one refused for its action or version.
    try:
        if not action:
            raise ApiError("MissingParameter", 400, 'The parameter "Action" is needed but '
                           "not provided.")
        if version != API_VERSION:
            shown = version[:64] if version else version
            raise ApiError("InvalidVersion", 400, f"Specified version {shown!r} is not "
                           f"valid; this service speaks {API_VERSION}.")
        spec = ACTIONS.get(action)
        if spec is None:
            if not _ACTION_NAME.fullmatch(action):  # Not echoed: it may be anything.
                raise ApiError("InvalidAction.NotFound", 404, "Specified api is not found.")
            if action in NOT_IMPLEMENTED:
                raise ApiError("InvalidAction.NotFound", 404,
                               f"Specified api {action!r} is an Alibaba Cloud KMS action "
                               "this front does not implement (README, Supported actions).")
            raise ApiError("InvalidAction.NotFound", 404, f"Specified api {action!r} is not "
                           "found.")
        op = Op(action)
        require_principal(op, principal.kind, principal.arn)
        service = request.app[SERVICE]
        service.gateway.admit(principal.account_id, op)
        result = await spec.handler(Call(service, principal, Params(params)))
        outcome, error_code = Outcome.SUCCESS, None
    except KmsError as exc:
        error = from_core(exc)
        error_code = error.code
        raise error from None
    except ApiError as exc:
        error_code = exc.code
        raise
    finally:
        # A bearer request's action comes from an unsigned header, which can hold anything
        # (non-UTF-8 bytes arrive as lone surrogates): the audit line names only real names.
        audited = action if action is None or _ACTION_NAME.fullmatch(action) else "(invalid)"
        _audit(request, audited or "", principal, outcome, error_code, result, params)
    return _json({"RequestId": request_id, **result})


async def openapi(request: web.Request) -> web.Response:
    """An OpenAPI description of the supported actions (unsigned)."""
    return _json(openapi_document(ACTIONS))


async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


def create_app(config: Config) -> web.Application:
    """The KMS front. Resources open in ``cleanup_ctx``: store, audit log, then service."""
    # Business parameters travel in the query string: 6 KB of plaintext, Base64 and
    # percent-encoded, is far beyond aiohttp's 8190-byte request line.
    app = web.Application(middlewares=[_envelope], client_max_size=1 << 20,
                          handler_args={"max_line_size": 65536, "max_field_size": 65536})
    app[CONFIG] = config
    app[VERIFIER] = RequestVerifier(
        [AccessKey(id=k.id, secret=k.secret, account_id=a.id, user=k.user)
         for a in config.accounts for k in a.access_keys],
        max_skew=timedelta(seconds=config.max_clock_skew))
    app[TOKENS] = TokenVerifier(_trusted_issuers(config))
    app[ACCOUNT_IDS] = frozenset(a.id for a in config.accounts)

    async def resources(app: web.Application) -> Any:
        async with AsyncExitStack() as stack:
            first_start = not config.database.exists()
            store = await stack.enter_async_context(SQLiteStore(config.database))
            # Before anything is served: the nonces earlier processes accepted (files read
            # once, at start), and from now on every accepted one is journaled.
            journal = nonce_journal(config, window_us=app[VERIFIER].window_us)
            if not app[VERIFIER].use_journal(journal, first_start=first_start) \
                    and not first_start:
                log.warning("no usable request-nonce journal: requests signed before this "
                            "start are refused")
            stack.callback(journal.close)
            audit = await stack.enter_async_context(
                AuditLog(config.audit_log, chain_key=config.audit_chain_key))
            software = SoftwareBackend(config.root_key)
            backends: dict[KeyKind, KeyBackend] = {
                KeyKind.SOFTWARE: software, KeyKind.DEFAULT_MASTER: software,
                KeyKind.SERVICE: software}
            if config.hsm is not None:
                backends[KeyKind.HARDWARE] = await _hsm_backend(stack, config.hsm)
            service = KeyService(
                store=store, backends=backends,
                config=ServiceConfig(
                    region=config.region, regions=config.regions,
                    default_instances=config.default_instance,
                    rotation_addon=frozenset(a.id for a in config.accounts
                                             if a.rotation_addon),
                    imported_default_keys=frozenset(
                        a.id for a in config.accounts
                        if a.default_key_material == "import"),
                    gateway_quotas=config.gateway_quotas))
            for instance_config in config.instances:
                if instance_config.xki is not None:
                    backend, probe = await _external_backend(stack, instance_config.xki)
                    service.attach_instance_backend(instance_config.id, backend,
                                                    probe.status_text)
            for instance in config.instances:
                existing = await store.get_instance(instance.id)
                await service.add_instance(Instance(
                    instance_id=instance.id, account_id=instance.account_id,
                    region=config.region, type=instance.type, name=instance.name,
                    spec_qps=instance.spec_qps, key_quota=instance.key_quota,
                    created=existing.created if existing else audit.now()[:19] + "Z"))
            service.lifecycle.on_event = _audit_system(audit)
            for account in config.accounts:
                await service.provision_default_key(account.id)
            app[SERVICE] = service
            app[AUDIT] = audit
            sweeper = asyncio.create_task(_sweep_forever(service,
                                                         config.lifecycle_interval_s))
            try:
                yield
            finally:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper

    app.cleanup_ctx.append(resources)
    app.router.add_route("POST", "/", rpc, expect_handler=continue_if_expected)
    app.router.add_route("GET", "/", rpc, expect_handler=continue_if_expected)
    app.router.add_get("/openapi.json", openapi, expect_handler=continue_if_expected)
    app.router.add_get("/health", health, expect_handler=continue_if_expected)
    return app


def nonce_journal(config: Config, *, window_us: int) -> NonceJournal:
    """The journal of accepted request nonces, beside the database."""
    return NonceJournal(config.database.with_name(config.database.name + ".nonces"),
                        window_us=window_us)


def _audit_system(audit: AuditLog) -> Callable[[SystemEvent], None]:
    """Audit what KMS did on its own (default and service keys it made; deletion windows,
    material expiry and automatic rotation) as done by ``service/kms``: no token can act
    under that name (jwt_auth.RESERVED_PRODUCTS)."""
    def record(event: SystemEvent) -> None:
        key = event.key
        details: dict[str, str | int | bool | None] = {}
        if event.version_id:
            details["KeyVersionId"] = event.version_id
        if event.alias:
            details["AliasName"] = event.alias
        audit.append(AuditEvent(
            time=audit.now(), request_id=f"kms-{uuid.uuid4()}",
            principal=f"acs:ram::{key.account_id}:service/kms", account_id=key.account_id,
            action=event.action, key_id=key.key_id, key_arn=key.arn,
            outcome=str(Outcome.SUCCESS), error_code=None, source_ip=None, details=details))
    return record


async def _sweep_forever(service: KeyService, interval: float) -> None:
    """Run the lifecycle sweep every ``interval`` seconds."""
    while True:
        try:
            await service.lifecycle.run_lifecycle()
        except Exception:  # A store failure (a full disk): the next sweep tries again.
            log.exception("lifecycle sweep stopped early")
        await asyncio.sleep(interval)


async def _hsm_backend(stack: AsyncExitStack, hsm: HSMTokenConfig) -> KeyBackend:
    """The hardware instances' token, opened once for the process."""
    if hsm.softhsm_conf is not None:
        # SoftHSM reads this when the module loads, which happens in the pool.
        os.environ["SOFTHSM2_CONF"] = str(hsm.softhsm_conf)
    pool = await stack.enter_async_context(PKCS11Pool(PoolConfig(
        module=hsm.module, token_label=hsm.token_label, user_pin=hsm.user_pin,
        mode=DispatchMode(hsm.mode), workers=hsm.workers)))
    backend = HSMBackend(pool, wrapping_key_label=hsm.wrapping_key_label,
                         oaep_sha256_in_token=hsm.oaep_sha256_in_token)
    await backend.ensure_token_keys()
    return backend


async def _external_backend(stack: AsyncExitStack, xki: XKIConfig
                            ) -> tuple[KeyBackend, HealthProbe]:
    """One XKS client (a keep-alive pool to the instance's proxy) and its health probe."""
    client = await stack.enter_async_context(XKSClient(XKSConnection(
        endpoint=xki.endpoint, uri_prefix=xki.uri_prefix, region=xki.region,
        credentials=tuple(Credential(k, v) for k, v in xki.credentials), ca=xki.ca,
        client_cert=xki.client_cert, client_key=xki.client_key,
        server_fingerprint_sha256=xki.server_fingerprint_sha256,
        timeout=xki.timeout_ms / 1000)))
    probe = await stack.enter_async_context(HealthProbe(client,
                                                        interval=xki.health_interval_s))
    return ExternalBackend(client, probe), probe
