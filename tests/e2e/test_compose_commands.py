"""compose.yaml's two services, run as the processes their containers would run.

The CI machines have no container engine, so the image itself is not built here. What is
tested is everything compose adds to it: each service's command, its healthcheck file, the
shared volume, one service finding the other by name, and a clean stop on SIGTERM. The
only changes: the volume is a temporary directory, the fixed ports are free ones, and the
service names are ``localhost`` (which both certificates also name).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from alibabacloud_kms20160120 import models as m

from tests.e2e.stacktools import sdk_for

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = {"ekm-sim": "ekm_sim.cli", "kms-proxy": "kms_proxy.cli"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _local(value: str, volume: Path, ports: dict[str, str], names: set[str]) -> str:
    if value.startswith("/stack"):
        return str(volume) + value[len("/stack"):]
    if value in names:
        return "localhost"
    return ports.get(value, value)


def _wait_for(path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{path} never appeared: {log.read_text()[-3000:]}")


def test_the_compose_services_come_up_talk_and_stop(tmp_path: Path) -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert list(services) == ["ekm-sim", "kms-proxy"]
    assert services["kms-proxy"]["depends_on"] == {"ekm-sim": {"condition": "service_healthy"}}
    assert all(s["volumes"] == ["stack:/stack"] for s in services.values())
    ports = {str(p.split(":")[-1]): str(_free_port())
             for s in services.values() for p in s["ports"]}
    volume = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, service in services.items():  # In depends_on order.
            program, *args = service["command"]
            command = [sys.executable, "-m", PROGRAMS[program],
                       *(_local(str(a), volume, ports, set(services)) for a in args)]
            log = tmp_path / f"{name}.out"
            with open(log, "wb") as out:
                started[name] = subprocess.Popen(command, env=env, stdout=out,
                                                 stderr=subprocess.STDOUT)
            check, kind, flag, path = service["healthcheck"]["test"]
            assert (check, kind, flag) == ("CMD", "test", "-s")
            _wait_for(Path(_local(path, volume, ports, set())), started[name], log)

        stack = json.loads((volume / "stack.json").read_text())
        assert stack["kms"]["endpoint"] == f"localhost:{ports['8443']}"
        assert stack["ekm"]["url"] == f"https://localhost:{ports['9443']}"
        sdk = sdk_for(stack)
        for kind in ("software", "hardware", "external"):
            key_id = stack["keys"][kind]
            sealed = sdk.encrypt(m.EncryptRequest(key_id=key_id, plaintext=kind)).body
            assert sdk.decrypt(m.DecryptRequest(
                ciphertext_blob=sealed.ciphertext_blob)).body.plaintext == kind
        instance = sdk.get_kms_instance(m.GetKmsInstanceRequest(
            kms_instance_id=stack["instances"]["external"])).body.kms_instance
        assert instance.status == "Connected"
        # The server logs go to the container's output, not to files in the volume.
        assert not (volume / "kms-proxy.log").exists()
        assert not (volume / "ekm" / "ekm-sim.log").exists()
    finally:
        for process in reversed(started.values()):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
    # `docker compose down` sends SIGTERM: each command passes it on and leaves cleanly,
    # and takes its healthcheck file along (a restart is not "healthy" before it is).
    for name, process in started.items():
        assert process.wait(timeout=30) == 0, (tmp_path / f"{name}.out").read_text()[-2000:]
    for port in (ports["8443"], ports["9443"]):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=2)
    assert not (volume / "stack.json").exists() and not (volume / "ekm" / "ekm.json").exists()


def test_a_stop_during_set_up_leaves_nothing_running(tmp_path: Path) -> None:
    """`docker stop` while the simulator is still setting up: the command ends at once
    (not after docker's 10 s and a SIGKILL) and no server is left behind."""
    service = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["ekm-sim"]
    port = str(_free_port())
    volume = tmp_path / "stack"
    program, *args = service["command"]
    command = [sys.executable, "-m", PROGRAMS[program],
               *(_local(str(a), volume, {"9443": port}, {"ekm-sim"}) for a in args)]
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    log = tmp_path / "ekm-sim.out"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(volume / "ekm" / "softhsm2.conf", process, log)  # Set-up has begun.
    finally:
        process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM, log.read_text()[-2000:]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(port)), timeout=2)
    assert not (volume / "ekm" / "ekm.json").exists()


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent that will never reap it here."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_stop_after_the_simulator_started_takes_it_down_too(tmp_path: Path) -> None:
    """The front's command starting its own simulator (no --ekm-workdir), stopped once that
    simulator serves: it was left running with no ekm.json for any `dev down` to find."""
    workdir = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    log = tmp_path / "kms-proxy.out"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "kms_proxy.cli", "dev", "up", "--workdir", str(workdir),
             "--foreground"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(workdir / "ekm" / "ekm-sim.pid", process, log)
        simulator = int((workdir / "ekm" / "ekm-sim.pid").read_text())
        assert _alive(simulator)
    finally:
        process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()[-2000:]
    deadline = time.monotonic() + 20
    while _alive(simulator) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(simulator)
    assert not (workdir / "stack.json").exists()


def test_dev_down_leaves_a_simulator_it_did_not_start_alone(tmp_path: Path) -> None:
    """Compose layout: the front's stack.json goes when the front stops, and with it the
    record that the simulator is another service's; `kms-proxy dev down` then stopped it."""
    compose: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    ports = {"9443": str(_free_port()), "8443": str(_free_port())}
    volume = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, service in services.items():
            program, *args = service["command"]
            log = tmp_path / f"{name}.out"
            with open(log, "wb") as out:
                started[name] = subprocess.Popen(
                    [sys.executable, "-m", PROGRAMS[program],
                     *(_local(str(a), volume, ports, set(services)) for a in args)],
                    env=env, stdout=out, stderr=subprocess.STDOUT)
            path = service["healthcheck"]["test"][-1]
            _wait_for(Path(_local(path, volume, ports, set())), started[name], log)
        started["kms-proxy"].send_signal(signal.SIGTERM)
        assert started["kms-proxy"].wait(timeout=30) == 0
        subprocess.run([sys.executable, "-m", "kms_proxy.cli", "dev", "down", "--workdir",
                        str(volume)], env=env, check=True, capture_output=True, timeout=60)
        assert started["ekm-sim"].poll() is None  # The other service still runs.
        socket.create_connection(("127.0.0.1", int(ports["9443"])), timeout=5).close()
    finally:
        for process in started.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in started.values():
            process.wait(timeout=30)
