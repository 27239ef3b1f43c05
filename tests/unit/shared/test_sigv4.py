"""Unit tests for shared.sigv4: requests signed by botocore, checked by SigV4Verifier.

Time is pinned: botocore's clock is patched to ``SIGNED_AT`` and the verifier gets an injected
clock, so every signature here is deterministic. Where a test needs a request botocore would
not produce (Host unsigned, scope date differing from X-Amz-Date), ``manual_authorization``
signs it by the AWS algorithm, so the verifier fails on the property under test and not
merely on a wrong signature; that signer is itself checked against botocore.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from unittest import mock
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from shared.sigv4 import (
    ACCESS_KEY_ID_PATTERN,
    SECRET_PATTERN,
    Credential,
    Signer,
    SigV4Error,
    SigV4Verifier,
    sign_request,
)

SERVICE = "kms-xks-proxy"
REGION = "us-east-1"
HOST = "ekm.example.com"
PATH = "/example/uri/path/prefix/kms/xks/v1/keys/foo/encrypt"
URL = f"https://{HOST}{PATH}"
BODY = b'{"requestMetadata":{"kmsRequestId":"r-1","kmsOperation":"Encrypt"}}'
CRED_A = Credential("BETWEEN2TENAND3TENCHARACTERS",
                    "PleaseReplaceThisWithSomeSecretOfLength43To64")
CRED_B = Credential("AKIDEXAMPLEAKIDEXAMPL", "c2Vjb25kLXNlY3JldC1mb3ItdGVzdHMtb25seS0wMDAwMA==")
SIGNED_AT = datetime(2024, 5, 15, 12, 30, 45, tzinfo=UTC)
AMZ_DATE = "20240515T123045Z"

for _c in (CRED_A, CRED_B):
    assert ACCESS_KEY_ID_PATTERN.fullmatch(_c.access_key_id)
    assert SECRET_PATTERN.fullmatch(_c.secret_access_key)


def fixed_clock(at: datetime) -> Callable[[], datetime]:
    return lambda: at


def verifier(*, credentials: Iterable[Credential] = (CRED_A, CRED_B), region: str = REGION,
             service: str = SERVICE, now: datetime = SIGNED_AT) -> SigV4Verifier:
    return SigV4Verifier(service=service, region=region, credentials=credentials,
                         clock=fixed_clock(now))


def sign(*, url: str = URL, body: bytes = BODY, headers: dict[str, str] | None = None,
         credential: Credential = CRED_A, region: str = REGION, service: str = SERVICE,
         at: datetime = SIGNED_AT) -> CIMultiDict[str]:
    """Sign with botocore at time ``at``; add the Host header an HTTP client would send."""
    with mock.patch("botocore.auth.get_current_datetime",
                    return_value=at.astimezone(UTC).replace(tzinfo=None)):
        signed = sign_request(method="POST", url=url, body=body, headers=headers or {},
                              credential=credential, region=region, service=service)
    out: CIMultiDict[str] = CIMultiDict(signed)
    out.setdefault("Host", urlsplit(url).netloc)
    return out


def verify(headers: CIMultiDict[str], *, path: str = PATH, body: bytes = BODY,
           method: str = "POST", query: str = "", v: SigV4Verifier | None = None) -> str:
    return (v or verifier()).verify(method=method, raw_path=path, query_string=query,
                                    headers=headers, body=body)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def manual_authorization(*, headers: CIMultiDict[str], signed: list[str], path: str = PATH,
                         body: bytes = BODY, scope_date: str = AMZ_DATE[:8],
                         credential: Credential = CRED_A, region: str = REGION,
                         service: str = SERVICE) -> str:
    """An Authorization value computed by the published SigV4 algorithm for ``signed``."""
    canonical_headers = "".join(
        f"{name}:{','.join(' '.join(v.split()) for v in headers.getall(name))}\n"
        for name in signed)
    canonical_request = "\n".join(["POST", path, "", canonical_headers, ";".join(signed),
                                   hashlib.sha256(body).hexdigest()])
    scope = f"{scope_date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(["AWS4-HMAC-SHA256", headers["X-Amz-Date"], scope,
                                hashlib.sha256(canonical_request.encode()).hexdigest()])
    key = _hmac(f"AWS4{credential.secret_access_key}".encode(), scope_date)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    return (f"AWS4-HMAC-SHA256 Credential={credential.access_key_id}/{scope}, "
            f"SignedHeaders={';'.join(signed)}, Signature={signature}")


def base_headers(amz_date: str = AMZ_DATE, host: str = HOST) -> CIMultiDict[str]:
    return CIMultiDict({"Host": host, "X-Amz-Date": amz_date})


# ------------------------------------------------------------------------------ positive


def test_botocore_signature_is_deterministic_with_a_pinned_clock() -> None:
    first, second = sign(), sign()
    assert first["X-Amz-Date"] == AMZ_DATE
    assert first["Authorization"] == second["Authorization"]
    assert first["Authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={CRED_A.access_key_id}/20240515/{REGION}/{SERVICE}/"
        "aws4_request, SignedHeaders=host;x-amz-date, Signature=")


def test_manual_signer_agrees_with_botocore() -> None:
    headers = sign()
    assert manual_authorization(headers=headers, signed=["host", "x-amz-date"]) == \
        headers["Authorization"]


def test_one_signer_across_dates_and_credentials_matches_stock_botocore() -> None:
    """A Signer keeps one botocore signer per credential: reused across midnight and
    between two credentials, it signs exactly as a new botocore SigV4Auth does."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    signer = Signer(region=REGION, service=SERVICE)
    headers = {"Host": HOST, "Content-Type": "application/json"}
    midnight = datetime(2024, 5, 16, tzinfo=UTC)
    moments = [midnight - timedelta(seconds=1), midnight, midnight + timedelta(hours=1),
               midnight - timedelta(seconds=1)]
    for at in moments:
        for credential in (CRED_A, CRED_B, CRED_A):
            with mock.patch("botocore.auth.get_current_datetime",
                            return_value=at.replace(tzinfo=None)):
                ours = signer.sign(method="POST", url=URL, body=BODY, headers=headers,
                                   credential=credential)
                stock = AWSRequest(method="POST", url=URL, data=BODY, headers=dict(headers))
                SigV4Auth(Credentials(credential.access_key_id,
                                      credential.secret_access_key),
                          SERVICE, REGION).add_auth(stock)
            assert ours["Authorization"] == stock.headers["Authorization"]
            assert ours["X-Amz-Date"] == at.strftime("%Y%m%dT%H%M%SZ")
            assert verify(CIMultiDict(ours), v=verifier(now=at)) == credential.access_key_id


