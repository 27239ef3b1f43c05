"""Run the simulator: listeners, TLS, worker processes, request log, signals."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from aiohttp import web

from ekm_sim.app import create_app, ping, reload_credentials, unparsable_answer
from ekm_sim.config import Config, ConfigError, load
from shared.serving import configure_logging, continue_if_expected, run_loop, serve_app
from shared.tls import server_context

__all__ = ["serve"]

log = logging.getLogger("ekm_sim.server")


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) so that workers can share the port with SO_REUSEPORT."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


async def _run(config: Config, config_path: Path, port: int, port_file: Path | None,
               children: list[subprocess.Popen[bytes]]) -> None:
    if config.hsm.softhsm_conf is not None:
        # The SoftHSM module reads this when it loads, which happens in create_app's context.
        os.environ["SOFTHSM2_CONF"] = str(config.hsm.softhsm_conf)
    ssl_ctx = None
    if config.tls.enabled:
        assert config.tls.cert is not None and config.tls.key is not None
        ssl_ctx = server_context(cert=config.tls.cert, key=config.tls.key,
                                 client_ca=config.tls.client_ca,
                                 require_client_cert=config.tls.require_client_cert)
    extra = []
    if config.server.ping_port is not None:
        ping_app = web.Application()
        ping_app.router.add_get("/ping", ping, expect_handler=continue_if_expected)
        extra.append((ping_app, config.server.ping_port))

    def reload(app: web.Application) -> None:
        for child in children:
            child.send_signal(signal.SIGHUP)
        try:
            warnings = reload_credentials(app, load(config_path))
        except ConfigError as exc:
            log.error("SIGHUP: config not reloaded: %s", exc)
            return
        for warning in warnings:
            log.warning("SIGHUP: %s", warning)
        log.info("SIGHUP: SigV4 credentials reloaded from %s", config_path)

    await serve_app(create_app(config), name="ekm-sim", host=config.server.host, port=port,
                    ssl_context=ssl_ctx, port_file=port_file, reuse_port=True,
                    extra_sites=extra, on_hangup=reload, unparsable=unparsable_answer)


def serve(config: Config, *, config_path: Path, port_file: Path | None = None,
          worker_port: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT; SIGHUP re-reads the SigV4 credentials. With
    ``server.workers > 1`` the first process starts the others (fresh interpreters: PKCS#11
    state must not cross a fork) on the same port and forwards SIGHUP to them.
    """
    configure_logging("ekm_sim.requests", config.server.request_log, line_format="%(message)s")
    if worker_port is not None:
        run_loop(_run(config, config_path, worker_port, None, []),
                 event_loop=config.server.event_loop)
        return
    reserved = _reserve_port(config.server.host, config.server.port)
    port = reserved.getsockname()[1]
    children: list[subprocess.Popen[bytes]] = [
        subprocess.Popen([sys.executable, "-m", "ekm_sim.cli", "serve", "--config",
                          str(config_path), "--worker-port", str(port)])
        for _ in range(config.server.workers - 1)
    ]
    try:
        run_loop(_run(config, config_path, port, port_file, children),
                 event_loop=config.server.event_loop)
    finally:
        reserved.close()
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
