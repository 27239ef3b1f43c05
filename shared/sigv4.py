"""AWS Signature Version 4: verification (server side) and signing (client side).

Verification follows the request's own ``SignedHeaders`` rather than a fixed set: AWS KMS
signs ``host;x-amz-date`` while curl's ``--aws-sigv4`` also signs ``content-type``. The
``Host`` value is taken raw, with its port. Signing delegates to botocore, the signer every
AWS SDK for Python uses, so our verifier is always checked against an independent signer.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol
from urllib.parse import quote, unquote

__all__ = [
    "ACCESS_KEY_ID_PATTERN",
    "ALGORITHM",
    "SECRET_PATTERN",
    "Credential",
    "SigV4Error",
    "SigV4Verifier",
    "Signer",
    "sign_request",
]

ALGORITHM: Final = "AWS4-HMAC-SHA256"
# XksProxyAuthenticationCredentialType: AccessKeyId 20-30 of [A-Z2-7]; secret 43-64 of
# [a-zA-Z0-9/+=] (spec L760-764).
ACCESS_KEY_ID_PATTERN: Final = re.compile(r"[A-Z2-7]{20,30}")
SECRET_PATTERN: Final = re.compile(r"[a-zA-Z0-9/+=]{43,64}")
# YYYYMMDD'T'HHMMSS'Z', checked by this pattern and parsed by fromisoformat (0.25 µs against
# strptime's 8.5 µs); fromisoformat alone would also take other ISO 8601 forms.
# ISO 8601 allows 24:00:00 for the end of a day, which a fromisoformat following it reads as
# the next midnight; SigV4 dates never use it, so the pattern refuses hour 24.
_AMZ_DATE: Final = re.compile(r"[0-9]{8}T(?:[01][0-9]|2[0-3])[0-9]{4}Z")
_AUTH_HEADER: Final = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+),\s*Signature=(?P<signature>[0-9a-fA-F]{64})\s*"
)
_SPACES = re.compile(r"\s+")


class SigV4Error(Exception):
    """A request's SigV4 authentication failed. The message is safe to return to a caller."""


class Headers(Protocol):
    def getall(self, key: str, /) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class Credential:
    """One SigV4 credential set. The secret never appears in ``repr``."""

    access_key_id: str
    secret_access_key: str = field(repr=False)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.digest(key, msg.encode(), "sha256")


