"""Benchmark: Encrypt through the signed Alibaba KMS OpenAPI (ACS3-HMAC-SHA256) over TLS.

Not a test. It starts its own stack with ``kms-proxy dev up`` in a temporary work directory
(the EKM simulator and the front), drives the front from 127.0.0.1 only and always stops the
stack with ``kms-proxy dev down`` (and, if that fails, kills exactly the processes the stack
file names), also on errors and on SIGTERM / ^C.

What is measured, in every repetition (``--runs``, medians reported):

- ``health``: ``GET /health`` on the same front: TLS + aiohttp, no signature, no crypto. It
  is the ceiling every Encrypt figure is compared with (``xceil``). A shared VM's speed can
  drift within a minute, so with ``--bracket S`` (default 3 s; 0 = off) a short ``/health``
  window also runs right after each closed-loop kind, and ``xceil`` divides by the mean of
  the ceilings just before and just after it; ``drift`` is after / before (1.00 = steady);
- ``software``, ``hardware``, ``external``: ``Encrypt`` with a key created (through the
  official SDK) in the software instance, the hardware instance (``HsmInternal``, SoftHSM2)
  and the external instance (XKI to the EKM simulator: every Encrypt is an XKS call);
- with ``--rate N`` (default 1800, 0 = off): an open-loop run of ``--rate-kinds`` (default
  ``external``) at a fixed schedule of N requests/s, whose latency is counted from each
  request's *scheduled* time (no coordinated omission; ``lag99`` is how late requests left
  the generator because every connection was busy).
- with ``--rate-xceil F`` (comma-separated, default none): the same open loop at F times the
  ``/health`` ceiling measured last in the same repetition, so a VM whose speed drifts is
  loaded alike in every repetition. Run B's 1800/s was 0.084 x its ceiling. With
  ``--bracket``, the ceiling is measured after these runs too, and their ``xceil`` is the
  load they carried against the mean of the ceilings around them (``drift`` as above).
- every open-loop row also shows ``xcap``: its rate over the same kind's closed-loop figure
  in the same repetition. Run B's 1800/s was 0.85 of its external capacity; on this stack
  the external p99 stayed within 50 ms up to about 0.6 (BENCHMARKS.md, run F).

The server refuses a replayed ``x-acs-signature-nonce``, so a request cannot be replayed the
way ``benchmarks/xks_encrypt.py`` replays a SigV4 request. Signing inside the timed window
would load the generator instead, so every request is PRE-SIGNED before the window, each with
its own nonce (32 hex digits: a random per-process prefix and a counter), and each generator
process sends its own list once, never reusing a nonce. How many: ``--presign`` (all
processes); by default ``1.2 x (warm-up + duration) x`` the ``/health`` ops/s of the same
repetition (an upper bound of what Encrypt can reach on the same front), or exactly the
schedule in rate mode. Every row shows ``signed`` and ``used``; a process that runs out stops
(its window ends at its last answer) and the row says so.

The signer is written here, following the server's verifier (``kms_proxy/api/signing.py``) and
the SDK (``alibabacloud_openapi_util`` ``get_authorization``): ``POST /?KeyId=..&Plaintext=..``
with an empty body and the headers the SDK signs (host, x-acs-action, x-acs-version,
x-acs-date, x-acs-signature-nonce, x-acs-content-sha256). Before timing, a preflight checks
the signer against the SDK's own ``get_authorization``, sends 20 signed Encrypts (all must
answer 200 with a ``CiphertextBlob``), checks that a replayed nonce is refused and decrypts one
answer with the SDK.

The load generator is kept cheap: several processes (``--gen-procs``), each an event loop
(uvloop when installed) with keep-alive TLS connections (``--connections`` in all), one
request in flight per connection, raw HTTP/1.1 and minimal response parsing (status and
Content-Length); it and the measuring are ``benchmarks/loadgen.py``, shared with
``benchmarks/xks_encrypt.py``. Each row reports the generator's CPU (``getrusage`` of its
processes), the front's and the EKM simulator's (``/proc/<pid>/stat``) and the whole
machine's (``/proc/stat``); ``other%`` is CPU none of them used (other work on the box),
and ``st%`` the part of it that was the hypervisor's steal (this VM ready to run, and not
run: a shared VM's own stall, which lands on the latency tail). CPU is in % of one core
(this machine's 2 cores are 200%). The script waits for an idle machine before each run
and repeats a run that others disturbed (``?``, once by default).

Medians are taken over the runs that were not disturbed (over all runs if none was).

``--py-spy`` adds one profiled run per kind (and for the first ``--rate``) after the measured
ones (not in the medians):
``py-spy record -f raw`` on the front (one process; ``--py-spy-process ekm`` for the EKM
simulator) for the run's duration, summarised as the
top self-time frames, the most inclusive project frames, and every sample charged to its
nearest project frame. py-spy sees Python frames only: time in C code is charged to the
calling frame, and kernel time (``fsys%``: TCP over loopback, wake-ups) hardly shows.

Examples::

    .venv/bin/python benchmarks/kms_encrypt.py
    .venv/bin/python benchmarks/kms_encrypt.py --kinds external --rate 1800 --runs 5
    .venv/bin/python benchmarks/kms_encrypt.py --py-spy --runs 1
    .venv/bin/python benchmarks/kms_encrypt.py --rate 0 --plaintext-bytes 4096

The last line of output is a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import hmac
import importlib
import json
import math
import os
import re
import secrets
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Final
from urllib.parse import quote

import loadgen
from alibabacloud_kms20160120 import models as kms_models
from alibabacloud_kms20160120.client import Client as KmsClient
from alibabacloud_tea_openapi import models as open_api
from darabonba.runtime import RuntimeOptions
from loadgen import HOST

API_VERSION: Final = "2016-01-20"
ALGORITHM: Final = "ACS3-HMAC-SHA256"
# What the SDK signs for an RPC call with an empty body, sorted as the verifier wants them.
SIGNED_HEADERS: Final = ("host;x-acs-action;x-acs-content-sha256;x-acs-date;"
                         "x-acs-signature-nonce;x-acs-version")
EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()
# The front accepts an x-acs-date within 15 minutes of its clock; requests are signed just
# before their run, so a run (warm-up + duration) must stay well inside that.
MAX_RUN_SECONDS: Final = 600.0
# The verifier remembers nonces in a bounded cache (1 000 000 per 15 minutes by default).
SERVER_NONCE_CACHE: Final = 1_000_000
DEFAULT_PRESIGN: Final = 200_000
KINDS: Final = ("health", "software", "hardware", "external")
KEY_KINDS: Final = ("software", "hardware", "external")
TARGET_OPS: Final = {"software": 6000.0, "hardware": 4000.0, "external": 1800.0}
TARGET_RATE_P99_MS: Final = 50.0
XKS_BUDGET_MS: Final = 250.0
_TEXT: Final = string.ascii_letters + string.digits


# -- the stack ---------------------------------------------------------------------------


def _kms_proxy_command() -> list[str]:
    return loadgen.venv_command("kms-proxy", "kms_proxy.cli")


class StackDied(RuntimeError):
    """A stack process exited during a run."""


class Stack(contextlib.AbstractContextManager["Stack"]):
    """``kms-proxy dev up`` in a fresh temporary directory; ``dev down`` on exit, and a kill
    of exactly the processes it started if they are still there."""

    def __init__(self, *, ekm_request_log: str, keep_workdir: bool = False) -> None:
        self.ekm_request_log = ekm_request_log
        self.keep_workdir = keep_workdir
        self.workdir = Path(tempfile.mkdtemp(prefix="kms-bench-"))
        self.info: dict[str, Any] = {}
        self.front_pids: list[int] = []
        self.ekm_pids: list[int] = []

    def __enter__(self) -> Stack:
        # As the e2e tests do: the front must find its own token, not the caller's.
        env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
        if self.ekm_request_log == "off":
            env["EKM_SIM__SERVER__REQUEST_LOG"] = "off"
        try:
            loadgen.dev_up("kms-proxy", _kms_proxy_command(), self.workdir, env=env,
                           timeout=180)
            self.info = json.loads((self.workdir / "stack.json").read_text())
            host = self.info["kms"]["endpoint"].rsplit(":", 1)[0]
            if host != HOST or not self.info["ekm"]["url"].startswith(f"https://{HOST}:"):
                raise RuntimeError(f"refusing to load a non-local stack: {self.info['kms']}")
            front, ekm = int(self.info["pid"]), int(self.info["ekm"]["pid"])
            self.front_pids = [front, *loadgen.children(front)]
            self.ekm_pids = [ekm, *loadgen.children(ekm)]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _ours(self, pid: int) -> bool:
        return str(self.workdir).encode() in loadgen.cmdline(pid)

    def __exit__(self, *exc: object) -> None:
        loadgen.dev_down(_kms_proxy_command(), self.workdir, self.front_pids + self.ekm_pids,
                         self._ours, timeout=90, keep_workdir=self.keep_workdir)

    def alive(self) -> bool:
        return all(self._ours(p) for p in (self.front_pids[0], self.ekm_pids[0]))

    def log_tail(self, lines: int = 8) -> str:
        log = self.info.get("log")
        return loadgen.log_tail(Path(log), lines) if log else "(no log)"

    def target(self) -> loadgen.Target:
        return loadgen.Target(port=self.port, ca=self.ca)

    @property
    def host(self) -> str:
        return str(self.info["kms"]["endpoint"])

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def ca(self) -> str:
        return str(self.info["kms"]["ca"])

    def access_key(self) -> dict[str, str]:
        [key, *_] = [k for k in self.info["access_keys"]
                     if k["account_id"] == self.info["account_id"]]
        return dict(key)

    def sdk(self) -> Any:
        key = self.access_key()
        return KmsClient(open_api.Config(
            access_key_id=key["id"], access_key_secret=key["secret"], endpoint=self.host,
            protocol="https", ca=self.ca, region_id=self.info["region"]))


def create_keys(stack: Stack, kinds: Sequence[str]) -> dict[str, str]:
    """One AES-256 key per kind through the official SDK; returns kind -> KeyId."""
    sdk = stack.sdk()
    instances = stack.info["instances"]
    keys: dict[str, str] = {}
    for kind in kinds:
        if kind == "software":
            meta = sdk.create_key(kms_models.CreateKeyRequest(
                dkmsinstance_id=instances["software"])).body.key_metadata
            keys[kind], level = meta.key_id, meta.protection_level
        elif kind == "hardware":
            meta = sdk.create_key(kms_models.CreateKeyRequest(
                dkmsinstance_id=instances["hardware"],
                key_storage_mechanism="HsmInternal")).body.key_metadata
            keys[kind], level = meta.key_id, meta.protection_level
        elif kind == "external":
            # ExternalKeyId is this project's extension: the SDK's generic call (as the e2e
            # test tests/e2e/test_key_taxonomy.py does).
            params = open_api.Params(action="CreateKey", version=API_VERSION, protocol="HTTPS",
                                     pathname="/", method="POST", auth_type="AK", style="RPC",
                                     req_body_type="formData", body_type="json")
            created = sdk.call_api(params, open_api.OpenApiRequest(query={
                "DKMSInstanceId": instances["external"],
                "ExternalKeyId": stack.info["ekm"]["keys"]["default"]}),
                RuntimeOptions())["body"]["KeyMetadata"]
            keys[kind], level = str(created["KeyId"]), str(created["ProtectionLevel"])
        else:
            continue
        print(f"  {kind} key {keys[kind]} ({level}) in {instances[kind]}", flush=True)
    return keys


# -- the signer --------------------------------------------------------------------------


def _percent(value: str) -> str:
    """RFC 3986 encoding as the SDK signs values: only ``A-Za-z0-9-_.~`` stay."""
    return quote(value, safe="~")


def _acs_date() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True, slots=True)
class EncryptSigner:
    """Signs ``Encrypt`` requests for one key and plaintext, differing only in their nonce.

    The query is sent exactly as it is signed (``quote(value, safe='~')``, names sorted), so
    the canonical query the verifier rebuilds from it is the same string.
    """

    host: str
    access_key_id: str
    secret: str = field(repr=False)
    key_id: str
    plaintext: str

    def query(self) -> str:
        params = {"KeyId": self.key_id, "Plaintext": self.plaintext}
        return "&".join(f"{name}={_percent(params[name])}" for name in sorted(params))

    def headers(self, nonce: str, date: str) -> dict[str, str]:
        """The signed headers, by their lower-case names."""
        return {"host": self.host, "x-acs-action": "Encrypt",
                "x-acs-content-sha256": EMPTY_SHA256, "x-acs-date": date,
                "x-acs-signature-nonce": nonce, "x-acs-version": API_VERSION}

    def _parts(self, date: str) -> tuple[str, str, str, str, str]:
        """Constant pieces around the nonce: canonical request and HTTP request."""
        query = self.query()
        canonical_head = (f"POST\n/\n{query}\nhost:{self.host}\nx-acs-action:Encrypt\n"
                          f"x-acs-content-sha256:{EMPTY_SHA256}\nx-acs-date:{date}\n"
                          "x-acs-signature-nonce:")
        canonical_tail = f"\nx-acs-version:{API_VERSION}\n\n{SIGNED_HEADERS}\n{EMPTY_SHA256}"
        http_head = (f"POST /?{query} HTTP/1.1\r\nHost: {self.host}\r\n"
                     f"x-acs-action: Encrypt\r\nx-acs-version: {API_VERSION}\r\n"
                     f"x-acs-date: {date}\r\nx-acs-content-sha256: {EMPTY_SHA256}\r\n"
                     "x-acs-signature-nonce: ")
        http_mid = (f"\r\nAuthorization: {ALGORITHM} Credential={self.access_key_id},"
                    f"SignedHeaders={SIGNED_HEADERS},Signature=")
        http_tail = "\r\nContent-Length: 0\r\n\r\n"
        return canonical_head, canonical_tail, http_head, http_mid, http_tail

    def signature(self, nonce: str, date: str) -> str:
        canonical_head, canonical_tail, *_ = self._parts(date)
        return self._sign(canonical_head + nonce + canonical_tail)

    def _sign(self, canonical_request: str) -> str:
        digest = hashlib.sha256(canonical_request.encode()).hexdigest()
        return hmac.digest(self.secret.encode(), f"{ALGORITHM}\n{digest}".encode(),
                           "sha256").hex()

    def presign(self, count: int, *, nonce_prefix: str, date: str | None = None
                ) -> list[bytes]:
        """``count`` requests with the nonces ``nonce_prefix + 16 hex digits of a counter``."""
        date = date or _acs_date()
        canonical_head, canonical_tail, http_head, http_mid, http_tail = self._parts(date)
        secret = self.secret.encode()
        prefix = f"{ALGORITHM}\n".encode()
        sha256, digest = hashlib.sha256, hmac.digest
        out: list[bytes] = []
        for i in range(count):
            nonce = f"{nonce_prefix}{i:016x}"
            hashed = sha256(f"{canonical_head}{nonce}{canonical_tail}".encode()).hexdigest()
            signature = digest(secret, prefix + hashed.encode(), "sha256").hex()
            out.append(f"{http_head}{nonce}{http_mid}{signature}{http_tail}".encode())
        return out


def sdk_agrees(signer: EncryptSigner) -> bool | None:
    """Whether the SDK's own ``get_authorization`` computes the same signature (``None`` if
    the SDK helper is not importable)."""
    try:
        util = importlib.import_module("alibabacloud_openapi_util.client")
    except ImportError:
        return None
    nonce, date = secrets.token_hex(16), _acs_date()
    request = SimpleNamespace(pathname="/", method="POST",
                              query={"KeyId": signer.key_id, "Plaintext": signer.plaintext},
                              headers=signer.headers(nonce, date))
    theirs = util.Client.get_authorization(request, ALGORITHM, EMPTY_SHA256,
                                           signer.access_key_id, signer.secret)
    ours = (f"{ALGORITHM} Credential={signer.access_key_id},SignedHeaders={SIGNED_HEADERS},"
            f"Signature={signer.signature(nonce, date)}")
    return bool(theirs == ours)


def health_request(host: str) -> bytes:
    return loadgen.get_request("/health", host)


def preflight(stack: Stack, signer: EncryptSigner, count: int = 20) -> str:
    """Check the signer and the server before timing; return a one-line verdict.

    :raises RuntimeError: if the SDK signs differently or the server refuses a request.
    """
    agrees = sdk_agrees(signer)
    if agrees is False:
        raise RuntimeError("this signer and the SDK's get_authorization disagree")
    requests = signer.presign(count, nonce_prefix=secrets.token_hex(8))
    session = loadgen.Session(stack.target(), timeout=30)
    blobs = []
    try:
        for request in requests:
            status, body = session.exchange(request)
            answer = json.loads(body) if body.startswith(b"{") else {}
            if status != 200 or not answer.get("CiphertextBlob"):
                raise RuntimeError(f"preflight Encrypt answered {status} {body[:300]!r}")
            blobs.append(answer["CiphertextBlob"])
        status, body = session.exchange(requests[0])
        replay = (str(json.loads(body).get("Code")) if body.startswith(b"{")
                  else body[:80].decode(errors="replace"))
    finally:
        session.close()
    if status == 200:
        print("  ! the server ACCEPTED a replayed nonce", file=sys.stderr, flush=True)
    plaintext = stack.sdk().decrypt(kms_models.DecryptRequest(ciphertext_blob=blobs[0])
                                    ).body.plaintext
    if plaintext != signer.plaintext:
        raise RuntimeError("the SDK's Decrypt of a preflight ciphertext differs")
    sdk = {True: "= SDK get_authorization", None: "SDK helper missing"}[agrees]
    return (f"signer {sdk}; {count}/{count} signed Encrypts 200 with CiphertextBlob; "
            f"replayed nonce -> {status} {replay}; SDK Decrypt round trip ok")


# -- one run -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadOptions(loadgen.LoadOptions):
    presign: int  # 0 = automatic


@dataclass(frozen=True, slots=True)
class Job:
    kind: str  # "health" or a key kind
    request: bytes | None  # replayed (health)
    signer: EncryptSigner | None  # pre-signed (Encrypt)
    rate: float = 0.0  # 0 = closed loop
    # Open loop at this fraction of the repetition's latest /health ceiling (sets ``rate``).
    rate_xceil: float = 0.0

    @property
    def label(self) -> str:
        if self.rate_xceil:
            return f"{self.kind}@x{self.rate_xceil:g}"
        return f"{self.kind}@{self.rate:g}" if self.rate else self.kind

    def workload(self, presign: int) -> loadgen.Workload:
        """What the generator sends: ``request`` replayed, or ``presign`` requests signed
        by each generator process (with its own random nonce prefix) before the run."""
        if self.signer is None:
            return loadgen.Workload(request=self.request, rate=self.rate)
        return loadgen.Workload(make=functools.partial(_presign, self.signer), count=presign,
                                rate=self.rate)


def _presign(signer: EncryptSigner, count: int) -> list[bytes]:
    return signer.presign(count, nonce_prefix=secrets.token_hex(8))


@dataclass(frozen=True, slots=True)
class RunResult(loadgen.Figures):
    gen_cpu_pct: float
    front_cpu_pct: float
    front_sys_pct: float  # the kernel's part of front_cpu_pct (TCP/TLS syscalls, wake-ups)
    ekm_cpu_pct: float
    machine_busy_pct: float
    other_cpu_pct: float  # machine CPU used by none of them: other work on the box
    steal_pct: float  # of that, the hypervisor's steal: this VM was ready and not run
    # CPU microseconds per answered request (of the generator, the front, the simulator).
    gen_us: float
    front_us: float
    ekm_us: float
    lag_p99_ms: float | None  # open loop: how late the 99th percentile left the generator
    signed: int
    used: int
    exhausted: bool
    sign_seconds: float
    window_s: float
    xceil: float | None = None  # ops_s / the /health ceiling around it (see --bracket)
    drift: float | None = None  # that ceiling just after the run / just before it
    # Open loop: ops_s / the same kind's closed-loop ops/s in the same repetition.
    xcap: float | None = None


class Profiler:
    """``py-spy record`` on the front for one run's measured window."""

    def __init__(self, pid: int, out: Path, seconds: float, rate: int, *,
                 nonblocking: bool) -> None:
        self.pid, self.out, self.seconds, self.rate = pid, out, seconds, rate
        self.nonblocking = nonblocking
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = Path(sys.executable).with_name("py-spy")
        command = [str(binary) if binary.exists() else "py-spy", "record", "-p", str(self.pid),
                   "-d", str(max(1, round(self.seconds))), "-r", str(self.rate), "-f", "raw",
                   "-o", str(self.out), *(["--nonblocking"] if self.nonblocking else [])]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)

    def wait(self) -> None:
        if self.process is None:
            return
        try:
            _, err = self.process.communicate(timeout=self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        if self.process.returncode != 0:
            print(f"  ! py-spy failed: {err.decode(errors='replace').strip()[-500:]}",
                  file=sys.stderr, flush=True)


def run_load(stack: Stack, job: Job, opts: LoadOptions, presign: int,
             profiler: Profiler | None = None) -> RunResult:
    """Drive ``job`` for warm-up + duration seconds and measure the duration part."""
    # Nothing here uses threads (the SDK is synchronous), so forking is safe; the generators
    # inherit the signer instead of having it pickled.
    try:
        run = loadgen.run_load(stack.target(), job.workload(presign), opts,
                               watch={"front": stack.front_pids, "ekm": stack.ekm_pids},
                               during=None if profiler is None else lambda _: profiler.start())
    finally:
        if profiler is not None:
            profiler.wait()
    if not stack.alive():
        raise StackDied(f"a stack process died during the run; the front's log ends:\n"
                        f"{stack.log_tail()}")
    run.warn_errors()
    if run.exhausted:
        print(f"  ! a generator used up its {'requests cap' if job.request else 'pre-signed'}"
              " requests before the end: the window ends at its last answer; raise "
              "--presign / --max-requests", file=sys.stderr, flush=True)
    return RunResult(
        **run.figures(), **run.cpu_columns("front", "ekm"),
        front_sys_pct=run.cpu_pct("front", system_only=True),
        lag_p99_ms=run.lag_p99_ms() if job.rate else None,
        signed=run.made, used=run.sent, exhausted=run.exhausted,
        sign_seconds=run.make_seconds, window_s=run.window_s)


# -- py-spy summary ------------------------------------------------------------------------

_FRAME: Final = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame_name(frame: str) -> str:
    """``function (file)`` without the line number, the file shortened to its package."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


# Leaf frames of threads blocked waiting for work, which py-spy still reports as active.
_IDLE_LEAVES: Final = frozenset({"_worker (concurrent/futures/thread.py)",
                                 "wait (threading.py)"})
_ENTRY_FILES: Final = ("kms_proxy/cli.py", "kms_proxy/server.py", "ekm_sim/cli.py",
                       "ekm_sim/server.py", "shared/serving.py")


def _project(name: str) -> bool:
    return ("kms_proxy/" in name or "ekm_sim/" in name or "shared/" in name) and not any(
        entry in name for entry in _ENTRY_FILES)


def summarise_profile(path: Path, *, seconds: float, rate: int, top: int = 12
                      ) -> dict[str, Any]:
    """A py-spy raw file summarised: the top self-time frames, the most inclusive project
    frames, and each sample charged to its nearest project frame (``owner``; samples with
    none, e.g. aiohttp writing a response or the TLS transport, to the leaf's file)."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    owners: Counter[str] = Counter()
    total = idle = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if frames[-1] in _IDLE_LEAVES:  # A worker thread waiting for work, not running.
            idle += count
            continue
        total += count
        self_time[frames[-1]] += count
        for name in set(frames):
            if _project(name):
                inclusive[name] += count
        owner = next((f for f in reversed(frames) if _project(f)), None)
        if owner is None:
            leaf = frames[-1]
            owner = "(no project frame) " + (leaf[leaf.rfind("(") + 1:-1] or leaf)
        owners[owner] += count
    if not total:
        return {}

    def shares(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "idle_thread_samples": idle,
        # Samples kept over the samples the window allows. py-spy skips idle threads and
        # samples it could not read, so this is not the front's CPU share.
        "sampled_pct": 100 * total / max(1.0, seconds * rate),
        "top_self": shares(self_time),
        "top_inclusive": shares(inclusive),
        "top_owner": shares(owners),
    }


def _print_profile(label: str, summary: dict[str, Any]) -> None:
    if not summary:
        print(f"  py-spy {label}: no samples", flush=True)
        return
    print(f"\n  py-spy {label}: {summary['samples']} samples ({summary['sampled_pct']:.0f}% "
          "of the window's; shares below are of these samples)", flush=True)
    for title, key in (("top self time", "top_self"),
                       ("most inclusive project frames", "top_inclusive"),
                       ("charged to the nearest project frame", "top_owner")):
        print(f"  {title}:")
        for name, pct in summary[key]:
            print(f"    {pct:5.1f}%  {name}")


# -- reporting -----------------------------------------------------------------------------


TABLE: Final = loadgen.Table(
    columns=(
        ("ops/s", "ops_s", 8, 0), ("p50ms", "p50_ms", 8, 2), ("p90ms", "p90_ms", 8, 2),
        ("p99ms", "p99_ms", 8, 2), ("maxms", "max_ms", 8, 1), ("err", "errors", 5, 0),
        ("gen%", "gen_cpu_pct", 6, 0), ("front%", "front_cpu_pct", 7, 0),
        ("fsys%", "front_sys_pct", 6, 0),
        ("ekm%", "ekm_cpu_pct", 6, 0), ("other%", "other_cpu_pct", 7, 0),
        ("st%", "steal_pct", 5, 1),
        ("gen_us", "gen_us", 7, 0), ("front_us", "front_us", 9, 0), ("ekm_us", "ekm_us", 7, 0),
        ("lag99", "lag_p99_ms", 8, 2), ("xceil", "xceil", 6, 2), ("drift", "drift", 6, 2),
        ("xcap", "xcap", 5, 2),
        ("signed", "signed", 8, 0),
        ("used", "used", 8, 0)),
    label_title="kind run", label_width=18, dash_if_zero=frozenset({"signed"}))


def median_result(all_runs: Sequence[RunResult]) -> dict[str, Any]:
    """The median of every metric, each taken on its own, over the runs other processes did
    not disturb (over all of them if every run was disturbed)."""
    if not all_runs:
        return {}
    runs = [r for r in all_runs if not loadgen.noisy(r)] or list(all_runs)
    out = loadgen.medians(runs)
    out["exhausted"] = any(r.exhausted for r in runs)
    out["runs"] = len(runs)
    out["noisy_runs"] = sum(loadgen.noisy(r) for r in all_runs)
    return out


# -- main ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"comma-separated subset of {','.join(KINDS)} (default all)")
    loadgen.add_run_arguments(p)
    p.add_argument("--presign", type=int, default=0,
                   help="pre-signed Encrypts per run, all processes (default: 1.2 x run "
                        f"seconds x the /health ops/s of the repetition, else {DEFAULT_PRESIGN})")
    p.add_argument("--plaintext-bytes", type=int, default=64,
                   help="Plaintext length (ASCII letters and digits)")
    loadgen.add_generator_arguments(p)
    p.add_argument("--rate", default=f"{TARGET_OPS['external']:g}",
                   help="open-loop runs at these ops/s on a fixed schedule, comma-separated "
                        "(default %(default)s; 0 = none)")
    p.add_argument("--bracket", type=float, default=3.0,
                   help="seconds of /health measured right after each closed-loop kind and "
                        "each --rate-xceil run, so xceil uses the ceiling around the run (0 = "
                        "only the one before)")
    p.add_argument("--rate-xceil", default="",
                   help="open-loop runs at these fractions of the same repetition's /health "
                        "ceiling, comma-separated (needs health in --kinds; default none)")
    p.add_argument("--rate-kinds", default="external",
                   help="comma-separated key kinds to run at --rate (default external)")
    p.add_argument("--ekm-request-log", choices=("dev", "off"), default="dev",
                   help="the EKM simulator's per-request log: as dev up configures it (a "
                        "file, default) or off")
    p.add_argument("--py-spy", action="store_true",
                   help="one extra profiled run per kind with py-spy on the front")
    p.add_argument("--py-spy-process", choices=("front", "ekm"), default="front",
                   help="the process --py-spy samples: the front or the EKM simulator")
    p.add_argument("--py-spy-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--py-spy-nonblocking", action="store_true",
                   help="do not pause the front for each sample (less overhead, but stacks "
                        "read while it runs can be inconsistent)")
    loadgen.add_quiet_arguments(p, noisy_retries=1)
    p.add_argument("--keep-workdir", action="store_true")
    return p


def _check(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    kinds = [k for k in args.kinds.split(",") if k]
    rate_kinds = [k for k in args.rate_kinds.split(",") if k]
    if not kinds or any(k not in KINDS for k in kinds):
        p.error(f"--kinds must name some of {','.join(KINDS)}")
    if any(k not in KEY_KINDS for k in rate_kinds):
        p.error(f"--rate-kinds must name some of {','.join(KEY_KINDS)}")
    loadgen.check_load_arguments(
        args, p, max_run_seconds=MAX_RUN_SECONDS,
        why="requests are signed before the run and the front allows 15 minutes of skew")
    if args.presign < 0:
        p.error("--presign must be >= 0")
    if not 1 <= args.plaintext_bytes <= 6144:
        p.error("--plaintext-bytes must be 1-6144 (the API's limit is 6 KB)")
    try:
        rates = [float(r) for r in args.rate.split(",") if r.strip()]
    except ValueError:
        p.error("--rate must be numbers, comma-separated")
    if not 0 <= args.bracket <= 60:
        p.error("--bracket must be 0-60 seconds")
    if any(not 0 <= r <= 1e6 for r in rates) or args.py_spy_rate < 1:
        p.error("--rate must be 0-1e6 and --py-spy-rate >= 1")
    args.rates = [r for r in rates if r > 0]
    try:
        args.rate_xceils = [float(r) for r in args.rate_xceil.split(",") if r.strip()]
    except ValueError:
        p.error("--rate-xceil must be numbers, comma-separated")
    if any(not 0 < r <= 1 for r in args.rate_xceils):
        p.error("--rate-xceil fractions must be in (0, 1]")
    if args.rate_xceils and "health" not in kinds:
        p.error("--rate-xceil needs health in --kinds (the ceiling it is a fraction of)")
    args.kinds = kinds
    args.rate_kinds = ([k for k in rate_kinds if k in kinds]
                       if args.rates or args.rate_xceils else [])


def _presign_count(job: Job, opts: LoadOptions, ceiling: float | None) -> int:
    if job.signer is None:
        return 0
    seconds = opts.warmup + opts.duration
    if job.rate:  # The schedule is known: every slot once, and a little slack.
        wanted = math.ceil(job.rate * seconds * 1.01) + opts.gen_procs
    elif opts.presign:
        wanted = opts.presign
    elif ceiling:
        wanted = math.ceil(1.2 * seconds * ceiling)
    else:
        wanted = DEFAULT_PRESIGN
    return min(wanted, opts.max_requests + opts.gen_procs)


def measure_once(stack: Stack, job: Job, opts: LoadOptions, ceiling: float | None,
                 label: str, profiler: Profiler | None = None) -> RunResult:
    """One run, repeated while other processes disturb it (up to ``noisy_retries``)."""
    presign = _presign_count(job, opts, ceiling)

    def run() -> RunResult:
        result = run_load(stack, job, opts, presign, profiler)
        if ceiling and job.kind != "health" and not job.rate:
            result = replace(result, xceil=result.ops_s / ceiling)
        return result

    # A profiled run is not repeated: it is not in the medians.
    return loadgen.measure_repeated(run, label=label, table=TABLE, opts=opts,
                                    retry=profiler is None)


def _targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The project's targets against the medians: ops/s per key kind, and the external key's
    p99 at the target rate (an open-loop run at exactly that rate)."""
    out: dict[str, Any] = {}
    for kind, target in TARGET_OPS.items():
        got = results.get(kind, {}).get("ops_s")
        if got is not None:
            out[kind] = {"target_ops_s": target, "ops_s": got, "met": got >= target}
    rate = TARGET_OPS["external"]
    external_rate = results.get(f"external@{rate:g}")
    if external_rate:
        p99 = external_rate.get("p99_ms")
        achieved = external_rate.get("ops_s") or 0.0
        out["external_rate"] = {
            "rate": rate, "ops_s": achieved, "p99_ms": p99,
            "target_p99_ms": TARGET_RATE_P99_MS, "xks_budget_ms": XKS_BUDGET_MS,
            "within_xks_budget": p99 is not None and p99 <= XKS_BUDGET_MS,
            "met": bool(p99 is not None and p99 <= TARGET_RATE_P99_MS
                        and achieved >= 0.99 * rate and not external_rate.get("errors"))}
    return out


def bench(stack: Stack, args: argparse.Namespace, opts: LoadOptions) -> dict[str, Any]:
    print(f"\nstack {stack.workdir}: front pid {stack.front_pids} at {stack.host}, "
          f"EKM simulator pid {stack.ekm_pids}", flush=True)
    keys = create_keys(stack, [k for k in args.kinds if k in KEY_KINDS])
    access_key = stack.access_key()
    plaintext = "".join(secrets.choice(_TEXT) for _ in range(args.plaintext_bytes))
    jobs: list[Job] = []
    for kind in args.kinds:
        if kind == "health":
            jobs.append(Job(kind, health_request(stack.host), None))
            continue
        signer = EncryptSigner(host=stack.host, access_key_id=access_key["id"],
                               secret=access_key["secret"], key_id=keys[kind],
                               plaintext=plaintext)
        print(f"  preflight {kind}: {preflight(stack, signer)}", flush=True)
        jobs.append(Job(kind, None, signer))
    for kind in args.rate_kinds:
        rate_signer = next(j.signer for j in jobs if j.kind == kind)
        jobs.extend(Job(kind, None, rate_signer, rate=rate) for rate in args.rates)
        jobs.extend(Job(kind, None, rate_signer, rate_xceil=fraction)
                    for fraction in args.rate_xceils)

    print("\n" + TABLE.header(), flush=True)
    runs: dict[str, list[RunResult]] = {job.label: [] for job in jobs}
    noisy = 0
    total_sent = 0
    health_job = next((j for j in jobs if j.kind == "health"), None)
    bracket_opts = replace(opts, duration=args.bracket, warmup=min(opts.warmup, 1.0))
    for rep in range(args.runs):
        ceiling: float | None = None
        capacity: dict[str, float] = {}  # closed-loop ops/s per kind in this repetition
        for planned in jobs:
            job = planned
            if planned.rate_xceil:
                if not ceiling:
                    print(f"  {planned.label} {rep + 1}: no ceiling measured; skipped",
                          flush=True)
                    continue
                job = replace(planned, rate=round(planned.rate_xceil * ceiling))
                print(f"  {planned.label} {rep + 1}: {job.rate:g}/s ({planned.rate_xceil:g} x "
                      f"the latest ceiling, {ceiling:.0f}/s)", flush=True)
            try:
                result = measure_once(stack, job, opts, ceiling, f"{job.label} {rep + 1}")
                if (args.bracket and health_job is not None and ceiling
                        and job.kind != "health" and (not job.rate or planned.rate_xceil)):
                    # The ceiling again, right after: the mean of the two is what this
                    # run is compared with, and their ratio shows how much the VM drifted.
                    bracket = measure_once(stack, health_job, bracket_opts, None,
                                           f"  (health after {job.label} {rep + 1})")
                    if loadgen.noisy(bracket):
                        # A disturbed ceiling would skew the ratio: keep the one before.
                        print(f"  {job.label} {rep + 1}: the ceiling after it was disturbed; "
                              "xceil uses the one before only", flush=True)
                    else:
                        after = bracket.ops_s
                        result = replace(result, xceil=result.ops_s / ((ceiling + after) / 2),
                                         drift=after / ceiling)
                        print(f"  {job.label} {rep + 1}: xceil {result.xceil:.2f} against the "
                              f"ceiling around it ({ceiling:.0f}/s before, {after:.0f}/s "
                              f"after, drift {result.drift:.2f})", flush=True)
                        ceiling = after
            except StackDied as exc:
                print(f"  ! {exc}", file=sys.stderr, flush=True)
                return {"failed": str(exc), "results": {k: median_result(v)
                                                        for k, v in runs.items()}}
            if job.rate and job.kind in capacity:
                result = replace(result, xcap=result.ops_s / capacity[job.kind])
                print(f"  {job.label} {rep + 1}: xcap {result.xcap:.2f} ({result.ops_s:.0f}/s "
                      f"over the closed loop's {capacity[job.kind]:.0f}/s)", flush=True)
            elif not job.rate and job.kind != "health":
                capacity[job.kind] = result.ops_s
            runs[planned.label].append(result)
            noisy += loadgen.noisy(result)
            total_sent += result.used if job.signer else 0
            if job.kind == "health":
                ceiling = result.ops_s
        if total_sent > 0.8 * SERVER_NONCE_CACHE:
            print(f"  ! {total_sent} signed requests so far: the front's nonce cache "
                  f"({SERVER_NONCE_CACHE}) starts refusing the oldest dates beyond it",
                  file=sys.stderr, flush=True)

    results = {label: median_result(rs) for label, rs in runs.items()}
    print("\nmedians over the undisturbed runs (each column on its own; \"?\" runs only if "
          "all were disturbed):")
    print(TABLE.header())
    for label, values in results.items():
        print(TABLE.row(f"{label} median", values), flush=True)

    profiles: dict[str, Any] = {}
    if args.py_spy:
        out_dir = Path(tempfile.mkdtemp(prefix="kms-bench-pyspy-"))
        pids = stack.front_pids if args.py_spy_process == "front" else stack.ekm_pids
        print(f"\nprofiled runs (py-spy on the {args.py_spy_process}, not in the medians; "
              f"raw files in {out_dir}):", flush=True)
        print(TABLE.header(), flush=True)
        ceiling = results.get("health", {}).get("ops_s")
        # Every closed-loop kind, and the open loop at the first --rate only.
        # (Not the --rate-xceil runs: their rate is set per repetition.)
        for job in (j for j in jobs if not j.rate_xceil
                    and (not j.rate or j.rate == args.rates[0])):
            raw = out_dir / f"{job.label.replace('@', '-at-')}.txt"
            profiler = Profiler(pids[0], raw, opts.duration, args.py_spy_rate,
                                nonblocking=args.py_spy_nonblocking)
            try:
                measure_once(stack, job, opts, ceiling, f"{job.label} prof", profiler)
            except StackDied as exc:
                print(f"  ! {exc}", file=sys.stderr, flush=True)
                break
            profiles[job.label] = summarise_profile(raw, seconds=opts.duration,
                                                    rate=args.py_spy_rate)
            _print_profile(job.label, profiles[job.label])
    return {"results": results, "profiles": profiles, "noisy_runs": noisy}


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check(args, p)

    loadgen.exit_on_sigterm()
    opts = LoadOptions.from_args(args, presign=args.presign)
    print(f"kms_encrypt: {os.cpu_count()} CPUs, kinds {','.join(args.kinds)}, plaintext "
          f"{args.plaintext_bytes} B, {loadgen.describe_load(args)}"
          + (f", open loop at {','.join(f'{r:g}' for r in args.rates)}/s for "
             f"{','.join(args.rate_kinds)}"
             if args.rate_kinds and args.rates else "")
          + (f", open loop at {','.join(f'{r:g}' for r in args.rate_xceils)} x the ceiling "
             f"for {','.join(args.rate_kinds)}"
             if args.rate_kinds and args.rate_xceils else ""), flush=True)
    summary: dict[str, Any] = {
        "benchmark": "kms_encrypt", "cpus": os.cpu_count(),
        "plaintext_bytes": args.plaintext_bytes, "gen_procs": args.gen_procs,
        "connections": args.connections, "gen_loop": args.gen_loop, "runs": args.runs,
        "duration_s": args.duration, "rates": args.rates if args.rate_kinds else [],
        "rate_xceils": args.rate_xceils if args.rate_kinds else [],
        "ekm_request_log": args.ekm_request_log}
    with Stack(ekm_request_log=args.ekm_request_log, keep_workdir=args.keep_workdir) as stack:
        summary.update(bench(stack, args, opts))
    summary["targets"] = _targets(summary.get("results", {}))
    if summary["targets"]:
        print("\ntargets: " + "; ".join(
            f"{k} {'met' if v['met'] else 'MISSED'} ("
            + (f"{v['ops_s']:.0f} vs {v['target_ops_s']:.0f} ops/s" if "target_ops_s" in v
               else f"p99 {v['p99_ms']:.1f} ms vs {v['target_p99_ms']:.0f} ms at "
                    f"{v['rate']:g}/s, achieved {v['ops_s']:.0f}/s") + ")"
            for k, v in summary["targets"].items()), flush=True)
    # The raw files are in the profile directory; keep the JSON line short.
    for profile in summary.get("profiles", {}).values():
        profile["top_self"] = profile.get("top_self", [])[:6]
        profile["top_inclusive"] = profile.get("top_inclusive", [])[:6]
        profile["top_owner"] = profile.get("top_owner", [])[:6]
    print(json.dumps(loadgen.rounded(summary), separators=(",", ":")))
    return 1 if "failed" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
