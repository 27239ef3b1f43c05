"""Run the KMS front: TLS listener, access log, signals."""

from __future__ import annotations

from pathlib import Path

from kms_proxy.app import create_app, unparsable_answer
from kms_proxy.config import Config
from shared.serving import configure_logging, run_loop, serve_app
from shared.tls import server_context

__all__ = ["serve"]


def serve(config: Config, *, port_file: Path | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    configure_logging("kms_proxy.access", config.server.access_log,
                      line_format="%(asctime)s %(message)s")
    ssl_ctx = None
    if config.server.tls:
        assert config.server.cert is not None and config.server.key is not None
        ssl_ctx = server_context(cert=config.server.cert, key=config.server.key,
                                 client_ca=config.server.client_ca,
                                 require_client_cert=config.server.require_client_cert)
    run_loop(serve_app(create_app(config), name="kms-proxy", host=config.server.host,
                       port=config.server.port, ssl_context=ssl_ctx, port_file=port_file,
                       unparsable=unparsable_answer),
             event_loop=config.server.event_loop)
