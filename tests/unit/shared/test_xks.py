"""Unit tests for shared.xks: wire models, error names, AAD binding and CDIV.

Expected values come from the reference (/work/shared/reference/xks-proxy-api.md, sections
4.4, 4.5 and 5), written out literally here rather than derived from the code under test.
"""

from __future__ import annotations

import hashlib
import json
from base64 import b64decode, b64encode, urlsafe_b64encode
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import xks
from shared.xks import (
    DecryptRequest,
    EncryptRequest,
    EncryptResponse,
    ErrorName,
    FleetEntry,
    HealthResponse,
    HealthStatus,
    KeyMetadataResponse,
    RequestMetadata,
    XKSError,
    bind_aad,
    cdiv,
    dumps,
    parse_decrypt,
    parse_encrypt,
    parse_health,
    parse_metadata,
)

PRINCIPAL = "arn:aws:iam::123456789012:user/Alice"
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"

# Bytes whose standard Base64 is "+//+" and whose URL-safe Base64 is "-__-".
URL_SENSITIVE = b"\xfb\xff\xfe"
assert b64encode(URL_SENSITIVE) == b"+//+"


def crypto_metadata(**overrides: Any) -> dict[str, Any]:
    md: dict[str, Any] = {
        "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
        "kmsOperation": "Encrypt",
        "awsPrincipalArn": PRINCIPAL,
        "kmsKeyArn": KEY_ARN,
    }
    md.update(overrides)
    return {k: v for k, v in md.items() if v is not None}


def encrypt_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "requestMetadata": crypto_metadata(),
        "plaintext": b64encode(b"hello world").decode(),
        "encryptionAlgorithm": "AES_GCM",
        "additionalAuthenticatedData": b64encode(b"project=nile").decode(),
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def decrypt_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "requestMetadata": crypto_metadata(kmsOperation="Decrypt"),
        "ciphertext": "ghxkK1txeDNn3q8Y",
        "encryptionAlgorithm": "AES_GCM",
        "initializationVector": "HMrlRw85cAJUd5Ax",
        "authenticationTag": "vBxN2ncH1oEkR8WVXpmyYQ==",
        "additionalAuthenticatedData": b64encode(b"project=nile").decode(),
        "ciphertextMetadata": b64encode(b"key_version=1").decode(),
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def metadata_body(**overrides: Any) -> dict[str, Any]:
    md: dict[str, Any] = {
        "kmsRequestId": "r-1",
        "kmsOperation": "CreateKey",
        "awsPrincipalArn": PRINCIPAL,
    }
    md.update(overrides)
    return {"requestMetadata": {k: v for k, v in md.items() if v is not None}}


def health_body(**overrides: Any) -> dict[str, Any]:
    md: dict[str, Any] = {"kmsRequestId": "r-1", "kmsOperation": "KmsHealthCheck"}
    md.update(overrides)
    return {"requestMetadata": {k: v for k, v in md.items() if v is not None}}


def assert_validation(exc: XKSError) -> None:
    assert exc.name is ErrorName.VALIDATION
    assert exc.status == 400


# --------------------------------------------------------------------------- CDIV (4.5)


CDIV_VECTOR = {
    "aad": b"project=nile,department=marketing",
    "ctm": b"key_version=1",
    "iv": b64decode("HMrlRw85cAJUd5Ax"),
    "ciphertext": b64decode("ghxkK1txeDNn3q8Y"),
    "tag": b64decode("vBxN2ncH1oEkR8WVXpmyYQ=="),
}
CDIV_EXPECTED_B64 = "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="


def test_cdiv_vector_decoded_lengths_match_the_spec_table() -> None:
    lengths = {name: len(value) for name, value in CDIV_VECTOR.items()}
    assert lengths == {"aad": 33, "ctm": 13, "iv": 12, "ciphertext": 12, "tag": 16}


def test_cdiv_matches_the_spec_test_vector() -> None:
    value = cdiv(**CDIV_VECTOR)
    assert len(value) == 32
    assert b64encode(value).decode() == CDIV_EXPECTED_B64
    assert xks.b64(value) == CDIV_EXPECTED_B64


def test_cdiv_is_plain_sha256_without_lengths_or_aad_prefix() -> None:
    v = CDIV_VECTOR
    plain = hashlib.sha256(v["aad"] + v["ctm"] + v["iv"] + v["ciphertext"] + v["tag"]).digest()
    assert cdiv(**v) == plain
    prefixed = hashlib.sha256(
        bind_aad(v["aad"], v["ctm"]) + v["iv"] + v["ciphertext"] + v["tag"]
    ).digest()
    assert cdiv(**v) != prefixed


