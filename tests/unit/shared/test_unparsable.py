"""Requests aiohttp's parser refuses (shared.unparsable): a real server on 127.0.0.1 gets
each as raw bytes, and must answer with the service's own error body, never quoting the
request (a query's Plaintext, a header's secret), in the answer or in any log record."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from ekm_sim.app import unparsable_answer as ekm_answer
from kms_proxy.app import unparsable_answer as kms_answer
from shared.unparsable import Answer, ProtocolErrorRunner

MARKER = "PLAINTEXT-MARKER-7f3a"


async def ok(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(text="fine")


async def fails(request: web.Request) -> web.Response:
    raise RuntimeError(f"handler bug while holding {MARKER}")


async def _serve(answer: Answer) -> AsyncIterator[int]:
    app = web.Application(handler_args={"max_line_size": 4096, "max_field_size": 4096})
    app.router.add_route("*", "/", ok)
    app.router.add_get("/fails", fails)
    runner = ProtocolErrorRunner(app, answer=answer, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


@pytest.fixture(params=["kms", "ekm"])
async def served(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, int]]:
    answer = kms_answer if request.param == "kms" else ekm_answer
    async for port in _serve(answer):
        yield request.param, port


async def _exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


HOST = b"Host: 127.0.0.1\r\n"
UNPARSABLE = {
    "long request line": b"GET /?Plaintext=" + MARKER.encode() + b"A" * 8000 + b" HTTP/1.1\r\n"
                         + HOST + b"\r\n",
    "long header": b"GET / HTTP/1.1\r\n" + HOST + b"X-Secret: " + MARKER.encode()
                   + b"B" * 8000 + b"\r\n\r\n",
    "control character in a header": b"GET / HTTP/1.1\r\n" + HOST + b"X-A: \x01"
                                     + MARKER.encode() + b"\r\n\r\n",
    "bad method": b"GE T /?" + MARKER.encode() + b" HTTP/1.1\r\n" + HOST + b"\r\n",
    "bad version": b"GET /?" + MARKER.encode() + b" HTTP/9.9\r\n" + HOST + b"\r\n",
    "bad chunk size": b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
                      + MARKER.encode() + b"\r\n",
}


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    handler = logging.Handler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    return "\n".join(handler.format(record) for record in caplog.records)


@pytest.mark.parametrize("case", sorted(UNPARSABLE))
async def test_unparsable_requests_get_the_protocols_error_and_are_not_echoed(
        served: tuple[str, int], case: str, caplog: pytest.LogCaptureFixture) -> None:
    protocol, port = served
    caplog.set_level(logging.DEBUG)
    status, headers, body = await _exchange(port, UNPARSABLE[case])
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    # (_exchange read to the end: the server closed the connection after answering.)
    error = json.loads(body)
    if protocol == "kms":
        assert (error["Code"], error["HttpStatus"]) == ("InvalidParameter", 400)
        assert error["RequestId"]
    else:
        assert error["errorName"] == "ValidationException"
    assert MARKER.encode() not in body
    logged = _logged(caplog)
    assert "not valid HTTP/1.1" in logged
    assert MARKER not in logged


async def test_valid_requests_and_handler_failures_are_unchanged(
        served: tuple[str, int], caplog: pytest.LogCaptureFixture) -> None:
    _, port = served
    status, _, body = await _exchange(port, b"GET / HTTP/1.1\r\n" + HOST
                                      + b"Connection: close\r\n\r\n")
    assert (status, body) == (200, b"fine")
    # No middleware here turns the handler's exception into a protocol error, so aiohttp's
    # own 500 answers; it quotes nothing (debug is off).
    status, _, body = await _exchange(port, b"GET /fails HTTP/1.1\r\n" + HOST
                                      + b"Connection: close\r\n\r\n")
    assert status == 500
    assert MARKER.encode() not in body and b"Traceback" not in body
