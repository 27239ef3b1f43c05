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
  The generator and the measuring are ``benchmarks/loadgen.py``, shared with
  ``benchmarks/kms_encrypt.py``.

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
import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import loadgen
from loadgen import HOST

from shared import xks
from shared.sigv4 import Credential, sign_request

SERVICE: Final = "kms-xks-proxy"
# SigV4 signatures are accepted for five minutes; keep a run (warm-up + duration) well inside.
MAX_RUN_SECONDS: Final = 240.0
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
    return loadgen.venv_command("ekm-sim", "ekm_sim.cli")


def _is_simulator(pid: int) -> bool:
    """Whether ``pid`` is still a simulator process (a pid that is gone has no cmdline)."""
    return b"ekm_sim" in loadgen.cmdline(pid)


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
            loadgen.dev_up("ekm-sim", _ekm_sim_command(), self.workdir, env=self._env(),
                           timeout=120, extra=("--workers", str(self.setup.workers)))
            self.info = json.loads((self.workdir / "ekm.json").read_text())
            if urlsplit(self.info["url"]).hostname != HOST:
                raise RuntimeError(f"refusing to load a non-local URL {self.info['url']}")
            main = int(self.info["pid"])
            deadline = time.monotonic() + 30
            # Extra workers are started by the first process; wait until all are there.
            while True:
                self.pids = [main, *loadgen.children(main)]
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
        loadgen.dev_down(_ekm_sim_command(), self.workdir, self.pids, _is_simulator,
                         timeout=60, keep_workdir=self.keep_workdir)

    def alive(self) -> bool:
        return all(_is_simulator(pid) for pid in self.pids)

    def log_tail(self, lines: int = 5) -> str:
        return loadgen.log_tail(self.workdir / "ekm-sim.log", lines)

    def target(self) -> loadgen.Target:
        return loadgen.Target(port=self.port, ca=self.info["ca"],
                              client_cert=self.info["client_cert"],
                              client_key=self.info["client_key"])

    @property
    def port(self) -> int:
        return int(urlsplit(self.info["url"]).port or 0)


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
    return loadgen.get_request("/ping", f"{HOST}:{sim.port}")


# -- the probe: a light connection measuring how long /ping waits behind the load -------------


class Probe(loadgen.Session):
    def __init__(self, sim: Simulator) -> None:
        super().__init__(sim.target(), timeout=10)
        self.request = ping_request(sim)

    def ping(self) -> float:
        """One GET /ping round trip, in seconds."""
        started = time.perf_counter()
        status, body = self.exchange(self.request)
        if status != 200:
            raise RuntimeError(f"/ping answered {status} {body[:200]!r}")
        return time.perf_counter() - started


class _Probing:
    """``GET /ping`` every ``interval`` seconds through the measured window (none if 0)."""

    def __init__(self, sim: Simulator, interval: float) -> None:
        self.sim = sim
        self.interval = interval
        self.probe: Probe | None = None
        self.samples: list[float] = []

    def connect(self) -> None:
        if self.interval > 0:
            self.probe = Probe(self.sim)
            self.probe.ping()

    def run(self, t_end: int) -> None:
        while self.probe is not None and (now := time.monotonic_ns()) < t_end:
            try:
                self.samples.append(self.probe.ping())
            except OSError:  # The server went away; reported after the run.
                self.close()
                continue
            time.sleep(min(self.interval, max(0.0, (t_end - now) / 1e9)))

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None


# -- one run ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadOptions(loadgen.LoadOptions):
    probe_interval: float  # seconds; 0 = no probe


@dataclass(frozen=True, slots=True)
class RunResult(loadgen.Figures):
    gen_cpu_pct: float
    server_cpu_pct: float
    machine_busy_pct: float
    # Machine CPU not used by the generator or the server: other processes on the box.
    other_cpu_pct: float
    probe_p50_ms: float | None
    probe_p99_ms: float | None
    probe_max_ms: float | None
    window_s: float