def test_valid_request_returns_the_access_key_id() -> None:
    assert verify(sign()) == CRED_A.access_key_id


def test_fixed_clock_verifier_is_deterministic() -> None:
    v = verifier()
    headers = sign()
    assert [verify(headers, v=v) for _ in range(5)] == [CRED_A.access_key_id] * 5
    # A request signed at the real current time is far from the pinned 2024 clock.
    fresh: CIMultiDict[str] = CIMultiDict(sign_request(
        method="POST", url=URL, body=BODY, headers={}, credential=CRED_A, region=REGION,
        service=SERVICE))
    fresh["Host"] = HOST
    with pytest.raises(SigV4Error, match="too far"):
        verify(fresh, v=v)
    # ... and is accepted by a verifier whose clock is its own X-Amz-Date.
    now = datetime.strptime(fresh["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert verify(fresh, v=verifier(now=now)) == CRED_A.access_key_id


def test_two_credentials_are_both_accepted() -> None:
    v = verifier(credentials=(CRED_A, CRED_B))
    assert verify(sign(credential=CRED_A), v=v) == CRED_A.access_key_id
    assert verify(sign(credential=CRED_B), v=v) == CRED_B.access_key_id


def test_curl_style_signed_headers_with_content_type() -> None:
    headers = sign(headers={"Content-Type": "application/json"})
    assert "SignedHeaders=content-type;host;x-amz-date," in headers["Authorization"]
    assert verify(headers) == CRED_A.access_key_id
    headers["Content-Type"] = "text/plain"
    with pytest.raises(SigV4Error):
        verify(headers)


def test_signed_header_values_are_whitespace_normalised() -> None:
    headers = sign(headers={"Content-Type": "application/json;   charset=utf-8"})
    assert verify(headers) == CRED_A.access_key_id
    headers["Content-Type"] = "  application/json; charset=utf-8 "
    assert verify(headers) == CRED_A.access_key_id


def test_host_with_a_port_is_signed_raw() -> None:
    url = f"https://127.0.0.1:8443{PATH}"
    headers = sign(url=url)
    assert headers["Host"] == "127.0.0.1:8443"
    assert verify(headers) == CRED_A.access_key_id
    headers["Host"] = "127.0.0.1"
    with pytest.raises(SigV4Error):
        verify(headers)


def test_header_names_are_case_insensitive_and_signature_hex_case_ignored() -> None:
    headers = sign()
    lowered: CIMultiDict[str] = CIMultiDict(
        (k.lower(), v) for k, v in headers.items())
    assert verify(lowered) == CRED_A.access_key_id
    head, _, signature = headers["Authorization"].rpartition("Signature=")
    lowered["authorization"] = f"{head}Signature={signature.upper()}"
    assert verify(lowered) == CRED_A.access_key_id


@pytest.mark.parametrize("delta", [timedelta(minutes=4), timedelta(minutes=-4),
                                   timedelta(minutes=5), timedelta(minutes=-5), timedelta(0)])
def test_clock_skew_within_five_minutes_is_accepted(delta: timedelta) -> None:
    assert verify(sign(), v=verifier(now=SIGNED_AT + delta)) == CRED_A.access_key_id


def test_set_credentials_rotates_without_a_new_verifier() -> None:
    v = verifier(credentials=(CRED_A,))
    assert verify(sign(credential=CRED_A), v=v) == CRED_A.access_key_id  # warms the key cache
    with pytest.raises(SigV4Error):
        verify(sign(credential=CRED_B), v=v)
    # Same access key id, new secret: the cached signing key for the old secret must go.
    rotated = Credential(CRED_A.access_key_id, CRED_B.secret_access_key)
    v.set_credentials((rotated, CRED_B))
    assert verify(sign(credential=rotated), v=v) == CRED_A.access_key_id
    assert verify(sign(credential=CRED_B), v=v) == CRED_B.access_key_id
    with pytest.raises(SigV4Error):
        verify(sign(credential=CRED_A), v=v)


def test_credential_repr_hides_the_secret() -> None:
    assert CRED_A.secret_access_key not in repr(CRED_A)
    assert CRED_A.access_key_id in repr(CRED_A)


# ------------------------------------------------------------------------------ negative


def test_unknown_access_key_id() -> None:
    stranger = Credential("AKIDUNKNOWNAKIDUNKNOW", CRED_A.secret_access_key)
    with pytest.raises(SigV4Error, match="not valid"):
        verify(sign(credential=stranger))


def test_wrong_secret() -> None:
    wrong = Credential(CRED_A.access_key_id, CRED_B.secret_access_key)
    with pytest.raises(SigV4Error, match="not valid"):
        verify(sign(credential=wrong))


def test_credential_removed_from_the_verifier_is_refused() -> None:
    with pytest.raises(SigV4Error):
        verify(sign(credential=CRED_A), v=verifier(credentials=(CRED_B,)))


def test_tampered_body() -> None:
    with pytest.raises(SigV4Error, match="not valid"):
        verify(sign(), body=BODY.replace(b"Encrypt", b"Decrypt"))


def test_tampered_path() -> None:
    with pytest.raises(SigV4Error, match="not valid"):
        verify(sign(), path=PATH.replace("/encrypt", "/decrypt"))


def test_tampered_method_and_query() -> None:
    with pytest.raises(SigV4Error):
        verify(sign(), method="PUT")
    with pytest.raises(SigV4Error):
        verify(sign(), query="a=b")


def test_wrong_region() -> None:
    with pytest.raises(SigV4Error, match="wrong region"):
        verify(sign(region="eu-west-1"))
    with pytest.raises(SigV4Error, match="wrong region"):
        verify(sign(), v=verifier(region="eu-west-1"))


def test_wrong_service() -> None:
    with pytest.raises(SigV4Error, match="wrong region or service"):
        verify(sign(service="kms"))


def test_host_not_signed() -> None:
    headers = base_headers()
    headers["Authorization"] = manual_authorization(headers=headers, signed=["x-amz-date"])
    with pytest.raises(SigV4Error, match="host"):
        verify(headers)
    # The same crafted signer over host;x-amz-date is accepted: only the missing host fails.
    headers["Authorization"] = manual_authorization(headers=headers,
                                                    signed=["host", "x-amz-date"])
    assert verify(headers) == CRED_A.access_key_id


def test_x_amz_date_not_signed() -> None:
    headers = base_headers()
    headers["Authorization"] = manual_authorization(headers=headers, signed=["host"])
    with pytest.raises(SigV4Error, match="x-amz-date"):
        verify(headers)


def test_host_header_missing_from_the_request() -> None:
    headers = sign()
    del headers["Host"]
    with pytest.raises(SigV4Error):
        verify(headers)


def test_missing_x_amz_date() -> None:
    headers = sign()
    del headers["X-Amz-Date"]
    with pytest.raises(SigV4Error, match="X-Amz-Date"):
        verify(headers)


@pytest.mark.parametrize("amz_date", [
    "2026-11-28T12:00:00Z",  # ISO 8601 extended form: fromisoformat would take it
    "20261128T120000", "20261128T120000+00:00", "20261128 120000Z", "20261128T1200Z",
    "20261328T120000Z", "20261128T250000Z", "20261128T240000Z", "20250229T120000Z",
    "\uff120261128T120000Z",  # a fullwidth digit
])
def test_x_amz_date_must_be_the_basic_form(amz_date: str) -> None:
    # Signed correctly over the odd value, so only the date form can fail.
    headers = base_headers(amz_date=amz_date)
    headers["Authorization"] = manual_authorization(headers=headers,
                                                    signed=["host", "x-amz-date"])
    with pytest.raises(SigV4Error, match="X-Amz-Date is not"):
        verify(headers)


def test_repeated_x_amz_date() -> None:
    headers = sign()
    headers.add("X-Amz-Date", AMZ_DATE)
    with pytest.raises(SigV4Error, match="X-Amz-Date"):
        verify(headers)


@pytest.mark.parametrize("value", ["2024-05-15T12:30:45Z", "20240515T123045", "", "now"])
def test_malformed_x_amz_date(value: str) -> None:
    headers = base_headers(amz_date=value)
    headers["Authorization"] = sign()["Authorization"]
    with pytest.raises(SigV4Error, match="X-Amz-Date"):
        verify(headers)


@pytest.mark.parametrize("delta", [timedelta(minutes=5, seconds=1),
                                   timedelta(minutes=-5, seconds=-1),
                                   timedelta(hours=1), timedelta(days=-1)])
def test_clock_skew_beyond_five_minutes_is_refused(delta: timedelta) -> None:
    with pytest.raises(SigV4Error, match="too far"):
        verify(sign(), v=verifier(now=SIGNED_AT + delta))


def test_request_signed_in_the_future_or_past_is_refused() -> None:
    with pytest.raises(SigV4Error, match="too far"):
        verify(sign(at=SIGNED_AT + timedelta(minutes=6)))
    with pytest.raises(SigV4Error, match="too far"):
        verify(sign(at=SIGNED_AT - timedelta(minutes=6)))
    assert verify(sign(at=SIGNED_AT - timedelta(minutes=4))) == CRED_A.access_key_id


def test_credential_scope_date_differs_from_x_amz_date() -> None:
    headers = base_headers()
    headers["Authorization"] = manual_authorization(headers=headers,
                                                    signed=["host", "x-amz-date"],
                                                    scope_date="20240514")
    with pytest.raises(SigV4Error, match="scope date"):
        verify(headers)


def test_credential_scope_date_across_midnight() -> None:
    # One minute after midnight with yesterday's scope: within skew, but the dates differ.
    just_after = datetime(2024, 5, 16, 0, 1, tzinfo=UTC)
    headers = base_headers(amz_date="20240516T000100Z")
    headers["Authorization"] = manual_authorization(headers=headers,
                                                    signed=["host", "x-amz-date"],
                                                    scope_date="20240515")
    with pytest.raises(SigV4Error, match="scope date"):
        verify(headers, v=verifier(now=just_after))
    headers["Authorization"] = manual_authorization(headers=headers,
                                                    signed=["host", "x-amz-date"],
                                                    scope_date="20240516")
    assert verify(headers, v=verifier(now=just_after)) == CRED_A.access_key_id


def _good_auth() -> str:
    return sign()["Authorization"]


MALFORMED = {
    "empty": lambda: "",
    "bearer": lambda: "Bearer abc.def.ghi",
    "sigv2": lambda: "AWS BETWEEN2TENAND3TENCHARACTERS:c2lnbmF0dXJl",
    "other algorithm": lambda: _good_auth().replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA512"),
    "no signed headers": lambda: _good_auth().replace(" SignedHeaders=host;x-amz-date,", ""),
    "no signature": lambda: _good_auth().rpartition(", Signature=")[0],
    "short signature": lambda: _good_auth()[:-1],
    "long signature": lambda: _good_auth() + "0",
    "non-hex signature": lambda: _good_auth()[:-1] + "g",
    "scope with four parts": lambda: _good_auth().replace(f"/{REGION}/", "/"),
    "scope not aws4_request": lambda: _good_auth().replace("aws4_request", "aws5_request"),
    "unsorted signed headers": lambda: _good_auth().replace("host;x-amz-date",
                                                            "x-amz-date;host"),
    "trailing garbage": lambda: _good_auth() + ", Extra=1",
}


@pytest.mark.parametrize("make", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_authorization(make: Callable[[], str]) -> None:
    headers = sign()
    headers["Authorization"] = make()
    with pytest.raises(SigV4Error):
        verify(headers)


def test_missing_authorization() -> None:
    headers = sign()
    del headers["Authorization"]
    with pytest.raises(SigV4Error, match="Authorization"):
        verify(headers)


def test_duplicate_authorization_header() -> None:
    headers = sign()
    headers.add("Authorization", headers["Authorization"])
    assert len(headers.getall("Authorization")) == 2
    with pytest.raises(SigV4Error, match="repeated"):
        verify(headers)


def test_duplicate_authorization_with_a_second_credential() -> None:
    headers = sign(credential=CRED_A)
    headers.add("Authorization", sign(credential=CRED_B)["Authorization"])
    with pytest.raises(SigV4Error, match="repeated"):
        verify(headers)


# ------------------------------------------------------------------------------ property

SEGMENT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
# Segments of [A-Za-z0-9_.-]; "", "." and ".." are left out because botocore normalises them
# away (see test_paths_that_botocore_normalises below).
segments = st.text(alphabet=SEGMENT_ALPHABET, min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))
paths = st.builds(lambda parts, slash: "/" + "/".join(parts) + ("/" if slash and parts else ""),
                  st.lists(segments, max_size=6), st.booleans())


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=512), path=paths)
def test_sign_and_verify_random_bodies_and_paths(body: bytes, path: str) -> None:
    headers = sign(url=f"https://{HOST}{path}", body=body)
    assert verify(headers, path=path, body=body) == CRED_A.access_key_id


@settings(max_examples=100, deadline=None)
@given(body=st.binary(min_size=1, max_size=512), data=st.data())
def test_any_single_byte_change_of_the_body_fails(body: bytes, data: st.DataObject) -> None:
    headers = sign(body=body)
    index = data.draw(st.integers(0, len(body) - 1), label="index")
    value = data.draw(st.integers(0, 255).filter(lambda b: b != body[index]), label="value")
    tampered = body[:index] + bytes([value]) + body[index + 1:]
    with pytest.raises(SigV4Error):
        verify(headers, body=tampered)


@pytest.mark.parametrize("path", [
    "/tenant//a/kms/xks/v1/health",
    "/kms/xks/v1/keys/./encrypt",
    "/kms/xks/v1/keys/../encrypt",
])
def test_paths_that_botocore_normalises(path: str) -> None:
    headers = sign(url=f"https://{HOST}{path}")
    assert verify(headers, path=path) == CRED_A.access_key_id
