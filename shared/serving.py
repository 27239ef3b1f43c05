"""Running a service: listen, report the bound port, stop on a signal; and starting one in
the background for dev stacks. Both services use it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Final

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from shared.unparsable import Answer, ProtocolErrorRunner

__all__ = [
    "CLIENT_CLOSED_REQUEST",
    "EVENT_LOOPS",
    "BackgroundError",
    "BodyRefused",
    "BufferedFileHandler",
    "StopRequested",
    "configure_logging",
    "continue_if_expected",
    "expectation_refused",
    "line_writer",
    "read_body",
    "run_in_foreground",
    "run_loop",
    "serve_app",
    "start_background",
    "stop_process",
    "stop_recorded",
    "write_atomically",
]

log = logging.getLogger("shared.serving")


def configure_logging(request_logger: str, target: str, *, line_format: str,
                      flush_interval: float = 0.25) -> None:
    """Operational logs to stderr; one service's per-request log to ``target``: ``-``
    (stderr), ``off``, or a file path (written by ``BufferedFileHandler``)."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    requests = logging.getLogger(request_logger)
    requests.propagate = False
    if target == "off":
        requests.setLevel(logging.WARNING)
        return
    handler: logging.Handler = (logging.StreamHandler(sys.stderr) if target == "-"
                                else BufferedFileHandler(target, flush_interval=flush_interval))
    handler.setFormatter(logging.Formatter(line_format))
    requests.addHandler(handler)
    requests.setLevel(logging.INFO)


