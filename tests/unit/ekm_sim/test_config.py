"""Unit tests for ekm_sim.config: TOML loading, environment overrides, checks naming fields."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from ekm_sim.config import (
    DEFAULT_MODULE,
    Config,
    ConfigError,
    HealthConfig,
    LimitsConfig,
    ServerConfig,
    load,
)
from shared.pkcs11pool import DispatchMode
from shared.sigv4 import Credential

AK_A = "AKIDEXAMPLEAKIDEXAMPL"
AK_B = "AKIDSECONDAKIDSECOND2"
AK_C = "AKIDTHIRDAKIDTHIRD234"
SK_A = "PleaseReplaceThisWithSomeSecretOfLength43To64"
SK_B = "c2Vjb25kLXNlY3JldC1mb3ItdGVzdHMtb25seS0wMDAwMA=="
SK_C = "dGhpcmQtc2VjcmV0LWZvci10ZXN0cy1vbmx5LTAwMDAwMA+/"
assert len(SK_A) >= 43 and len(SK_B) >= 43 and len(SK_C) >= 43

STORE = f"""
[[stores]]
uri_prefix = "example/uri/path/prefix"
credentials = [{{ access_key_id = "{AK_A}", secret_access_key = "{SK_A}" }}]
"""
HSM = """
[hsm]
user_pin = "1234-user"
"""
TLS = """
[tls]
cert = "certs/server.pem"
key = "certs/server-key.pem"
"""
MINIMAL = 'registry = "var/keys.json"\n' + STORE + HSM + TLS


def write(tmp_path: Path, text: str, name: str = "ekm-sim.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load(write(tmp_path, text), env={} if env is None else env)


def expect_error(tmp_path: Path, text: str, field: str, env: dict[str, str] | None = None
                 ) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, env)
    message = str(info.value)
    # The message starts with the whole field name (not a longer one that begins with it).
    assert re.match(rf"{re.escape(field)}(?![\w.\[])", message), message
    return info.value


def store_toml(prefix: str, *creds: tuple[str, str], extra: str = "") -> str:
    rows = ", ".join(f'{{ access_key_id = "{ak}", secret_access_key = "{sk}" }}'
                     for ak, sk in creds)
    return f'\n[[stores]]\nuri_prefix = "{prefix}"\ncredentials = [{rows}]\n{extra}\n'


def with_stores(*stores: str) -> str:
    return 'registry = "keys.json"\n' + "".join(stores) + HSM + TLS


# -------------------------------------------------------------------------------- loading


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, MINIMAL)
    assert config.registry == tmp_path / "var" / "keys.json"
    assert config.server == ServerConfig()
    assert config.server.port == 8443 and config.server.host == "127.0.0.1"
    assert config.limits == LimitsConfig(max_plaintext_bytes=65536, max_aad_bytes=65535)
    assert config.health == HealthConfig(test_key="ekm-sim.health-probe", cache_seconds=10.0,
                                         degraded_after_ms=100.0)
    assert config.tls.enabled is True
    assert config.tls.cert == tmp_path / "certs" / "server.pem"
    assert config.tls.key == tmp_path / "certs" / "server-key.pem"
    assert config.tls.client_ca is None and config.tls.require_client_cert is False
    assert config.tls.allowed_client_names == ()
    hsm = config.hsm
    assert (hsm.module, hsm.token_label, hsm.user_pin, hsm.so_pin) == (
        DEFAULT_MODULE, "ekm-sim", "1234-user", "")
    assert (hsm.mode, hsm.workers, hsm.max_pending, hsm.iv_source, hsm.softhsm_conf) == (
        DispatchMode.INLINE, 2, 256, "hsm", None)
    (store,) = config.stores
    assert store.uri_prefix == "example/uri/path/prefix"
    assert store.base_path == "/example/uri/path/prefix/kms/xks/v1"
    assert store.region == "us-east-1"
    assert store.credentials == (Credential(AK_A, SK_A),)
    assert store.keys == ("*",) and store.allows_key("anything")
    assert store.quota_rps == 0.0 and store.allowed_principals == ()


def test_full_config_values_are_read(tmp_path: Path) -> None:
    text = with_stores(store_toml("/tenant-a/", (AK_A, SK_A), (AK_B, SK_B), extra="""
