"""The CLI and ``ekm-sim dev up/down`` as real subprocesses, driven like a user would."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, TCPConnector

from shared.sigv4 import Credential, sign_request
from shared.xks import b64
from tests.conftest import metadata

EKM_SIM = [sys.executable, "-m", "ekm_sim.cli"]


def run(*args: str, env: dict[str, str] | None = None, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EKM_SIM, *args], capture_output=True, text=True, check=check,
                          env=env, timeout=120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("dev")
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    up = run("dev", "up", "--workdir", str(workdir), env=env)
    info = json.loads(up.stdout)
    try:
        yield {**info, "workdir": workdir}
    finally:
        run("dev", "down", "--workdir", str(workdir), env=env)


class Client:
    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        ctx = ssl.create_default_context(cafile=info["ca"])
        ctx.load_cert_chain(info["client_cert"], info["client_key"])
        self.session = ClientSession(connector=TCPConnector(ssl=ctx))
        self.cred = Credential(info["access_key_id"], info["secret_access_key"])

    async def call(self, api: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        url = f"{self.info['url']}/{self.info['uri_prefix']}/kms/xks/v1/{api}"
        data = json.dumps(body).encode()
        headers = sign_request(method="POST", url=url, body=data,
                               headers={"Content-Type": "application/json"},
                               credential=self.cred, region=self.info["region"],
                               service="kms-xks-proxy")
        async with self.session.post(url, data=data, headers=headers) as resp:
            return resp.status, await resp.json()

    async def encrypt(self, key: str, plaintext: bytes) -> tuple[int, dict[str, Any]]:
        return await self.call(f"keys/{key}/encrypt", {
            "requestMetadata": metadata(), "plaintext": b64(plaintext),
            "encryptionAlgorithm": "AES_GCM"})

    async def decrypt(self, key: str, sealed: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return await self.call(f"keys/{key}/decrypt", {
            "requestMetadata": metadata("Decrypt"), "encryptionAlgorithm": "AES_GCM",
            **{k: v for k, v in sealed.items() if k != "ciphertextDataIntegrityValue"}})


def test_help_everywhere() -> None:
    for args in ([], ["keys"], ["dev"]):
        out = run(*args, "--help").stdout
        assert "usage: ekm-sim" in out
    assert "rotate" in run("keys", "--help").stdout


def test_ekm_json_has_the_stable_fields(stack: dict[str, Any]) -> None:
    saved = json.loads((stack["workdir"] / "ekm.json").read_text())
    for field in ("url", "uri_prefix", "region", "access_key_id", "secret_access_key", "ca",
                  "client_cert", "client_key", "keys", "pid"):
        assert field in saved
    assert saved["url"].startswith("https://127.0.0.1:")
    assert saved["uri_prefix"] == "example/uri/path/prefix"
    assert saved["keys"] == {"default": "foo", "encrypt_only": "encrypt_only_key",
                             "decrypt_only": "decrypt_only_key", "impotent": "impotent_key"}
    for path in ("ca", "client_cert", "client_key"):
        assert Path(saved[path]).is_absolute() and Path(saved[path]).exists()
    assert saved["access_key_id"] == "BETWEEN2TENAND3TENCHARACTERS"
    os.kill(saved["pid"], 0)
    # Private keys and the config with secrets are not world-readable.
    assert Path(saved["client_key"]).stat().st_mode & 0o077 == 0
    assert (stack["workdir"] / "ekm-sim.toml").stat().st_mode & 0o077 == 0


def test_dev_up_is_idempotent(stack: dict[str, Any]) -> None:
    again = run("dev", "up", "--workdir", str(stack["workdir"]))
    assert json.loads(again.stdout)["pid"] == stack["pid"]
    assert json.loads(again.stdout)["url"] == stack["url"] and not again.stderr
    # The workdir keeps its config; asking for other settings says so.
    other = run("dev", "up", "--workdir", str(stack["workdir"]), "--workers", "2")
    assert json.loads(other.stdout)["pid"] == stack["pid"]
    assert "keeps workers 1 (asked: 2)" in other.stderr


async def test_keys_lifecycle_against_the_running_server(stack: dict[str, Any]) -> None:
    config = ["--config", stack["config"]]
    client = Client(stack)
    try:
        status, old = await client.encrypt("foo", b"before")
        assert status == 200

        assert "now version 2" in run("keys", "rotate", "foo", *config).stdout
        await asyncio.sleep(0.6)
        status, new = await client.encrypt("foo", b"after")
        assert status == 200 and new["ciphertextMetadata"] != old["ciphertextMetadata"]
        assert (await client.decrypt("foo", old))[1] == {"plaintext": b64(b"before")}
        assert (await client.decrypt("foo", new))[1] == {"plaintext": b64(b"after")}

        run("keys", "disable", "foo", *config)
        await asyncio.sleep(0.6)
        status, body = await client.encrypt("foo", b"x")
        assert (status, body["errorName"]) == (400, "InvalidStateException")
        run("keys", "enable", "foo", *config)
        await asyncio.sleep(0.6)
        assert (await client.encrypt("foo", b"x"))[0] == 200

        listing = json.loads(run("keys", "list", "--json", *config).stdout)
        by_id = {k["key_id"]: k for k in listing}
        assert by_id["foo"]["versions"] == [1, 2]
        assert by_id["encrypt_only_key"]["usage"] == ["ENCRYPT"]
        assert by_id["impotent_key"]["usage"] == []
        assert "ekm-sim.health-probe" not in by_id

        run("keys", "create", "scratch", "--usage", "decrypt", *config)
        assert "scratch" in run("keys", "list", *config).stdout
        assert "destroyed" in run("keys", "delete", "scratch", *config).stdout
        assert "scratch" not in run("keys", "list", *config).stdout
        failed = run("keys", "delete", "scratch", *config, check=False)
        assert failed.returncode == 2 and "no key 'scratch'" in failed.stderr
    finally:
        await client.session.close()


async def test_request_log_file_of_the_running_server(stack: dict[str, Any]) -> None:
    """The served process writes its request log straight into the batched file (the path
    tests that build the app in-process do not take): whole JSON lines, within the flush
    interval, never the plaintext or the secret."""
    log_file = stack["workdir"] / "requests.log"
    client = Client(stack)
    marker = f"log-probe-{os.urandom(6).hex()}"
    try:
        status, _ = await client.encrypt("foo", marker.encode())
        assert status == 200
        status, _ = await client.call("keys/no-such-key/metadata", {
            "requestMetadata": metadata("DescribeKey")})
        assert status == 404
    finally:
        await client.session.close()
    deadline = time.monotonic() + 5
    while True:
        records = [json.loads(line) for line in log_file.read_text().splitlines()]
        done = bool(records) and records[-1].get("keyId") == "no-such-key"
        if done or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    last_two = records[-2:]
    assert [(r["operation"], r["keyId"], r["status"]) for r in last_two] == [
        ("Encrypt", "foo", 200), ("GetKeyMetadata", "no-such-key", 404)]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", last_two[0]["time"])
    text = log_file.read_text()
    assert marker not in text and b64(marker.encode()) not in text
    assert stack["secret_access_key"] not in text


async def test_sighup_rotates_credentials(stack: dict[str, Any]) -> None:
    config_path = Path(stack["config"])
    original = config_path.read_text()
    second = tomllib.loads(original)["stores"][0]["credentials"][1]
    new = Credential("SIGHUPROTATEDKEYSIGHUP23",
                     "c2lnaHVwLXJvdGF0ZWQtc2VjcmV0LWZvci10ZXN0cy0wMA==")
    client = Client(stack)
    try:
        client.cred = Credential(second["access_key_id"], second["secret_access_key"])
        assert (await client.encrypt("foo", b"x"))[0] == 200
        config_path.write_text(original.replace(second["access_key_id"], new.access_key_id)
                               .replace(second["secret_access_key"], new.secret_access_key))
        os.kill(stack["pid"], signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert (await client.encrypt("foo", b"x"))[0] == 401
        client.cred = new
        assert (await client.encrypt("foo", b"x"))[0] == 200
    finally:
        config_path.write_text(original)
        os.kill(stack["pid"], signal.SIGHUP)
        await client.session.close()


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('registry = "k.json"\n[hsm]\nuser_pin = "1"\n'
                      '[[stores]]\nuri_prefix = "p"\n[[stores.credentials]]\n'
                      'access_key_id = "lowercase-is-wrong"\nsecret_access_key = "x"\n')
    done = run("keys", "list", "--config", str(config), check=False)
    assert done.returncode == 2
    assert "stores[0].credentials[0].access_key_id" in done.stderr


def test_certs_command(tmp_path: Path) -> None:
    out = json.loads(run("certs", "--out", str(tmp_path / "c"), "--san", "ekm.example",
                         "--san", "10.0.0.1").stdout)
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(out["server_cert"]).read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["ekm.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert Path(out["client_key"]).stat().st_mode & 0o077 == 0


def test_dev_down_stops_it(tmp_path: Path) -> None:
    up = json.loads(run("dev", "up", "--workdir", str(tmp_path)).stdout)
    run("dev", "down", "--workdir", str(tmp_path))
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(up["pid"], 0)
            time.sleep(0.1)
    assert not (tmp_path / "ekm.json").exists()


def _at_once(commands: list[list[str]], env: dict[str, str]) -> None:
    """Start every command, then wait for all; each must succeed."""
    started = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for command in commands]
    for process in started:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err


async def test_concurrent_cli_changes_and_a_key_made_again(stack: dict[str, Any]) -> None:
    """Three `keys rotate` at once each add a version (one lock across processes), and a
    key deleted and made again serves its first request (no stale handle or registry)."""
    config = ["--config", stack["config"]]
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}

    def versions() -> list[int]:
        listing = json.loads(run("keys", "list", "--json", *config).stdout)
        return list(next(k for k in listing if k["key_id"] == "foo")["versions"])

    before = versions()
    _at_once([[*EKM_SIM, "keys", "rotate", "foo", *config]] * 3, env)
    after = versions()
    assert after == sorted(set(after)) and after[:len(before)] == before
    assert len(after) == len(before) + 3
    client = Client(stack)
    try:
        status, sealed = await client.encrypt("foo", b"newest")  # no wait for the refresh
        assert status == 200
        assert (await client.decrypt("foo", sealed))[1] == {"plaintext": b64(b"newest")}
        for _ in range(2):  # The second time, version 1 was just used: its handle cached.
            run("keys", "delete", "foo", *config)
            run("keys", "create", "foo", *config)
            await asyncio.sleep(0.6)
            status, body = await client.encrypt("foo", b"again")
            assert status == 200, body
        # A key made after `dev up` is served too (the dev store serves every key).
        run("keys", "create", "made-later", *config)
        status, body = await client.encrypt("made-later", b"new key")
        assert status == 200, body
        run("keys", "delete", "made-later", *config)
    finally:
        await client.session.close()
    clash = run("keys", "create", "ekm-sim.health-probe", *config, check=False)
    assert clash.returncode == 2 and "already holds" in clash.stderr
    # A dot segment could never be reached: /keys/../encrypt loses it on the way.
    for dots in (".", ".."):
        refused = run("keys", "create", dots, *config, check=False)
        assert refused.returncode == 2 and "not . or .." in refused.stderr