class BufferedFileHandler(logging.FileHandler):
    """A ``FileHandler`` that writes its lines in batches: every ``flush_interval`` seconds
    (from a daemon thread), when its 64 KiB buffer fills, and on ``flush``/``close``.

    ``FileHandler`` flushes after every record: one ``write`` system call per request on
    the event loop, which a slow disk turns into a stall of every request. Here the loop
    writes only when the buffer fills (a few times a second at thousands of requests a
    second) and the thread does the rest; a record logged while the thread is writing
    still waits for it (they share the handler's lock), so a slow disk can stall the loop
    a few times a second, not on every request. In CPU it saves little: about 1 of the
    15 us a logged request costs (a loop of 50,000 records to a local file). A process
    killed without a shutdown loses at most the last ``flush_interval`` of lines; a failed
    flush (a full disk) is reported once and retried at the next interval.
    """

    def __init__(self, filename: str | os.PathLike[str], *, flush_interval: float = 0.25,
                 buffer_bytes: int = 64 * 1024) -> None:
        if not flush_interval > 0:
            raise ValueError("flush_interval must be > 0")
        self._buffer_bytes = buffer_bytes
        super().__init__(filename, encoding="utf-8")
        self._stopping = threading.Event()
        self._flusher = threading.Thread(target=self._flush_periodically,
                                         args=(flush_interval,), daemon=True,
                                         name=f"log-flush:{self.baseFilename}")
        self._flusher.start()

    def _open(self) -> io.TextIOWrapper:
        # FileHandler opens with the default 8 KiB buffer; a larger one batches more lines.
        # Append mode, and a buffer flushed before a line that does not fit: every write is
        # whole lines, so workers appending to one file never cut each other's lines.
        return open(self.baseFilename, "a", buffering=self._buffer_bytes,
                    encoding=self.encoding, errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        """``StreamHandler.emit`` without its flush after every line."""
        try:
            stream = self.stream
            if stream is None:
                stream = self.stream = self._open()
            stream.write(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def write_line(self, line: str) -> None:
        """Buffer ``line`` as a record formatted ``%(message)s`` would be, without building
        the record (see ``line_writer``)."""
        with self.lock:  # type: ignore[union-attr]  # Handler.createLock made it.
            try:
                stream = self.stream
                if stream is None:
                    stream = self.stream = self._open()
                stream.write(line + self.terminator)
            except RecursionError:
                raise
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": "(a request log line)"}))

    def _flush_periodically(self, interval: float) -> None:
        failing = False
        while not self._stopping.wait(interval):
            try:
                self.flush()
            except Exception as exc:  # The thread must outlive any failure.
                if not failing:
                    log.warning("cannot write the log file %s (%s); retrying every %g s",
                                self.baseFilename, exc, interval)
                failing = True
            else:
                failing = False

    def close(self) -> None:
        self._stopping.set()
        super().close()  # Flushes what is buffered, then closes the file.


def line_writer(logger: logging.Logger) -> Callable[[str], None]:
    """How to log one preformatted line to ``logger`` at INFO, as cheaply as it allows.

    When ``configure_logging`` gave the logger its only handler, a ``BufferedFileHandler``
    that writes a record's message as it is, the line goes straight into that file's
    buffer: the logging module's record, caller lookup and handler chain were about 6% of
    the EKM simulator's samples under load (py-spy; with the other savings the log went
    from 13% to 5%, BENCHMARKS.md run F). Otherwise (stderr, or handlers, filters or levels
    a test or an operator added) it goes through ``logger.info``. The choice is made once,
    when called; callers still check ``logger.isEnabledFor(logging.INFO)`` per line.
    """
    handlers = logger.handlers
    if len(handlers) != 1 or logger.propagate or logger.filters:
        return logger.info
    handler = handlers[0]
    if (not isinstance(handler, BufferedFileHandler) or handler.filters
            or handler.level > logging.INFO):
        return logger.info
    probe = logging.makeLogRecord({"msg": "probe", "levelno": logging.INFO,
                                   "levelname": "INFO", "name": logger.name})
    if handler.format(probe) != "probe":  # Its format adds something to each line.
        return logger.info
    return handler.write_line


class BackgroundError(Exception):
    """A background service did not come up; the message says why."""


def write_atomically(path: Path, text: str, *, mode: int = 0o644) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


# The status a request log records for a client that closed its connection before its
# request was read (nginx's 499); nothing is sent, there is no one to send it to.
CLIENT_CLOSED_REQUEST: Final = 499

# How long a request body may take to arrive once its headers have: a client that stops
# in the middle otherwise holds its connection and handler for ever (aiohttp has no such
# limit; its keep-alive and header timeouts do not cover a body). A 1 MiB body over a slow
# link takes far less.
BODY_TIMEOUT_S: Final = 30.0


class BodyRefused(ValueError):
    """A request body this server does not take as sent (the message is safe to answer)."""


async def read_body(request: web.BaseRequest) -> bytes:
    """The request's body as sent, within ``BODY_TIMEOUT_S``.

    A ``Content-Encoding`` is refused, not undone: a signature covers the bytes sent
    (SigV4's payload hash, ACS3's content hash), and aiohttp's decoding of a bad body
    surfaced as an unexpected error (a 500 with a traceback).

    :raises TimeoutError: :raises BodyRefused:
    """
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise BodyRefused(f"Content-Encoding {encoding[:32]!r} is not accepted; send the "
                          "body as is")
    try:
        async with asyncio.timeout(body_timeout_s):
            return await request.read()
    except BadHttpMessage as exc:
        raise BodyRefused(f"the request body is malformed ({type(exc).__name__})") from None


# What read_body applies (a module value, so a test can shorten it).
body_timeout_s = BODY_TIMEOUT_S


def _expectations(request: web.BaseRequest) -> list[str]:
    """Every member of every ``Expect`` field, lower case (repeated fields are one list,
    RFC 9110 5.3)."""
    return [member.strip().lower() for field in request.headers.getall("Expect", ())
            for member in field.split(",") if member.strip()]


def expectation_refused(request: web.BaseRequest) -> bool:
    """Whether the request expects anything but ``100-continue``."""
    return any(member != "100-continue" for member in _expectations(request))


async def continue_if_expected(request: web.Request) -> None:
    """A route's ``expect_handler``: ``100 Continue`` when that is all the client expects,
    and otherwise nothing, so that the request reaches the app's middleware, which refuses
    it (``expectation_refused``) in the protocol's own error and logs it. aiohttp's default
    handler answered an unknown expectation itself, with a text/plain 417, before any
    middleware, and so unlogged; it still does on paths no route matches."""
    expected = _expectations(request)
    if expected and request.version >= (1, 1) and not expectation_refused(request):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # As aiohttp's own: the answer is still unsent.


# The event loops a server can run on: Python's own "asyncio" (the default) or "uvloop"
# (libuv, with its own TLS transport). On this project's TLS workloads uvloop measured no
# better, and slower for the KMS front (BENCHMARKS.md), so it is an option, not the default.
EVENT_LOOPS = ("asyncio", "uvloop")


def run_loop(main: Coroutine[object, object, None], *, event_loop: str) -> None:
    """Run ``main`` to completion on a new event loop of the kind named."""
    if event_loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def _settle_heap() -> None:
    """Move everything alive after start-up (modules, config, caches, the app) out of the
    garbage collector's sight (``gc.freeze``). A full collection otherwise walks all of it
    again and again under load: in the KMS front that was 11 full collections and 270 ms of
    pauses (up to 32 ms each) in 90 s of benchmark, against 45 ms (up to 18 ms) frozen, and
    the pauses land on the p99 (BENCHMARKS.md, run C)."""
    gc.collect()
    gc.freeze()


async def serve_app(app: web.Application, *, name: str, host: str, port: int,
                    ssl_context: ssl.SSLContext | None, unparsable: Answer,
                    port_file: Path | None = None,
                    reuse_port: bool = False,
                    extra_sites: Sequence[tuple[web.Application, int]] = (),
                    on_hangup: Callable[[web.Application], None] | None = None) -> None:
    """Serve ``app`` (and plain-HTTP ``extra_sites``) until SIGTERM or SIGINT.

    The bound port (useful with ``port=0``) is written to ``port_file`` once listening;
    SIGHUP calls ``on_hangup``. A request that is not valid HTTP gets ``unparsable``'s
    answer (``shared.unparsable``), on every site.
    """
    runners = []
    # auto_decompress off: a body is taken only as sent (read_body refuses an encoding),
    # since aiohttp decodes it in the parser, before any handler or signature check.
    runner = ProtocolErrorRunner(app, answer=unparsable, access_log=None,
                                 handle_signals=False, auto_decompress=False)
    await runner.setup()
    runners.append(runner)
    _settle_heap()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port,
                      backlog=1024).start()
    bound = int(runner.addresses[0][1])
    for extra_app, extra_port in extra_sites:
        extra = ProtocolErrorRunner(extra_app, answer=unparsable, access_log=None,
                                    handle_signals=False, auto_decompress=False)
        await extra.setup()
        runners.append(extra)
        await web.TCPSite(extra, host, extra_port, reuse_port=reuse_port).start()
    if port_file is not None:
        write_atomically(port_file, str(bound))
    log.info("%s listening on %s://%s:%d (pid %d)", name, "https" if ssl_context else "http",
             host, bound, os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_hangup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hangup, app)
    try:
        await stop.wait()
    finally:
        for each in reversed(runners):
            await each.cleanup()


def start_background(command: Sequence[str], *, env: dict[str, str], log_path: Path | None,
                     port_file: Path, health_path: str, ssl_context: ssl.SSLContext,
                     timeout: float = 60.0, pid_file: Path | None = None
                     ) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``command`` detached, wait until ``port_file`` names a port whose
    ``https://127.0.0.1:<port><health_path>`` answers 200, and return the process and port.
    Its output goes to ``log_path``, or (None) to this process's own (a container's log).
    ``pid_file`` gets its pid at once, so that whatever interrupts this process later can
    still find the server (``run_in_foreground``, ``dev down``).

    :raises BackgroundError: if the process exits or is not ready within ``timeout``.
    """
    port_file.unlink(missing_ok=True)
    with open(log_path or os.devnull, "ab") as log_file:
        out = log_file if log_path is not None else None
        process = subprocess.Popen(list(command), env=env, stdout=out, stderr=out,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        if pid_file is not None:
            write_atomically(pid_file, str(process.pid))
        return _await_ready(process, command[0], log_path=log_path, port_file=port_file,
                            health_path=health_path, ssl_context=ssl_context, timeout=timeout)
    except BaseException:
        # Not ready in time, or interrupted (StopRequested): leave nothing running.
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
        raise


def _await_ready(process: subprocess.Popen[bytes], name: str, *, log_path: Path | None,
                 port_file: Path, health_path: str, ssl_context: ssl.SSLContext,
                 timeout: float) -> tuple[subprocess.Popen[bytes], int]:
    where = f"see {log_path}" if log_path is not None else "see its output"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BackgroundError(f"{name} exited with {process.returncode}; {where}")
        if port_file.exists():
            port = int(port_file.read_text())
            try:
                with urllib.request.urlopen(
                        f"https://127.0.0.1:{port}{health_path}", context=ssl_context,
                        timeout=2) as response:
                    if response.status == 200:
                        return process, port
            except OSError:
                pass
        time.sleep(0.1)
    raise BackgroundError(f"{name} did not come up within {timeout:.0f}s; {where}")


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived while a foreground command was still setting up."""


