"""``kms-proxy dev up/down``: the whole local stack in the background.

It starts the EKM simulator (``ekm-sim dev up`` in ``WORKDIR/ekm``) and the front, with dev
certificates, a root key and an audit chain key kept apart from the database, demo access
keys for two accounts, and a software key management instance per account. It writes
``WORKDIR/stack.json``; its fields are a stable interface:
``region, account_id, kms{endpoint, protocol, ca}, access_keys[{id, secret, account_id}],
instances{software, ...}, ekm{<ekm.json>}`` plus ``pid``, ``config``, ``log``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import ssl
import string
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

from shared.certs import DevCA
from shared.serving import start_background, stop_process, write_atomically

__all__ = ["down", "up"]

REGION: Final = "cn-hangzhou"
ACCOUNTS: Final = ("1234567890123456", "9876543210987654")
_ALNUM: Final = string.ascii_letters + string.digits


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def _secret_file(path: Path) -> None:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")


def _config(workdir: Path, certs: dict[str, Path]) -> tuple[str, list[dict[str, str]],
                                                             dict[str, str]]:
    keys = [{"id": "LTAI" + _random(20), "secret": _random(30), "account_id": account}
            for account in ACCOUNTS for _ in range(2)]
    instances = {account: f"kst-{REGION[3:6]}{_random(12).lower()}" for account in ACCOUNTS}
    accounts = "\n".join(
        f'[[accounts]]\nid = "{account}"\n' + "".join(
            f'[[accounts.access_keys]]\nid = "{k["id"]}"\nsecret = "{k["secret"]}"\n'
            f'user = "dev{n}"\n' for n, k in enumerate(keys) if k["account_id"] == account)
        for account in ACCOUNTS)
    instance_rows = "\n".join(
        f'[[instances]]\nid = "{iid}"\naccount_id = "{account}"\ntype = "software"\n'
        f'name = "software-dev"\nspec_qps = 20000\ndefault = true\n'
        for account, iid in instances.items())
    text = f"""# Written by `kms-proxy dev up`. Holds secrets: keep it private (mode 0600).
region = "{REGION}"
regions = ["{REGION}", "cn-shanghai"]
database = "{workdir / 'data' / 'kms.db'}"
root_key_file = "{workdir / 'secrets' / 'root.key'}"
audit_log = "{workdir / 'data' / 'audit.log'}"
audit_chain_key_file = "{workdir / 'secrets' / 'audit-chain.key'}"

[server]
host = "127.0.0.1"
port = 0
tls = true
cert = "{certs['cert']}"
key = "{certs['key']}"

{accounts}
{instance_rows}"""
    return text, keys, instances


def up(workdir: Path, *, timeout: float = 60.0) -> dict[str, Any]:
    """Start the EKM simulator and the front; return what ``stack.json`` holds.

    Idempotent while the front runs.
    """
    workdir = workdir.resolve()
    stack_path = workdir / "stack.json"
    if stack_path.exists():
        stack = json.loads(stack_path.read_text())
        try:
            os.kill(int(stack["pid"]), 0)
            return dict(stack)
        except ProcessLookupError:
            pass
    workdir.mkdir(parents=True, exist_ok=True)
    # The simulator is its own program: start it through its CLI, read its ekm.json.
    subprocess.run([sys.executable, "-m", "ekm_sim.cli", "dev", "up", "--workdir",
                    str(workdir / "ekm")], check=True, capture_output=True, timeout=timeout)
    ekm = json.loads((workdir / "ekm" / "ekm.json").read_text())
    ca = DevCA.load_or_create(workdir / "certs")
    server = ca.issue("kms", common_name="localhost", sans=["localhost", "127.0.0.1"],
                      server=True)
    (workdir / "secrets").mkdir(mode=0o700, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    _secret_file(workdir / "secrets" / "root.key")
    _secret_file(workdir / "secrets" / "audit-chain.key")
    config_path = workdir / "kms-proxy.toml"
    keys_path = workdir / "secrets" / "access-keys.json"
    if not config_path.exists():
        text, keys, instances = _config(workdir, {"cert": server.cert, "key": server.key})
        write_atomically(config_path, text, mode=0o600)
        write_atomically(keys_path, json.dumps({"access_keys": keys, "instances": instances}),
                         mode=0o600)
    saved = json.loads(keys_path.read_text())
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    process, port = start_background(
        [sys.executable, "-m", "kms_proxy.cli", "serve", "--config", str(config_path),
         "--port-file", str(workdir / "kms-proxy.port")],
        env=dict(os.environ), log_path=workdir / "kms-proxy.log",
        port_file=workdir / "kms-proxy.port", health_path="/health", ssl_context=ctx,
        timeout=timeout)
    stack = {
        "region": REGION,
        "account_id": ACCOUNTS[0],
        "kms": {"endpoint": f"127.0.0.1:{port}", "protocol": "https",
                "ca": str(ca.cert_path)},
        "access_keys": saved["access_keys"],
        "instances": {"software": saved["instances"][ACCOUNTS[0]]},
        "instances_by_account": {a: {"software": i} for a, i in saved["instances"].items()},
        "ekm": ekm,
        "pid": process.pid,
        "config": str(config_path),
        "log": str(workdir / "kms-proxy.log"),
    }
    write_atomically(stack_path, json.dumps(stack, indent=2) + "\n", mode=0o600)
    return stack


def down(workdir: Path) -> None:
    """Stop the front and the EKM simulator."""
    workdir = workdir.resolve()
    stack_path = workdir / "stack.json"
    if stack_path.exists():
        stop_process(int(json.loads(stack_path.read_text())["pid"]))
        stack_path.unlink()
    subprocess.run([sys.executable, "-m", "ekm_sim.cli", "dev", "down", "--workdir",
                    str(workdir / "ekm")], check=True, capture_output=True, timeout=60)
