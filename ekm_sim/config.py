"""The simulator's configuration: one TOML file, every value overridable from the environment.

Environment overrides use the path of the value, upper case, joined by double underscores:
``EKM_SIM__SERVER__PORT=9443``, ``EKM_SIM__HSM__USER_PIN=...``,
``EKM_SIM__STORES__0__CREDENTIALS__1__SECRET_ACCESS_KEY=...``. A value is read as a TOML
literal when it parses as one (numbers, booleans, arrays) and as a string otherwise.
Everything is checked once at start-up; an error names the field. Nothing reads
``os.environ`` after ``load``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from shared.pkcs11pool import DispatchMode, PoolConfig
from shared.serving import EVENT_LOOPS
from shared.sigv4 import ACCESS_KEY_ID_PATTERN, SECRET_PATTERN, Credential
from shared.tomlconfig import ConfigError, TableReader, read_toml
from shared.xks import EXTERNAL_KEY_ID, MAX_AAD_BYTES, MIN_AAD_BYTES, MIN_PLAINTEXT_BYTES

__all__ = [
    "ENV_PREFIX",
    "Config",
    "ConfigError",
    "HSMConfig",
    "HealthConfig",
    "LimitsConfig",
    "ServerConfig",
    "StoreConfig",
    "TLSConfig",
    "load",
]

ENV_PREFIX: Final = "EKM_SIM__"
DEFAULT_MODULE: Final = "/usr/lib/softhsm/libsofthsm2.so"
# The largest plaintext limit a request body (ekm_sim.app, 512 KiB) can carry in Base64 with
# a 64 KiB AAD; above it the body limit, not this one, would answer.
MAX_PLAINTEXT_LIMIT: Final = 256 * 1024
# XksProxyUriPath allows [a-zA-Z0-9/_-] and at most 128 characters (spec L128); the prefix
# is that path without the leading slash and the trailing /kms/xks/v1 (12 characters in
# all), as the public test client takes it.
_PREFIX: Final = re.compile(r"[a-zA-Z0-9/_-]{0,116}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8443
    # Extra processes sharing the port with SO_REUSEPORT; quotas are then per process.
    workers: int = 1
    # Where the one-line-per-request log goes: "-" for stderr, or a file path.
    request_log: str = "-"
    # A separate plain-HTTP listener answering GET /ping for load balancers (spec L718).
    ping_port: int | None = None
    # The event loop (shared.serving.EVENT_LOOPS).
    event_loop: str = "asyncio"


@dataclass(frozen=True, slots=True)
class TLSConfig:
    enabled: bool = True
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    require_client_cert: bool = False
    # Client certificate subject CNs or SANs accepted after the handshake; empty = any
    # certificate that chains to client_ca.
    allowed_client_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HSMConfig:
    module: str = DEFAULT_MODULE
    token_label: str = "ekm-sim"  # noqa: S105 - a label, not a secret.
    user_pin: str = field(default="", repr=False)
    so_pin: str = field(default="", repr=False)
    # SOFTHSM2_CONF for this token; set in the process environment before the module loads.
    softhsm_conf: Path | None = None
    mode: DispatchMode = DispatchMode.INLINE
    workers: int = 2
    max_pending: int = 256
    # "hsm": C_GenerateRandom; "os": os.urandom. Both are CSPRNGs; the HSM call costs a hop.
    iv_source: str = "hsm"

    def pool(self) -> PoolConfig:
        return PoolConfig(module=self.module, token_label=self.token_label,
                          user_pin=self.user_pin, mode=self.mode, workers=self.workers,
                          max_pending=self.max_pending)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_plaintext_bytes: int = 65536
    max_aad_bytes: int = MAX_AAD_BYTES


@dataclass(frozen=True, slots=True)
class HealthConfig:
    # A token key used only by GetHealthStatus; never in a store's allow-list.
    test_key: str = "ekm-sim.health-probe"
    # Deep checks are cached at most this long (spec L598 allows up to one minute).
    cache_seconds: float = 10.0
    # A round trip slower than this reports DEGRADED instead of ACTIVE.
    degraded_after_ms: float = 100.0


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """One logical key store: a URI path prefix with its own credentials, keys and quota."""

    uri_prefix: str
    region: str
    credentials: tuple[Credential, ...]
    # Key ids this store may use; ("*",) allows every key in the registry.
    keys: tuple[str, ...] = ("*",)
    # Requests per second for the whole prefix; 0 = no quota.
    quota_rps: float = 0.0
    # Secondary authorization: shell-style patterns matched against awsPrincipalArn;
    # empty = every principal.
    allowed_principals: tuple[str, ...] = ()

    @property
    def base_path(self) -> str:
        return f"/{self.uri_prefix}/kms/xks/v1" if self.uri_prefix else "/kms/xks/v1"

    def allows_key(self, key_id: str) -> bool:
        return "*" in self.keys or key_id in self.keys


@dataclass(frozen=True, slots=True)
class Config:
    stores: tuple[StoreConfig, ...]
    registry: Path
    server: ServerConfig = ServerConfig()
    tls: TLSConfig = TLSConfig()
    hsm: HSMConfig = HSMConfig()
    limits: LimitsConfig = LimitsConfig()
    health: HealthConfig = HealthConfig()


def _server(r: TableReader) -> ServerConfig:
    port = r.get("port", int, 8443)
    workers = r.get("workers", int, 1)
    r.check(0 <= port <= 65535, "port", "must be 0-65535")
    r.check(1 <= workers <= 64, "workers", "must be 1-64")
    ping = r.get("ping_port", int)
    r.check(ping is None or 1 <= ping <= 65535, "ping_port", "must be 1-65535")
    request_log = r.get("request_log", str, "-")
    if request_log not in ("-", "off"):
        request_log = str(r.path("request_log"))
    event_loop = r.get("event_loop", str, "asyncio")
    r.check(event_loop in EVENT_LOOPS, "event_loop", f"must be one of {EVENT_LOOPS}")
    return ServerConfig(host=r.get("host", str, "127.0.0.1"), port=port, workers=workers,
                        request_log=request_log, ping_port=ping, event_loop=event_loop)


def _tls(r: TableReader) -> TLSConfig:
    enabled = r.get("enabled", bool, True)
    tls = TLSConfig(
        enabled=enabled,
        cert=r.path("cert", required=enabled),
        key=r.path("key", required=enabled),
        client_ca=r.path("client_ca"),
        require_client_cert=r.get("require_client_cert", bool, False),
        allowed_client_names=r.strings("allowed_client_names"),
    )
    r.check(not tls.require_client_cert or tls.client_ca is not None, "client_ca",
            "is required when require_client_cert is true")
    r.check(not tls.require_client_cert or enabled, "require_client_cert",
            "needs tls.enabled")
    # Without a required certificate no client name is ever seen, so the list would be
    # silently ignored: a fail-open setting.
    r.check(not tls.allowed_client_names or tls.require_client_cert, "allowed_client_names",
            "needs require_client_cert = true (without it no client name is checked)")
    return tls


def _hsm(r: TableReader) -> HSMConfig:
    mode = r.get("mode", str, "inline")
    r.check(mode in set(DispatchMode), "mode", f"must be one of {sorted(DispatchMode)}")
    iv_source = r.get("iv_source", str, "hsm")
    r.check(iv_source in ("hsm", "os"), "iv_source", "must be 'hsm' or 'os'")
    workers = r.get("workers", int, 2)
    r.check(1 <= workers <= 64, "workers", "must be 1-64")
    max_pending = r.get("max_pending", int, 256)
    r.check(max_pending >= 1, "max_pending", "must be at least 1")
    return HSMConfig(
        module=r.get("module", str, DEFAULT_MODULE),
        token_label=r.get("token_label", str, "ekm-sim"),
        user_pin=r.get("user_pin", str, required=True),
        so_pin=r.get("so_pin", str, ""),
        softhsm_conf=r.path("softhsm_conf"),
        mode=DispatchMode(mode),
        workers=workers,
        max_pending=max_pending,
        iv_source=iv_source,
    )


def _limits(r: TableReader) -> LimitsConfig:
    limits = LimitsConfig(
        max_plaintext_bytes=r.get("max_plaintext_bytes", int, 65536),
        max_aad_bytes=r.get("max_aad_bytes", int, MAX_AAD_BYTES),
    )
    r.check(MIN_PLAINTEXT_BYTES <= limits.max_plaintext_bytes <= MAX_PLAINTEXT_LIMIT,
            "max_plaintext_bytes", f"must be {MIN_PLAINTEXT_BYTES} (the spec's minimum) to "
                                   f"{MAX_PLAINTEXT_LIMIT} (what a 512 KiB request body "
                                   "holds in Base64, with the largest AAD)")
    r.check(MIN_AAD_BYTES <= limits.max_aad_bytes <= MAX_AAD_BYTES, "max_aad_bytes",
            f"must be {MIN_AAD_BYTES}-{MAX_AAD_BYTES}")
    return limits


def _health(r: TableReader) -> HealthConfig:
    health = HealthConfig(
        test_key=r.get("test_key", str, "ekm-sim.health-probe"),
        cache_seconds=r.get("cache_seconds", float, 10.0),
        degraded_after_ms=r.get("degraded_after_ms", float, 100.0),
    )
    r.check(0 <= health.cache_seconds <= 60, "cache_seconds", "must be 0-60 (spec L598)")
    return health


def _store(r: TableReader) -> StoreConfig:
    prefix = r.get("uri_prefix", str, required=True).strip("/")
    r.check(bool(_PREFIX.fullmatch(prefix)) and "//" not in prefix, "uri_prefix",
            "must be <=116 chars of [a-zA-Z0-9/_-] without empty segments")
    raw_creds = r.get("credentials", list, required=True)
    creds = []
    for i, raw in enumerate(raw_creds):
        c = TableReader(raw, f"{r.where}.credentials[{i}]", r.base)
        ak = c.get("access_key_id", str, required=True)
        sk = c.get("secret_access_key", str, required=True)
        c.check(bool(ACCESS_KEY_ID_PATTERN.fullmatch(ak)), "access_key_id",
                "must be 20-30 characters of [A-Z2-7]")
        c.check(bool(SECRET_PATTERN.fullmatch(sk)), "secret_access_key",
                "must be 43-64 characters of [a-zA-Z0-9/+=]")
        creds.append(Credential(ak, sk))
    r.check(bool(creds), "credentials", "needs at least one credential set")
    r.check(len({c.access_key_id for c in creds}) == len(creds), "credentials",
            "has a repeated access_key_id")
    keys = r.strings("keys", ("*",))
    r.check(all(k == "*" or EXTERNAL_KEY_ID.fullmatch(k) for k in keys), "keys",
            "must hold key ids of [A-Za-z0-9._-] or '*'")
    quota = r.get("quota_rps", float, 0.0)
    r.check(quota >= 0, "quota_rps", "must be >= 0")
    return StoreConfig(uri_prefix=prefix, region=r.get("region", str, "us-east-1"),
                       credentials=tuple(creds), keys=keys, quota_rps=quota,
                       allowed_principals=r.strings("allowed_principals"))


def parse(data: dict[str, Any], base: Path) -> Config:
    """Build a checked ``Config`` from a TOML tree. :raises ConfigError: naming the field."""
    root = TableReader(data, "", base)
    raw_stores = root.get("stores", list, required=True)
    stores = tuple(_store(TableReader(s, f"stores[{i}]", base)) for i, s in enumerate(raw_stores))
    root.check(bool(stores), "stores", "needs at least one key store")
    prefixes = [s.uri_prefix for s in stores]
    root.check(len(set(prefixes)) == len(prefixes), "stores", "has a repeated uri_prefix")
    access_keys = [c.access_key_id for s in stores for c in s.credentials]
    root.check(len(set(access_keys)) == len(access_keys), "stores",
               "share an access_key_id; each must map to one store unambiguously")
    health = _health(root.table("health"))
    root.check(all(health.test_key not in s.keys for s in stores), "health.test_key",
               "must not be in any store's keys")
    return Config(
        stores=stores,
        registry=root.path("registry", required=True) or Path(),
        server=_server(root.table("server")),
        tls=_tls(root.table("tls")),
        hsm=_hsm(root.table("hsm")),
        limits=_limits(root.table("limits")),
        health=health,
    )


def load(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path``, overlay the environment, and check everything.

    :raises ConfigError: naming the bad field.
    """
    return parse(read_toml(path, ENV_PREFIX, env), path.resolve().parent)