def test_cdiv_absent_fields_count_as_empty() -> None:
    iv, ct, tag = b"\x01" * 12, b"\x02" * 5, b"\x03" * 16
    assert cdiv(None, None, iv, ct, tag) == cdiv(b"", b"", iv, ct, tag)
    assert cdiv(None, None, iv, ct, tag) == hashlib.sha256(iv + ct + tag).digest()


def test_cdiv_changes_with_any_field() -> None:
    base = cdiv(**CDIV_VECTOR)
    for name in CDIV_VECTOR:
        changed = dict(CDIV_VECTOR)
        changed[name] = bytes([changed[name][0] ^ 1]) + changed[name][1:]
        assert cdiv(**changed) != base, name


def test_encrypt_response_carries_the_vector_cdiv() -> None:
    v = CDIV_VECTOR
    resp = EncryptResponse(ciphertext=v["ciphertext"], iv=v["iv"], tag=v["tag"],
                           ciphertext_metadata=v["ctm"], cdiv=cdiv(**v))
    wire = resp.to_wire()
    assert wire == {
        "authenticationTag": "vBxN2ncH1oEkR8WVXpmyYQ==",
        "ciphertext": "ghxkK1txeDNn3q8Y",
        "initializationVector": "HMrlRw85cAJUd5Ax",
        "ciphertextMetadata": "a2V5X3ZlcnNpb249MQ==",
        "ciphertextDataIntegrityValue": CDIV_EXPECTED_B64,
    }


# --------------------------------------------------------------------- AAD binding (4.4)


@pytest.mark.parametrize(
    ("aad", "ctm", "expected"),
    [
        (None, None, b"\x00\x00" + b"\x00"),
        (b"", b"", b"\x00\x00" + b"\x00"),
        (b"ab", None, b"\x00\x02ab" + b"\x00"),
        (None, b"v1", b"\x00\x00" + b"\x02v1"),
        (b"ab", b"v1", b"\x00\x02ab" + b"\x02v1"),
        (
            b"project=nile,department=marketing",
            b"key_version=1",
            b"\x00\x21project=nile,department=marketing\x0dkey_version=1",
        ),
        (b"A" * 300, b"x" * 20, b"\x01\x2c" + b"A" * 300 + b"\x14" + b"x" * 20),
    ],
)
def test_bind_aad_exact_layout(aad: bytes | None, ctm: bytes | None, expected: bytes) -> None:
    assert bind_aad(aad, ctm) == expected


def test_bind_aad_moving_a_byte_between_aad_and_ctm_changes_the_result() -> None:
    # Plain concatenation could not tell these apart; the length prefixes must.
    assert b"abc" + b"d" == b"ab" + b"cd"
    assert bind_aad(b"abc", b"d") != bind_aad(b"ab", b"cd")
    assert bind_aad(b"abcd", None) != bind_aad(None, b"abcd")
    assert bind_aad(b"abcd", b"") != bind_aad(b"", b"abcd")


@given(st.binary(max_size=64), st.binary(max_size=64), st.binary(max_size=64),
       st.binary(max_size=64))
def test_bind_aad_is_injective(a1: bytes, c1: bytes, a2: bytes, c2: bytes) -> None:
    if (a1, c1) != (a2, c2):
        assert bind_aad(a1, c1) != bind_aad(a2, c2)


def test_bind_aad_length_limits() -> None:
    assert bind_aad(b"\x00" * 0xFFFF, None)[:2] == b"\xff\xff"
    assert bind_aad(None, b"\x00" * 0xFF)[2:3] == b"\xff"
    with pytest.raises(ValueError):
        bind_aad(b"\x00" * 0x10000, None)
    with pytest.raises(ValueError):
        bind_aad(None, b"\x00" * 0x100)


# ------------------------------------------------------------------------- errors (5)

# The reference's section 5 table, written out literally: (HTTP status, errorName).
SPEC_ERROR_TABLE = [
    (400, "ValidationException"),
    (400, "InvalidStateException"),
    (400, "InvalidCiphertextException"),
    (400, "InvalidKeyUsageException"),
    (401, "AuthenticationFailedException"),
    (403, "AccessDeniedException"),
    (404, "KeyNotFoundException"),
    (404, "InvalidUriPathException"),
    (429, "ThrottlingException"),
    (500, "InternalException"),
    (501, "UnsupportedOperationException"),
    (503, "DependencyTimeoutException"),
]


