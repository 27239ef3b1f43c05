"""The front's config: an external instance's XKI connection, read and checked, each
fault naming its field."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from kms_proxy.config import ConfigError, parse


def _data(**xki: Any) -> dict[str, Any]:
    return {
        "region": "cn-hangzhou", "database": "kms.db", "audit_log": "audit.log",
        "root_key": base64.b64encode(bytes(32)).decode(),
        "server": {"cert": "server.pem", "key": "server-key.pem"},
        "accounts": [{"id": "1234567890123456",
                      "access_keys": [{"id": "LTAIexample0001", "secret": "s" * 24}]}],
        "instances": [{"id": "kst-hzzexternal0001", "account_id": "1234567890123456",
                       "type": "external", "xki": {
                           "endpoint": "https://ekm.example:8443", "uri_prefix": "/p/",
                           "credentials": [{"access_key_id": "A" * 20,
                                            "secret_access_key": "b" * 43}],
                           "ca": "ca.pem", "client_cert": "c.pem", "client_key": "k.pem",
                           **xki}}],
    }


def test_xki_defaults_and_values(tmp_path: Path) -> None:
    [default] = parse(_data(), tmp_path).instances
    assert default.xki is not None
    assert (default.xki.timeout_ms, default.xki.health_interval_s) == (250, 30.0)
    assert default.xki.uri_prefix == "p"
    assert default.xki.ca == tmp_path / "ca.pem"
    [tuned] = parse(_data(timeout_ms=500, health_interval_s=2.5), tmp_path).instances
    assert tuned.xki is not None
    assert (tuned.xki.timeout_ms, tuned.xki.health_interval_s) == (500, 2.5)


@pytest.mark.parametrize(("field", "value"), [
    ("timeout_ms", 9), ("timeout_ms", 60_001), ("timeout_ms", "fast"),
    ("health_interval_s", 0), ("health_interval_s", -1.0), ("endpoint", "http://ekm:80"),
    ("credentials", [])])
def test_bad_xki_values_name_their_field(tmp_path: Path, field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        parse(_data(**{field: value}), tmp_path)


def test_hsm_oaep_sha256_in_token_is_a_setting(tmp_path: Path) -> None:
    hsm = {"token_label": "kms", "user_pin": "1234"}
    config = parse({**_data(), "hsm": hsm}, tmp_path)
    assert config.hsm is not None and config.hsm.oaep_sha256_in_token is False
    config = parse({**_data(), "hsm": {**hsm, "oaep_sha256_in_token": True}}, tmp_path)
    assert config.hsm is not None and config.hsm.oaep_sha256_in_token is True
    with pytest.raises(ConfigError, match="oaep_sha256_in_token"):
        parse({**_data(), "hsm": {**hsm, "oaep_sha256_in_token": "yes"}}, tmp_path)


def test_trusted_issuer_settings_and_their_faults(tmp_path: Path) -> None:
    """An issuer's lifetime and products are settings; a key file the front cannot trust is
    a configuration error naming the issuer (it was a traceback at start-up)."""
    import json

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    from kms_proxy.app import create_app

    private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa.generate_private_key(
        65537, 2048)))
    (tmp_path / "private.json").write_text(json.dumps({"keys": [{**private, "kid": "r"}]}))
    (tmp_path / "public.json").write_text(json.dumps({"keys": [{
        **{k: v for k, v in private.items() if k in ("kty", "n", "e")}, "kid": "r"}]}))
    issuer = {"issuer": "https://sts.test", "algorithms": ["RS256"],
              "jwks_file": "public.json", "max_lifetime_s": 600, "products": ["oss"]}
    [read] = parse({**_data(), "trusted_issuers": [issuer]}, tmp_path).trusted_issuers
    assert (read.max_lifetime_s, read.products) == (600, ("oss",))
    with pytest.raises(ConfigError, match="max_lifetime_s"):
        parse({**_data(), "trusted_issuers": [{**issuer, "max_lifetime_s": 0}]}, tmp_path)
    for fault, match in (({"jwks_file": "private.json"}, "private key"),
                         ({"jwks_file": "missing.json"}, "No such file"),
                         ({"products": ["kms"]}, "products")):
        config = parse({**_data(), "trusted_issuers": [{**issuer, **fault}]}, tmp_path)
        named = r"trusted_issuers\[0\] \(https://sts.test\): "
        with pytest.raises(ConfigError, match=rf"{named}.*{match}"):
            create_app(config)


def test_two_access_keys_cannot_share_a_secret(tmp_path: Path) -> None:
    """ACS3 does not sign the AccessKey id: a request signed for one id would verify, and be
    replayable, as the other."""
    data = _data()
    data["accounts"][0]["access_keys"].append({"id": "LTAIexample0002", "secret": "s" * 24})
    with pytest.raises(ConfigError, match="same secret"):
        parse(data, tmp_path)


def test_gateway_quotas_are_a_setting(tmp_path: Path) -> None:
    assert parse(_data(), tmp_path).gateway_quotas is False
    assert parse({**_data(), "gateway_quotas": True}, tmp_path).gateway_quotas is True
    with pytest.raises(ConfigError, match="gateway_quotas"):
        parse({**_data(), "gateway_quotas": "yes"}, tmp_path)
