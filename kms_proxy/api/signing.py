"""Alibaba Cloud OpenAPI request signatures, verified on the server side.

Two schemes reach the RPC edge from the official SDKs:

* **V3** ``ACS3-HMAC-SHA256`` (the default of ``alibabacloud-tea-openapi``): an
  ``Authorization`` header over a canonical request of method, path, query, the headers
  named in ``SignedHeaders`` and the body's SHA-256.
* **Legacy RPC** (``Config(signature_algorithm='v2')``): a ``Signature`` parameter, the
  Base64 HMAC-SHA1 of every other query *and form-body* parameter.

Canonicalisation follows what the Python SDK actually sends (tea-openapi 0.4.6
``Utils.get_authorization`` and ``Utils.get_rpcsignature``; darabonba-core 1.0.9
``compose_url``), not a generic AWS-style signer:

* The URL query is built with ``urlencode``, so a space arrives as ``+`` and a literal
  ``+`` as ``%2B``; the async transport (yarl) also unescapes ``%2F``, ``%2A`` and ``%3A``.
  The signature is over *decoded* values re-encoded with ``quote(value, safe='~')``, so the
  raw query is decoded first (``+`` meaning space), whatever escaping the transport chose.
* V3 canonical query names are re-encoded like values (the SDK leaves them as they are,
  which for its names, ``[A-Za-z0-9.]``, is the same string); legacy names are too.
* V3 signs every header the SDK set before signing (``accept``, ``user-agent`` and
  ``x-acs-credentials-provider`` included) but not the ones its transport adds later
  (``accept-encoding``, aiohttp's ``content-type: application/octet-stream``), so the
  verifier rebuilds exactly the headers the request names in ``SignedHeaders``.
* Legacy signatures cover parameters only: the ``x-acs-action`` header the SDK also sends is
  unsigned, so the action of a legacy request must come from its ``Action`` parameter.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import ClassVar, Final, Protocol
from urllib.parse import quote, unquote_plus

from kms_proxy.api.nonce_journal import NonceJournal

__all__ = [
    "ACS3_HMAC_SHA256",
    "AccessKey",
    "NonceCache",
    "RequestVerifier",
    "SignatureError",
    "SignatureErrorCode",
]

ACS3_HMAC_SHA256: Final = "ACS3-HMAC-SHA256"
# Algorithms the SDK can produce (tea-openapi ``signature_method``) that we do not accept.
_UNSUPPORTED_ACS3: Final = frozenset({"ACS3-HMAC-SM3", "ACS3-RSA-SHA256"})
_LEGACY_METHOD: Final = "HMAC-SHA1"
_LEGACY_VERSION: Final = "1.0"
# The SDK writes ``yyyy-MM-ddTHH:mm:ssZ`` (``Utils.get_timestamp``); other SDKs may add
# fractions of a second.
_TIMESTAMP: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?Z")
_AUTHORIZATION: Final = re.compile(
    r"ACS3-HMAC-SHA256 +Credential=(?P<credential>[^,\s]+), *"
    r"SignedHeaders=(?P<signed>[^,\s]+), *Signature=(?P<signature>[0-9a-fA-F]{64})"
)
# Alibaba's V3 page: every common header except Authorization must be signed when present.
_V3_REQUIRED_HEADERS: Final = frozenset({
    "host", "x-acs-action", "x-acs-version", "x-acs-date", "x-acs-signature-nonce",
    "x-acs-content-sha256",
})
_V3_SIGNED_IF_PRESENT: Final = ("x-acs-security-token", "x-acs-accesskey-id")
_LEGACY_REQUIRED: Final = ("AccessKeyId", "SignatureVersion", "SignatureNonce")
# SDK nonces are 32 hex digits, other SDKs send UUIDs; the cap bounds the replay cache's memory.
_MAX_NONCE_LENGTH: Final = 128


class SignatureErrorCode(StrEnum):
    """The Alibaba error codes a signature check can end with."""

    INVALID_ACCESS_KEY_ID_NOT_FOUND = "InvalidAccessKeyId.NotFound"
    INCOMPLETE_SIGNATURE = "IncompleteSignature"
    SIGNATURE_DOES_NOT_MATCH = "SignatureDoesNotMatch"
    ILLEGAL_TIMESTAMP = "IllegalTimestamp"
    TIMESTAMP_EXPIRED = "InvalidTimeStamp.Expired"
    SIGNATURE_NONCE_USED = "SignatureNonceUsed"


# Each code's status and message, written once. Statuses and texts follow the KMS error
# table (reference section 6.1) and Alibaba's common OpenAPI gateway errors.
_STATUS: Final[Mapping[SignatureErrorCode, int]] = MappingProxyType({
    SignatureErrorCode.INVALID_ACCESS_KEY_ID_NOT_FOUND: 404,
    SignatureErrorCode.INCOMPLETE_SIGNATURE: 400,
    SignatureErrorCode.SIGNATURE_DOES_NOT_MATCH: 400,
    SignatureErrorCode.ILLEGAL_TIMESTAMP: 400,
    SignatureErrorCode.TIMESTAMP_EXPIRED: 400,
    SignatureErrorCode.SIGNATURE_NONCE_USED: 400,
})
_MESSAGE: Final[Mapping[SignatureErrorCode, str]] = MappingProxyType({
    SignatureErrorCode.INVALID_ACCESS_KEY_ID_NOT_FOUND: "Specified access key is not found.",
    SignatureErrorCode.INCOMPLETE_SIGNATURE:
        "The request signature does not conform to Aliyun standards.",
    SignatureErrorCode.SIGNATURE_DOES_NOT_MATCH:
        "Specified signature is not matched with our calculation.",
    SignatureErrorCode.ILLEGAL_TIMESTAMP:
        "The input parameter \"Timestamp\" that is mandatory for processing this request is "
        "not supplied or not valid.",
    SignatureErrorCode.TIMESTAMP_EXPIRED: "Specified time stamp or date value is expired.",
    SignatureErrorCode.SIGNATURE_NONCE_USED: "Specified signature nonce was used already.",
})


class SignatureError(Exception):
    """A request failed authentication.

    ``code`` and ``status`` are what the Alibaba error envelope carries; ``message`` is safe
    to return to the caller and to log: it never holds a secret, an expected signature or a
    parameter value.
    """

    def __init__(self, code: SignatureErrorCode, detail: str | None = None) -> None:
        self.code: Final = code
        self.status: Final = _STATUS[code]
        base = _MESSAGE[code]
        self.message: Final = f"{base} {detail}" if detail else base
        super().__init__(self.message)


@dataclass(frozen=True, slots=True)
class AccessKey:
    """One AccessKey pair and the principal it authenticates. The secret never appears in
    ``repr``."""

    id: str
    secret: str = field(repr=False)
    account_id: str
    user: str


class Headers(Protocol):
    """The part of ``multidict.CIMultiDictProxy`` the verifier uses: case-insensitive names."""

    def getall(self, key: str, default: list[str], /) -> list[str]: ...


def _utc_now() -> datetime:
    return datetime.now(UTC)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


class NonceCache:
    """Remembers recently used ``(access key id, nonce)`` pairs, bounded in memory and time.

    A request dated ``when`` passes the date check only while ``|now - when| <= window``, so
    its nonce can be forgotten once ``when + window < now``. Entries are kept in arrival
    order and purged from the front, so each call is O(1) amortised and an entry lives at
    most ``2 * window`` after it arrived (its date was at most ``window`` ahead then).

    When ``max_size`` entries are all still live, the oldest is dropped anyway, and from then
    on every request dated no later than it is refused (``horizon``): the cache fails closed
    by narrowing the accepted window rather than letting a forgotten nonce be replayed.

    It holds up to a million entries, so it is built for the garbage collector to skip: a
    ``dict`` of strings to integer microseconds since the epoch (CPython stops tracking a
    dict that holds only atomic values; integers keep the comparisons exact), with the
    arrival order in tuples of 1024 keys (untracked once they hold only strings). An
    ``OrderedDict`` of tuples to datetimes is walked in full by every full collection:
    34-39 ms per collection for a million entries on this project's test VM, paid as a
    pause of every request in flight (BENCHMARKS.md, run F).

    Not thread-safe; it is meant for one event loop, where no call is interleaved.
    """

    _CHUNK: ClassVar[int] = 1024

    def __init__(self, *, max_size: int, window: timedelta) -> None:
        """:raises ValueError: if ``max_size`` is below 1 or ``window`` is not positive."""
        if max_size < 1:
            raise ValueError("nonce_cache_size must be at least 1")
        if window <= timedelta(0):
            raise ValueError("max_skew must be positive")
        self._max_size = max_size
        self._window = window // _MICROSECOND
        # Entry key -> the request's date in microseconds since the epoch.
        self._dates: dict[str, int] = {}
        # Arrival order: full chunks, then the open one; ``_front`` indexes the oldest key
        # of the first of them.
        self._chunks: deque[tuple[str, ...]] = deque()
        self._open: list[str] = []
        self._front = 0
        self._horizon: int | None = None
        # The latest "now" seen: a clock that steps back must not make the cache forget
        # nonces it purged by a later clock, nor accept the requests they belonged to.
        self._high_water = 0
        # Where accepted nonces are also written, for the next process (None: memory only).
        self.journal: NonceJournal | None = None

    def __len__(self) -> int:
        return len(self._dates)

    @property
    def horizon(self) -> datetime | None:
        """Requests dated at or before this are refused: their nonces may have been dropped."""
        return None if self._horizon is None else _EPOCH + self._horizon * _MICROSECOND

    def remember(self, key: tuple[str, str], *, when: datetime, now: datetime) -> None:
        """Record ``key`` for a request dated ``when`` that was authenticated at ``now``.

        :raises SignatureError: ``SignatureNonceUsed`` for a key seen within the window, and
            ``InvalidTimeStamp.Expired`` for a request older than ``horizon``.
        """
        dated = (when - _EPOCH) // _MICROSECOND
        now_us = self._high_water = max((now - _EPOCH) // _MICROSECOND, self._high_water)
        self._purge(now_us)
        if dated < now_us - self._window:
            # Only after the clock stepped back (the date check uses the clock as it is):
            # nonces this old may already have been purged.
            raise SignatureError(SignatureErrorCode.TIMESTAMP_EXPIRED,
                                 "The server's clock stepped back; retry with a new request.")
        if self._horizon is not None and dated <= self._horizon:
            raise SignatureError(SignatureErrorCode.TIMESTAMP_EXPIRED,
                                 "The server's replay window is full; retry with a new request.")
        access_key_id, nonce = key
        # Length-prefixed, so no two (id, nonce) pairs make the same string.
        entry = f"{len(access_key_id)}:{access_key_id}{nonce}"
        if entry in self._dates:
            raise SignatureError(SignatureErrorCode.SIGNATURE_NONCE_USED)
        if self.journal is not None:
            # First on disk: a request is accepted only once a restart would know it.
            self.journal.append(entry, dated, now_us)
        self._add(entry, dated)

    def _add(self, entry: str, dated: int) -> None:
        if len(self._dates) >= self._max_size:
            dropped = self._pop_oldest()
            if self._horizon is None or dropped > self._horizon:
                self._horizon = dropped
        self._dates[entry] = dated
        self._open.append(entry)
        if len(self._open) == self._CHUNK:
            self._chunks.append(tuple(self._open))
            self._open = []

    def refuse_before(self, moment: datetime) -> None:
        """Refuse requests dated in a second before ``moment``'s: their nonces may have
        been used where this cache could not see (an earlier process whose journal is
        gone or not trusted). ``moment``'s own second stays open, since dates have whole
        seconds and a client signing right after ``moment`` must pass."""
        at = (moment - _EPOCH) // _MICROSECOND
        floor = at - at % 1_000_000 - 1
        if self._horizon is None or floor > self._horizon:
            self._horizon = floor

    def restore(self, entries: Iterable[tuple[str, int]], *, now: datetime) -> int:
        """Take in journaled entries (``NonceJournal.load``), oldest first, into an empty
        cache; returns how many are still live."""
        for entry, dated in entries:
            if entry not in self._dates:
                self._add(entry, dated)
        self._purge((now - _EPOCH) // _MICROSECOND)
        return len(self._dates)

    def _pop_oldest(self) -> int:
        chunk = self._chunks[0] if self._chunks else self._open
        entry = chunk[self._front]
        self._front += 1
        if self._front == len(chunk):
            if self._chunks:
                self._chunks.popleft()
            else:
                self._open.clear()
            self._front = 0
        return self._dates.pop(entry)

    def _purge(self, now: int) -> None:
        limit = now - self._window
        dates = self._dates
        while dates and dates[(self._chunks[0] if self._chunks else self._open)[self._front]] \
                < limit:
            self._pop_oldest()
        if self._horizon is not None and self._horizon < limit:
            # The date check alone now refuses everything the horizon covered.
            self._horizon = None


class RequestVerifier:
    """Verify V3 (``ACS3-HMAC-SHA256``) and legacy RPC (HMAC-SHA1) signed requests.

    Besides the signature, it checks the request date against the server clock (``max_skew``
    either way) and refuses a nonce already used by the same AccessKey within that window.
    One instance serves one event loop; it is not thread-safe.
    """

    def __init__(
        self,
        access_keys: Iterable[AccessKey],
        *,
        max_skew: timedelta = timedelta(minutes=15),
        clock: Callable[[], datetime] = _utc_now,
        nonce_cache_size: int = 1_000_000,
    ) -> None:
        """``clock`` returns the current time as an aware UTC ``datetime``.

        :raises ValueError: for a repeated AccessKey id, a non-positive ``max_skew`` or a
            ``nonce_cache_size`` below 1.
        """
        self._keys: dict[str, AccessKey] = {}
        for key in access_keys:
            if key.id in self._keys:
                raise ValueError(f"AccessKey id {key.id!r} is configured twice")
            self._keys[key.id] = key
        self._max_skew = max_skew
        self._clock = clock
        self._nonces = NonceCache(max_size=nonce_cache_size, window=max_skew)
        # Signing with a random secret for unknown ids keeps their timing like known ones.
        self._decoy_secret = secrets.token_urlsafe(32)

    @property
    def window_us(self) -> int:
        return self._max_skew // _MICROSECOND

    def use_journal(self, journal: NonceJournal, *, first_start: bool) -> bool:
        """At start: take in the nonces ``journal`` holds, then journal every accepted one.
        A journal that holds none, or none that can be trusted, leaves this process unsure
        which requests were used, so those dated before its start are refused; a
        ``first_start`` (a new database) never accepted any. Returns whether the journal
        was loaded."""
        entries = journal.load()
        if entries is not None:
            self._nonces.restore(entries, now=self._clock())
        elif not first_start:
            self._nonces.refuse_before(self._clock())
        self._nonces.journal = journal
        return entries is not None

    def verify(
        self,
        *,
        method: str,
        raw_path: str,
        query_string: str,
        headers: Headers,
        body: bytes,
        form: Mapping[str, str],
    ) -> AccessKey:
        """Authenticate one request and return the AccessKey that signed it.

        ``query_string`` is the raw, still percent-encoded query (aiohttp:
        ``request.rel_url.raw_query_string``; ``request.query_string`` is already decoded).
        ``raw_path`` may include the query, which is ignored. ``form`` holds the decoded
        ``application/x-www-form-urlencoded`` body parameters: the legacy scheme signs them,
        while V3 covers the raw ``body`` through ``x-acs-content-sha256``.

        :raises SignatureError: ``IncompleteSignature`` for a missing, malformed or
            unsupported signature; ``IllegalTimestamp`` for a missing or unparseable date;
            ``InvalidTimeStamp.Expired`` for a date outside ``max_skew``;
            ``InvalidAccessKeyId.NotFound`` for an unknown AccessKey id;
            ``SignatureDoesNotMatch`` for a wrong signature or body; ``SignatureNonceUsed``
            for a replayed nonce.
        """
        authorization = headers.getall("Authorization", [])
        if authorization:
            return self._verify_v3(method=method, raw_path=raw_path,
                                   query_string=query_string, headers=headers, body=body,
                                   authorization=authorization)
        query = _decode_query(query_string)
        if "Signature" in query or "Signature" in form:
            return self._verify_legacy(method=method, query=query, headers=headers, form=form)
        raise SignatureError(SignatureErrorCode.INCOMPLETE_SIGNATURE,
                             "The request has neither an Authorization header nor a "
                             "Signature parameter.")

    def _verify_v3(
        self,
        *,
        method: str,
        raw_path: str,
        query_string: str,
        headers: Headers,
        body: bytes,
        authorization: list[str],
    ) -> AccessKey:
        if len(authorization) != 1:
            raise _incomplete("Exactly one Authorization header is required.")
        unverified_auth = authorization[0].strip()
        algorithm = unverified_auth.split(" ", 1)[0]
        if algorithm in _UNSUPPORTED_ACS3:
            raise _incomplete(f"Signature algorithm {algorithm} is not supported; "
                              f"sign with {ACS3_HMAC_SHA256}.")
        match = _AUTHORIZATION.fullmatch(unverified_auth)
        if match is None:
            raise _incomplete(f"The Authorization header is not a well-formed "
                              f"{ACS3_HMAC_SHA256} signature.")
        dates = headers.getall("x-acs-date", [])
        when, now = self._check_date(dates[0].strip() if len(dates) == 1 else None,
                                     "x-acs-date")
        signed = match["signed"].split(";")
        if signed != sorted(set(signed)) or any(n != n.lower() or not n for n in signed):
            raise _incomplete("SignedHeaders must list lower-case names, sorted and unique.")
        required = set(_V3_REQUIRED_HEADERS)
        required.update(n for n in _V3_SIGNED_IF_PRESENT if headers.getall(n, []))
        if body and headers.getall("Content-Type", []):
            # The content type decides how the body is read, so it must be signed with it.
            required.add("content-type")
        missing = required.difference(signed)
        if missing:
            raise _incomplete(f"SignedHeaders must include {', '.join(sorted(missing))}.")

        canonical_headers = []
        for name in signed:
            values = headers.getall(name, [])
            if not values:
                raise _incomplete(f"The signed header {name} is missing from the request.")
            # tea-openapi ``get_canonicalized_headers``: stripped values, sorted, comma-joined.
            canonical_headers.append(f"{name}:{','.join(sorted(v.strip() for v in values))}\n")
        nonce = _check_nonce(_single(headers, "x-acs-signature-nonce"))
        body_hash = hashlib.sha256(body).hexdigest()

        canonical_request = "\n".join((
            method.upper(),
            raw_path.partition("?")[0] or "/",
            _canonical_v3_query(_decode_query(query_string)),
            "".join(canonical_headers),
            match["signed"],
            body_hash,
        ))
        try:
            canonical_bytes = canonical_request.encode()
        except UnicodeEncodeError:
            # aiohttp gives a header's non-UTF-8 bytes as lone surrogates.
            raise _incomplete("A signed header is not UTF-8 text.") from None
        string_to_sign = f"{ACS3_HMAC_SHA256}\n{hashlib.sha256(canonical_bytes).hexdigest()}"
        key = self._keys.get(match["credential"])
        secret = key.secret if key is not None else self._decoy_secret
        expected = hmac.digest(secret.encode(), string_to_sign.encode(), "sha256").hex()
        valid = hmac.compare_digest(expected, match["signature"].lower())
        if key is None:
            raise SignatureError(SignatureErrorCode.INVALID_ACCESS_KEY_ID_NOT_FOUND)
        if _single(headers, "x-acs-content-sha256").lower() != body_hash:
            # The body is covered by the signature; a changed one is a mismatch, not a
            # malformed signature. Saying which part differs helps whoever debugs a proxy.
            raise SignatureError(SignatureErrorCode.SIGNATURE_DOES_NOT_MATCH,
                                 "The x-acs-content-sha256 header does not match the body.")
        if not valid:
            raise SignatureError(SignatureErrorCode.SIGNATURE_DOES_NOT_MATCH)
        self._nonces.remember((key.id, nonce), when=when, now=now)
        return key

    def _verify_legacy(
        self,
        *,
        method: str,
        query: dict[str, str],
        headers: Headers,
        form: Mapping[str, str],
    ) -> AccessKey:
        params = dict(query)
        for name, value in form.items():
            # The SDK signs the union of query and body; one name in both would be ambiguous.
            if name in params:
                raise _incomplete("A parameter appears more than once.")
            params[name] = value
        signature = params.pop("Signature", "")
        if params.get("SignatureMethod") != _LEGACY_METHOD:
            raise _incomplete(f"SignatureMethod must be {_LEGACY_METHOD}.")
        for name in _LEGACY_REQUIRED:
            if not params.get(name):
                raise _incomplete(f"The parameter {name} is required.")
        if params["SignatureVersion"] != _LEGACY_VERSION:
            raise _incomplete(f"SignatureVersion must be {_LEGACY_VERSION}.")
        for header, param in (("x-acs-action", "Action"), ("x-acs-version", "Version")):
            # These headers are not signed here; refuse a request where they disagree with
            # the signed parameters, so nothing downstream can be steered by them.
            values = headers.getall(header, [])
            if values and values != [params.get(param)]:
                raise _incomplete(f"The unsigned {header} header differs from {param}.")
        when, now = self._check_date(params.get("Timestamp"), "Timestamp")
        nonce = _check_nonce(params["SignatureNonce"])

        canonical = "&".join(f"{_percent(k)}={_percent(v)}" for k, v in sorted(params.items()))
        string_to_sign = f"{method.upper()}&%2F&{_percent(canonical)}"
        key = self._keys.get(params["AccessKeyId"])
        secret = key.secret if key is not None else self._decoy_secret
        digest = hmac.digest(f"{secret}&".encode(), string_to_sign.encode(), "sha1")
        # compare_digest refuses non-ASCII str, and the signature is caller-supplied text.
        valid = hmac.compare_digest(base64.b64encode(digest), signature.encode())
        if key is None:
            raise SignatureError(SignatureErrorCode.INVALID_ACCESS_KEY_ID_NOT_FOUND)
        if not valid:
            raise SignatureError(SignatureErrorCode.SIGNATURE_DOES_NOT_MATCH)
        self._nonces.remember((key.id, nonce), when=when, now=now)
        return key

    def _check_date(self, unverified_date: str | None, name: str) -> tuple[datetime, datetime]:
        """Parse the request date and check it against the clock; return (date, now).

        :raises SignatureError: ``IllegalTimestamp`` or ``InvalidTimeStamp.Expired``.
        """
        if not unverified_date:
            raise SignatureError(SignatureErrorCode.ILLEGAL_TIMESTAMP,
                                 f"Exactly one {name} value is required.")
        try:
            if _TIMESTAMP.fullmatch(unverified_date) is None:
                raise ValueError(unverified_date)
            # fromisoformat is ~50x cheaper than strptime; the regex above has already
            # pinned the exact shape, so both read the same instant.
            when = datetime.fromisoformat(unverified_date[:19])
        except ValueError:
            raise SignatureError(SignatureErrorCode.ILLEGAL_TIMESTAMP,
                                 f"{name} must be ISO 8601 yyyy-MM-ddTHH:mm:ssZ in UTC.") from None
        when = when.replace(tzinfo=UTC)
        now = self._clock()
        if abs(now - when) > self._max_skew:
            raise SignatureError(SignatureErrorCode.TIMESTAMP_EXPIRED)
        return when, now


def _incomplete(detail: str) -> SignatureError:
    return SignatureError(SignatureErrorCode.INCOMPLETE_SIGNATURE, detail)


def _percent(value: str) -> str:
    """RFC 3986 percent-encoding as both SDK signers use it: only ``A-Za-z0-9-_.~`` stay."""
    return quote(value, safe="~")


def _decode_query(query_string: str) -> dict[str, str]:
    """Decode a raw query as the SDK's ``urlencode`` wrote it (``+`` is a space).

    :raises SignatureError: ``IncompleteSignature`` for a repeated name or invalid UTF-8.
    """
    params: dict[str, str] = {}
    for part in query_string.split("&"):
        if not part:
            continue
        raw_name, _, raw_value = part.partition("=")
        try:
            name = unquote_plus(raw_name, errors="strict")
            value = unquote_plus(raw_value, errors="strict")
        except UnicodeDecodeError:
            raise _incomplete("The query string is not valid UTF-8.") from None
        # The SDK builds the query from a dict, so a repeated name never comes from it, and
        # the handler and the signature could otherwise read different values.
        if name in params:
            raise _incomplete("A query parameter appears more than once.")
        params[name] = value
    return params


def _canonical_v3_query(params: Mapping[str, str]) -> str:
    # tea-openapi ``get_canonical_query_string`` leaves names as they are and re-encodes
    # values. Names are re-encoded here too (Alibaba's V3 text encodes both): for every name
    # an SDK sends ([A-Za-z0-9.]) that is the same string, and a name holding "=" or "&"
    # can no longer make one signature cover another parameter set.
    return "&".join(f"{_percent(name)}={_percent(params[name])}" for name in sorted(params))


def _single(headers: Headers, name: str) -> str:
    values = headers.getall(name, [])
    if len(values) != 1:
        raise _incomplete(f"Exactly one {name} header is required.")
    return values[0].strip()


def _check_nonce(unverified_nonce: str) -> str:
    if not unverified_nonce or len(unverified_nonce) > _MAX_NONCE_LENGTH:
        raise _incomplete(f"The signature nonce must be 1 to {_MAX_NONCE_LENGTH} characters.")
    return unverified_nonce
