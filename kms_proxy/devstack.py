"""``kms-proxy dev up/down``: the whole local stack in the background.

It starts the EKM simulator (``ekm-sim dev up`` in ``WORKDIR/ekm``) and the front, with dev
certificates, a root key and an audit chain key kept apart from the database, demo access
keys for three accounts, and a software, a hardware and an external key management instance
per account. It writes
``WORKDIR/stack.json``; its fields are a stable interface:
``region, account_id, kms{endpoint, protocol, ca}, access_keys[{id, secret, account_id}],
accounts[{id, rotation_addon, default_key_material}], instances{software, hardware,
external}, keys{software, hardware, external, default, service, migrated}, ekm{<ekm.json>}``
plus ``pid``, ``config``, ``log``, ``instances_by_account`` and ``token_issuer``. The second
account has the rotation add-on; the third's default key waits for imported material.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import ssl
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kms_proxy.api.jwt_auth import ACCOUNT_ID, DEFAULT_MAX_LIFETIME_S, product_ok
from kms_proxy.config import ConfigError, load
from shared.certs import DevCA
from shared.serving import start_background, stop_process, stop_recorded, write_atomically
from shared.softhsm import init_token, write_softhsm_conf

__all__ = ["PID_FILE", "down", "token", "up"]

# The front's pid, written the moment it starts (``start_background``); and whether this
# stack started its simulator (it outlives stack.json, which a foreground stop removes).
PID_FILE: Final = "kms-proxy.pid"
EKM_MANAGED_FILE: Final = "ekm-managed"

REGION: Final = "cn-hangzhou"
ACCOUNTS: Final = ("1234567890123456", "9876543210987654", "5555666677778888")
# The second and third accounts show the seed's conditional cells: the second has the paid
# rotation add-on (its default and service keys may rotate); the third's default master key
# is first enabled by importing material (BYOK) rather than with KMS-generated material.
ACCOUNT_FEATURES: Final = {
    ACCOUNTS[0]: {"rotation_addon": False, "default_key_material": "kms"},
    ACCOUNTS[1]: {"rotation_addon": True, "default_key_material": "kms"},
    ACCOUNTS[2]: {"rotation_addon": False, "default_key_material": "import"},
}
_ALNUM: Final = string.ascii_letters + string.digits


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def _secret_file(path: Path) -> None:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")


ISSUER: Final = "https://sts.kms-proxy.dev"
AUDIENCE: Final = "kms-proxy"
ISSUER_KID: Final = "dev-1"


def _issuer_keys(secrets_dir: Path) -> Path:
    """The dev stack's token issuer: an EC P-256 key (private, 0600) and its JWKS."""
    key_path, jwks_path = secrets_dir / "issuer-key.pem", secrets_dir / "issuer-jwks.json"
    if not key_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        write_atomically(key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode(), mode=0o600)
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        jwk.update(kid=ISSUER_KID, alg="ES256", use="sig")
        write_atomically(jwks_path, json.dumps({"keys": [jwk]}))
    return jwks_path


def token(workdir: Path, *, product: str, account: str, ttl: int = 3600) -> str:
    """A service-principal JWT for ``product`` acting for ``account``, signed by the dev
    stack's issuer (for tests and compose stacks)."""
    if not product_ok(product) or not ACCOUNT_ID.fullmatch(account):
        raise ConfigError(f"the front refuses a token for product {product[:40]!r} and "
                          f"account {account[:40]!r}: a product is like 'oss' (not 'kms'), an "
                          f"account 6-20 digits")
    if not 0 < ttl <= DEFAULT_MAX_LIFETIME_S:
        raise ConfigError(f"--ttl must be 1-{DEFAULT_MAX_LIFETIME_S} seconds")
    try:
        pem = (workdir.resolve() / "secrets" / "issuer-key.pem").read_bytes()
    except OSError as exc:
        raise ConfigError(f"no dev stack's issuer key in {workdir}: {exc.strerror}") from None
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + ttl,
                       "product": product, "account": account},
                      key, algorithm="ES256", headers={"kid": ISSUER_KID})