@pytest.mark.parametrize(("status", "name"), SPEC_ERROR_TABLE)
def test_status_table_row(status: int, name: str) -> None:
    assert xks.STATUS[ErrorName(name)] == status
    assert XKSError(ErrorName(name)).status == status


def test_status_table_has_exactly_the_spec_rows() -> None:
    assert {str(n) for n in ErrorName} == {name for _, name in SPEC_ERROR_TABLE}
    assert {str(n): s for n, s in xks.STATUS.items()} == {n: s for s, n in SPEC_ERROR_TABLE}
    assert len(xks.STATUS) == len(SPEC_ERROR_TABLE)


def test_xks_error_sanitises_non_printable_characters() -> None:
    err = XKSError(ErrorName.VALIDATION, "bad\nfield\t\x00\x7f\u00e9\u2028 ok~")
    assert err.message == "bad?field????? ok~"
    assert all(0x20 <= ord(c) <= 0x7E for c in err.message)


def test_xks_error_message_is_capped_below_512_characters() -> None:
    assert len(XKSError(ErrorName.INTERNAL, "x" * 511).message) == 511
    assert len(XKSError(ErrorName.INTERNAL, "x" * 512).message) == 511
    assert XKSError(ErrorName.INTERNAL, "y" * 5000).message == "y" * 511


@given(st.text(max_size=2000))
def test_xks_error_message_is_always_wire_safe(message: str) -> None:
    err = XKSError(ErrorName.INTERNAL, message)
    assert len(err.message) <= 511
    assert all(0x20 <= ord(c) <= 0x7E for c in err.message)
    if message and len(message) <= 511:
        assert len(err.message) == len(message)


def test_xks_error_body() -> None:
    assert XKSError(ErrorName.KEY_NOT_FOUND, "no such key").body() == {
        "errorName": "KeyNotFoundException",
        "errorMessage": "no such key",
    }
    assert XKSError(ErrorName.THROTTLING).body() == {"errorName": "ThrottlingException"}
    assert XKSError(ErrorName.INTERNAL, "a\nb").body()["errorMessage"] == "a?b"
    assert json.loads(dumps(XKSError(ErrorName.VALIDATION, "x").body())) == {
        "errorName": "ValidationException",
        "errorMessage": "x",
    }


def test_xks_error_from_body_round_trip() -> None:
    original = XKSError(ErrorName.ACCESS_DENIED, "denied")
    rebuilt = XKSError.from_body(403, dumps(original.body()))
    assert (rebuilt.name, rebuilt.message, rebuilt.status) == (
        ErrorName.ACCESS_DENIED, "denied", 403)
    no_message = XKSError.from_body(429, b'{"errorName":"ThrottlingException"}')
    assert (no_message.name, no_message.message) == (ErrorName.THROTTLING, "")


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b"null", b'"x"', b"{}", b'{"errorName":"NoSuchException"}',
     b'{"errorName":5}', b"\xff\xfe"],
)
def test_xks_error_from_unreadable_body_is_internal(body: bytes) -> None:
    err = XKSError.from_body(502, body)
    assert err.name is ErrorName.INTERNAL
    assert "502" in err.message


def test_xks_error_from_body_ignores_a_non_string_message() -> None:
    err = XKSError.from_body(400, b'{"errorName":"ValidationException","errorMessage":7}')
    assert (err.name, err.message) == (ErrorName.VALIDATION, "")


# -------------------------------------------------------------------------- parse_encrypt


def test_parse_encrypt_valid() -> None:
    req = parse_encrypt(encrypt_body(ciphertextDataIntegrityValueAlgorithm="SHA_256"))
    assert req.plaintext == b"hello world"
    assert req.aad == b"project=nile"
    assert req.want_cdiv is True
    assert req.metadata == RequestMetadata(
        kms_request_id="4112f4d6-db54-4af4-ae30-c55a22a8dfae", kms_operation="Encrypt",
        aws_principal_arn=PRINCIPAL, kms_key_arn=KEY_ARN, extra={})


def test_parse_encrypt_optional_fields_absent() -> None:
    req = parse_encrypt(encrypt_body(additionalAuthenticatedData=None))
    assert req.aad is None
    assert req.want_cdiv is False


@pytest.mark.parametrize("missing", ["requestMetadata", "plaintext", "encryptionAlgorithm"])
def test_parse_encrypt_required_top_level_fields(missing: str) -> None:
    with pytest.raises(XKSError) as info:
        parse_encrypt(encrypt_body(**{missing: None}))
    assert_validation(info.value)
    assert missing in info.value.message


@pytest.mark.parametrize("missing",
                         ["kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn"])
