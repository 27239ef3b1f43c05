"""Client certificates: refused at the handshake unless they chain to the configured CA;
chained but not allow-listed subjects get 401 before any work."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ekm_sim.config import Config
from tests.conftest import Sim, StartSim, TLSFiles, metadata


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kms-front.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "self.pem", directory / "self-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _write(leaf: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert_path))
    leaf.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def _handshake(port: int, ca: Path, cert: tuple[Path, Path] | None,
               version: ssl.TLSVersion) -> bytes:
    """Connect, send a request and read: returns the first bytes or raises."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.maximum_version = version
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return tls.recv(100)


@pytest.fixture
def bogus_certs(tmp_path: Path, ca: trustme.CA) -> dict[str, tuple[Path, Path] | None]:
    other_ca = trustme.CA()
    expired = ca.issue_cert("kms-front.test",
                            not_before=dt.datetime(2022, 11, 1, tzinfo=dt.UTC),
                            not_after=dt.datetime(2022, 11, 2, tzinfo=dt.UTC))
    return {
        "none": None,
        "unknown_ca": _write(other_ca.issue_cert("kms-front.test"), tmp_path, "unknown"),
        "expired": _write(expired, tmp_path, "expired"),
        "self_signed": _self_signed(tmp_path),
    }


@pytest.mark.parametrize("kind", ["none", "unknown_ca", "expired", "self_signed"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_bad_client_certificates_are_refused_at_the_handshake(
    sim: Sim, tls_files: TLSFiles, bogus_certs: dict[str, tuple[Path, Path] | None],
    kind: str, version: ssl.TLSVersion, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ekm_sim.requests")
    port = int(sim.host.rsplit(":", 1)[1])
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        data = await asyncio.to_thread(_handshake, port, tls_files.ca, bogus_certs[kind],
                                       version)
        # TLS 1.3 finishes the client's side of the handshake before the server checks the
        # certificate; the server then closes without answering.
        if data == b"":
            raise ConnectionResetError("closed without a response")
    assert not [r for r in caplog.records if r.name == "ekm_sim.requests"]


async def test_allowed_certificate_passes_the_handshake(sim: Sim, tls_files: TLSFiles) -> None:
    port = int(sim.host.rsplit(":", 1)[1])
    data = await asyncio.to_thread(_handshake, port, tls_files.ca,
                                   (tls_files.client_cert, tls_files.client_key),
                                   ssl.TLSVersion.TLSv1_3)
    assert data.startswith(b"HTTP/1.1 200")


async def test_trusted_but_not_allow_listed_subject_gets_401(
    start_sim: StartSim, make_config: Callable[..., Config], ca: trustme.CA, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stranger = _write(ca.issue_cert("stranger.example"), tmp_path, "stranger")
    sim = await start_sim(make_config(), client_cert=stranger)
    caplog.set_level(logging.INFO, logger="ekm_sim.requests")
    status, body = await sim.encrypt("foo", b"data")
    assert (status, body["errorName"]) == (401, "AuthenticationFailedException")
    # Refused before any work: no key, operation or access key was looked at.
    [line] = [r.getMessage() for r in caplog.records if r.name == "ekm_sim.requests"]
    assert '"operation":null' in line and '"accessKeyId":null' in line
    # Even health and unknown paths are refused for this client.
    status, body = await sim.call("health", {"requestMetadata": metadata()})
    assert status == 401


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_tls_versions_below_1_2_are_refused(sim: Sim, tls_files: TLSFiles) -> None:
    port = int(sim.host.rsplit(":", 1)[1])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(tls_files.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")

    def connect() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
            pass

    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await asyncio.to_thread(connect)
