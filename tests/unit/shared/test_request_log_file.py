"""The batched request-log file (shared.serving.BufferedFileHandler): lines reach the file
by the flush interval, on flush and on close, never one write per line, and in order."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.serving import BufferedFileHandler, configure_logging, line_writer


def _logger(name: str, handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


Opened = tuple[Path, BufferedFileHandler, logging.Logger]


@pytest.fixture
def buffered(tmp_path: Path) -> Iterator[Callable[..., Opened]]:
    """``buffered(name, **handler_options)``: a logger writing to a fresh
    ``BufferedFileHandler``, detached and closed after the test."""
    made: list[tuple[logging.Logger, logging.Handler]] = []

    def open_one(name: str, **options: Any) -> Opened:
        path = tmp_path / f"{name}.log"
        handler = BufferedFileHandler(path, **options)
        logger = _logger(name, handler)
        made.append((logger, handler))
        return path, handler, logger

    yield open_one
    for logger, handler in made:
        logger.removeHandler(handler)
        handler.close()


def _wait_for_lines(path: Path, count: int, *, within: float) -> list[str]:
    deadline = time.monotonic() + within
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)


def test_lines_wait_in_the_buffer_until_the_interval(
        buffered: Callable[..., Opened]) -> None:
    path, handler, logger = buffered("test.buffered.wait", flush_interval=3600)
    for i in range(50):
        logger.info("line %d", i)
    # No write per line: nothing has reached the file yet (an hour-long interval).
    assert path.read_text() == ""
    handler.flush()
    assert path.read_text().splitlines() == [f"line {i}" for i in range(50)]


def test_the_flusher_writes_idle_lines_within_the_interval(
        buffered: Callable[..., Opened]) -> None:
    path, _, logger = buffered("test.buffered.idle", flush_interval=0.05)
    logger.info("first")
    logger.info("second")
    # Nothing else is logged: only the flusher thread can write them.
    assert _wait_for_lines(path, 2, within=5.0) == ["first", "second"]


def test_close_writes_everything_and_stops_the_flusher(tmp_path: Path) -> None:
    path = tmp_path / "requests.log"
    handler = BufferedFileHandler(path, flush_interval=3600)
    logger = _logger("test.buffered.close", handler)
    try:
        for i in range(1000):
            logger.info("%d", i)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert path.read_text().splitlines() == [str(i) for i in range(1000)]
    handler._flusher.join(timeout=5)
    assert not handler._flusher.is_alive()


def test_a_full_buffer_is_written_without_waiting(
        buffered: Callable[..., Opened]) -> None:
    path, _, logger = buffered("test.buffered.full", flush_interval=3600,
                               buffer_bytes=16 * 1024)
    for i in range(1300):  # About 40 KB of 31-byte lines: the 16 KiB buffer must spill.
        logger.info("request %04d %s", i, "x" * 20)
    written = path.read_text()
    assert 16 * 1024 <= len(written) < 1300 * 31
    assert written.endswith("\n")  # Only whole lines are written.
    assert written.splitlines()[0] == f"request 0000 {'x' * 20}"


def test_the_buffer_size_is_the_one_given(buffered: Callable[..., Opened]) -> None:
    """The default 8 KiB buffer would have written long before 200 KB."""
    path, handler, logger = buffered("test.buffered.size", flush_interval=3600,
                                     buffer_bytes=1024 * 1024)
    for i in range(6500):  # About 200 KB.
        logger.info("request %04d %s", i, "x" * 20)
    assert path.read_text() == ""
    handler.flush()
    assert len(path.read_text().splitlines()) == 6500


class _FailsOnce:
    """A stream whose first flush fails as a full disk does, then works."""

    def __init__(self, stream: Any) -> None:
        self._stream, self.failed = stream, False

    def write(self, text: str) -> int:
        return int(self._stream.write(text))

    def flush(self) -> None:
        if not self.failed:
            self.failed = True
            raise OSError(28, "No space left on device")
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()


def test_the_flusher_survives_a_failed_flush(
        buffered: Callable[..., Opened], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shared.serving")
    path, handler, logger = buffered("test.buffered.fails", flush_interval=0.02)
    logger.info("first")  # Opens the stream.
    stream = _FailsOnce(handler.stream)
    with handler.lock:  # type: ignore[union-attr]
        handler.stream = stream  # type: ignore[assignment]
    logger.info("second")
    # The first timed flush fails; a later one writes both lines.
    assert _wait_for_lines(path, 2, within=5.0) == ["first", "second"]
    assert stream.failed and handler._flusher.is_alive()
    assert [r.getMessage() for r in caplog.records if r.name == "shared.serving"] == [
        f"cannot write the log file {handler.baseFilename} ([Errno 28] No space left on "
        "device); retrying every 0.02 s"]


def test_a_full_device_does_not_stop_the_flusher(buffered: Callable[..., Opened]) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    handler = BufferedFileHandler("/dev/full", flush_interval=0.01)
    logger = _logger("test.buffered.devfull", handler)
    try:
        logger.info("lost")
        time.sleep(0.2)  # About 20 failed flushes.
        assert handler._flusher.is_alive()
    finally:
        logger.removeHandler(handler)
        with pytest.raises(OSError):
            handler.close()  # The last flush fails too, and says so.


def test_configure_logging_uses_it_for_a_file_target(tmp_path: Path) -> None:
    path = tmp_path / "logs.jsonl"
    name = "test.configure.requests"
    configure_logging(name, str(path), line_format="%(message)s", flush_interval=0.05)
    logger = logging.getLogger(name)
    handlers = [h for h in logger.handlers if isinstance(h, BufferedFileHandler)]
    try:
        assert len(handlers) == 1 and not logger.propagate
        logger.info(json.dumps({"operation": "Encrypt"}))
        assert [json.loads(line) for line in _wait_for_lines(path, 1, within=5.0)] == [
            {"operation": "Encrypt"}]
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


def test_the_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="flush_interval"):
        BufferedFileHandler(tmp_path / "x.log", flush_interval=0)


def test_two_writers_on_one_file_never_split_a_line(tmp_path: Path) -> None:
    """``server.workers > 1``: each worker appends its batches to the same file. A batch is
    whole lines (the buffer is flushed before a line that does not fit), so lines of two
    writers interleave but are never cut."""
    path = tmp_path / "shared.log"
    handlers = [BufferedFileHandler(path, flush_interval=3600, buffer_bytes=256)
                for _ in range(2)]
    loggers = [_logger(f"test.buffered.writer{i}", h) for i, h in enumerate(handlers)]
    try:
        for i in range(300):
            for w, logger in enumerate(loggers):
                logger.info("writer %d line %03d %s", w, i, "y" * (i % 50))
    finally:
        for logger, handler in zip(loggers, handlers, strict=True):
            logger.removeHandler(handler)
            handler.close()
    lines = path.read_text().splitlines()
    assert sorted(lines) == sorted(f"writer {w} line {i:03d} {'y' * (i % 50)}"
                                   for w in range(2) for i in range(300))
    # Each writer's lines stay in order.
    for w in range(2):
        mine = [line for line in lines if line.startswith(f"writer {w} ")]
        assert mine == sorted(mine)


def test_line_writer_goes_straight_to_a_configured_file(tmp_path: Path) -> None:
    path = tmp_path / "direct.log"
    name = "test.line_writer.direct"
    configure_logging(name, str(path), line_format="%(message)s", flush_interval=3600)
    logger = logging.getLogger(name)
    [handler] = logger.handlers
    try:
        write = line_writer(logger)
        assert write == handler.write_line  # type: ignore[attr-defined]
        write('{"n":1}')
        logger.info('{"n":2}')  # The logging path still lands in the same buffer, in order.
        write('{"n":3}')
        assert path.read_text() == ""
        handler.flush()
        assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [1, 2, 3]
    finally:
        logger.removeHandler(handler)
        handler.close()


@pytest.mark.parametrize("setup", ["propagates", "second handler", "other format", "filter",
                                   "handler level"])
def test_line_writer_uses_logging_when_anything_else_listens(
        tmp_path: Path, setup: str, caplog: pytest.LogCaptureFixture) -> None:
    """A test's caplog, an operator's extra handler, a different format, a filter or a
    handler level must have their say on every line: then it goes through logger.info."""
    logger = logging.getLogger(f"test.line_writer.{setup.replace(' ', '_')}")
    handler = BufferedFileHandler(tmp_path / "x.log", flush_interval=3600)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(message)s" if setup == "other format" else "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = setup == "propagates"
    extra = logging.NullHandler()
    if setup == "second handler":
        logger.addHandler(extra)
    if setup == "filter":
        logger.addFilter(lambda record: True)
    if setup == "handler level":
        handler.setLevel(logging.WARNING)
    try:
        assert line_writer(logger) == logger.info
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(extra)
        logger.filters.clear()
        handler.close()