def test_parse_encrypt_required_metadata_fields(missing: str) -> None:
    body = encrypt_body(requestMetadata=crypto_metadata(**{missing: None}))
    with pytest.raises(XKSError) as info:
        parse_encrypt(body)
    assert_validation(info.value)
    assert missing in info.value.message


@pytest.mark.parametrize("field", ["kmsRequestId", "kmsOperation", "awsPrincipalArn"])
def test_parse_encrypt_refuses_empty_or_non_string_required_metadata(field: str) -> None:
    # kmsRequestId and kmsOperation are opaque (spec: no validation of their structure,
    # no refusal of an unlisted operation): an empty string is accepted.
    opaque = field in ("kmsRequestId", "kmsOperation")
    for bad in ("", 5, ["x"], {"a": 1}, True):
        if opaque and bad == "":
            parsed = parse_encrypt(encrypt_body(requestMetadata=crypto_metadata(**{field: ""})))
            assert parsed.metadata.to_wire()[field] == ""
            continue
        with pytest.raises(XKSError) as info:
            parse_encrypt(encrypt_body(requestMetadata=crypto_metadata(**{field: bad})))
        assert_validation(info.value)


def test_fields_an_api_does_not_define_are_not_judged() -> None:
    """Appendix B: KMS may add fields. kmsKeyArn is no GetKeyMetadata or GetHealthStatus
    field in 1.0.3, awsPrincipalArn no GetHealthStatus one: kept as sent, not refused."""
    md = parse_metadata(metadata_body(kmsKeyArn=5))
    assert md.kms_key_arn is None and md.extra == {"kmsKeyArn": 5}
    health = parse_health(health_body(awsPrincipalArn=1, kmsKeyArn=["x"]))
    assert health.extra == {"awsPrincipalArn": 1, "kmsKeyArn": ["x"]}


@pytest.mark.parametrize("bad", [[], "x", 5, None, True])
def test_parse_encrypt_refuses_a_non_object_request_metadata(bad: Any) -> None:
    body = encrypt_body()
    body["requestMetadata"] = bad
    with pytest.raises(XKSError) as info:
        parse_encrypt(body)
    assert_validation(info.value)


def test_parse_encrypt_refuses_url_safe_base64() -> None:
    url_safe = urlsafe_b64encode(URL_SENSITIVE).decode()
    assert url_safe == "-__-"
    assert parse_encrypt(encrypt_body(plaintext="+//+")).plaintext == URL_SENSITIVE
    for field in ("plaintext", "additionalAuthenticatedData"):
        with pytest.raises(XKSError) as info:
            parse_encrypt(encrypt_body(**{field: url_safe}))
        assert_validation(info.value)
        assert field in info.value.message


@pytest.mark.parametrize("bad", ["aGVsbG8", "aGVs bG8=", "aGVsbG8=\n", "a\u00e9==", "====", 42,
                                 ["aGVsbG8="], {"b64": "aGVsbG8="}, True])
def test_parse_encrypt_refuses_malformed_base64(bad: Any) -> None:
    with pytest.raises(XKSError) as info:
        parse_encrypt(encrypt_body(plaintext=bad))
    assert_validation(info.value)


def test_parse_encrypt_refuses_empty_plaintext() -> None:
    with pytest.raises(XKSError) as info:
        parse_encrypt(encrypt_body(plaintext=""))
    assert_validation(info.value)
    assert "plaintext" in info.value.message


@pytest.mark.parametrize("algorithm", ["AES_CBC", "aes_gcm", "AES_GCM ", "", "SHA_256", 1, True,
                                       ["AES_GCM"]])
def test_parse_encrypt_refuses_wrong_encryption_algorithm(algorithm: Any) -> None:
    with pytest.raises(XKSError) as info:
        parse_encrypt(encrypt_body(encryptionAlgorithm=algorithm))
    assert_validation(info.value)
    assert "encryptionAlgorithm" in info.value.message


@pytest.mark.parametrize("algorithm", ["SHA_512", "sha_256", "", 256])
def test_parse_encrypt_refuses_wrong_cdiv_algorithm(algorithm: Any) -> None:
    with pytest.raises(XKSError) as info:
        parse_encrypt(encrypt_body(ciphertextDataIntegrityValueAlgorithm=algorithm))
    assert_validation(info.value)


