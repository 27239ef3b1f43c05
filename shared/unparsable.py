"""Requests that are not valid HTTP/1.1, answered in the service's own protocol and never
echoed.

aiohttp answers a request its parser refuses (a request line or header over the limit, a
control character in a header, a bad chunk size) itself, before any middleware runs: a
``text/plain`` body holding the parser's message, which quotes the offending bytes, and
an ERROR log line with a traceback quoting them again. A query string can carry an
Encrypt's ``Plaintext`` and a header a signature or token, so both copies could leak them.
This module swaps in a connection handler whose ``handle_error`` logs the error's type
only and answers with the service's own error body (an Alibaba or an XKS error).

aiohttp has no public hook for this: ``AppRunner._make_server`` (the extension point
``BaseRunner`` declares for its subclasses) builds the ``Server``, and the ``Server``
builds one ``RequestHandler`` per connection. Both are given a subclass that adds no
state; ``tests/unit/shared/test_unparsable.py`` drives a real server with such requests,
so an aiohttp change that bypassed it would fail there rather than leak.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_request import BaseRequest

__all__ = ["Answer", "ProtocolErrorRunner"]

# The service's error response for an unparsable request, given the HTTP status (4xx).
Answer = Callable[[int], web.Response]

log = logging.getLogger("shared.unparsable")


def _handler_class(answer: Answer) -> type[web.RequestHandler]:
    class Handler(web.RequestHandler):
        __slots__ = ()

        def handle_error(self, request: BaseRequest, status: int = 500,
                         exc: BaseException | None = None,
                         message: str | None = None) -> web.StreamResponse:
            if status >= 500:
                # A handler's failure: aiohttp's answer holds no request data (no debug).
                return super().handle_error(request, status, exc)
            log.warning("refused a request that is not valid HTTP/1.1 from %s: %s "
                        "(HTTP %d)", request.remote,
                        type(exc).__name__ if exc is not None else "parse error", status)
            if request.writer.output_size > 0:
                raise ConnectionError("a response was already sent on this connection")
            response = answer(status)
            response.force_close()
            return response

    return Handler


def _server_class(handler: type[web.RequestHandler]) -> type[web.Server]:
    class Server(web.Server):
        def __call__(self) -> web.RequestHandler:
            connection = super().__call__()
            connection.__class__ = handler
            return connection

    return Server


class ProtocolErrorRunner(web.AppRunner):
    """An ``AppRunner`` whose connections answer unparsable requests with ``answer``."""

    def __init__(self, app: web.Application, *, answer: Answer, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._server_class = _server_class(_handler_class(answer))

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = self._server_class
        return server
