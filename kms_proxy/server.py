"""Run the KMS front: TLS listener, access log, signals."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from kms_proxy.app import create_app
from kms_proxy.config import Config
from shared.serving import serve_app
from shared.tls import server_context

__all__ = ["serve"]


def _logging(config: Config) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    access = logging.getLogger("kms_proxy.access")
    access.propagate = False
    target = config.server.access_log
    if target == "off":
        access.setLevel(logging.WARNING)
        return
    handler: logging.Handler = (logging.StreamHandler(sys.stderr) if target == "-"
                                else logging.FileHandler(target))
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)


def serve(config: Config, *, port_file: Path | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    _logging(config)
    ssl_ctx = None
    if config.server.tls:
        assert config.server.cert is not None and config.server.key is not None
        ssl_ctx = server_context(cert=config.server.cert, key=config.server.key,
                                 client_ca=config.server.client_ca,
                                 require_client_cert=config.server.require_client_cert)
    asyncio.run(serve_app(create_app(config), name="kms-proxy", host=config.server.host,
                          port=config.server.port, ssl_context=ssl_ctx,
                          port_file=port_file))