def test_parse_encrypt_accepts_unknown_metadata_fields_and_operations() -> None:
    extra = {"awsSourceVpc": "vpc-1", "awsSourceVpce": "vpce-1", "kmsViaService": "ebs",
             "futureAppendixBField": {"nested": [1, 2, None]}}
    md = crypto_metadata(kmsOperation="BulkEncrypt", **extra)
    req = parse_encrypt(encrypt_body(requestMetadata=md, someFutureTopLevelField=[1, "x"]))
    assert req.metadata.kms_operation == "BulkEncrypt"
    assert dict(req.metadata.extra) == extra
    assert req.metadata.to_wire() == md


def test_parse_accepts_an_unknown_kms_operation_everywhere() -> None:
    op = "SomeOperationKmsAddsLater"
    assert parse_encrypt(encrypt_body(requestMetadata=crypto_metadata(kmsOperation=op))
                         ).metadata.kms_operation == op
    assert parse_decrypt(decrypt_body(requestMetadata=crypto_metadata(kmsOperation=op))
                         ).metadata.kms_operation == op
    assert parse_metadata(metadata_body(kmsOperation=op)).kms_operation == op
    assert parse_health(health_body(kmsOperation=op)).kms_operation == op


@pytest.mark.parametrize("parse", [parse_encrypt, parse_decrypt, parse_metadata, parse_health])
@pytest.mark.parametrize("body", [None, [], "body", 1, 1.5, True, [{"requestMetadata": {}}]])
def test_parse_refuses_a_non_object_body(parse: Any, body: Any) -> None:
    with pytest.raises(XKSError) as info:
        parse(body)
    assert_validation(info.value)


# -------------------------------------------------------------------------- parse_decrypt


def test_parse_decrypt_valid() -> None:
    req = parse_decrypt(decrypt_body())
    assert req == DecryptRequest(
        metadata=RequestMetadata("4112f4d6-db54-4af4-ae30-c55a22a8dfae", "Decrypt",
                                 PRINCIPAL, KEY_ARN, {}),
        ciphertext=CDIV_VECTOR["ciphertext"], iv=CDIV_VECTOR["iv"], tag=CDIV_VECTOR["tag"],
        aad=b"project=nile", ciphertext_metadata=b"key_version=1")


def test_parse_decrypt_optional_fields_absent() -> None:
    req = parse_decrypt(decrypt_body(additionalAuthenticatedData=None, ciphertextMetadata=None))
    assert req.aad is None
    assert req.ciphertext_metadata is None


@pytest.mark.parametrize("missing", ["requestMetadata", "encryptionAlgorithm"])
def test_parse_decrypt_required_top_level_fields(missing: str) -> None:
    with pytest.raises(XKSError) as info:
        parse_decrypt(decrypt_body(**{missing: None}))
    assert_validation(info.value)
    assert missing in info.value.message


@pytest.mark.parametrize("missing", ["ciphertext", "initializationVector", "authenticationTag"])
def test_parse_decrypt_a_missing_ciphertext_part_is_invalid_ciphertext(missing: str) -> None:
    """The spec's Decrypt row: ciphertext, IV, AAD or tag "corrupted, missing, or otherwise
    invalid" is InvalidCiphertextException."""
    with pytest.raises(XKSError) as info:
        parse_decrypt(decrypt_body(**{missing: None}))
    assert info.value.name is ErrorName.INVALID_CIPHERTEXT
    assert missing in info.value.message


@pytest.mark.parametrize("missing",
                         ["kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn"])
def test_parse_decrypt_required_metadata_fields(missing: str) -> None:
    md = crypto_metadata(**{"kmsOperation": "Decrypt", missing: None})
    with pytest.raises(XKSError) as info:
        parse_decrypt(decrypt_body(requestMetadata=md))
    assert_validation(info.value)
    assert missing in info.value.message


@pytest.mark.parametrize("field", ["ciphertext", "initializationVector", "authenticationTag",
                                   "additionalAuthenticatedData", "ciphertextMetadata"])
def test_parse_decrypt_refuses_url_safe_base64(field: str) -> None:
    with pytest.raises(XKSError) as info:
        parse_decrypt(decrypt_body(**{field: "-__-"}))
    if field == "ciphertextMetadata":
        assert_validation(info.value)
    else:
        assert info.value.name is ErrorName.INVALID_CIPHERTEXT
    assert field in info.value.message
    # The same bytes in the standard alphabet are accepted.
    parse_decrypt(decrypt_body(**{field: "+//+"}))


def test_parse_decrypt_ciphertext_metadata_length_limit() -> None:
    ok = parse_decrypt(decrypt_body(ciphertextMetadata=b64encode(b"m" * 20).decode()))
    assert ok.ciphertext_metadata == b"m" * 20
    with pytest.raises(XKSError) as info:
        parse_decrypt(decrypt_body(ciphertextMetadata=b64encode(b"m" * 21).decode()))
    assert_validation(info.value)
    assert "ciphertextMetadata" in info.value.message