def _fingerprint(cert: Path) -> str:
    return x509.load_pem_x509_certificate(cert.read_bytes()).fingerprint(
        hashes.SHA256()).hex()


def _config(workdir: Path, certs: dict[str, Path], ekm: dict[str, Any], *,
            bind: str = "127.0.0.1", port: int = 0
            ) -> tuple[str, list[dict[str, str]], dict[str, dict[str, str]]]:
    keys = [{"id": "LTAI" + _random(20), "secret": _random(30), "account_id": account}
            for account in ACCOUNTS for _ in range(2)]
    instances = {account: {kind: f"kst-{REGION[3:6]}{_random(12).lower()}"
                           for kind in ("software", "hardware", "external")}
                 for account in ACCOUNTS}
    accounts = "\n".join(
        f'[[accounts]]\nid = "{account}"\n'
        f'rotation_addon = {str(ACCOUNT_FEATURES[account]["rotation_addon"]).lower()}\n'
        f'default_key_material = "{ACCOUNT_FEATURES[account]["default_key_material"]}"\n'
        + "".join(
            f'[[accounts.access_keys]]\nid = "{k["id"]}"\nsecret = "{k["secret"]}"\n'
            f'user = "dev{n}"\n' for n, k in enumerate(keys) if k["account_id"] == account)
        for account in ACCOUNTS)
    ekm_cert = Path(ekm["ca"]).parent / "server.pem"
    xki = (f'[instances.xki]\nendpoint = "{ekm["url"]}"\nuri_prefix = "{ekm["uri_prefix"]}"\n'
           f'region = "{ekm["region"]}"\nca = "{ekm["ca"]}"\n'
           f'client_cert = "{ekm["client_cert"]}"\nclient_key = "{ekm["client_key"]}"\n'
           f'server_fingerprint_sha256 = "{_fingerprint(ekm_cert)}"\n'
           f'credentials = [{{ access_key_id = "{ekm["access_key_id"]}", '
           f'secret_access_key = "{ekm["secret_access_key"]}" }}]\n')
    instance_rows = "\n".join(
        f'[[instances]]\nid = "{ids[kind]}"\naccount_id = "{account}"\ntype = "{kind}"\n'
        f'name = "{kind}-dev"\nspec_qps = 20000\nkey_quota = 100000\n'
        + ("default = true\n" if kind == "software" else "")
        + (xki if kind == "external" else "")
        for account, ids in instances.items() for kind in ids)
    text = f"""# Written by `kms-proxy dev up`. Holds secrets: keep it private (mode 0600).
region = "{REGION}"
regions = ["{REGION}", "cn-shanghai"]
database = "{workdir / 'data' / 'kms.db'}"
root_key_file = "{workdir / 'secrets' / 'root.key'}"
audit_log = "{workdir / 'data' / 'audit.log'}"
audit_chain_key_file = "{workdir / 'secrets' / 'audit-chain.key'}"

[hsm]
token_label = "kms-proxy-hsm"
user_pin = "{_random(12)}"
softhsm_conf = "{workdir / 'hsm' / 'softhsm2.conf'}"

[[trusted_issuers]]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
algorithms = ["ES256"]
jwks_file = "{workdir / 'secrets' / 'issuer-jwks.json'}"

[server]
host = "{bind}"
port = {port}
tls = true
cert = "{certs['cert']}"
key = "{certs['key']}"

{accounts}
{instance_rows}"""
    return text, keys, instances


