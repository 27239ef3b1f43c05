"""The load generator and the measuring that the benchmarks in this directory share.

Not a test, and not a benchmark on its own: ``xks_encrypt.py`` and ``kms_encrypt.py`` import
it (``import loadgen``: a script's own directory is first on ``sys.path``).

The generator must not be what is measured, so it is kept cheap: several forked processes
(``LoadOptions.gen_procs``), each an event loop (uvloop when asked for) with keep-alive TLS
connections, one request in flight per connection (no pipelining), raw HTTP/1.1 bytes
written as they are and responses parsed minimally (status line and Content-Length).

What it sends is a ``Workload``: either one request replayed by every connection for the
whole run (a SigV4 request, ``GET /ping``, ``GET /health``), or distinct requests that each
generator process makes before the run (pre-signed, each with its own nonce) and sends once.
Requests go out in a closed loop (each connection sends again as soon as it has an answer)
or on a fixed schedule of ``rate`` requests/s (open loop), whose latency counts from each
request's *scheduled* time, so that a slow server cannot hide its queue (no coordinated
omission).

Around the generator: CPU accounting (the generator's own ``getrusage``, named groups of
server processes from ``/proc/<pid>/stat``, the whole machine from ``/proc/stat``), waiting
for an idle machine and marking the runs that other processes disturbed, nearest-rank
percentiles and medians, and the result table. CPU percentages are of one core (a 2-core
machine has 200%).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import dataclasses
import importlib
import importlib.util
import math
import multiprocessing as mp
import os
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar, Final, Protocol, Self, TypeVar, cast

HOST: Final = "127.0.0.1"
# After the end of a run, outstanding requests get this long to finish.
DRAIN_SECONDS: Final = 5.0
# A run in which other processes used more CPU than this (% of one core) is marked "?".
NOISY_OTHER_PCT: Final = 20.0
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


# -- processes and CPU ---------------------------------------------------------------------


def venv_command(script: str, module: str) -> list[str]:
    """The venv's console script ``script``, else ``python -m module``."""
    path = Path(sys.executable).with_name(script)
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (a server's extra worker processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def cpu_seconds(pids: Sequence[int]) -> tuple[float, float]:
    """(utime, stime) of ``pids`` so far (all their threads), in seconds."""
    user = system = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine from ``/proc/stat``."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user/nice
    return (total - idle) / CLK_TCK, total / CLK_TCK


def steal_seconds() -> float:
    """CPU seconds the hypervisor gave to other guests while this VM had work (``steal`` in
    ``/proc/stat``): time a process here was ready to run and could not."""
    values = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return int(values[7]) / CLK_TCK if len(values) > 7 else 0.0


def busy_pct(before: tuple[float, float], after: tuple[float, float]) -> float:
    """How busy the machine was between two ``machine_busy_seconds``, in % of one core."""
    return 100 * (os.cpu_count() or 1) * (after[0] - before[0]) / max(1e-9, after[1] - before[1])


def wait_quiet(max_wait: float, threshold_pct: float = 15.0) -> None:
    """Wait (at most ``max_wait`` s) until nothing else uses the CPU, and say so if it still
    does: other processes on the box skew every figure (see the other% column)."""
    deadline = time.monotonic() + max_wait
    while True:
        before = machine_busy_seconds()
        time.sleep(0.5)
        pct = busy_pct(before, machine_busy_seconds())
        if pct <= threshold_pct:
            return
        if time.monotonic() >= deadline:
            print(f"  ! the machine is {pct:.0f}% busy before this run (other processes)",
                  file=sys.stderr, flush=True)
            return


def sleep_until(deadline_ns: int) -> None:
    while (left := deadline_ns - time.monotonic_ns()) > 0:
        time.sleep(min(left / 1e9, 0.5))


def dev_up(name: str, command: Sequence[str], workdir: Path, *, env: Mapping[str, str],
           timeout: float, extra: Sequence[str] = ()) -> None:
    """``<command> dev up --workdir <workdir> [extra]`` (``name``: the command's, for errors).

    :raises RuntimeError: if it fails (with the end of its stderr).
    """
    done = subprocess.run([*command, "dev", "up", "--workdir", str(workdir), *extra],
                          env=dict(env), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} dev up failed: {done.stderr.strip()[-2000:]}")


def dev_down(command: Sequence[str], workdir: Path, pids: Sequence[int],
             ours: Callable[[int], bool], *, timeout: float, keep_workdir: bool) -> None:
    """``<command> dev down``, then a kill of exactly those of ``pids`` that are still
    ``ours`` after 10 s, then the work directory's removal unless ``keep_workdir``."""
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        subprocess.run([*command, "dev", "down", "--workdir", str(workdir)],
                       capture_output=True, timeout=timeout, check=False)
    deadline = time.monotonic() + 10
    while any(ours(p) for p in pids):
        if time.monotonic() > deadline:
            for pid in pids:
                if ours(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    if not keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def log_tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# -- HTTP ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """A TLS server on ``HOST``, with the client certificate for mTLS if it wants one."""

    port: int
    ca: str
    client_cert: str | None = None
    client_key: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca)
        if self.client_cert is not None:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


def get_request(path: str, host: str) -> bytes:
    """A bodiless ``GET`` (``/ping``, ``/health``: the TLS + HTTP server's ceiling)."""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def content_length(head: bytes | bytearray) -> int:
    at = head.find(b"\r\nContent-Length:")
    if at < 0:
        at = bytes(head).lower().find(b"\r\ncontent-length:")
        if at < 0:
            raise ValueError("response without Content-Length")
    end = head.find(b"\r\n", at + 2)
    return int(head[at + 17:end if end >= 0 else len(head)])


class Session:
    """One blocking keep-alive TLS connection (preflight checks, probes)."""

    def __init__(self, target: Target, *, timeout: float) -> None:
        raw = socket.create_connection((HOST, target.port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = target.ssl_context().wrap_socket(raw, server_hostname=HOST)

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send one raw request; return the response's status and body."""
        self.sock.sendall(request)
        buf = b""
        while (head_end := buf.find(b"\r\n\r\n")) < 0:
            buf += self._recv()
        total = head_end + 4 + content_length(buf[:head_end])
        while len(buf) < total:
            buf += self._recv()
        return int(buf[9:12]), buf[head_end + 4:total]

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# -- the generator (one process) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    """What the generator sends: ``request``, replayed as is by every connection, or the
    requests each generator process gets from ``make(n)`` before the run (its share ``n`` of
    ``count``) and sends once each; a process that runs out stops (``exhausted``).

    ``make`` runs in the forked generator processes: it is inherited, never pickled.
    """

    request: bytes | None = None
    make: Callable[[int], list[bytes]] | None = None
    count: int = 0  # requests ``make`` makes, all processes together
    rate: float = 0.0  # all processes' requests/s on a fixed schedule; 0 = closed loop


@dataclass(frozen=True, slots=True)
class _GenConfig:
    target: Target
    workload: Workload
    connections: int
    loop: str
    index: int
    procs: int
    max_requests: int  # this process's cap
    count: int  # requests this process makes (``workload.make``)


@dataclass(slots=True)
class GenResult:
    """What one generator process reports."""

    latencies_ns: bytes = b""
    lags_ns: bytes = b""  # open loop: sent - scheduled
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    unfinished: int = 0
    lost_connections: int = 0
    error_sample: str = ""
    cpu_seconds: float = 0.0
    window_end_ns: int = 0
    sent: int = 0
    made: int = 0
    make_seconds: float = 0.0
    exhausted: bool = False


class _Client(asyncio.Protocol):
    """One keep-alive TLS connection with at most one request in flight."""

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.started = 0  # the request's start: its send (closed loop) or schedule (open)
        self.sent_at = 0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, request: bytes, started: int, now: int) -> None:
        assert self.transport is not None
        self.busy = True
        self.started, self.sent_at = started, now
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        total = head_end + 4 + content_length(buf[:head_end])
        if len(buf) < total:
            return
        status = int(buf[9:12])
        body = bytes(buf[head_end + 4:total]) if status != 200 else b""
        del buf[:total]
        self.busy = False
        self.load.completed(self, status, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.lost(self)


class _Load:
    """The connections of one generator process, closed loop or on a fixed schedule."""

    def __init__(self, requests: list[bytes], *, replay: bool, cap: int, open_loop: bool
                 ) -> None:
        self.requests = requests
        self.replay = replay
        self.cap = cap
        self.open_loop = open_loop
        self.t_measure = 0
        self.t_end = 0
        self.sent = 0
        self.latencies = array.array("q")
        self.lags = array.array("q")
        self.statuses: Counter[int] = Counter()
        self.errors = 0
        self.lost_connections = 0
        self.error_sample = ""
        self.last_done = 0
        self.exhausted = False
        self.active = 0  # closed loop: connections still sending
        self.outstanding = 0  # open loop: requests in flight
        self.backlog: deque[int] = deque()  # open loop: scheduled times waiting for a client
        self.idle: list[_Client] = []
        self.pacing_done = False
        self.finished = asyncio.Event()

    def take(self) -> bytes | None:
        """The next request, or ``None`` (and ``exhausted``) when the cap or the made
        requests are used up."""
        if self.sent >= self.cap or (not self.replay and self.sent >= len(self.requests)):
            self.exhausted = True
            return None
        request = self.requests[0] if self.replay else self.requests[self.sent]
        self.sent += 1
        return request

    def in_window(self, started: int, now: int) -> bool:
        if self.open_loop:  # Every request scheduled in the window counts, however late.
            return self.t_measure <= started < self.t_end
        return started >= self.t_measure and now <= self.t_end

    # closed loop

    def next_closed(self, client: _Client, now: int) -> None:
        if now < self.t_end and (request := self.take()) is not None:
            client.send(request, now, now)
        else:
            self.retire()

    def retire(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.finished.set()

    # open loop

    def dispatch(self, client: _Client, scheduled: int, now: int) -> None:
        request = self.take()
        if request is None:  # Nothing left to send: this slot is lost (counted at the end).
            self.backlog.appendleft(scheduled)
            self.idle.append(client)
            self.pacing_done = True
            self.check_finished()
            return
        self.outstanding += 1
        client.send(request, scheduled, now)

    def schedule(self, scheduled: int, now: int) -> None:
        self.backlog.append(scheduled)
        while self.backlog and self.idle and not self.exhausted:
            self.dispatch(self.idle.pop(), self.backlog.popleft(), now)

    def next_open(self, client: _Client, now: int) -> None:
        self.outstanding -= 1
        if self.backlog and not self.exhausted:
            self.dispatch(client, self.backlog.popleft(), now)
        else:
            self.idle.append(client)
            self.check_finished()

    def check_finished(self) -> None:
        if self.pacing_done and self.outstanding == 0 and (self.exhausted or not self.backlog):
            self.finished.set()

    # both

    def completed(self, client: _Client, status: int, body: bytes) -> None:
        now = time.monotonic_ns()
        self.statuses[status] += 1
        if self.in_window(client.started, now):
            self.latencies.append(now - client.started)
            if self.open_loop:
                self.lags.append(client.sent_at - client.started)
            self.last_done = now
            if status != 200:
                self.errors += 1
                if not self.error_sample:
                    self.error_sample = f"{status} {body[:300]!r}"
        if self.open_loop:
            self.next_open(client, now)
        else:
            self.next_closed(client, now)

    def lost(self, client: _Client) -> None:
        if not client.busy:
            return
        client.busy = False
        self.lost_connections += 1
        self.errors += 1
        if not self.error_sample:
            self.error_sample = "connection lost"
        if self.open_loop:
            self.outstanding -= 1
            self.check_finished()
        else:
            self.retire()


async def _pace(load: _Load, cfg: _GenConfig, t_start: int) -> None:
    """Put this process's slots of the global schedule on the backlog as they fall due:
    slot ``k`` of process ``i`` is due at ``t_start + (k * procs + i) / rate``."""
    rate = cfg.workload.rate
    k = 0
    while True:
        due = t_start + int((k * cfg.procs + cfg.index) * 1e9 / rate)
        if due >= load.t_end or load.exhausted:
            break
        now = time.monotonic_ns()
        if due > now:
            # Event-loop timers have a 1 ms resolution: a shorter sleep returns at once and
            # the loop would spin. Late slots are sent late, and that counts in their latency.
            await asyncio.sleep(max(0.001, (due - now) / 1e9))
            continue
        k += 1
        load.schedule(due, now)
    load.pacing_done = True
    load.check_finished()


async def _generate(cfg: _GenConfig, pipe: Connection) -> GenResult:
    loop = asyncio.get_running_loop()
    work = cfg.workload
    made_at = time.perf_counter()
    if work.make is not None:
        requests = work.make(cfg.count)
    else:
        assert work.request is not None
        requests = [work.request]
    make_seconds = time.perf_counter() - made_at
    ctx = cfg.target.ssl_context()
    load = _Load(requests, replay=work.make is None, cap=cfg.max_requests,
                 open_loop=work.rate > 0)
    clients: list[_Client] = []
    for _ in range(cfg.connections):
        _, client = await loop.create_connection(
            lambda: _Client(load), HOST, cfg.target.port, ssl=ctx, server_hostname=HOST)
        cast(asyncio.Transport, client.transport).get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        clients.append(client)
    pipe.send("ready")
    t_start, load.t_measure, load.t_end = pipe.recv()
    await asyncio.sleep(max(0.0, (t_start - time.monotonic_ns()) / 1e9))

    cpu: list[float] = []

    def snapshot() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(usage.ru_utime + usage.ru_stime)

    loop.call_later(max(0.0, (load.t_measure - time.monotonic_ns()) / 1e9), snapshot)
    end_timer = loop.call_later(max(0.0, (load.t_end - time.monotonic_ns()) / 1e9), snapshot)
    pacer: asyncio.Task[None] | None = None
    if load.open_loop:
        load.idle = list(reversed(clients))
        pacer = asyncio.create_task(_pace(load, cfg, t_start))
    else:
        load.active = len(clients)
        now = time.monotonic_ns()
        for client in clients:
            load.next_closed(client, now)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(load.finished.wait(),
                               (load.t_end - time.monotonic_ns()) / 1e9 + DRAIN_SECONDS)
    if pacer is not None:
        pacer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pacer
    if len(cpu) < 2:  # Finished before t_end (requests used up).
        end_timer.cancel()
        snapshot()
    # Requests of the window that never got an answer (or never left) are failures.
    now = time.monotonic_ns()
    unfinished = sum(1 for c in clients if c.busy and load.in_window(c.started, now))
    unfinished += sum(1 for s in load.backlog if load.t_measure <= s < load.t_end)
    # A closed loop that ran out counts up to its last answer; a schedule, its whole window.
    window_end = (min(load.t_end, load.last_done or load.t_end)
                  if load.exhausted and not load.open_loop else load.t_end)
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    await asyncio.sleep(0)
    return GenResult(
        latencies_ns=load.latencies.tobytes(), lags_ns=load.lags.tobytes(),
        statuses=dict(load.statuses), errors=load.errors + unfinished, unfinished=unfinished,
        lost_connections=load.lost_connections, error_sample=load.error_sample,
        cpu_seconds=cpu[-1] - cpu[0] if len(cpu) >= 2 else 0.0, window_end_ns=window_end,
        sent=load.sent, made=len(requests) if work.make is not None else 0,
        make_seconds=make_seconds, exhausted=load.exhausted)


def _generator_main(cfg: _GenConfig, pipe: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # The parent handles ^C and stops us.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        if cfg.loop == "uvloop":
            uvloop = importlib.import_module("uvloop")  # Optional; only for --gen-loop uvloop.
            result = uvloop.run(_generate(cfg, pipe))
        else:
            result = asyncio.run(_generate(cfg, pipe))
        pipe.send(result)
    except Exception as exc:
        pipe.send(f"generator failed: {type(exc).__name__}: {exc}")
    finally:
        pipe.close()


# -- one run -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadOptions:
    duration: float
    warmup: float
    max_requests: int
    gen_procs: int
    connections: int
    gen_loop: str
    wait_quiet: float  # seconds to wait for an idle machine before each run
    noisy_retries: int  # repeats of a run that other processes disturbed

    @classmethod
    def from_args(cls, args: argparse.Namespace, **extra: Any) -> Self:
        """From the arguments ``add_*_arguments`` define, and a subclass's own fields."""
        return cls(duration=args.duration, warmup=args.warmup, max_requests=args.max_requests,
                   gen_procs=args.gen_procs, connections=args.connections,
                   gen_loop=args.gen_loop, wait_quiet=args.wait_quiet,
                   noisy_retries=args.noisy_retries, **extra)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True, slots=True)
class Figures:
    """The leading fields of a run's result: throughput and latency (a benchmark's
    ``RunResult`` extends it with its CPU columns)."""

    ops_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int


@dataclass(frozen=True, slots=True)
class Measured:
    """One run: the generator processes' reports merged, and the CPU that the watched
    processes and the whole machine used in the measured window."""

    latencies_ms: list[float]  # sorted
    lags_ms: list[float]  # sorted; open loop only
    window_s: float  # where answers were counted: shorter if a closed loop ran out
    cpu_window_s: float  # the measured window (warm-up excluded)
    gen_cpu_seconds: float
    watched: dict[str, tuple[float, float]]  # (user, system) seconds per group of processes
    machine_busy_pct: float  # steal included (it is neither idle nor ours)
    errors: int
    unfinished: int
    lost_connections: int
    statuses: dict[int, int]
    error_sample: str
    exhausted: bool
    sent: int
    made: int
    make_seconds: float
    steal_pct: float = 0.0  # hypervisor steal over the window, in % of one core

    @property
    def ops_s(self) -> float:
        return len(self.latencies_ms) / self.window_s if self.window_s > 0 else 0.0

    def figures(self) -> dict[str, Any]:
        """The fields of ``Figures``, as keywords for a ``RunResult``."""
        ordered = self.latencies_ms
        return dataclasses.asdict(Figures(
            ops_s=self.ops_s, p50_ms=percentile(ordered, 50), p90_ms=percentile(ordered, 90),
            p99_ms=percentile(ordered, 99), max_ms=ordered[-1] if ordered else math.nan,
            requests=len(ordered), errors=self.errors))

    def cpu_pct(self, group: str, *, system_only: bool = False) -> float:
        """A watched group's CPU over the measured window, in % of one core."""
        user, system = self.watched[group]
        return 100 * (system if system_only else user + system) / self.cpu_window_s

    def cpu_columns(self, *groups: str) -> dict[str, Any]:
        """The CPU columns of a result row: the generator's and each watched group's CPU
        in % of one core (``gen_cpu_pct``, ``<group>_cpu_pct``) and in µs per answered
        request (``gen_us``, ``<group>_us``), and the machine's busy, other and steal %."""
        gen = 100 * self.gen_cpu_seconds / self.cpu_window_s
        used = {group: self.cpu_pct(group) for group in groups}
        ops_s = self.ops_s

        def per_op(pct: float) -> float:
            return pct / 100 / ops_s * 1e6 if ops_s else math.nan

        columns = {"gen_cpu_pct": gen, "gen_us": per_op(gen),
                   "machine_busy_pct": self.machine_busy_pct,
                   "other_cpu_pct": self.other_pct(gen, *used.values()),
                   "steal_pct": self.steal_pct}
        for group, pct in used.items():
            columns[f"{group}_cpu_pct"], columns[f"{group}_us"] = pct, per_op(pct)
        return columns

    def lag_p99_ms(self) -> float | None:
        """Open loop: how late the 99th percentile of requests left the generator."""
        return percentile(self.lags_ms, 99) if self.lags_ms else None

    def other_pct(self, *used_pct: float) -> float:
        """Machine CPU that none of ``used_pct`` accounts for: other work on the box."""
        return max(0.0, self.machine_busy_pct - sum(used_pct))

    def warn_errors(self) -> None:
        if self.errors:
            print(f"  ! {self.errors} errors ({self.unfinished} unanswered, "
                  f"{self.lost_connections} lost connections); statuses {self.statuses}; "
                  f"e.g. {self.error_sample}", file=sys.stderr, flush=True)


def run_load(target: Target, workload: Workload, opts: LoadOptions, *,
             watch: Mapping[str, Sequence[int]],
             on_ready: Callable[[], None] | None = None,
             during: Callable[[int], None] | None = None) -> Measured:
    """Drive ``workload`` for warm-up + duration seconds and measure the duration part.

    ``watch`` names groups of server processes whose CPU is measured over the window.
    ``on_ready`` runs once every generator process has connected (and made its requests),
    ``during(t_end_ns)`` at the start of the measured window, after the first CPU readings;
    the run then sleeps until the window ends, whenever ``during`` returns.
    """
    # Forking is safe only with no other threads (the generators inherit ``workload.make``
    # instead of having it pickled).
    if threading.active_count() > 1:
        raise RuntimeError("refusing to fork with threads running")
    ctx = mp.get_context("fork")
    procs = opts.gen_procs
    per_proc_conns = [opts.connections // procs + (i < opts.connections % procs)
                      for i in range(procs)]
    ready_within = 180.0 if workload.make is not None else 60.0
    what = "make its requests and connect" if workload.make is not None else "connect"
    workers: list[tuple[Any, Connection]] = []
    finished = False
    try:
        for i, conns in enumerate(per_proc_conns):
            ours, theirs = ctx.Pipe()
            cfg = _GenConfig(target=target, workload=workload, connections=conns,
                             loop=opts.gen_loop, index=i, procs=procs,
                             max_requests=opts.max_requests // procs
                             + (i < opts.max_requests % procs),
                             count=math.ceil(workload.count / procs))
            proc = ctx.Process(target=_generator_main, args=(cfg, theirs), daemon=True)
            proc.start()
            theirs.close()
            workers.append((proc, ours))
        for _, pipe in workers:
            if not pipe.poll(ready_within):
                raise RuntimeError(f"a generator did not {what} within {ready_within:.0f} s")
            message = pipe.recv()
            if message != "ready":
                raise RuntimeError(str(message))
        if on_ready is not None:
            on_ready()
        t_start = time.monotonic_ns() + 100_000_000
        t_measure = t_start + int(opts.warmup * 1e9)
        t_end = t_measure + int(opts.duration * 1e9)
        for _, pipe in workers:
            pipe.send((t_start, t_measure, t_end))
        sleep_until(t_measure)
        watched0 = {name: cpu_seconds(pids) for name, pids in watch.items()}
        machine0, steal0 = machine_busy_seconds(), steal_seconds()
        if during is not None:
            during(t_end)
        sleep_until(t_end)
        watched1 = {name: cpu_seconds(pids) for name, pids in watch.items()}
        machine1, steal1 = machine_busy_seconds(), steal_seconds()
        results: list[GenResult] = []
        for _, pipe in workers:
            if not pipe.poll(DRAIN_SECONDS + 30):
                raise RuntimeError("a generator did not report in time")
            message = pipe.recv()
            if not isinstance(message, GenResult):
                raise RuntimeError(str(message))
            results.append(message)
        finished = True
    finally:
        for proc, pipe in workers:
            proc.join(timeout=5 if finished else 0)  # On errors, stop the load at once.
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
            pipe.close()

    latencies, lags = array.array("q"), array.array("q")
    for r in results:
        latencies.frombytes(r.latencies_ns)
        lags.frombytes(r.lags_ns)
    return Measured(
        latencies_ms=sorted(v / 1e6 for v in latencies),
        lags_ms=sorted(v / 1e6 for v in lags),
        window_s=(opts.duration if workload.rate else
                  (max(r.window_end_ns for r in results) - t_measure) / 1e9),
        cpu_window_s=(t_end - t_measure) / 1e9,
        gen_cpu_seconds=sum(r.cpu_seconds for r in results),
        watched={name: (watched1[name][0] - watched0[name][0],
                        watched1[name][1] - watched0[name][1]) for name in watch},
        machine_busy_pct=busy_pct(machine0, machine1),
        steal_pct=100 * (steal1 - steal0) / ((t_end - t_measure) / 1e9),
        errors=sum(r.errors for r in results),
        unfinished=sum(r.unfinished for r in results),
        lost_connections=sum(r.lost_connections for r in results),
        statuses=dict(sum((Counter(r.statuses) for r in results), Counter())),
        error_sample=next((r.error_sample for r in results if r.error_sample), ""),
        exhausted=any(r.exhausted for r in results),
        sent=sum(r.sent for r in results), made=sum(r.made for r in results),
        make_seconds=max(r.make_seconds for r in results))


# -- repetitions and reporting -------------------------------------------------------------


class RunFigures(Protocol):
    """A benchmark's per-run result: a dataclass with an ``other_cpu_pct``."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def other_cpu_pct(self) -> float: ...


R = TypeVar("R", bound=RunFigures)


def noisy(run: RunFigures) -> bool:
    """Whether other processes disturbed the run."""
    return run.other_cpu_pct > NOISY_OTHER_PCT


@dataclass(frozen=True, slots=True)
class Table:
    """Rows of fixed-width columns: (title, field, width, decimals)."""

    columns: tuple[tuple[str, str, int, int], ...]
    label_title: str
    label_width: int
    dash_if_zero: frozenset[str] = frozenset()  # fields shown as "-" when 0 (as when None)

    def header(self) -> str:
        return f"{self.label_title:<{self.label_width}}" + "".join(
            f"{name:>{width}}" for name, _, width, _ in self.columns)

    def row(self, label: str, values: Mapping[str, Any]) -> str:
        cells = []
        for _, key, width, digits in self.columns:
            value = values.get(key)
            blank = value is None or (value == 0 and key in self.dash_if_zero)
            cells.append(f"{'-':>{width}}" if blank else f"{value:>{width}.{digits}f}")
        return f"{label:<{self.label_width}}" + "".join(cells)


def measure_repeated(run: Callable[[], R], *, label: str, table: Table, opts: LoadOptions,
                     retry: bool = True) -> R:
    """One run after waiting for an idle machine, printed as a row (``label?`` if other
    processes disturbed it) and repeated while they do, ``opts.noisy_retries`` times at most
    (never if not ``retry``). Returns the last."""
    result: R | None = None
    for attempt in range(1 + opts.noisy_retries):
        wait_quiet(opts.wait_quiet)
        result = run()
        disturbed = noisy(result)
        print(table.row(label + ("?" if disturbed else ""), dataclasses.asdict(result)),
              flush=True)
        if not disturbed or not retry:
            break
        if attempt < opts.noisy_retries:
            print(f"  ! other processes used {result.other_cpu_pct:.0f}% CPU; repeating this "
                  "run", file=sys.stderr, flush=True)
    assert result is not None
    return result


def medians(runs: Sequence[RunFigures]) -> dict[str, Any]:
    """The median of every field over the runs, each taken on its own (``None`` values left
    out), with ``errors`` and ``requests`` summed instead."""
    if not runs:
        return {}
    out: dict[str, Any] = {}
    for key in runs[0].__dataclass_fields__:
        values = [getattr(r, key) for r in runs if getattr(r, key) is not None]
        out[key] = statistics.median(values) if values else None
    out["errors"] = sum(getattr(r, "errors", 0) for r in runs)
    out["requests"] = sum(getattr(r, "requests", 0) for r in runs)
    return out


def rounded(value: Any) -> Any:
    """Floats rounded to 3 decimals, in dicts and lists too (for the JSON summary)."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


# -- command line --------------------------------------------------------------------------


def add_run_arguments(group: argparse._ActionsContainer) -> None:
    group.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    group.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per run")
    group.add_argument("--runs", type=int, default=3,
                       help="repetitions; medians are reported")
    group.add_argument("--max-requests", type=int, default=2_000_000,
                       help="hard cap on requests per run (all generator processes)")


def add_generator_arguments(group: argparse._ActionsContainer) -> None:
    group.add_argument("--gen-procs", type=int, default=2, help="generator processes")
    group.add_argument("--connections", type=int, default=32,
                       help="keep-alive connections in all (one request in flight each)")
    group.add_argument("--gen-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                       help="the generator's event loop; auto = uvloop when it is installed "
                            "(about a third less client CPU per request), else asyncio")


def add_quiet_arguments(group: argparse._ActionsContainer, *, noisy_retries: int) -> None:
    group.add_argument("--wait-quiet", type=float, default=30.0,
                       help="before each run, wait up to this many seconds for other "
                            "processes to leave the CPU idle (default %(default)g)")
    group.add_argument("--noisy-retries", type=int, default=noisy_retries,
                       help=f"repeat a run whose other%% exceeds {NOISY_OTHER_PCT:.0f} up to "
                            "this many times (default %(default)s)")


def check_load_arguments(args: argparse.Namespace, p: argparse.ArgumentParser, *,
                         max_run_seconds: float, why: str) -> None:
    """The checks of what ``add_*_arguments`` define; ``why`` explains ``max_run_seconds``.
    Resolves ``--gen-loop auto``."""
    if not (0 < args.duration and args.duration + args.warmup <= max_run_seconds):
        p.error(f"--duration + --warmup must be within {max_run_seconds:.0f} s ({why})")
    if args.warmup < 0 or args.runs < 1 or args.max_requests < 1:
        p.error("--warmup must be >= 0, --runs and --max-requests >= 1")
    if not 1 <= args.gen_procs <= 64 or args.connections < args.gen_procs:
        p.error("--gen-procs must be 1-64 and --connections at least --gen-procs")
    if args.wait_quiet < 0 or args.noisy_retries < 0:
        p.error("--wait-quiet and --noisy-retries must be >= 0")
    if args.gen_loop == "auto":
        args.gen_loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def describe_load(args: argparse.Namespace) -> str:
    return (f"generator {args.gen_procs} procs x {args.connections} connections in all "
            f"({args.gen_loop}), {args.runs} runs x {args.duration:g} s (+{args.warmup:g} s "
            "warm-up)")


def exit_on_sigterm() -> None:
    """SIGTERM raises ``SystemExit``, which unwinds through the stack's clean-up."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
