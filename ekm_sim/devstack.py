"""``ekm-sim dev up/down``: a ready simulator in the background, described by ``ekm.json``.

``ekm.json`` fields are a stable interface that other tools (the KMS front's dev stack,
test harnesses) read: url, uri_prefix, region, access_key_id, secret_access_key, ca,
client_cert, client_key, keys{default, encrypt_only, decrypt_only, impotent}, pid.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

from ekm_sim.admin import AdminError, write_softhsm_conf
from shared.certs import DevCA
from shared.serving import (
    BackgroundError,
    start_background,
    stop_process,
    stop_recorded,
    write_atomically,
)

__all__ = ["PID_FILE", "TEST_CLIENT_CREDENTIAL", "down", "make_certs", "up"]

# The server's pid, written the moment it starts (``start_background``).
PID_FILE: Final = "ekm-sim.pid"

# The public XKS test client's default credentials, so vendors can run it with no flags.
TEST_CLIENT_CREDENTIAL: Final = ("BETWEEN2TENAND3TENCHARACTERS",
                                 "PleaseReplaceThisWithSomeSecretOfLength43To64")
URI_PREFIX: Final = "example/uri/path/prefix"
REGION: Final = "us-east-1"
CLIENT_CN: Final = "kms-proxy.dev.internal"
KEYS: Final = {"default": ("foo", "both"), "encrypt_only": ("encrypt_only_key", "encrypt"),
               "decrypt_only": ("decrypt_only_key", "decrypt"),
               "impotent": ("impotent_key", "none")}


def make_certs(out: Path, *, sans: list[str], client_cn: str = CLIENT_CN,
               reuse: bool = False) -> dict[str, Path]:
    """A dev CA (reused if present), a server certificate and a client certificate.

    With ``reuse``, existing leaf certificates are kept: a client that pins the server
    certificate (the KMS front's XKI connection) keeps working across restarts.
    """
    ca = DevCA.load_or_create(out)
    paths = {"ca": ca.cert_path, "server_cert": out / "server.pem",
             "server_key": out / "server-key.pem", "client_cert": out / "client.pem",
             "client_key": out / "client-key.pem"}
    if reuse and all(p.exists() for p in paths.values()):
        return paths
    ca.issue("server", common_name=sans[0], sans=sans, server=True)
    ca.issue("client", common_name=client_cn, sans=[client_cn], server=False)
    return paths


def _random_access_key_id() -> str:
    return base64.b32encode(secrets.token_bytes(15)).decode()[:24]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cli(*args: str, env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "ekm_sim.cli", *args], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AdminError(f"ekm-sim {' '.join(args)} failed: {done.stderr.strip()}")


def _warn_if_kept(config_path: Path, *, port: int, workers: int, bind: str,
                  name: str | None) -> None:
    """An existing workdir keeps its config and certificates: say so when this call asked
    for other settings (they would otherwise be dropped without a word)."""
    if not config_path.exists():
        return
    from ekm_sim.config import ConfigError, load

    try:
        server = load(config_path).server
    except ConfigError:
        return  # The server start reports it.
    kept = [f"{what} {have} (asked: {asked})"
            for what, have, asked, default in (("port", server.port, port, 0),
                                               ("workers", server.workers, workers, 1),
                                               ("bind", server.host, bind, "127.0.0.1"))
            if asked != default and asked != have]
    cert = config_path.parent / "certs" / "server.pem"
    if name is not None and cert.exists():
        import ipaddress

        from cryptography import x509

        try:
            names = x509.load_pem_x509_certificate(cert.read_bytes()).extensions \
                .get_extension_for_class(x509.SubjectAlternativeName).value
            named = {*names.get_values_for_type(x509.DNSName),
                     *map(str, names.get_values_for_type(x509.IPAddress))}
        except x509.ExtensionNotFound:
            named = set()
        with contextlib.suppress(ValueError):
            name = str(ipaddress.ip_address(name))  # The form the certificate gives back.
        if name not in named:
            kept.append(f"a server certificate that does not name {name!r}")
    if kept:
        print(f"ekm-sim dev up: {config_path} exists and keeps {', '.join(kept)}; edit it, "
              "or use a new workdir", file=sys.stderr)


def up(workdir: Path, *, port: int = 0, workers: int = 1, timeout: float = 60.0,
       name: str | None = None, bind: str = "127.0.0.1", foreground: bool = False
       ) -> dict[str, Any]:
    """Set up certificates, a token, a config and the demo keys, start the server in the
    background and return what ``ekm.json`` holds. Idempotent while the server runs.

    For a container (compose.yaml): ``name`` is the host name clients use (a SAN of the
    server certificate, and ``ekm.json``'s url), ``bind`` the address to listen on, and
    ``foreground`` sends the server's output to this process's and always starts it (a
    pid kept from an earlier container proves nothing).

    :raises AdminError: if set-up fails or the server does not come up in time.
    """
    workdir = workdir.resolve()
    _warn_if_kept(workdir / "ekm-sim.toml", port=port, workers=workers, bind=bind, name=name)
    info_path = workdir / "ekm.json"
    if info_path.exists() and not foreground:
        info = json.loads(info_path.read_text())
        if _alive(int(info["pid"])):
            return dict(info)
    info_path.unlink(missing_ok=True)  # Written again once the server answers.
    workdir.mkdir(parents=True, exist_ok=True)
    certs = make_certs(workdir / "certs", sans=["localhost", "127.0.0.1", *([name] if name
                                                                             else [])],
                       reuse=True)
    conf = workdir / "softhsm2.conf"
    write_softhsm_conf(workdir / "tokens", conf)
    config_path = workdir / "ekm-sim.toml"
    if not config_path.exists():
        second = (_random_access_key_id(), base64.b64encode(secrets.token_bytes(32)).decode())
        config_path.write_text(_config_text(workdir, certs, conf, second, port, workers,
                                            bind))
        config_path.chmod(0o600)
    env = dict(os.environ, EKM_SIM_CONFIG=str(config_path))
    _cli("init", env=env)
    listing = subprocess.run([sys.executable, "-m", "ekm_sim.cli", "keys", "list", "--json"],
                             env=env, capture_output=True, text=True, check=True)
    existing = {k["key_id"] for k in json.loads(listing.stdout)}
    for key_id, usage in KEYS.values():
        if key_id not in existing:
            _cli("keys", "create", key_id, "--usage", usage, env=env)

    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    ctx.load_cert_chain(str(certs["client_cert"]), str(certs["client_key"]))
    try:
        process, bound = start_background(
            [sys.executable, "-m", "ekm_sim.cli", "serve", "--port-file",
             str(workdir / "ekm-sim.port")],
            env=env, log_path=None if foreground else workdir / "ekm-sim.log",
            port_file=workdir / "ekm-sim.port", pid_file=workdir / PID_FILE,
            health_path="/ping", ssl_context=ctx, timeout=timeout)
    except BackgroundError as exc:
        raise AdminError(str(exc)) from None
    try:
        return _describe(workdir, process.pid, bound, name=name, certs=certs,
                         config_path=config_path, foreground=foreground)
    except BaseException:
        stop_process(process.pid)  # Interrupted during set-up: stop what started.
        raise


def _describe(workdir: Path, pid: int, bound: int, *, name: str | None,
              certs: dict[str, Path], config_path: Path, foreground: bool
              ) -> dict[str, Any]:
    """ekm.json for a running simulator (a healthcheck waits for it)."""
    info_path = workdir / "ekm.json"
    info = {
        "url": f"https://{name or '127.0.0.1'}:{bound}",
        "uri_prefix": URI_PREFIX,
        "region": REGION,
        "access_key_id": TEST_CLIENT_CREDENTIAL[0],
        "secret_access_key": TEST_CLIENT_CREDENTIAL[1],
        "ca": str(certs["ca"]),
        "client_cert": str(certs["client_cert"]),
        "client_key": str(certs["client_key"]),
        "keys": {role: key_id for role, (key_id, _) in KEYS.items()},
        "pid": pid,
        "config": str(config_path),
        "log": None if foreground else str(workdir / "ekm-sim.log"),
    }
    write_atomically(info_path, json.dumps(info, indent=2) + "\n", mode=0o600)
    return info


def _config_text(workdir: Path, certs: dict[str, Path], conf: Path,
                 second: tuple[str, str], port: int, workers: int, bind: str) -> str:
    user_pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
    return f"""# Written by `ekm-sim dev up`. Holds secrets: keep it private (mode 0600).
registry = "{workdir / 'keys.json'}"

[server]
host = "{bind}"
port = {port}
workers = {workers}
request_log = "{workdir / 'requests.log'}"

[tls]
enabled = true
cert = "{certs['server_cert']}"
key = "{certs['server_key']}"
client_ca = "{certs['ca']}"
require_client_cert = true
allowed_client_names = ["{CLIENT_CN}"]

[hsm]
token_label = "ekm-sim"
user_pin = "{user_pin}"
so_pin = "{so_pin}"
softhsm_conf = "{conf}"

[[stores]]
uri_prefix = "{URI_PREFIX}"
region = "{REGION}"
# Every key of the registry, so keys made later with `ekm-sim keys create` are served too.
keys = ["*"]

[[stores.credentials]]
access_key_id = "{TEST_CLIENT_CREDENTIAL[0]}"
secret_access_key = "{TEST_CLIENT_CREDENTIAL[1]}"

[[stores.credentials]]
access_key_id = "{second[0]}"
secret_access_key = "{second[1]}"
"""


def down(workdir: Path, *, timeout: float = 15.0) -> None:
    """Stop the server that ``up`` started; a no-op if it is not running. Without
    ``ekm.json`` (a set-up that was interrupted), the pid file still names it."""
    workdir = workdir.resolve()
    stop_recorded(workdir / "ekm.json", workdir / PID_FILE, timeout=timeout)