def up(workdir: Path, *, timeout: float = 60.0, ekm_workdir: Path | None = None,
       name: str | None = None, bind: str = "127.0.0.1", port: int = 0,
       foreground: bool = False) -> dict[str, Any]:
    """Start the EKM simulator and the front; return what ``stack.json`` holds.

    Idempotent while the front runs. For a container (compose.yaml): ``ekm_workdir`` names
    a simulator already set up and running elsewhere (its ``ekm.json``), ``name`` is the
    host name clients use (a SAN of the front's certificate and stack.json's endpoint),
    ``bind`` and ``port`` where to listen, and ``foreground`` sends the front's output to
    this process's and always starts it.
    """
    workdir = workdir.resolve()
    stack_path = workdir / "stack.json"
    if stack_path.exists() and not foreground:
        stack = json.loads(stack_path.read_text())
        try:
            os.kill(int(stack["pid"]), 0)
            return dict(stack)
        except ProcessLookupError:
            pass
    stack_path.unlink(missing_ok=True)  # Written again once the front answers.
    workdir.mkdir(parents=True, exist_ok=True)
    managed = ekm_workdir is None
    write_atomically(workdir / EKM_MANAGED_FILE, "yes\n" if managed else "no\n")
    try:
        return _up(workdir, timeout=timeout, ekm_workdir=ekm_workdir, name=name, bind=bind,
                   port=port, foreground=foreground)
    except BaseException:
        if managed:
            # Interrupted or failed after the simulator may have started: stop it too.
            subprocess.run([sys.executable, "-m", "ekm_sim.cli", "dev", "down", "--workdir",
                            str(workdir / "ekm")], capture_output=True, timeout=60,
                           check=False)
        raise


