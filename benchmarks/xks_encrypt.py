"""Benchmark: SigV4-signed XKS Encrypt throughput and latency against a local ekm-sim.

Not a test. It starts its own simulator with ``ekm-sim dev up`` in a temporary work
directory, drives it from 127.0.0.1 only, and stops it at the end, also on errors.

The load generator must not be what is measured, so it is kept cheap:

- the Encrypt request is signed once per run with the project's signer (botocore SigV4) and
  its bytes are replayed as they are: SigV4 has no nonce and a signature stays valid for five
  minutes, so an identical request is a valid request (runs are capped well under that);
- several generator processes (``--gen-procs``), each an event loop with many keep-alive
  TLS connections (mTLS with the dev client certificate) and one outstanding request per
  connection (no pipelining); responses are parsed minimally (status + Content-Length).

The generator uses uvloop when it is installed (``--gen-loop``), which costs about a third
less client CPU per request than asyncio's pure-Python TLS transport.

Each run reports ops/s, latency percentiles, non-200 responses, the generator's CPU (its
processes' own ``getrusage``), the server's CPU (``/proc/<pid>/stat`` of the server and its
worker processes) and how busy the whole machine was (``/proc/stat``); ``other%`` is CPU
that neither used, i.e. other processes on the box. The script waits for an idle machine
before each run and repeats runs that others disturbed (marked ``?``). A light separate
connection sends ``GET /ping`` every few milliseconds during the run to show how long a
request waits behind the load (event-loop responsiveness). ``GET /ping`` is also driven
with the same generator as a ceiling: TLS + aiohttp with no SigV4 and no crypto. CPU
percentages are of one core (a 2-core machine has 200%).

A server that dies during a run (see the log tail printed) ends that configuration; the
others still run.

Examples::

    .venv/bin/python benchmarks/xks_encrypt.py                       # workers=1, inline
    .venv/bin/python benchmarks/xks_encrypt.py --workers 2
    .venv/bin/python benchmarks/xks_encrypt.py --compare-modes       # inline vs threads
    .venv/bin/python benchmarks/xks_encrypt.py --plaintext-bytes 4096 --aad-bytes 64

The last line of output is a one-line JSON summary (medians over ``--runs``).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import functools
import importlib
import importlib.util
import json
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
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any, Final, cast
from urllib.parse import urlsplit

from shared import xks
from shared.sigv4 import Credential, sign_request

SERVICE: Final = "kms-xks-proxy"
HOST: Final = "127.0.0.1"
# SigV4 signatures are accepted for five minutes; keep a run (warm-up + duration) well inside.
MAX_RUN_SECONDS: Final = 240.0
# After the end of a run, outstanding requests get this long to finish.
DRAIN_SECONDS: Final = 5.0
# A run in which other processes used more CPU than this (% of one core) is marked "?".
NOISY_OTHER_PCT: Final = 20.0
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
SERVER_UVLOOP_HOOK: Final = """\
# Written by benchmarks/xks_encrypt.py --server-uvloop: every interpreter started with this
# directory on PYTHONPATH uses uvloop's event loop policy. The project code is unchanged.
import asyncio

import uvloop

asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
"""


# -- the simulator ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerSetup:
    workers: int = 1
    hsm_mode: str = "inline"
    request_log: bool = False
    hsm_threads: int | None = None
    iv_source: str | None = None
    uvloop: bool = False

    def label(self) -> str:
        extra = [f"hsm_threads={self.hsm_threads}"] if self.hsm_threads else []
        extra += [f"iv={self.iv_source}"] if self.iv_source else []
        extra += ["server_uvloop"] if self.uvloop else []
        return " ".join([f"workers={self.workers}", f"hsm={self.hsm_mode}",
                         f"request_log={'on' if self.request_log else 'off'}", *extra])


def _ekm_sim_command() -> list[str]:
    script = Path(sys.executable).with_name("ekm-sim")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ekm_sim.cli"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the simulator's ``--worker-port`` workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _is_simulator(pid: int) -> bool:
    try:
        return b"ekm_sim" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class ServerDied(RuntimeError):
    """A simulator process exited during a run."""


class Simulator(contextlib.AbstractContextManager["Simulator"]):
    """``ekm-sim dev up`` in a fresh temporary directory; ``dev down`` (and, if needed, a
    kill of exactly the processes it started) on exit."""

    def __init__(self, setup: ServerSetup, *, keep_workdir: bool = False) -> None:
        self.setup = setup
        self.keep_workdir = keep_workdir
        self.workdir = Path(tempfile.mkdtemp(prefix="xks-bench-"))
        self.info: dict[str, Any] = {}
        self.pids: list[int] = []

    def _env(self) -> dict[str, str]:
        s = self.setup
        env = dict(os.environ)
        env["EKM_SIM__HSM__MODE"] = s.hsm_mode
        env["EKM_SIM__SERVER__WORKERS"] = str(s.workers)
        if not s.request_log:
            env["EKM_SIM__SERVER__REQUEST_LOG"] = "off"
        if s.hsm_threads is not None:
            env["EKM_SIM__HSM__WORKERS"] = str(s.hsm_threads)
        if s.iv_source is not None:
            env["EKM_SIM__HSM__IV_SOURCE"] = s.iv_source
        if s.uvloop:
            hook = self.workdir / "uvloop-hook"
            hook.mkdir()
            (hook / "sitecustomize.py").write_text(SERVER_UVLOOP_HOOK)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(hook), env.get("PYTHONPATH", "")) if p)
        return env

    def __enter__(self) -> Simulator:
        try:
            done = subprocess.run(
                [*_ekm_sim_command(), "dev", "up", "--workdir", str(self.workdir),
                 "--workers", str(self.setup.workers)],
                env=self._env(), capture_output=True, text=True, timeout=120, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"ekm-sim dev up failed: {done.stderr.strip()}")
            self.info = json.loads((self.workdir / "ekm.json").read_text())
            if urlsplit(self.info["url"]).hostname != HOST:
                raise RuntimeError(f"refusing to load a non-local URL {self.info['url']}")
            main = int(self.info["pid"])
            deadline = time.monotonic() + 30
            # Extra workers are started by the first process; wait until all are there.
            while True:
                self.pids = [main, *_children(main)]
                if len(self.pids) >= self.setup.workers or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if len(self.pids) < self.setup.workers:
                raise RuntimeError(f"expected {self.setup.workers} server processes, "
                                   f"found {len(self.pids)}")
            time.sleep(0.5)  # Let extra workers finish opening their token and listener.
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run([*_ekm_sim_command(), "dev", "down", "--workdir", str(self.workdir)],
                           capture_output=True, timeout=60, check=False)
        deadline = time.monotonic() + 10
        while any(_alive(p) and _is_simulator(p) for p in self.pids):
            if time.monotonic() > deadline:
                for pid in self.pids:
                    if _alive(pid) and _is_simulator(pid):
                        os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def alive(self) -> bool:
        return all(_alive(pid) and _is_simulator(pid) for pid in self.pids)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = (self.workdir / "ekm-sim.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def cpu_seconds(self) -> float:
        """utime + stime of every server process so far (all their threads)."""
        ticks = 0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
        return ticks / CLK_TCK

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.info["ca"])
        ctx.load_cert_chain(self.info["client_cert"], self.info["client_key"])
        return ctx

    @property
    def port(self) -> int:
        return int(urlsplit(self.info["url"]).port or 0)


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine from ``/proc/stat``."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user/nice
    return (total - idle) / CLK_TCK, total / CLK_TCK


# -- requests --------------------------------------------------------------------------------


def encrypt_request(sim: Simulator, *, plaintext_bytes: int, aad_bytes: int) -> bytes:
    """One complete, signed HTTP/1.1 Encrypt request, ready to be replayed."""
    info = sim.info
    key_id = info["keys"]["default"]
    host = f"{HOST}:{sim.port}"
    path = f"/{info['uri_prefix']}/kms/xks/v1/keys/{key_id}/encrypt"
    metadata = xks.RequestMetadata(
        kms_request_id="4112f4d6-db54-4af4-ae30-c55a22a8dfae",
        kms_operation="Encrypt",
        aws_principal_arn="arn:aws:iam::123456789012:user/xks-bench",
        kms_key_arn="arn:aws:kms:us-east-1:123456789012:key/xks-bench")
    body = xks.dumps(xks.EncryptRequest(
        metadata=metadata, plaintext=os.urandom(plaintext_bytes),
        aad=os.urandom(aad_bytes) if aad_bytes else None).to_wire())
    headers = sign_request(
        method="POST", url=f"https://{host}{path}", body=body,
        headers={"Content-Type": "application/json"},
        credential=Credential(info["access_key_id"], info["secret_access_key"]),
        region=info["region"], service=SERVICE)
    headers = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length")}
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}",
             *(f"{k}: {v}" for k, v in headers.items()),
             f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode() + body


def ping_request(sim: Simulator) -> bytes:
    return f"GET /ping HTTP/1.1\r\nHost: {HOST}:{sim.port}\r\n\r\n".encode()


def _content_length(head: bytes | bytearray) -> int:
    at = head.find(b"\r\nContent-Length:")
    if at < 0:
        at = bytes(head).lower().find(b"\r\ncontent-length:")
        if at < 0:
            raise ValueError("response without Content-Length")
    end = head.find(b"\r\n", at + 2)
    return int(head[at + 17:end if end >= 0 else len(head)])


# -- the generator (one process) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GenConfig:
    port: int
    ca: str
    client_cert: str
    client_key: str
    request: bytes
    connections: int
    max_requests: int
    loop: str


@dataclass(slots=True)
class GenResult:
    measured: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_ns: bytes = b""
    cpu_seconds: float = 0.0
    window_end_ns: int = 0
    sent: int = 0
    lost_connections: int = 0
    error_sample: str = ""


class _Load:
    """Shared state of one generator process's connections."""

    def __init__(self, request: bytes, max_requests: int) -> None:
        self.request = request
        self.max_requests = max_requests
        self.t_measure = 0
        self.t_end = 0
        self.sent = 0
        self.active = 0
        self.latencies = array.array("q")
        self.statuses: Counter[int] = Counter()
        self.errors = 0
        self.lost = 0
        self.last_done = 0
        self.error_sample = ""
        self.finished: asyncio.Event | None = None

    def next(self, client: _Client, now: int) -> None:
        if now < self.t_end and self.sent < self.max_requests:
            self.sent += 1
            client.send(now)
        else:
            self.retire()

    def retire(self) -> None:
        self.active -= 1
        if self.active == 0 and self.finished is not None:
            self.finished.set()

    def completed(self, client: _Client, status: int, sent_at: int, body: bytes) -> None:
        now = time.monotonic_ns()
        self.statuses[status] += 1
        if sent_at >= self.t_measure and now <= self.t_end:
            self.latencies.append(now - sent_at)
            self.last_done = now
            if status != 200:
                self.errors += 1
                if not self.error_sample:
                    self.error_sample = f"{status} {body[:300]!r}"
        self.next(client, now)