@pytest.mark.parametrize("algorithm", ["AES_CBC", "aes_gcm", "", 0])
def test_parse_decrypt_refuses_wrong_encryption_algorithm(algorithm: Any) -> None:
    with pytest.raises(XKSError) as info:
        parse_decrypt(decrypt_body(encryptionAlgorithm=algorithm))
    assert_validation(info.value)


def test_parse_decrypt_leaves_iv_and_tag_lengths_to_the_key_store() -> None:
    # Well-formed Base64 with lengths no ciphertext can have: not a shape error (docstring).
    req = parse_decrypt(decrypt_body(initializationVector=b64encode(b"\x00" * 5).decode(),
                                     authenticationTag=b64encode(b"\x00" * 3).decode()))
    assert (len(req.iv), len(req.tag)) == (5, 3)


def test_parse_decrypt_accepts_unknown_metadata_fields() -> None:
    md = crypto_metadata(kmsOperation="ReEncrypt", kmsViaService="ebs", awsSourceVpc="vpc-9")
    req = parse_decrypt(decrypt_body(requestMetadata=md))
    assert dict(req.metadata.extra) == {"kmsViaService": "ebs", "awsSourceVpc": "vpc-9"}


# ------------------------------------------------------------------ metadata and health


def test_parse_metadata_valid_without_kms_key_arn() -> None:
    md = parse_metadata(metadata_body())
    assert md == RequestMetadata("r-1", "CreateKey", PRINCIPAL, None, {})


@pytest.mark.parametrize("missing", ["kmsRequestId", "kmsOperation", "awsPrincipalArn"])
def test_parse_metadata_required_fields(missing: str) -> None:
    with pytest.raises(XKSError) as info:
        parse_metadata(metadata_body(**{missing: None}))
    assert_validation(info.value)
    assert missing in info.value.message


def test_parse_metadata_refuses_missing_request_metadata() -> None:
    for body in ({}, {"requestMetadata": None}, {"requestMetadata": []}):
        with pytest.raises(XKSError) as info:
            parse_metadata(body)
        assert_validation(info.value)


def test_parse_metadata_accepts_unknown_fields() -> None:
    md = parse_metadata(metadata_body(awsSourceVpce="vpce-1", kmsKeyArn=KEY_ARN))
    assert md.kms_key_arn == KEY_ARN
    assert dict(md.extra) == {"awsSourceVpce": "vpce-1"}


def test_parse_health_needs_only_request_id_and_operation() -> None:
    assert parse_health(health_body()) == RequestMetadata("r-1", "KmsHealthCheck")


@pytest.mark.parametrize(
    "body",
    [{}, {"requestMetadata": {}}, health_body(kmsRequestId=None), health_body(kmsOperation=None),
     health_body(kmsOperation=3), health_body(kmsRequestId=7)],
)
def test_parse_health_validation(body: Any) -> None:
    with pytest.raises(XKSError) as info:
        parse_health(body)
    assert_validation(info.value)


# ----------------------------------------------------------------- to_wire / from_wire


def test_encrypt_request_round_trip() -> None:
    req = EncryptRequest(
        metadata=RequestMetadata("id", "GenerateDataKey", PRINCIPAL, KEY_ARN,
                                 {"kmsViaService": "ebs"}),
        plaintext=URL_SENSITIVE * 10, aad=b"", want_cdiv=True)
    wire = req.to_wire()
    assert wire["encryptionAlgorithm"] == "AES_GCM"
    assert wire["ciphertextDataIntegrityValueAlgorithm"] == "SHA_256"
    assert wire["additionalAuthenticatedData"] == ""
    assert parse_encrypt(json.loads(dumps(wire))) == req


def test_encrypt_request_to_wire_omits_absent_optionals() -> None:
    req = EncryptRequest(metadata=RequestMetadata("id", "Encrypt", PRINCIPAL, KEY_ARN),
                         plaintext=b"p")
    assert req.to_wire() == {
        "requestMetadata": {"kmsRequestId": "id", "kmsOperation": "Encrypt",
                            "awsPrincipalArn": PRINCIPAL, "kmsKeyArn": KEY_ARN},
        "plaintext": "cA==",
        "encryptionAlgorithm": "AES_GCM",
    }