def _up(workdir: Path, *, timeout: float, ekm_workdir: Path | None, name: str | None,
        bind: str, port: int, foreground: bool) -> dict[str, Any]:
    managed = ekm_workdir is None
    if ekm_workdir is None:
        # The simulator is its own program: start it through its CLI, read its ekm.json.
        # It gets a fixed port the first time (kept in its config), so the front's XKI
        # endpoint stays right when the simulator is stopped and started again.
        ekm_workdir = workdir / "ekm"
        subprocess.run([sys.executable, "-m", "ekm_sim.cli", "dev", "up", "--workdir",
                        str(ekm_workdir), "--port", str(_free_port())],
                       check=True, capture_output=True, timeout=timeout)
    ekm = _ekm_info(ekm_workdir, timeout)
    ca = DevCA.load_or_create(workdir / "certs")
    server = ca.issue("kms", common_name="localhost",
                      sans=["localhost", "127.0.0.1", *([name] if name else [])], server=True)
    (workdir / "secrets").mkdir(mode=0o700, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    _secret_file(workdir / "secrets" / "root.key")
    _secret_file(workdir / "secrets" / "audit-chain.key")
    config_path = workdir / "kms-proxy.toml"
    keys_path = workdir / "secrets" / "access-keys.json"
    _issuer_keys(workdir / "secrets")
    if not config_path.exists():
        text, keys, instances = _config(workdir, {"cert": server.cert, "key": server.key}, ekm,
                                        bind=bind, port=port)
        write_atomically(config_path, text, mode=0o600)
        write_atomically(keys_path, json.dumps({"access_keys": keys, "instances": instances}),
                         mode=0o600)
    # The hardware instances' token: a SoftHSM2 token of its own, not the EKM's.
    config = load(config_path)
    assert config.hsm is not None
    _warn_if_kept(config_path, ekm["url"], port=port, bind=bind)
    write_softhsm_conf(workdir / "hsm" / "tokens", workdir / "hsm" / "softhsm2.conf")
    init_token(label=config.hsm.token_label, user_pin=config.hsm.user_pin,
               so_pin=_random(12), softhsm_conf=config.hsm.softhsm_conf)
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    process, bound = start_background(
        [sys.executable, "-m", "kms_proxy.cli", "serve", "--config", str(config_path),
         "--port-file", str(workdir / "kms-proxy.port")],
        env=dict(os.environ), log_path=None if foreground else workdir / "kms-proxy.log",
        port_file=workdir / "kms-proxy.port", health_path="/health", ssl_context=ctx,
        timeout=timeout, pid_file=workdir / PID_FILE)
    try:
        return _describe(workdir, process.pid, bound, name=name, ca=ca.cert_path, ekm=ekm,
                         keys=json.loads(keys_path.read_text()), config_path=config_path,
                         foreground=foreground, ekm_managed=managed)
    except BaseException:
        # Interrupted (a container stopped during set-up) or failed: stop what started.
        stop_process(process.pid)
        raise


def _describe(workdir: Path, pid: int, bound: int, *, name: str | None, ca: Path,
              ekm: dict[str, Any], keys: dict[str, Any], config_path: Path,
              foreground: bool, ekm_managed: bool) -> dict[str, Any]:
    """stack.json for a running front: written last, once the demo keys exist."""
    saved = keys
    stack_path = workdir / "stack.json"
    stack = {
        "region": REGION,
        "account_id": ACCOUNTS[0],
        "kms": {"endpoint": f"{name or '127.0.0.1'}:{bound}", "protocol": "https",
                "ca": str(ca)},
        "access_keys": saved["access_keys"],
        "accounts": [{"id": account, **ACCOUNT_FEATURES[account]} for account in ACCOUNTS],
        "instances": saved["instances"][ACCOUNTS[0]],
        "instances_by_account": saved["instances"],
        "token_issuer": {"issuer": ISSUER, "audience": AUDIENCE},
        "ekm": ekm,
        # Whether this stack started the simulator (dev down stops it then) or uses one
        # that runs elsewhere (--ekm-workdir: another container).
        "ekm_managed": ekm_managed,
        "pid": pid,
        "config": str(config_path),
        "log": None if foreground else str(workdir / "kms-proxy.log"),
    }
    # Demo keys of every kind, made once (the database keeps them across restarts).
    demo_path = workdir / "secrets" / "demo-keys.json"
    if not demo_path.exists():
        from kms_proxy.devkeys import make_demo_keys

        demo_keys = make_demo_keys(stack, token(workdir, product="oss",
                                                account=ACCOUNTS[0]))
        write_atomically(demo_path, json.dumps(demo_keys), mode=0o600)
    stack["keys"] = json.loads(demo_path.read_text())
    write_atomically(stack_path, json.dumps(stack, indent=2) + "\n", mode=0o600)
    return stack


def down(workdir: Path) -> None:
    """Stop the front, and the EKM simulator if this stack started it."""
    workdir = workdir.resolve()
    marker = workdir / EKM_MANAGED_FILE
    managed = not marker.exists() or marker.read_text().strip() != "no"
    stop_recorded(workdir / "stack.json", workdir / PID_FILE)
    if managed:
        subprocess.run([sys.executable, "-m", "ekm_sim.cli", "dev", "down", "--workdir",
                        str(workdir / "ekm")], check=True, capture_output=True, timeout=60)


def _ekm_info(ekm_workdir: Path, timeout: float) -> dict[str, Any]:
    """The simulator's ekm.json, waited for: in a compose stack the simulator may have
    removed an old one and not written the new one yet."""
    path = ekm_workdir / "ekm.json"
    deadline = time.monotonic() + timeout
    while True:
        try:
            info: dict[str, Any] = json.loads(path.read_text())
            return info
        except (OSError, ValueError) as exc:
            if time.monotonic() >= deadline:
                raise ConfigError(f"no running simulator's ekm.json in {ekm_workdir}: "
                                  f"{exc}") from None
        time.sleep(0.2)


def _warn_if_kept(config_path: Path, ekm_url: str, *, port: int, bind: str) -> None:
    """An existing config keeps its port, its address and its external instances' endpoint
    (and pinned certificate): say so when this call asked for others, or when the
    simulator now answers elsewhere."""
    config = load(config_path)
    kept = [f"{what} {have} (asked: {asked})"
            for what, have, asked, default in (("port", config.server.port, port, 0),
                                               ("bind", config.server.host, bind,
                                                "127.0.0.1"))
            if asked != default and asked != have]
    endpoints = {i.xki.endpoint for i in config.instances if i.xki is not None}
    if endpoints and endpoints != {ekm_url}:
        kept.append(f"the external key manager at {', '.join(sorted(endpoints))} (the "
                    f"simulator is at {ekm_url})")
    if kept:
        print(f"kms-proxy dev up: {config_path} exists and keeps {'; '.join(kept)}; use a "
              "new workdir, or edit it", file=sys.stderr)