region = "eu-west-1"
keys = ["foo", "bar.v2"]
quota_rps = 50
allowed_principals = ["arn:aws:iam::*:user/*"]
""")) + """
[server]
host = "0.0.0.0"
port = 9443
workers = 4
ping_port = 8080
[health]
cache_seconds = 60
degraded_after_ms = 250
[limits]
max_plaintext_bytes = 4300
max_aad_bytes = 8192
"""
    config = load_text(tmp_path, text)
    (store,) = config.stores
    assert store.uri_prefix == "tenant-a"  # slashes stripped
    assert store.base_path == "/tenant-a/kms/xks/v1"
    assert store.region == "eu-west-1"
    assert store.keys == ("foo", "bar.v2")
    assert store.allows_key("foo") and not store.allows_key("baz")
    assert store.quota_rps == 50.0 and isinstance(store.quota_rps, float)
    assert store.credentials == (Credential(AK_A, SK_A), Credential(AK_B, SK_B))
    assert config.server == ServerConfig(host="0.0.0.0", port=9443, workers=4,  # noqa: S104
                                         ping_port=8080)
    assert config.health.cache_seconds == 60.0
    assert config.limits == LimitsConfig(max_plaintext_bytes=4300, max_aad_bytes=8192)


def test_empty_uri_prefix_is_the_root_path(tmp_path: Path) -> None:
    config = load_text(tmp_path, with_stores(store_toml("", (AK_A, SK_A))))
    assert config.stores[0].base_path == "/kms/xks/v1"


def test_secrets_are_not_in_reprs(tmp_path: Path) -> None:
    config = load_text(tmp_path, MINIMAL, env={"EKM_SIM__HSM__SO_PIN": "so-secret-pin"})
    text = repr(config)
    assert SK_A not in text
    assert "1234-user" not in text
    assert "so-secret-pin" not in text


def test_unreadable_or_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml", env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load(write(tmp_path, "registry = \n"), env={})


# ------------------------------------------------------------------- environment overrides


def test_env_override_port_is_an_int(tmp_path: Path) -> None:
    config = load_text(tmp_path, MINIMAL, env={"EKM_SIM__SERVER__PORT": "9000"})
    assert config.server.port == 9000
    assert isinstance(config.server.port, int)


def test_env_override_user_pin_string(tmp_path: Path) -> None:
    config = load_text(tmp_path, MINIMAL, env={"EKM_SIM__HSM__USER_PIN": "x"})
    assert config.hsm.user_pin == "x"


def test_env_override_numeric_pin_stays_text(tmp_path: Path) -> None:
    # A value that parses as a TOML integer is still accepted where the field is text.
    config = load_text(tmp_path, MINIMAL, env={"EKM_SIM__HSM__USER_PIN": "1234"})
    assert config.hsm.user_pin == "1234"
    config = load_text(tmp_path, MINIMAL, env={"EKM_SIM__HSM__USER_PIN": '"1234"'})
    assert config.hsm.user_pin == "1234"
    expect_error(tmp_path, MINIMAL, "hsm.user_pin", env={"EKM_SIM__HSM__USER_PIN": "true"})


def test_env_override_list_index_adds_a_second_credential(tmp_path: Path) -> None:
    env = {
        "EKM_SIM__STORES__0__CREDENTIALS__1__ACCESS_KEY_ID": AK_B,
        "EKM_SIM__STORES__0__CREDENTIALS__1__SECRET_ACCESS_KEY": SK_B,
    }
    config = load_text(tmp_path, MINIMAL, env=env)
    assert config.stores[0].credentials == (Credential(AK_A, SK_A), Credential(AK_B, SK_B))


def test_env_override_list_index_replaces_an_existing_secret(tmp_path: Path) -> None:
    env = {"EKM_SIM__STORES__0__CREDENTIALS__0__SECRET_ACCESS_KEY": SK_C}
    config = load_text(tmp_path, MINIMAL, env=env)
    assert config.stores[0].credentials == (Credential(AK_A, SK_C),)


def test_env_override_secret_only_for_a_new_index_names_the_missing_field(
        tmp_path: Path) -> None:
    env = {"EKM_SIM__STORES__0__CREDENTIALS__1__SECRET_ACCESS_KEY": SK_B}
    expect_error(tmp_path, MINIMAL, "stores[0].credentials[1].access_key_id", env=env)


def test_env_override_can_add_a_whole_store(tmp_path: Path) -> None:
    env = {
        "EKM_SIM__STORES__1__URI_PREFIX": "second",
        "EKM_SIM__STORES__1__CREDENTIALS__0__ACCESS_KEY_ID": AK_B,
        "EKM_SIM__STORES__1__CREDENTIALS__0__SECRET_ACCESS_KEY": SK_B,
        "EKM_SIM__STORES__1__KEYS": '["k1", "k2"]',
    }
    config = load_text(tmp_path, MINIMAL, env=env)
    assert [s.uri_prefix for s in config.stores] == ["example/uri/path/prefix", "second"]
    assert config.stores[1].keys == ("k1", "k2")
    assert config.stores[1].credentials == (Credential(AK_B, SK_B),)


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("false", False)])
def test_env_override_booleans(tmp_path: Path, raw: str, expected: bool) -> None:
    text = MINIMAL + 'client_ca = "ca.pem"\n'
    config = load_text(tmp_path, text, env={"EKM_SIM__TLS__REQUIRE_CLIENT_CERT": raw})
    assert config.tls.require_client_cert is expected


def test_env_override_disables_tls_so_cert_is_not_required(tmp_path: Path) -> None:
    text = 'registry = "keys.json"\n' + STORE + HSM
    expect_error(tmp_path, text, "tls.cert")
    config = load_text(tmp_path, text, env={"EKM_SIM__TLS__ENABLED": "false"})
    assert config.tls.enabled is False and config.tls.cert is None


def test_env_override_float_and_int_to_float(tmp_path: Path) -> None:
    config = load_text(tmp_path, MINIMAL, env={"EKM_SIM__HEALTH__CACHE_SECONDS": "30",
                                               "EKM_SIM__STORES__0__QUOTA_RPS": "2.5"})
    assert config.health.cache_seconds == 30.0
    assert config.stores[0].quota_rps == 2.5


def test_env_override_wrong_type_names_the_field(tmp_path: Path) -> None:
    expect_error(tmp_path, MINIMAL, "server.port", env={"EKM_SIM__SERVER__PORT": "abc"})
    expect_error(tmp_path, MINIMAL, "server.port", env={"EKM_SIM__SERVER__PORT": "true"})
    expect_error(tmp_path, MINIMAL, "tls.enabled", env={"EKM_SIM__TLS__ENABLED": "yes"})


def test_env_override_is_checked_like_the_file(tmp_path: Path) -> None:
    expect_error(tmp_path, MINIMAL, "health.cache_seconds",
                 env={"EKM_SIM__HEALTH__CACHE_SECONDS": "61"})
    expect_error(tmp_path, MINIMAL, "stores[0].credentials[0].access_key_id",
                 env={"EKM_SIM__STORES__0__CREDENTIALS__0__ACCESS_KEY_ID": "lowercase"})


def test_other_environment_variables_are_ignored(tmp_path: Path) -> None:
    env = {"EKM_SIM_SERVER__PORT": "1", "OTHER__SERVER__PORT": "2", "SERVER__PORT": "3"}
    assert load_text(tmp_path, MINIMAL, env=env).server.port == 8443


def test_explicit_env_replaces_os_environ(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, MINIMAL)
    monkeypatch.setenv("EKM_SIM__SERVER__PORT", "9100")
    assert load(path).server.port == 9100
    assert load(path, env={}).server.port == 8443
    assert load(path, env={"EKM_SIM__SERVER__PORT": "9200"}).server.port == 9200


# ------------------------------------------------------------------------ errors name fields


def test_missing_stores(tmp_path: Path) -> None:
    expect_error(tmp_path, 'registry = "keys.json"\n' + HSM + TLS, "stores")


def test_empty_stores(tmp_path: Path) -> None:
    err = expect_error(tmp_path, 'registry = "keys.json"\nstores = []\n' + HSM + TLS, "stores")
    assert "at least one" in str(err)


def test_stores_not_a_list_or_table(tmp_path: Path) -> None:
    expect_error(tmp_path, 'registry = "k"\nstores = "x"\n' + HSM + TLS, "stores")
    expect_error(tmp_path, 'registry = "k"\nstores = ["x"]\n' + HSM + TLS, "stores[0]")


def test_missing_registry(tmp_path: Path) -> None:
    expect_error(tmp_path, STORE + HSM + TLS, "registry")


def test_missing_user_pin(tmp_path: Path) -> None:
    expect_error(tmp_path, 'registry = "k"\n' + STORE + TLS, "hsm.user_pin")


@pytest.mark.parametrize("bad", [
    AK_A.lower(),            # lower case
    "AKIDEXAMPLEAKIDEXAM",   # 19 characters
    "A" * 31,                # too long
    "AKIDEXAMPLEAKIDEXAMP1",  # '1' is not in [A-Z2-7]
    "AKIDEXAMPLEAKIDEXAMP8",  # '8' neither
    "AKIDEXAMPLE/AKIDEXAMPL",
])
def test_bad_access_key_id_format(tmp_path: Path, bad: str) -> None:
    err = expect_error(tmp_path, with_stores(store_toml("p", (bad, SK_A))),
                       "stores[0].credentials[0].access_key_id")
    assert SK_A not in str(err)


def test_access_key_id_length_bounds(tmp_path: Path) -> None:
    for good in ("A" * 20, "B" * 30, "ABCDEFGHIJKLMNOPQRSTUVWXYZ2345"):
        config = load_text(tmp_path, with_stores(store_toml("p", (good, SK_A))))
        assert config.stores[0].credentials[0].access_key_id == good


@pytest.mark.parametrize("bad", ["a" * 42, "a" * 65, "a" * 42 + "-", "a" * 42 + "_",
                                 "a" * 42 + " "])
def test_bad_secret(tmp_path: Path, bad: str) -> None:
    err = expect_error(tmp_path, with_stores(store_toml("p", (AK_A, bad))),
                       "stores[0].credentials[0].secret_access_key")
    assert bad.strip() not in str(err)


def test_secret_length_bounds(tmp_path: Path) -> None:
    for good in ("a" * 43, "Z/+=" * 16):
        config = load_text(tmp_path, with_stores(store_toml("p", (AK_A, good))))
        assert config.stores[0].credentials[0].secret_access_key == good


def test_missing_credentials(tmp_path: Path) -> None:
    expect_error(tmp_path, with_stores('\n[[stores]]\nuri_prefix = "p"\n'),
                 "stores[0].credentials")
    expect_error(tmp_path, with_stores(store_toml("p")), "stores[0].credentials")


def test_missing_uri_prefix(tmp_path: Path) -> None:
    text = with_stores(f'\n[[stores]]\ncredentials = [{{ access_key_id = "{AK_A}", '
                       f'secret_access_key = "{SK_A}" }}]\n')
    expect_error(tmp_path, text, "stores[0].uri_prefix")


@pytest.mark.parametrize("prefix", ["has space", "dots.not.allowed", "q?x", "a" * 117])
def test_bad_uri_prefix(tmp_path: Path, prefix: str) -> None:
    expect_error(tmp_path, with_stores(store_toml(prefix, (AK_A, SK_A))), "stores[0].uri_prefix")


def test_the_longest_uri_prefix_makes_a_128_character_path(tmp_path: Path) -> None:
    """Spec: the whole XksProxyUriPath, /<prefix>/kms/xks/v1, may have 128 characters."""
    config = load_text(tmp_path, with_stores(store_toml("a" * 116, (AK_A, SK_A))))
    assert len(config.stores[0].base_path) == 128


@pytest.mark.parametrize("key_id", [".", ".."])
def test_a_store_cannot_list_a_dot_segment_key(tmp_path: Path, key_id: str) -> None:
    expect_error(tmp_path, with_stores(store_toml("p", (AK_A, SK_A),
                                                  extra=f'keys = ["{key_id}"]')),
                 "stores[0].keys")


def test_repeated_uri_prefix(tmp_path: Path) -> None:
    # "/a/" and "a" are the same prefix once the slashes are stripped.
    text = with_stores(store_toml("a", (AK_A, SK_A)), store_toml("/a/", (AK_B, SK_B)))
    err = expect_error(tmp_path, text, "stores")
    assert "uri_prefix" in str(err)


def test_access_key_id_shared_across_stores(tmp_path: Path) -> None:
    text = with_stores(store_toml("a", (AK_A, SK_A)), store_toml("b", (AK_A, SK_B)))
    err = expect_error(tmp_path, text, "stores")
    assert "access_key_id" in str(err)


def test_access_key_id_repeated_in_one_store(tmp_path: Path) -> None:
    text = with_stores(store_toml("a", (AK_A, SK_A), (AK_A, SK_B)))
    err = expect_error(tmp_path, text, "stores[0].credentials")
    assert "repeated" in str(err)


def test_two_stores_with_distinct_prefixes_and_keys_load(tmp_path: Path) -> None:
    text = with_stores(store_toml("a", (AK_A, SK_A)), store_toml("b", (AK_B, SK_B), (AK_C, SK_C)))
    config = load_text(tmp_path, text)
    assert [len(s.credentials) for s in config.stores] == [1, 2]


def test_bad_store_keys_and_quota(tmp_path: Path) -> None:
    expect_error(tmp_path, with_stores(store_toml("p", (AK_A, SK_A), extra='keys = ["a b"]')),
                 "stores[0].keys")
    expect_error(tmp_path, with_stores(store_toml("p", (AK_A, SK_A), extra="keys = [1]")),
                 "stores[0].keys")
    expect_error(tmp_path, with_stores(store_toml("p", (AK_A, SK_A), extra="quota_rps = -1")),
                 "stores[0].quota_rps")


@pytest.mark.parametrize("seconds", ["60.5", "61", "-1", "nan"])
def test_health_cache_seconds_above_a_minute(tmp_path: Path, seconds: str) -> None:
    expect_error(tmp_path, MINIMAL + f"[health]\ncache_seconds = {seconds}\n",
                 "health.cache_seconds")


def test_health_test_key_must_not_be_a_store_key(tmp_path: Path) -> None:
    text = with_stores(store_toml("p", (AK_A, SK_A), extra='keys = ["ekm-sim.health-probe"]'))
    expect_error(tmp_path, text, "health.test_key")


def test_require_client_cert_without_client_ca(tmp_path: Path) -> None:
    expect_error(tmp_path, MINIMAL + "require_client_cert = true\n", "tls.client_ca")
    config = load_text(tmp_path, MINIMAL + 'require_client_cert = true\nclient_ca = "ca.pem"\n')
    assert config.tls.require_client_cert is True
    assert config.tls.client_ca == tmp_path / "ca.pem"


def test_require_client_cert_needs_tls(tmp_path: Path) -> None:
    text = ('registry = "k"\n' + STORE + HSM
            + '[tls]\nenabled = false\nrequire_client_cert = true\nclient_ca = "ca.pem"\n')
    expect_error(tmp_path, text, "tls.require_client_cert")


@pytest.mark.parametrize(("section", "field", "value"), [
    ("limits", "max_plaintext_bytes", 4299),
    # Past what the 512 KiB body limit carries: that limit would answer instead.
    ("limits", "max_plaintext_bytes", 256 * 1024 + 1),
    ("limits", "max_aad_bytes", 8191),
    ("limits", "max_aad_bytes", 65536),
])
def test_limits_outside_the_spec_range(tmp_path: Path, section: str, field: str,
                                       value: int) -> None:
    expect_error(tmp_path, MINIMAL + f"[{section}]\n{field} = {value}\n", f"{section}.{field}")


@pytest.mark.parametrize(("section", "field", "value"), [
    ("server", "port", "65536"),
    ("server", "port", "-1"),
    ("server", "port", '"8443"'),
    ("server", "workers", "0"),
    ("server", "workers", "65"),
    ("hsm", "mode", '"processes"'),
    ("hsm", "iv_source", '"rdrand"'),
    ("hsm", "workers", "0"),
    ("tls", "enabled", '"true"'),
    ("tls", "allowed_client_names", '"x"'),
    # A name list without a required client certificate would never be checked.
    ("tls", "allowed_client_names", '["client.example"]'),
])
def test_other_bad_values_name_the_field(tmp_path: Path, section: str, field: str,
                                         value: str) -> None:
    text = 'registry = "k"\n' + STORE
    tables = {"hsm": 'user_pin = "p"\n', "tls": 'cert = "c"\nkey = "k"\n', "server": ""}
    for name, body in tables.items():
        extra = f"{field} = {value}\n" if name == section else ""
        text += f"\n[{name}]\n{body}{extra}"
    expect_error(tmp_path, text, f"{section}.{field}")


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    expect_error(tmp_path, 'server = 5\n' + MINIMAL, "server")


# ------------------------------------------------------------------------ relative paths


def test_relative_paths_resolve_against_the_config_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc" / "ekm"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = ('registry = "../../var/keys.json"\n' + STORE
            + '[hsm]\nuser_pin = "p"\nsofthsm_conf = "softhsm2.conf"\n'
            + '[tls]\ncert = "tls/server.pem"\nkey = "./tls/server-key.pem"\n'
            + f'client_ca = "{tmp_path / "abs" / "ca.pem"}"\n')
    config = load(write(conf_dir, text), env={})
    assert config.registry == tmp_path / "var" / "keys.json"
    assert config.hsm.softhsm_conf == conf_dir / "softhsm2.conf"
    assert config.tls.cert == conf_dir / "tls" / "server.pem"
    assert config.tls.key == conf_dir / "tls" / "server-key.pem"
    assert config.tls.client_ca == tmp_path / "abs" / "ca.pem"  # absolute: unchanged


def test_relative_config_path_is_resolved_first(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "conf", MINIMAL)
    monkeypatch.chdir(tmp_path)
    config = load(Path("conf/ekm-sim.toml"), env={})
    assert config.registry == tmp_path / "conf" / "var" / "keys.json"
    assert config.registry.is_absolute()


def test_env_relative_path_resolves_against_the_config_directory(tmp_path: Path) -> None:
    config = load_text(tmp_path, MINIMAL, env={"EKM_SIM__REGISTRY": "other/keys.json"})
    assert config.registry == tmp_path / "other" / "keys.json"


# ------------------------------------------------ regressions (bugs found by these tests)


def test_env_non_index_into_a_list_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"(?i)stores"):
        load_text(tmp_path, MINIMAL, env={"EKM_SIM__STORES__FIRST__REGION": "eu-west-1"})


def test_env_path_through_a_scalar_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"(?i)server"):
        load_text(tmp_path, MINIMAL + "[server]\nport = 1\n",
                  env={"EKM_SIM__SERVER__PORT__X": "1"})


def test_ping_port_out_of_range_is_refused(tmp_path: Path) -> None:
    expect_error(tmp_path, MINIMAL + "[server]\nping_port = 70000\n", "server.ping_port")


def test_non_positive_max_pending_is_refused(tmp_path: Path) -> None:
    expect_error(tmp_path, MINIMAL, "hsm.max_pending", env={"EKM_SIM__HSM__MAX_PENDING": "0"})


def test_relative_request_log_resolves_against_the_config_directory(tmp_path: Path) -> None:
    config = load_text(tmp_path, MINIMAL + '[server]\nrequest_log = "logs/requests.log"\n')
    assert Path(config.server.request_log) == tmp_path / "logs" / "requests.log"