def run_load(sim: Simulator, request: bytes, opts: LoadOptions) -> RunResult:
    """Drive ``request`` for warm-up + duration seconds and measure the duration part."""
    probing = _Probing(sim, opts.probe_interval)
    try:
        run = loadgen.run_load(sim.target(), loadgen.Workload(request=request), opts,
                               watch={"server": sim.pids}, on_ready=probing.connect,
                               during=probing.run)
    finally:
        probing.close()
    if not sim.alive():
        raise ServerDied(f"the server died during the run; its log ends:\n{sim.log_tail()}")
    run.warn_errors()
    probes = sorted(probing.samples)
    gen_cpu = 100 * run.gen_cpu_seconds / run.window_s if run.window_s > 0 else 0.0
    server_cpu = run.cpu_pct("server")
    return RunResult(
        **run.figures(),
        gen_cpu_pct=gen_cpu, server_cpu_pct=server_cpu, machine_busy_pct=run.machine_busy_pct,
        other_cpu_pct=run.other_pct(gen_cpu, server_cpu),
        probe_p50_ms=loadgen.percentile(probes, 50) * 1e3 if probes else None,
        probe_p99_ms=loadgen.percentile(probes, 99) * 1e3 if probes else None,
        probe_max_ms=probes[-1] * 1e3 if probes else None,
        window_s=run.window_s)


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


TABLE: Final = loadgen.Table(
    columns=(("ops/s", "ops_s", 9, 0), ("p50ms", "p50_ms", 7, 2), ("p90ms", "p90_ms", 7, 2),
             ("p99ms", "p99_ms", 7, 2), ("maxms", "max_ms", 7, 1),
             ("errors", "errors", 7, 0), ("gen%", "gen_cpu_pct", 6, 0),
             ("server%", "server_cpu_pct", 8, 0), ("busy%", "machine_busy_pct", 6, 0),
             ("other%", "other_cpu_pct", 7, 0),
             ("ping50", "probe_p50_ms", 7, 2), ("ping99", "probe_p99_ms", 7, 2),
             ("pingmax", "probe_max_ms", 8, 1)),
    label_title="run", label_width=7)


def measure(title: str, make_request: Callable[[], bytes], sim: Simulator, opts: LoadOptions,
            runs: int) -> dict[str, Any]:
    """``runs`` runs of one request (signed afresh each run); prints each and the median."""
    print(f"\n== {title}", flush=True)
    print(TABLE.header(), flush=True)
    results: list[RunResult] = []
    for i in range(runs):
        try:
            results.append(loadgen.measure_repeated(
                lambda: run_load(sim, make_request(), opts), label=str(i + 1), table=TABLE,
                opts=opts))
        except ServerDied as exc:
            print(f"  ! run {i + 1}: {exc}", file=sys.stderr, flush=True)
            return {**loadgen.medians(results), "failed": str(exc)}
    median = loadgen.medians(results)
    print(TABLE.row("median", median), flush=True)
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
    loadgen.add_run_arguments(load)
    load.add_argument("--plaintext-bytes", type=int, default=64)
    load.add_argument("--aad-bytes", type=int, default=0, help="0 = no AAD (default)")
    loadgen.add_generator_arguments(load)
    load.add_argument("--probe-interval-ms", type=float, default=10.0,
                      help="/ping probe period during runs; 0 disables the probe")
    loadgen.add_quiet_arguments(load, noisy_retries=2)
    load.add_argument("--no-ceiling", action="store_true",
                      help="skip the GET /ping throughput ceiling")
    return p


def _check(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    loadgen.check_load_arguments(
        args, p, max_run_seconds=MAX_RUN_SECONDS,
        why="the signed request is replayed and SigV4 allows 5 minutes of skew")
    if not 1 <= args.workers <= 64:
        p.error("--workers must be 1-64")
    if args.plaintext_bytes < 1 or args.aad_bytes < 0:
        p.error("--plaintext-bytes must be >= 1 and --aad-bytes >= 0")
    if args.probe_interval_ms < 0:
        p.error("--probe-interval-ms must be >= 0")


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
            results[f"ping {setup.label()}"] = measure(
                f"GET /ping ceiling  {setup.label()}", functools.partial(ping_request, sim),
                sim, replace(opts, probe_interval=0.0), args.runs)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check(args, p)
    loadgen.exit_on_sigterm()
    opts = LoadOptions.from_args(args, probe_interval=args.probe_interval_ms / 1e3)
    modes = ("inline", "threads") if args.compare_modes else (args.hsm_mode,)
    aad = f"{args.aad_bytes} B" if args.aad_bytes else "none"
    print(f"xks_encrypt: {os.cpu_count()} CPUs, plaintext {args.plaintext_bytes} B, AAD {aad}, "
          f"{loadgen.describe_load(args)}", flush=True)
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
    print(json.dumps(loadgen.rounded(summary), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