def _canonical_query(query_string: str) -> str:
    pairs = []
    for part in query_string.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((quote(unquote(name), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


class SigV4Verifier:
    """Verify SigV4-signed requests for one service and region against a set of credentials.

    Several credentials may be valid at once, so that a caller can rotate them (spec L683-690).
    """

    def __init__(
        self,
        *,
        service: str,
        region: str,
        credentials: Iterable[Credential],
        max_skew: timedelta = timedelta(minutes=5),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._service = service
        self._region = region
        self._secrets: dict[str, str] = {}
        self.set_credentials(credentials)
        # Deriving a signing key takes four HMACs; it changes only with the date.
        self._signing_keys: dict[tuple[str, str], bytes] = {}
        self._max_skew = max_skew
        self._clock = clock

    def set_credentials(self, credentials: Iterable[Credential]) -> None:
        """Replace the accepted credentials (rotation without a restart)."""
        self._secrets = {c.access_key_id: c.secret_access_key for c in credentials}
        self._signing_keys = {}

    def _signing_key(self, access_key_id: str, secret: str, date: str) -> bytes:
        cached = self._signing_keys.get((access_key_id, date))
        if cached is None:
            key = _hmac(("AWS4" + secret).encode(), date)
            for part in (self._region, self._service, "aws4_request"):
                key = _hmac(key, part)
            if len(self._signing_keys) > 64:
                self._signing_keys.clear()
            cached = self._signing_keys[(access_key_id, date)] = key
        return cached

    def verify(
        self, *, method: str, raw_path: str, query_string: str, headers: Headers, body: bytes
    ) -> str:
        """Check one request's signature and return the access key id that signed it.

        :raises SigV4Error: for a missing, malformed, stale or wrong signature.
        """
        auth = headers.getall("Authorization") if _has(headers, "Authorization") else []
        if len(auth) != 1:
            raise SigV4Error("missing or repeated Authorization header")
        match = _AUTH_HEADER.fullmatch(auth[0].strip())
        if match is None:
            raise SigV4Error(f"Authorization header is not a well-formed {ALGORITHM} signature")
        scope = match["credential"].split("/")
        if len(scope) != 5 or scope[4] != "aws4_request":
            raise SigV4Error("malformed credential scope")
        access_key_id, date, region, service, _ = scope
        if service != self._service or region != self._region:
            raise SigV4Error("credential scope names the wrong region or service")
        signed = match["signed"].split(";")
        if signed != sorted(signed) or "host" not in signed or "x-amz-date" not in signed:
            raise SigV4Error("SignedHeaders must be sorted and include host and x-amz-date")
        amz_date = _single(headers, "X-Amz-Date")
        try:
            if not _AMZ_DATE.fullmatch(amz_date):
                raise ValueError(amz_date)
            when = datetime.fromisoformat(amz_date)
        except ValueError:
            raise SigV4Error("X-Amz-Date is not in YYYYMMDD'T'HHMMSS'Z' form") from None
        if abs(self._clock() - when) > self._max_skew:
            raise SigV4Error("request time is too far from the server time")
        if amz_date[:8] != date:
            raise SigV4Error("credential scope date differs from X-Amz-Date")

        canonical_headers = "".join(
            f"{name}:{','.join(_SPACES.sub(' ', v.strip()) for v in _values(headers, name))}\n"
            for name in signed
        )
        payload_hash = hashlib.sha256(body).hexdigest()
        canonical_request = "\n".join((
            method,
            quote(_normalize_path(raw_path), safe="/~"),
            _canonical_query(query_string),
            canonical_headers,
            match["signed"],
            payload_hash,
        ))
        string_to_sign = "\n".join((
            ALGORITHM,
            amz_date,
            f"{date}/{region}/{service}/aws4_request",
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ))
        secret = self._secrets.get(access_key_id)
        # Compute a signature even for an unknown key, so timing does not tell them apart.
        key = self._signing_key(access_key_id, secret or "", date)
        expected = hmac.digest(key, string_to_sign.encode(), "sha256").hex()
        if not hmac.compare_digest(expected, match["signature"].lower()) or secret is None:
            raise SigV4Error("the access key id or signature is not valid")
        return access_key_id


def _normalize_path(path: str) -> str:
    """The canonical URI path for services other than S3: dot segments removed (RFC 3986
    section 5.2.4) and empty segments collapsed, as AWS signers (botocore) do before signing.
    """
    if not path:
        return "/"
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment and segment != ".":
            out.append(segment)
    trailing = "/" if path.endswith("/") and out else ""
    return "/" + "/".join(out) + trailing


def _has(headers: Headers, name: str) -> bool:
    return bool(_values(headers, name))


def _values(headers: Headers, name: str) -> list[str]:
    try:
        return headers.getall(name)
    except KeyError:
        return []


def _single(headers: Headers, name: str) -> str:
    values = _values(headers, name)
    if len(values) != 1:
        raise SigV4Error(f"exactly one {name} header is required")
    return values[0]


class Signer:
    """Signs requests with botocore's SigV4 signer for one region and service, keeping one
    ``SigV4Auth`` per credential rather than building it (and its ``Credentials``) for
    every call (0.84 to 0.98 of the time, ``benchmarks/sigv4_sign.py``)."""

    def __init__(self, *, region: str, service: str) -> None:
        self._region, self._service = region, service
        self._auths: dict[tuple[str, str], Any] = {}

    def sign(self, *, method: str, url: str, body: bytes, headers: Mapping[str, str],
             credential: Credential) -> dict[str, str]:
        """Return ``headers`` plus ``Authorization`` and ``X-Amz-Date``, signed now.

        ``Host`` is signed as given in ``headers``, else botocore takes it from ``url``
        (parsing it twice: giving it saves about a quarter of the time). Tests that need
        another time give the verifier a clock.
        """
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        cache_key = (credential.access_key_id, credential.secret_access_key)
        auth = self._auths.get(cache_key)
        if auth is None:
            auth = self._auths[cache_key] = SigV4Auth(
                Credentials(credential.access_key_id, credential.secret_access_key),
                self._service, self._region)
        request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
        auth.add_auth(request)
        return dict(request.headers.items())


def sign_request(
    *,
    method: str,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    credential: Credential,
    region: str,
    service: str,
) -> dict[str, str]:
    """One request signed with botocore (see ``Signer`` for repeated signing)."""
    return Signer(region=region, service=service).sign(
        method=method, url=url, body=body, headers=headers, credential=credential)
