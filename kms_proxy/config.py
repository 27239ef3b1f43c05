"""The KMS front's configuration: one TOML file, every value overridable by
``KMS_PROXY__<PATH>`` environment variables (``shared.tomlconfig``). Checked once at start.

The root key that wraps software key material is never in this file's directory by
default and never in the database: it comes from ``root_key_file`` or from the
``KMS_PROXY__ROOT_KEY`` environment variable (Base64 of 32 bytes).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from kms_proxy.core.model import InstanceType
from shared.serving import EVENT_LOOPS
from shared.tomlconfig import ConfigError, TableReader, read_toml

__all__ = ["AccessKeyConfig", "AccountConfig", "Config", "ConfigError", "HSMTokenConfig",
           "InstanceConfig", "IssuerConfig", "ServerConfig", "XKIConfig", "load"]

ENV_PREFIX: Final = "KMS_PROXY__"
_ACCOUNT: Final = re.compile(r"[0-9]{6,20}")
_INSTANCE: Final = re.compile(r"kst-[a-z0-9]{6,40}")
_AK_ID: Final = re.compile(r"[A-Za-z0-9]{8,64}")
_REGION: Final = re.compile(r"[a-z]{2}-[a-z0-9-]{2,30}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8443
    tls: bool = True
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    require_client_cert: bool = False
    # One line per request (no secrets): "-" stderr, "off", or a file.
    access_log: str = "off"
    # The event loop (shared.serving.EVENT_LOOPS).
    event_loop: str = "asyncio"


@dataclass(frozen=True, slots=True)
class AccessKeyConfig:
    id: str
    secret: str = field(repr=False)
    user: str = "admin"


@dataclass(frozen=True, slots=True)
class AccountConfig:
    id: str
    access_keys: tuple[AccessKeyConfig, ...]
    # The paid rotation add-on: default and service keys may rotate.
    rotation_addon: bool = False
    # "kms": the default master key gets KMS-generated material; "import": it waits, at its
    # first enabling, for BYOK material (the seed: import only when first enabled).
    default_key_material: str = "kms"


@dataclass(frozen=True, slots=True)
class XKIConfig:
    """An external instance's connection to its XKI proxy (an XKS Proxy API v1 server)."""

    endpoint: str
    uri_prefix: str
    region: str
    # (access key id, secret) pairs; the first signs, all are kept for rotation.
    credentials: tuple[tuple[str, str], ...] = field(repr=False)
    ca: Path
    client_cert: Path
    client_key: Path
    server_fingerprint_sha256: str | None = None
    timeout_ms: int = 250
    health_interval_s: float = 30.0


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    id: str
    account_id: str
    type: InstanceType
    name: str
    spec_qps: int
    xki: XKIConfig | None = None
    # Key versions the instance may hold (reference section 9: 1000 by default).
    key_quota: int = 1000


@dataclass(frozen=True, slots=True)
class HSMTokenConfig:
    """The PKCS#11 token hardware instances use (not the EKM's)."""

    module: str
    token_label: str
    user_pin: str = field(repr=False)
    softhsm_conf: Path | None = None
    mode: str = "inline"
    workers: int = 2
    wrapping_key_label: str = "kms-proxy.wrap"
    # The token does CKM_RSA_PKCS_OAEP with SHA-256 itself (SoftHSM2 2.6 does not; see
    # HSMBackend): RSAES_OAEP_SHA_256 then never decodes outside the token.
    oaep_sha256_in_token: bool = False


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    jwks_file: Path | None = None
    pem_file: Path | None = None
    # The longest token lifetime (exp - iat) accepted from this issuer.
    max_lifetime_s: int = 24 * 3600
    # The products it may speak for (None: any).
    products: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Config:
    region: str
    regions: tuple[str, ...]
    database: Path
    root_key: bytes = field(repr=False)
    audit_log: Path
    audit_chain_key: bytes | None = field(repr=False)
    accounts: tuple[AccountConfig, ...]
    instances: tuple[InstanceConfig, ...]
    default_instance: Mapping[str, str]  # account id -> instance id
    server: ServerConfig = ServerConfig()
    # Accepted difference between a request's signed date and ours, in seconds.
    max_clock_skew: int = 900
    hsm: HSMTokenConfig | None = None
    trusted_issuers: tuple[IssuerConfig, ...] = ()
    # How often the lifecycle sweep runs (deletion windows, material expiry, rotation).
    lifecycle_interval_s: float = 60.0
    # Alibaba's shared-gateway QPS limits per account (reference section 10): off by default.
    gateway_quotas: bool = False