def test_decrypt_request_round_trip() -> None:
    req = DecryptRequest(
        metadata=RequestMetadata("id", "Decrypt", PRINCIPAL, KEY_ARN),
        ciphertext=b"c" * 33, iv=b"i" * 12, tag=b"t" * 16, aad=b"a", ciphertext_metadata=b"m")
    assert parse_decrypt(json.loads(dumps(req.to_wire()))) == req
    bare = DecryptRequest(metadata=req.metadata, ciphertext=b"c", iv=b"i" * 16, tag=b"t" * 16)
    wire = bare.to_wire()
    assert "additionalAuthenticatedData" not in wire and "ciphertextMetadata" not in wire
    assert parse_decrypt(wire) == bare


def test_encrypt_response_round_trip() -> None:
    for resp in (
        EncryptResponse(ciphertext=b"c" * 7, iv=b"i" * 12, tag=b"t" * 16),
        EncryptResponse(ciphertext=b"", iv=b"i" * 16, tag=b"t" * 16,
                        ciphertext_metadata=b"m" * 20, cdiv=b"d" * 32),
    ):
        assert EncryptResponse.from_wire(json.loads(dumps(resp.to_wire()))) == resp


@pytest.mark.parametrize(
    "overrides",
    [
        {"initializationVector": b64encode(b"i" * 8).decode()},
        {"initializationVector": b64encode(b"i" * 13).decode()},
        {"authenticationTag": b64encode(b"t" * 15).decode()},
        {"authenticationTag": b64encode(b"t" * 17).decode()},
        {"ciphertextMetadata": b64encode(b"m" * 21).decode()},
        {"ciphertext": None},
        {"initializationVector": None},
        {"authenticationTag": None},
        {"ciphertext": "-__-"},
    ],
)
def test_encrypt_response_from_wire_refuses_bad_fields(overrides: dict[str, Any]) -> None:
    wire = EncryptResponse(ciphertext=b"c", iv=b"i" * 12, tag=b"t" * 16).to_wire()
    wire.update(overrides)
    wire = {k: v for k, v in wire.items() if v is not None}
    with pytest.raises(XKSError) as info:
        EncryptResponse.from_wire(wire)
    assert_validation(info.value)


def test_request_metadata_to_wire() -> None:
    md = RequestMetadata("id", "op", extra={"awsSourceVpc": "vpc-1"})
    assert md.to_wire() == {"awsSourceVpc": "vpc-1", "kmsRequestId": "id", "kmsOperation": "op"}
    assert parse_health({"requestMetadata": md.to_wire()}) == md


def test_key_metadata_and_health_response_to_wire() -> None:
    assert KeyMetadataResponse("AES_256", ("ENCRYPT", "DECRYPT"), "ENABLED").to_wire() == {
        "keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"}
    health = HealthResponse(
        fleet_size=2, proxy_vendor="v", proxy_model="m 1.0", ekm_vendor="e",
        ekm_fleet=(FleetEntry("hsm-1", "SoftHSM", HealthStatus.DEGRADED),))
    assert health.to_wire() == {
        "xksProxyFleetSize": 2, "xksProxyVendor": "v", "xksProxyModel": "m 1.0",
        "ekmVendor": "e",
        "ekmFleetDetails": [{"id": "hsm-1", "model": "SoftHSM", "healthStatus": "DEGRADED"}],
    }


@given(
    plaintext=st.binary(min_size=1, max_size=256),
    aad=st.none() | st.binary(max_size=256),
    want_cdiv=st.booleans(),
    request_id=st.text(min_size=1),
    operation=st.text(min_size=1),
)
def test_encrypt_request_round_trip_property(plaintext: bytes, aad: bytes | None,
                                             want_cdiv: bool, request_id: str,
                                             operation: str) -> None:
    req = EncryptRequest(RequestMetadata(request_id, operation, PRINCIPAL, KEY_ARN),
                         plaintext, aad, want_cdiv)
    assert parse_encrypt(json.loads(dumps(req.to_wire()))) == req


@given(ciphertext=st.binary(max_size=128), iv=st.sampled_from([12, 16]).flatmap(
    lambda n: st.binary(min_size=n, max_size=n)), tag=st.binary(min_size=16, max_size=16),
    aad=st.none() | st.binary(max_size=64), ctm=st.none() | st.binary(max_size=20))
def test_decrypt_request_and_encrypt_response_round_trip_property(
        ciphertext: bytes, iv: bytes, tag: bytes, aad: bytes | None, ctm: bytes | None) -> None:
    md = RequestMetadata("id", "Decrypt", PRINCIPAL, KEY_ARN)
    req = DecryptRequest(md, ciphertext, iv, tag, aad, ctm)
    assert parse_decrypt(json.loads(dumps(req.to_wire()))) == req
    resp = EncryptResponse(ciphertext, iv, tag, ctm, cdiv(aad, ctm, iv, ciphertext, tag))
    assert EncryptResponse.from_wire(json.loads(dumps(resp.to_wire()))) == resp


