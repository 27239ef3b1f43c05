"""Garbage-collector pauses of the servers during a benchmark.

Python imports ``sitecustomize`` at start-up when it is on the path, so::

    PYTHONPATH=benchmarks/gcpauses .venv/bin/python benchmarks/kms_encrypt.py ...

makes every ``serve`` process (the KMS front, the EKM simulator) record how long each
collection took, by generation, and rewrite ``$GC_PAUSES_DIR/gc-<pid>.txt`` (default: the
temporary directory) every 500 collections and after each full one. Each full collection is
also listed with its time since start-up, so those of start-up (before the servers freeze
their heap) can be told from those under load. Other processes (the
load generator, which refuses to fork with threads, so none are used here) record nothing.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from typing import Any

_started: dict[int, float] = {}
_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
_seen = [0]
_full: list[tuple[float, float]] = []  # (seconds since start-up, pause seconds)
_origin = time.perf_counter()


def _write() -> None:
    command = " ".join(sys.argv)
    if "serve" not in command:
        return
    directory = os.environ.get("GC_PAUSES_DIR") or tempfile.gettempdir()
    path = os.path.join(directory, f"gc-{os.getpid()}.txt")
    with open(path, "w") as out:
        out.write(command + "\n")
        for generation, pauses in _pauses.items():
            if pauses:
                ordered = sorted(pauses)
                out.write(f"gen{generation}: n={len(ordered)} "
                          f"total={sum(ordered) * 1000:.1f}ms "
                          f"max={ordered[-1] * 1000:.2f}ms\n")
        out.write("full collections (s since start: ms): "
                  + ", ".join(f"{at:.1f}: {pause * 1000:.1f}" for at, pause in _full) + "\n")


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    generation = info["generation"]
    if phase == "start":
        _started[generation] = time.perf_counter()
        return
    now = time.perf_counter()
    _pauses[generation].append(now - _started.get(generation, now))
    if generation == 2:
        _full.append((now - _origin, _pauses[2][-1]))
    _seen[0] += 1
    if _seen[0] % 500 == 0 or generation == 2:
        _write()


gc.callbacks.append(_on_gc)