class _Client(asyncio.Protocol):
    """One keep-alive TLS connection with at most one request in flight."""

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.sent_at = 0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, now: int) -> None:
        assert self.transport is not None
        self.busy = True
        self.sent_at = now
        self.transport.write(self.load.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        total = head_end + 4 + _content_length(buf[:head_end])
        if len(buf) < total:
            return
        status = int(buf[9:12])
        body = bytes(buf[head_end + 4:total]) if status != 200 else b""
        del buf[:total]
        self.busy = False
        self.load.completed(self, status, self.sent_at, body)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy:
            self.busy = False
            self.load.lost += 1
            self.load.errors += 1
            self.load.retire()


async def _generate(cfg: GenConfig, pipe: Connection) -> GenResult:
    loop = asyncio.get_running_loop()
    ctx = ssl.create_default_context(cafile=cfg.ca)
    ctx.load_cert_chain(cfg.client_cert, cfg.client_key)
    load = _Load(cfg.request, cfg.max_requests)
    load.finished = asyncio.Event()
    clients: list[_Client] = []
    for _ in range(cfg.connections):
        _, client = await loop.create_connection(
            lambda: _Client(load), HOST, cfg.port, ssl=ctx, server_hostname=HOST)
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
    load.active = len(clients)
    now = time.monotonic_ns()
    for client in clients:
        load.next(client, now)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(load.finished.wait(),
                               (load.t_end - time.monotonic_ns()) / 1e9 + DRAIN_SECONDS)
    if len(cpu) < 2:  # Every connection retired early (max requests reached).
        end_timer.cancel()
        snapshot()
    window_end = load.t_end if load.sent < load.max_requests else min(
        load.t_end, load.last_done or load.t_end)
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    await asyncio.sleep(0)
    return GenResult(
        measured=len(load.latencies), errors=load.errors, statuses=dict(load.statuses),
        latencies_ns=load.latencies.tobytes(),
        cpu_seconds=cpu[-1] - cpu[0] if len(cpu) >= 2 else 0.0, window_end_ns=window_end,
        sent=load.sent, lost_connections=load.lost, error_sample=load.error_sample)


def _generator_main(cfg: GenConfig, pipe: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # The parent handles ^C and stops us.
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


# -- the probe: a light connection measuring how long /ping waits behind the load -------------


class Probe:
    def __init__(self, sim: Simulator) -> None:
        raw = socket.create_connection((HOST, sim.port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sim.ssl_context().wrap_socket(raw, server_hostname=HOST)
        self.request = ping_request(sim)

    def ping(self) -> float:
        """One GET /ping round trip, in seconds."""
        started = time.perf_counter()
        status, body = self.exchange(self.request)
        if status != 200:
            raise RuntimeError(f"/ping answered {status} {body[:200]!r}")
        return time.perf_counter() - started

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send one raw request; return the response's status and body."""
        self.sock.sendall(request)
        buf = b""
        while (head_end := buf.find(b"\r\n\r\n")) < 0:
            buf += self._recv()
        total = head_end + 4 + _content_length(buf[:head_end])
        while len(buf) < total:
            buf += self._recv()
        return int(buf[9:12]), buf[head_end + 4:total]

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the probe connection")
        return chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# -- one run ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadOptions:
    duration: float
    warmup: float
    max_requests: int
    gen_procs: int
    connections: int
    gen_loop: str
    probe_interval: float  # seconds; 0 = no probe
    wait_quiet: float  # seconds to wait for an idle machine before each run
    noisy_retries: int  # repeats of a run that other processes disturbed


@dataclass(frozen=True, slots=True)
class RunResult:
    ops_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int
    gen_cpu_pct: float
    server_cpu_pct: float
    machine_busy_pct: float
    # Machine CPU not used by the generator or the server: other processes on the box.
    other_cpu_pct: float
    probe_p50_ms: float | None
    probe_p99_ms: float | None
    probe_max_ms: float | None
    window_s: float


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def run_load(sim: Simulator, request: bytes, opts: LoadOptions) -> RunResult:
    """Drive ``request`` for warm-up + duration seconds and measure the duration part."""
    ctx = mp.get_context("fork")  # No threads or event loops exist in this process yet.
    per_proc = [opts.connections // opts.gen_procs + (i < opts.connections % opts.gen_procs)
                for i in range(opts.gen_procs)]
    workers: list[tuple[Any, Connection]] = []
    probe: Probe | None = None
    finished = False
    try:
        for i, conns in enumerate(per_proc):
            if conns == 0:
                continue
            ours, theirs = ctx.Pipe()
            cfg = GenConfig(port=sim.port, ca=sim.info["ca"], client_cert=sim.info["client_cert"],
                            client_key=sim.info["client_key"], request=request,
                            connections=conns,
                            max_requests=opts.max_requests // opts.gen_procs
                            + (i < opts.max_requests % opts.gen_procs),
                            loop=opts.gen_loop)
            proc = ctx.Process(target=_generator_main, args=(cfg, theirs), daemon=True)
            proc.start()
            theirs.close()
            workers.append((proc, ours))
        for _, pipe in workers:
            if not pipe.poll(60):
                raise RuntimeError("a generator did not connect within 60 s")
            message = pipe.recv()
            if message != "ready":
                raise RuntimeError(str(message))
        if opts.probe_interval > 0:
            probe = Probe(sim)
            probe.ping()
        t_start = time.monotonic_ns() + 100_000_000
        t_measure = t_start + int(opts.warmup * 1e9)
        t_end = t_measure + int(opts.duration * 1e9)
        for _, pipe in workers:
            pipe.send((t_start, t_measure, t_end))

        _sleep_until(t_measure)
        server0, machine0 = sim.cpu_seconds(), machine_busy_seconds()
        probes: list[float] = []
        while (now := time.monotonic_ns()) < t_end:
            if probe is None:
                _sleep_until(t_end)
                break
            try:
                probes.append(probe.ping())
            except OSError:  # The server went away; reported below.
                probe.close()
                probe = None
                continue
            time.sleep(min(opts.probe_interval, max(0.0, (t_end - now) / 1e9)))
        server1, machine1 = sim.cpu_seconds(), machine_busy_seconds()

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
        if probe is not None:
            probe.close()
        for proc, pipe in workers:
            proc.join(timeout=5 if finished else 0)  # On errors, stop the load at once.
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
            pipe.close()

    if not sim.alive():
        raise ServerDied(f"the server died during the run; its log ends:\n{sim.log_tail()}")
    latencies = array.array("q")
    for r in results:
        latencies.frombytes(r.latencies_ns)
    ordered = sorted(v / 1e6 for v in latencies)
    window = (max(r.window_end_ns for r in results) - t_measure) / 1e9
    server_window = (t_end - t_measure) / 1e9
    errors = sum(r.errors for r in results)
    if errors:
        sample = next(r.error_sample for r in results if r.error_sample or r.lost_connections)
        print(f"  ! {errors} errors; statuses "
              f"{sum((Counter(r.statuses) for r in results), Counter())}; "
              f"lost connections {sum(r.lost_connections for r in results)}; e.g. {sample}",
              file=sys.stderr)
    probes.sort()
    busy = 100 * (os.cpu_count() or 1) * (machine1[0] - machine0[0]) / max(
        1e-9, machine1[1] - machine0[1])
    gen_cpu = 100 * sum(r.cpu_seconds for r in results) / window if window > 0 else 0.0
    server_cpu = 100 * (server1 - server0) / server_window
    return RunResult(
        ops_s=len(ordered) / window if window > 0 else 0.0,
        p50_ms=_percentile(ordered, 50), p90_ms=_percentile(ordered, 90),
        p99_ms=_percentile(ordered, 99), max_ms=ordered[-1] if ordered else math.nan,
        requests=len(ordered), errors=errors,
        gen_cpu_pct=gen_cpu, server_cpu_pct=server_cpu, machine_busy_pct=busy,
        other_cpu_pct=max(0.0, busy - gen_cpu - server_cpu),
        probe_p50_ms=_percentile(probes, 50) * 1e3 if probes else None,
        probe_p99_ms=_percentile(probes, 99) * 1e3 if probes else None,
        probe_max_ms=probes[-1] * 1e3 if probes else None,
        window_s=window)


def _wait_quiet(max_wait: float, threshold_pct: float = 15.0) -> None:
    """Wait (at most ``max_wait`` s) until nothing else uses the CPU, and say so if it still
    does: other processes on the box skew every figure (see the other% column)."""
    deadline = time.monotonic() + max_wait
    while True:
        busy0, total0 = machine_busy_seconds()
        time.sleep(0.5)
        busy1, total1 = machine_busy_seconds()
        pct = 100 * (os.cpu_count() or 1) * (busy1 - busy0) / max(1e-9, total1 - total0)
        if pct <= threshold_pct:
            return
        if time.monotonic() >= deadline:
            print(f"  ! the machine is {pct:.0f}% busy before this run (other processes)",
                  file=sys.stderr, flush=True)
            return


def _sleep_until(deadline_ns: int) -> None:
    while (left := deadline_ns - time.monotonic_ns()) > 0:
        time.sleep(min(left / 1e9, 0.5))


def preflight(sim: Simulator, encrypt: bytes, count: int = 200) -> float:
    """Check that the replayed Encrypt request is accepted (twice: replay is fine) and
    return the median /ping round trip on the idle server, in ms.

    :raises RuntimeError: if the server refuses the request.
    """
    probe = Probe(sim)
    try:
        for _ in range(2):
            status, body = probe.exchange(encrypt)
            if status != 200 or "ciphertext" not in json.loads(body):
                raise RuntimeError(f"Encrypt answered {status} {body[:300]!r}")
        probe.ping()
        return statistics.median(probe.ping() for _ in range(count)) * 1e3
    finally:
        probe.close()


# -- reporting -------------------------------------------------------------------------------


_COLUMNS: Final = (("ops/s", "ops_s", 9, 0), ("p50ms", "p50_ms", 7, 2), ("p90ms", "p90_ms", 7, 2),
                   ("p99ms", "p99_ms", 7, 2), ("maxms", "max_ms", 7, 1),
                   ("errors", "errors", 7, 0), ("gen%", "gen_cpu_pct", 6, 0),
                   ("server%", "server_cpu_pct", 8, 0), ("busy%", "machine_busy_pct", 6, 0),
                   ("other%", "other_cpu_pct", 7, 0),
                   ("ping50", "probe_p50_ms", 7, 2), ("ping99", "probe_p99_ms", 7, 2),
                   ("pingmax", "probe_max_ms", 8, 1))


def _row(label: str, values: dict[str, Any]) -> str:
    cells = []
    for _, key, width, digits in _COLUMNS:
        value = values.get(key)
        cells.append(f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}")
    return f"{label:<7}" + "".join(cells)


def median_result(runs: Sequence[RunResult]) -> dict[str, Any]:
    """The median of every metric over the runs, each taken on its own."""
    if not runs:
        return {}
    out: dict[str, Any] = {}
    for key in asdict(runs[0]):
        values = [getattr(r, key) for r in runs if getattr(r, key) is not None]
        out[key] = statistics.median(values) if values else None
    out["errors"] = sum(r.errors for r in runs)
    out["requests"] = sum(r.requests for r in runs)
    return out


def measure(title: str, make_request: Callable[[], bytes], sim: Simulator, opts: LoadOptions,
            runs: int) -> dict[str, Any]:
    """``runs`` runs of one request (signed afresh each run); prints each and the median."""
    print(f"\n== {title}", flush=True)
    print(f"{'run':<7}" + "".join(f"{name:>{w}}" for name, _, w, _ in _COLUMNS), flush=True)
    results: list[RunResult] = []
    for i in range(runs):
        for attempt in range(1 + opts.noisy_retries):
            _wait_quiet(opts.wait_quiet)
            try:
                result = run_load(sim, make_request(), opts)
            except ServerDied as exc:
                print(f"  ! run {i + 1}: {exc}", file=sys.stderr, flush=True)
                return {**(median_result(results) if results else {}), "failed": str(exc)}
            noisy = result.other_cpu_pct > NOISY_OTHER_PCT
            print(_row(str(i + 1) + ("?" if noisy else ""), asdict(result)), flush=True)
            if not noisy:
                break
            if attempt < opts.noisy_retries:
                print(f"  ! other processes used {result.other_cpu_pct:.0f}% CPU; "
                      "repeating this run", file=sys.stderr, flush=True)
        results.append(result)
    median = median_result(results)
    print(_row("median", median), flush=True)
    return median


# -- main ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    server = p.add_argument_group("server")
    server.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    server.add_argument("--hsm-mode", choices=("inline", "threads"), default="inline")
    server.add_argument("--hsm-threads", type=int, default=None,
                        help="PKCS#11 worker threads in threads mode (server default 2; with "
                             "more than 1, SoftHSM ran without locks and the server crashed: "
                             "python-pkcs11 calls C_Initialize(NULL))")
    server.add_argument("--iv-source", choices=("hsm", "os"), default=None,
                        help="where IVs come from (server default hsm)")
    server.add_argument("--request-log", choices=("off", "on"), default="off",
                        help="the per-request JSON log (to a file in the work directory)")
    server.add_argument("--server-uvloop", action="store_true",
                        help="run the server under uvloop (via a sitecustomize on PYTHONPATH; "
                             "needs uvloop installed in the venv)")
    server.add_argument("--compare-modes", action="store_true",
                        help="run hsm=inline and hsm=threads back to back and print the ratio")
    server.add_argument("--keep-workdir", action="store_true")
    load = p.add_argument_group("load")
    load.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    load.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per run")
    load.add_argument("--runs", type=int, default=3, help="repetitions; the median is reported")
    load.add_argument("--max-requests", type=int, default=2_000_000,
                      help="hard cap on requests per run (all generator processes)")
    load.add_argument("--plaintext-bytes", type=int, default=64)
    load.add_argument("--aad-bytes", type=int, default=0, help="0 = no AAD (default)")
    load.add_argument("--gen-procs", type=int, default=2, help="generator processes")
    load.add_argument("--connections", type=int, default=32,
                      help="keep-alive connections in all (one request in flight each)")
    load.add_argument("--gen-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                      help="the generator's event loop; auto = uvloop when it is installed "
                           "(about a third less client CPU per request), else asyncio")
    load.add_argument("--probe-interval-ms", type=float, default=10.0,
                      help="/ping probe period during runs; 0 disables the probe")
    load.add_argument("--wait-quiet", type=float, default=30.0,
                      help="before each run, wait up to this many seconds for other processes "
                           "to leave the CPU idle (default 30)")
    load.add_argument("--noisy-retries", type=int, default=2,
                      help=f"repeat a run whose other%% exceeds {NOISY_OTHER_PCT:.0f} up to "
                           "this many times (default 2)")
    load.add_argument("--no-ceiling", action="store_true",
                      help="skip the GET /ping throughput ceiling")
    return p


def _check(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    if not (0 < args.duration and args.duration + args.warmup <= MAX_RUN_SECONDS):
        p.error(f"--duration + --warmup must be within {MAX_RUN_SECONDS:.0f} s "
                "(the signed request is replayed and SigV4 allows 5 minutes of skew)")
    if args.warmup < 0 or args.runs < 1 or args.max_requests < 1:
        p.error("--warmup must be >= 0, --runs and --max-requests >= 1")
    if not 1 <= args.gen_procs <= 64 or args.connections < args.gen_procs:
        p.error("--gen-procs must be 1-64 and --connections at least --gen-procs")
    if not 1 <= args.workers <= 64:
        p.error("--workers must be 1-64")
    if args.plaintext_bytes < 1 or args.aad_bytes < 0:
        p.error("--plaintext-bytes must be >= 1 and --aad-bytes >= 0")
    if args.wait_quiet < 0 or args.noisy_retries < 0 or args.probe_interval_ms < 0:
        p.error("--wait-quiet, --noisy-retries and --probe-interval-ms must be >= 0")


def bench_server(setup: ServerSetup, args: argparse.Namespace, opts: LoadOptions, *,
                 ceiling: bool) -> dict[str, dict[str, Any]]:
    """Start one simulator, measure Encrypt (and the /ping ceiling), stop it."""
    results = {}
    with Simulator(setup, keep_workdir=args.keep_workdir) as sim:
        make_encrypt = functools.partial(encrypt_request, sim, plaintext_bytes=args.plaintext_bytes,
                                         aad_bytes=args.aad_bytes)
        idle_ms = preflight(sim, make_encrypt())
        print(f"\nserver {setup.label()} pids {sim.pids}; idle /ping round trip "
              f"{idle_ms:.3f} ms", flush=True)
        encrypt = measure(f"Encrypt  {setup.label()}", make_encrypt, sim, opts, args.runs)
        results[f"encrypt {setup.label()}"] = {**encrypt, "idle_ping_ms": idle_ms}
        if ceiling and sim.alive():
            no_probe = LoadOptions(**{**asdict(opts), "probe_interval": 0.0})
            results[f"ping {setup.label()}"] = measure(
                f"GET /ping ceiling  {setup.label()}", functools.partial(ping_request, sim),
                sim, no_probe, args.runs)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check(args, p)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # Unwinds through the simulator's clean-up.

    signal.signal(signal.SIGTERM, on_term)
    if args.gen_loop == "auto":
        args.gen_loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    opts = LoadOptions(duration=args.duration, warmup=args.warmup,
                       max_requests=args.max_requests, gen_procs=args.gen_procs,
                       connections=args.connections, gen_loop=args.gen_loop,
                       probe_interval=args.probe_interval_ms / 1e3,
                       wait_quiet=args.wait_quiet, noisy_retries=args.noisy_retries)
    modes = ("inline", "threads") if args.compare_modes else (args.hsm_mode,)
    aad = f"{args.aad_bytes} B" if args.aad_bytes else "none"
    print(f"xks_encrypt: {os.cpu_count()} CPUs, plaintext {args.plaintext_bytes} B, AAD {aad}, "
          f"generator {args.gen_procs} procs x {args.connections} connections in all "
          f"({args.gen_loop}), {args.runs} runs x {args.duration:g} s (+{args.warmup:g} s "
          f"warm-up)", flush=True)
    summary: dict[str, Any] = {
        "benchmark": "xks_encrypt", "cpus": os.cpu_count(),
        "plaintext_bytes": args.plaintext_bytes, "aad_bytes": args.aad_bytes,
        "gen_procs": args.gen_procs, "connections": args.connections, "gen_loop": args.gen_loop,
        "runs": args.runs, "duration_s": args.duration, "results": {}}
    for i, mode in enumerate(modes):
        setup = ServerSetup(workers=args.workers, hsm_mode=mode,
                            request_log=args.request_log == "on",
                            hsm_threads=args.hsm_threads, iv_source=args.iv_source,
                            uvloop=args.server_uvloop)
        summary["results"].update(bench_server(
            setup, args, opts, ceiling=i == 0 and not args.no_ceiling))
    if args.compare_modes:
        inline, threads = (summary["results"][k] for k in summary["results"]
                           if k.startswith("encrypt"))
        ratio = {k: threads[k] / inline[k] for k in ("ops_s", "p50_ms", "p99_ms")
                 if inline.get(k) and threads.get(k)}
        print("\nthreads / inline: " + ", ".join(f"{k} x{v:.3f}" for k, v in ratio.items()))
        summary["threads_over_inline"] = ratio
    print(json.dumps(_rounded(summary), separators=(",", ":")))
    return 0


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    sys.exit(main())