# ------------------------------------------------------------------------------ fuzzing

FIELD_NAMES = [
    "requestMetadata", "plaintext", "ciphertext", "encryptionAlgorithm",
    "additionalAuthenticatedData", "ciphertextDataIntegrityValueAlgorithm",
    "initializationVector", "authenticationTag", "ciphertextMetadata",
    "kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn", "awsSourceVpc",
    "kmsViaService",
]
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text()
                | st.sampled_from(["AES_GCM", "SHA_256", "", "+//+", "-__-", "aGVsbG8="]))
json_keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(json_keys, children, max_size=6),
    max_leaves=25,
)
b64_like = (st.binary(max_size=40).map(lambda b: b64encode(b).decode())
            | st.binary(min_size=1, max_size=30).map(lambda b: urlsafe_b64encode(b).decode())
            | st.text(alphabet="ABCDabcd0123+/=-_ \n", max_size=12))
field_value = b64_like | json_values


def _drop_some(full: dict[str, Any], drop: set[str]) -> dict[str, Any]:
    return {k: v for k, v in full.items() if k not in drop}


METADATA_NAMES = ["kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn",
                  "awsSourceVpc"]
# Every field present, then a random few dropped: near the valid shape, so that the fuzzer
# reaches the deeper checks (and successful parses) as well as the early refusals.
metadata_value = st.builds(
    _drop_some,
    st.fixed_dictionaries({name: st.text(min_size=1, max_size=8) | json_values
                           for name in METADATA_NAMES}),
    st.sets(st.sampled_from(METADATA_NAMES), max_size=2),
) | json_values
BODY_NAMES = ["requestMetadata", "plaintext", "ciphertext", "encryptionAlgorithm",
              "additionalAuthenticatedData", "ciphertextDataIntegrityValueAlgorithm",
              "initializationVector", "authenticationTag", "ciphertextMetadata"]
near_valid_bodies = st.builds(
    _drop_some,
    st.fixed_dictionaries({
        "requestMetadata": metadata_value,
        "plaintext": field_value,
        "ciphertext": field_value,
        "encryptionAlgorithm": st.sampled_from(["AES_GCM", "aes_gcm"]) | json_values,
        "additionalAuthenticatedData": field_value,
        "ciphertextDataIntegrityValueAlgorithm": st.sampled_from(["SHA_256"]) | json_values,
        "initializationVector": field_value,
        "authenticationTag": field_value,
        "ciphertextMetadata": field_value,
    }),
    st.sets(st.sampled_from(BODY_NAMES), max_size=3),
)
any_body = json_values | near_valid_bodies

PARSERS = [
    (parse_encrypt, EncryptRequest),
    (parse_decrypt, DecryptRequest),
    (parse_metadata, RequestMetadata),
    (parse_health, RequestMetadata),
]


@pytest.mark.parametrize(("parse", "result_type"), PARSERS,
                         ids=[p.__name__ for p, _ in PARSERS])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=any_body)
def test_parse_only_returns_or_raises_validation(parse: Any, result_type: type,
                                                 body: Any) -> None:
    """A parser answers a bad body with ValidationException only (Decrypt: or with
    InvalidCiphertextException for its ciphertext parts, as the spec's table says)."""
    allowed = {ErrorName.VALIDATION} | (
        {ErrorName.INVALID_CIPHERTEXT} if parse is parse_decrypt else set())
    try:
        result = parse(body)
    except XKSError as exc:
        assert exc.name in allowed
        assert exc.status == 400
        assert len(exc.message) <= 511
    else:
        assert isinstance(result, result_type)


@settings(max_examples=300)
@given(st.dictionaries(json_keys, st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(json_keys, children, max_size=4),
    max_leaves=20)))
def test_dumps_is_single_line_json(value: dict[str, Any]) -> None:
    out = dumps(value)
    assert b"\n" not in out
    assert b"\r" not in out
    assert json.loads(out) == value


@given(st.text(alphabet=st.sampled_from("\n\r\u2028\u2029\x85 a"), max_size=20))
def test_dumps_escapes_line_breaks_in_keys_and_values(text: str) -> None:
    out = dumps({text: text, "list": [text]})
    assert b"\n" not in out and b"\r" not in out
    assert json.loads(out) == {text: text, "list": [text]}