def _secret_bytes(r: TableReader, value_key: str, file_key: str, *, required: bool
                  ) -> bytes | None:
    """32 bytes from ``<value_key>`` (Base64) or from the file ``<file_key>``."""
    raw = r.get(value_key, str)
    path = r.path(file_key)
    if raw is None and path is not None:
        try:
            raw = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{file_key}: cannot read {path}: {exc.strerror}") from None
    if raw is None:
        if required:
            raise ConfigError(f"{value_key} (or {file_key}) is required")
        return None
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{value_key} must be Base64 of 32 bytes") from None
    if len(data) != 32:
        raise ConfigError(f"{value_key} must be Base64 of 32 bytes")
    return data


def _xki(r: TableReader) -> XKIConfig:
    creds = []
    for i, raw in enumerate(r.get("credentials", list, required=True)):
        c = TableReader(raw, f"{r.where}.credentials[{i}]", r.base)
        creds.append((c.get("access_key_id", str, required=True),
                      c.get("secret_access_key", str, required=True)))
    r.check(bool(creds), "credentials", "needs at least one credential set")
    xki = XKIConfig(
        endpoint=r.get("endpoint", str, required=True),
        uri_prefix=r.get("uri_prefix", str, "").strip("/"),
        region=r.get("region", str, "us-east-1"), credentials=tuple(creds),
        ca=r.path("ca", required=True) or Path(),
        client_cert=r.path("client_cert", required=True) or Path(),
        client_key=r.path("client_key", required=True) or Path(),
        server_fingerprint_sha256=r.get("server_fingerprint_sha256", str),
        timeout_ms=r.get("timeout_ms", int, 250),
        health_interval_s=_positive(r, "health_interval_s", 30.0))
    r.check(xki.endpoint.startswith("https://"), "endpoint", "must be an https:// URL")
    r.check(10 <= xki.timeout_ms <= 60_000, "timeout_ms", "must be 10-60000")
    return xki


def _hsm(r: TableReader) -> HSMTokenConfig | None:
    if not r.data:
        return None
    hsm = HSMTokenConfig(
        module=r.get("module", str, "/usr/lib/softhsm/libsofthsm2.so"),
        token_label=r.get("token_label", str, required=True),
        user_pin=r.get("user_pin", str, required=True),
        softhsm_conf=r.path("softhsm_conf"), mode=r.get("mode", str, "inline"),
        workers=r.get("workers", int, 2),
        wrapping_key_label=r.get("wrapping_key_label", str, "kms-proxy.wrap"),
        oaep_sha256_in_token=r.get("oaep_sha256_in_token", bool, False))
    r.check(hsm.mode in ("inline", "threads"), "mode", "must be inline or threads")
    return hsm


def _issuers(root: TableReader) -> tuple[IssuerConfig, ...]:
    out = []
    for i, raw in enumerate(root.get("trusted_issuers", list, [])):
        r = TableReader(raw, f"trusted_issuers[{i}]", root.base)
        issuer = IssuerConfig(issuer=r.get("issuer", str, required=True),
                              audience=r.get("audience", str, "kms-proxy"),
                              algorithms=r.strings("algorithms", ("ES256", "RS256")),
                              jwks_file=r.path("jwks_file"), pem_file=r.path("pem_file"),
                              max_lifetime_s=r.get("max_lifetime_s", int, 24 * 3600),
                              products=(r.strings("products") if "products" in r.data
                                        else None))
        r.check(issuer.jwks_file is not None or issuer.pem_file is not None, "jwks_file",
                "(or pem_file) is required")
        r.check(issuer.max_lifetime_s > 0, "max_lifetime_s", "must be positive")
        out.append(issuer)
    return tuple(out)


def _server(r: TableReader) -> ServerConfig:
    tls = r.get("tls", bool, True)
    port = r.get("port", int, 8443)
    r.check(0 <= port <= 65535, "port", "must be 0-65535")
    server = ServerConfig(host=r.get("host", str, "127.0.0.1"), port=port, tls=tls,
                          cert=r.path("cert", required=tls), key=r.path("key", required=tls),
                          client_ca=r.path("client_ca"),
                          require_client_cert=r.get("require_client_cert", bool, False),
                          access_log=r.get("access_log", str, "off"),
                          event_loop=r.get("event_loop", str, "asyncio"))
    r.check(server.event_loop in EVENT_LOOPS, "event_loop", f"must be one of {EVENT_LOOPS}")
    r.check(not server.require_client_cert or server.client_ca is not None, "client_ca",
            "is required when require_client_cert is true")
    return server


