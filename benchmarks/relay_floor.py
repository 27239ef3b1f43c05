"""Benchmark: the floor of an external-key Encrypt on this machine, with no project code.

Not a test. An external-key Encrypt makes the machine do, at the very least: the generator
sends a request over TLS; the front's aiohttp server takes it and, within its budget, POSTs
over a kept-alive mTLS connection with its aiohttp client to the EKM's aiohttp server; the EKM
answers; the front answers. This script builds exactly that and nothing more, from the same
parts and settings the project uses (``shared.tls`` contexts, ``shared.serving.serve_app``,
the XKS client's session settings and 250 ms budget), as two throw-away processes:

- ``edge``: ``GET /health`` answers ``ok``; ``POST /relay`` reads the body, POSTs an XKS
  Encrypt body of the real size to ``ekm`` with the real header set (a fixed, unchecked
  ``Authorization``) and returns what ``ekm`` answered;
- ``ekm``: requires a client certificate; ``POST`` anywhere reads the body and returns an XKS
  Encrypt answer of the real size.

No signing, no verification, no JSON, no crypto, no audit, no logging. Whatever the project's
code does, an external Encrypt here cannot cost less than this relay, so its closed-loop
figure is an upper bound of what the front and the EKM simulator can reach on this machine,
and its p99 at a fixed rate a lower bound of theirs. It answers whether a target is out of
reach on this box whatever the code (BENCHMARKS.md, run I).

In each repetition (``--runs``, medians reported), after waiting for an idle machine:
``health`` (``GET /health`` on ``edge``: a bare aiohttp answer, cheaper than the front's
``/health``, which runs the front's middleware, so ratios to the two ceilings do not
compare across the two scripts), ``relay``
(closed loop) and ``relay@N`` for every ``--rate`` N (open loop, latency from each request's
scheduled time). CPU per answered request is reported for the generator, ``edge`` and ``ekm``.

Certificates are made afresh with trustme in a temporary directory, which is removed at the
end; the servers listen on 127.0.0.1 only and are stopped (SIGTERM, then SIGKILL) on every
exit path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import loadgen

HOST: Final = loadgen.HOST
BUDGET_S: Final = 0.25  # the XKS client's default per-call budget
TARGET_RATE: Final = 1800.0
TARGET_P99_MS: Final = 50.0

# What crosses the wire in an external Encrypt of a 64-byte plaintext, by size: the XKS
# request body (request metadata, plaintext, AAD, CDIV asked for) and its answer.
XKS_REQUEST: Final = json.dumps({
    "requestMetadata": {
        "awsPrincipalArn": "acs:ram::1234567890123456:user/relay-floor",
        "kmsKeyArn": "acs:kms:cn-hangzhou:1234567890123456:key/key-hzz6a1b2c3d4e5f6g7h8i9",
        "kmsOperation": "Encrypt", "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae"},
    "plaintext": "A" * 88, "additionalAuthenticatedData": "B" * 44,
    "encryptionAlgorithm": "AES_GCM", "ciphertextDataIntegrityValueAlgorithm": "SHA_256",
}).encode()
XKS_ANSWER: Final = json.dumps({
    "authenticationTag": "C" * 24, "ciphertext": "D" * 88,
    "ciphertextDataIntegrityValue": "E" * 44, "ciphertextMetadata": "F" * 8,
    "initializationVector": "G" * 16}).encode()
XKS_HEADERS: Final = {
    "Content-Type": "application/json",
    "X-Amz-Date": "20261201T120000Z",
    "Authorization": ("AWS4-HMAC-SHA256 Credential=AKIA4GBY3I6JCE5M2HPM/20261201/us-east-1/"
                      "kms-xks-proxy/aws4_request, SignedHeaders=content-type;host;"
                      "x-amz-date, Signature=" + "0" * 64),
}


# -- the two servers (run as ``relay_floor.py --serve edge|ekm``) ----------------------------


def _serve(args: argparse.Namespace) -> None:
    """One server process until SIGTERM (imports the project only here)."""
    import aiohttp
    from aiohttp import web

    from shared.serving import run_loop, serve_app
    from shared.tls import client_context, server_context

    certs = Path(args.certs)

    def unparsable(status: int) -> web.Response:
        return web.Response(status=status)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=XKS_ANSWER, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        if args.serve == "ekm":
            app.router.add_post("/{tail:.*}", answer)
            ssl_context = server_context(cert=certs / "server.pem", key=certs / "server.key",
                                         client_ca=certs / "ca.pem", require_client_cert=True)
        else:
            # The XKS client's session (kms_proxy/backends/xks_client.py), less its
            # pooled-connection marking and answer cap.
            connector = aiohttp.TCPConnector(
                ssl=client_context(ca=certs / "ca.pem", cert=certs / "client.pem",
                                   key=certs / "client.key"),
                limit=64, limit_per_host=64, keepalive_timeout=30.0)
            session = aiohttp.ClientSession(
                connector=connector, trust_env=False, raise_for_status=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_read=None,
                                              sock_connect=None),
                auto_decompress=False, skip_auto_headers=("Accept-Encoding",))
            url = f"https://{HOST}:{args.upstream_port}/kms/xks/v1/keys/floor/encrypt"
            headers = {**XKS_HEADERS, "Host": f"{HOST}:{args.upstream_port}"}

            async def relay(request: web.Request) -> web.Response:
                await request.read()
                async with asyncio.timeout(BUDGET_S):
                    async with session.post(url, data=XKS_REQUEST, headers=headers) as resp:
                        body = await resp.read()
                return web.Response(body=body, status=resp.status,
                                    content_type="application/json")

            async def close_session(app: web.Application) -> None:
                await session.close()

            app.router.add_get("/health", health)
            app.router.add_post("/relay", relay)
            app.on_cleanup.append(close_session)
            ssl_context = server_context(cert=certs / "server.pem", key=certs / "server.key")
        # With several processes per role, the first takes a free port and the others
        # join it (SO_REUSEPORT: the kernel spreads connections over them).
        await serve_app(app, name=f"relay-floor {args.serve}", host=HOST, port=args.port,
                        ssl_context=ssl_context, unparsable=unparsable,
                        port_file=Path(args.port_file), reuse_port=True)

    run_loop(main(), event_loop=args.server_loop)


# -- the driver ------------------------------------------------------------------------------


def _make_certs(directory: Path) -> None:
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server = ca.issue_cert(HOST, "localhost")
    server.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    server.private_key_pem.write_to_path(str(directory / "server.key"))
    client = ca.issue_cert("relay-floor-client")
    client.cert_chain_pems[0].write_to_path(str(directory / "client.pem"))
    client.private_key_pem.write_to_path(str(directory / "client.key"))


class Servers(contextlib.AbstractContextManager["Servers"]):
    """The ``ekm`` and ``edge`` processes (each role on one port) in a fresh temporary
    directory."""

    def __init__(self, server_loop: str, *, edge_procs: int = 1, ekm_procs: int = 1) -> None:
        self.server_loop = server_loop
        self.counts = {"ekm": ekm_procs, "edge": edge_procs}
        self.workdir = Path(tempfile.mkdtemp(prefix="relay-floor-"))
        self.processes: dict[str, list[subprocess.Popen[bytes]]] = {"ekm": [], "edge": []}
        self.ports: dict[str, int] = {}

    def _start(self, role: str, index: int, *extra: str) -> None:
        port_file = self.workdir / f"{role}{index}.port"
        log_path = self.workdir / f"{role}{index}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, __file__, "--serve", role, "--certs", str(self.workdir),
                 "--port-file", str(port_file), "--server-loop", self.server_loop,
                 "--port", str(self.ports.get(role, 0)), *extra],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                    p for p in (str(Path(__file__).resolve().parents[1]),
                                os.environ.get("PYTHONPATH", "")) if p)})
        self.processes[role].append(process)
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"relay-floor {role} did not start: "
                                   f"{loadgen.log_tail(log_path, 20)}")
            time.sleep(0.05)
        self.ports[role] = int(port_file.read_text())

    def __enter__(self) -> Servers:
        try:
            _make_certs(self.workdir)
            for i in range(self.counts["ekm"]):
                self._start("ekm", i)
            for i in range(self.counts["edge"]):
                self._start("edge", i, "--upstream-port", str(self.ports["ekm"]))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def pids(self, role: str) -> list[int]:
        return [p.pid for p in self.processes[role]]

    def __exit__(self, *exc: object) -> None:
        every = [p for processes in self.processes.values() for p in processes]
        for process in every:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in every:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def alive(self) -> bool:
        return all(p.poll() is None for processes in self.processes.values()
                   for p in processes)

    def target(self) -> loadgen.Target:
        return loadgen.Target(port=self.ports["edge"], ca=str(self.workdir / "ca.pem"))

    def relay_request(self) -> bytes:
        """A ``POST /relay`` the size of a signed OpenAPI Encrypt (headers and query)."""
        query = "KeyId=key-hzz6a1b2c3d4e5f6g7h8i9&Plaintext=" + "A" * 88
        head = "\r\n".join([
            f"POST /relay?{query} HTTP/1.1", f"Host: {HOST}:{self.ports['edge']}",
            "x-acs-action: Encrypt", "x-acs-version: 2016-01-20",
            "x-acs-date: 2026-12-01T12:00:00Z", "x-acs-signature-nonce: " + "0" * 32,
            "x-acs-content-sha256: " + "0" * 64,
            "Authorization: ACS3-HMAC-SHA256 Credential=LTAI5tFloorBenchmarkKey0,"
            "SignedHeaders=host;x-acs-action;x-acs-content-sha256;x-acs-date;"
            "x-acs-signature-nonce;x-acs-version,Signature=" + "0" * 64,
            "Content-Length: 0"])
        return (head + "\r\n\r\n").encode()


@dataclass(frozen=True, slots=True)
class RunResult(loadgen.Figures):
    gen_cpu_pct: float
    edge_cpu_pct: float
    ekm_cpu_pct: float
    machine_busy_pct: float
    other_cpu_pct: float
    steal_pct: float
    gen_us: float
    edge_us: float
    ekm_us: float
    lag_p99_ms: float | None
    window_s: float


def run_load(servers: Servers, request: bytes, rate: float,
             opts: loadgen.LoadOptions) -> RunResult:
    run = loadgen.run_load(servers.target(), loadgen.Workload(request=request, rate=rate), opts,
                           watch={"edge": servers.pids("edge"), "ekm": servers.pids("ekm")})
    if not servers.alive():
        raise RuntimeError("a relay-floor server died during the run")
    run.warn_errors()
    return RunResult(**run.figures(), **run.cpu_columns("edge", "ekm"),
                     lag_p99_ms=run.lag_p99_ms() if rate else None, window_s=run.window_s)


TABLE: Final = loadgen.Table(
    columns=(("ops/s", "ops_s", 8, 0), ("p50ms", "p50_ms", 7, 2), ("p90ms", "p90_ms", 7, 2),
             ("p99ms", "p99_ms", 8, 2), ("maxms", "max_ms", 8, 1), ("err", "errors", 5, 0),
             ("gen%", "gen_cpu_pct", 6, 0), ("edge%", "edge_cpu_pct", 6, 0),
             ("ekm%", "ekm_cpu_pct", 6, 0), ("other%", "other_cpu_pct", 7, 0),
             ("st%", "steal_pct", 5, 1), ("gen_us", "gen_us", 7, 0),
             ("edge_us", "edge_us", 8, 0), ("ekm_us", "ekm_us", 7, 0),
             ("lag99", "lag_p99_ms", 7, 2)),
    label_title="run", label_width=16)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--serve", choices=("edge", "ekm"), help=argparse.SUPPRESS)
    p.add_argument("--certs", help=argparse.SUPPRESS)
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    p.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--edge-procs", type=int, default=1,
                   help="relay front processes on one port (SO_REUSEPORT); default 1")
    p.add_argument("--ekm-procs", type=int, default=1,
                   help="relay EKM processes on one port (SO_REUSEPORT); default 1")
    p.add_argument("--server-loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="the two servers' event loop (both project servers can run either: "
                        "server.event_loop); default %(default)s, the projects' default")
    p.add_argument("--rate", default=f"{TARGET_RATE:g}",
                   help="comma-separated fixed rates (requests/s) for the open-loop relay "
                        "runs; 0 = none (default %(default)s, the external-key target)")
    loadgen.add_run_arguments(p)
    loadgen.add_generator_arguments(p)
    loadgen.add_quiet_arguments(p, noisy_retries=1)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.serve:
        _serve(args)
        return 0
    loadgen.check_load_arguments(args, p, max_run_seconds=120, why="a bounded load")
    try:
        rates = [float(r) for r in args.rate.split(",") if float(r) > 0]
    except ValueError:
        p.error("--rate must be comma-separated numbers")
    if any(r > 20_000 for r in rates):
        p.error("--rate must be at most 20000 (a bounded load on loopback)")
    loadgen.exit_on_sigterm()
    opts = loadgen.LoadOptions.from_args(args)
    print(f"relay_floor: {os.cpu_count()} CPUs, servers on {args.server_loop}, "
          f"{args.edge_procs} edge and {args.ekm_procs} ekm processes, "
          f"{loadgen.describe_load(args)}", flush=True)
    rows: dict[str, list[RunResult]] = {}
    if not (1 <= args.edge_procs <= 8 and 1 <= args.ekm_procs <= 8):
        p.error("--edge-procs and --ekm-procs must be 1 to 8")
    with Servers(args.server_loop, edge_procs=args.edge_procs,
                 ekm_procs=args.ekm_procs) as servers:
        health = loadgen.get_request("/health", f"{HOST}:{servers.ports['edge']}")
        relay = servers.relay_request()
        with contextlib.closing(loadgen.Session(servers.target(), timeout=5)) as check:
            status, body = check.exchange(relay)
            if status != 200 or body != XKS_ANSWER:
                raise RuntimeError(f"the relay answered {status} {body[:200]!r}")
        jobs = [("health", health, 0.0), ("relay", relay, 0.0),
                *((f"relay@{r:g}", relay, r) for r in rates)]
        print(TABLE.header(), flush=True)
        for i in range(args.runs):
            for label, request, rate in jobs:
                rows.setdefault(label, []).append(loadgen.measure_repeated(
                    functools.partial(run_load, servers, request, rate, opts),
                    label=f"{label} #{i + 1}", table=TABLE, opts=opts))
    print("\nmedians", flush=True)
    print(TABLE.header(), flush=True)
    summary: dict[str, Any] = {"benchmark": "relay_floor", "cpus": os.cpu_count(),
                               "runs": args.runs, "duration_s": args.duration, "results": {}}
    for label, results in rows.items():
        median = loadgen.medians(results)
        summary["results"][label] = median
        print(TABLE.row(label, median), flush=True)
    ceiling = summary["results"]["health"]["ops_s"]
    closed = summary["results"]["relay"]["ops_s"]
    print(f"\nrelay closed loop: {closed:.0f}/s = {closed / ceiling:.3f} x the /health ceiling "
          f"({ceiling:.0f}/s)", flush=True)
    for r in rates:
        p99 = summary["results"][f"relay@{r:g}"]["p99_ms"]
        verdict = "within" if p99 <= TARGET_P99_MS else "above"
        print(f"relay at {r:g}/s ({r / closed:.2f} x the closed loop): p99 {p99:.1f} ms, "
              f"{verdict} {TARGET_P99_MS:g} ms", flush=True)
    print(json.dumps(loadgen.rounded(summary), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