def _pid_in(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text())
    except (OSError, ValueError):
        return None


def run_in_foreground(start: Callable[[], str], *, ready_file: Path, pid_file: Path) -> int:
    """What a container's main process does: ``start()`` sets up and starts a server (a
    child whose pid ``start_background`` writes to ``pid_file``) and returns a line to
    print; then wait for the server, passing SIGTERM and SIGINT on to it.

    A signal during set-up stops it at once; whatever had started by then is stopped too
    (found through ``pid_file``, however late in set-up the signal came). ``ready_file`` (a
    healthcheck's) goes when the server ends, so a later start is not taken as ready early.

    Returns the exit code to leave with."""
    pid: int | None = None  # Set once set-up is over: from then on signals go to it.

    def on_signal(signum: int, _frame: object) -> None:
        if pid is None:
            raise StopRequested(signum)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        message = start()
        started = _pid_in(pid_file)
        if started is None:
            raise RuntimeError(f"the server's pid is not in {pid_file}")
        pid = started
    except StopRequested as stopped:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # Stopping already; a second one waits.
        leftover = _pid_in(pid_file)
        if leftover is not None:
            stop_process(leftover)
        pid_file.unlink(missing_ok=True)
        ready_file.unlink(missing_ok=True)
        return 128 + int(stopped.args[0])
    print(message, flush=True)
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        ready_file.unlink(missing_ok=True)
        pid_file.unlink(missing_ok=True)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code  # Killed by signal N: 128 + N, as shells say.


def stop_recorded(info_file: Path, pid_file: Path, *, timeout: float = 15.0) -> None:
    """Stop the server a dev stack recorded: the ``pid`` in ``info_file`` (a JSON file
    written once it served), else the pid in ``pid_file`` (written when it started, so a
    set-up that was interrupted still names it); then remove both records."""
    pid = None
    try:
        pid = int(json.loads(info_file.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        pid = _pid_in(pid_file)
    if pid is not None:
        stop_process(pid, timeout=timeout)
    info_file.unlink(missing_ok=True)
    pid_file.unlink(missing_ok=True)


def stop_process(pid: int, *, timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL; a no-op for a process that is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