def parse(data: dict[str, object], base: Path) -> Config:
    """:raises ConfigError: naming the field."""
    root = TableReader(data, "", base)
    region = root.get("region", str, required=True)
    root.check(bool(_REGION.fullmatch(region)), "region", "must look like cn-hangzhou")
    regions = root.strings("regions", (region,))
    root.check(region in regions, "regions", "must include region")
    accounts = []
    for i, raw in enumerate(root.get("accounts", list, required=True)):
        a = TableReader(raw, f"accounts[{i}]", base)
        account_id = a.get("id", str, required=True)
        a.check(bool(_ACCOUNT.fullmatch(account_id)), "id", "must be 6-20 digits")
        keys = []
        for j, raw_key in enumerate(a.get("access_keys", list, [])):
            k = TableReader(raw_key, f"accounts[{i}].access_keys[{j}]", base)
            key = AccessKeyConfig(id=k.get("id", str, required=True),
                                  secret=k.get("secret", str, required=True),
                                  user=k.get("user", str, "admin"))
            k.check(bool(_AK_ID.fullmatch(key.id)), "id", "must be 8-64 letters or digits")
            k.check(len(key.secret) >= 16, "secret", "must be at least 16 characters")
            keys.append(key)
        material = a.get("default_key_material", str, "kms")
        a.check(material in ("kms", "import"), "default_key_material",
                'must be "kms" or "import"')
        accounts.append(AccountConfig(account_id, tuple(keys),
                                      rotation_addon=a.get("rotation_addon", bool, False),
                                      default_key_material=material))
    ids = [k.id for a in accounts for k in a.access_keys]
    root.check(len(ids) == len(set(ids)), "accounts", "repeat an access key id")
    # ACS3 does not sign the AccessKey id: two ids with one secret would let a request
    # signed for one be replayed as the other (the nonce cache is per id).
    secrets_ = [k.secret for a in accounts for k in a.access_keys]
    root.check(len(secrets_) == len(set(secrets_)), "accounts",
               "give two access keys the same secret")
    account_ids = {a.id for a in accounts}
    instances, defaults = [], {}
    for i, raw in enumerate(root.get("instances", list, [])):
        n = TableReader(raw, f"instances[{i}]", base)
        kind = n.get("type", str, required=True)
        n.check(kind in set(InstanceType), "type", f"must be one of {sorted(InstanceType)}")
        instance = InstanceConfig(id=n.get("id", str, required=True),
                                  account_id=n.get("account_id", str, required=True),
                                  type=InstanceType(kind), name=n.get("name", str, "kms"),
                                  spec_qps=n.get("spec_qps", int, 1000),
                                  key_quota=n.get("key_quota", int, 1000))
        if instance.type is InstanceType.EXTERNAL:
            instance = replace(instance, xki=_xki(n.table("xki")))
        n.check(bool(_INSTANCE.fullmatch(instance.id)), "id", "must look like kst-...")
        n.check(instance.account_id in account_ids, "account_id", "names no account")
        n.check(instance.spec_qps > 0, "spec_qps", "must be positive")
        n.check(instance.key_quota > 0, "key_quota", "must be positive")
        if n.get("default", bool, False):
            n.check(instance.account_id not in defaults, "default",
                    "is set twice for one account")
            defaults[instance.account_id] = instance.id
        instances.append(instance)
    return Config(
        region=region, regions=regions,
        database=root.path("database", required=True) or Path(),
        root_key=_secret_bytes(root, "root_key", "root_key_file", required=True) or b"",
        audit_log=root.path("audit_log", required=True) or Path(),
        audit_chain_key=_secret_bytes(root, "audit_chain_key", "audit_chain_key_file",
                                      required=False),
        accounts=tuple(accounts), instances=tuple(instances), default_instance=defaults,
        server=_server(root.table("server")),
        max_clock_skew=root.get("max_clock_skew", int, 900),
        hsm=_hsm(root.table("hsm")),
        trusted_issuers=_issuers(root),
        lifecycle_interval_s=_positive(root, "lifecycle_interval_s", 60.0),
        gateway_quotas=root.get("gateway_quotas", bool, False))


def _positive(r: TableReader, key: str, default: float) -> float:
    value: float = r.get(key, float, default)
    r.check(value > 0, key, "must be positive")
    return value


def load(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """:raises ConfigError: naming the field."""
    return parse(read_toml(path, ENV_PREFIX, env), path.resolve().parent)
