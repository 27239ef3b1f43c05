"""The key registry: each key's lifecycle state, kept in one JSON file beside the token.

The XKS API has no key lifecycle, so the simulator keeps its own: which keys exist, whether
each is enabled, and which versions it has. Key material and usage flags live in the
PKCS#11 token (CKA_ENCRYPT/CKA_DECRYPT); the registry never holds material.

The CLI changes the file under an exclusive lock and replaces it atomically; a running
server notices the change within ``refresh_seconds`` without a restart.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

__all__ = ["KeyRecord", "KeyRegistry", "RegistryError"]

_FORMAT = 1


class RegistryError(Exception):
    """The registry file is unreadable, or a change to it is not allowed."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One key's lifecycle state. ``versions`` ascend; the newest encrypts."""

    key_id: str
    enabled: bool
    versions: tuple[int, ...]
    created: str

    @property
    def current_version(self) -> int:
        return self.versions[-1]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["versions"] = list(self.versions)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyRecord:
        """:raises RegistryError: if a field is missing or of the wrong type."""
        if not isinstance(data, dict):
            raise RegistryError("a key record must be an object")
        enabled, versions = data.get("enabled"), data.get("versions")
        if not isinstance(enabled, bool):
            raise RegistryError("enabled must be true or false")
        if (not isinstance(versions, list) or not versions
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                           for v in versions)
                or versions != sorted(set(versions))):
            raise RegistryError("versions must be a non-empty ascending list of integers")
        if not isinstance(data.get("key_id"), str) or not isinstance(data.get("created"), str):
            raise RegistryError("key_id and created must be strings")
        return cls(key_id=data["key_id"], enabled=enabled, versions=tuple(versions),
                   created=data["created"])


class KeyRegistry:
    """Read (with cheap change detection) and update the registry file."""

    def __init__(self, path: Path, *, refresh_seconds: float = 0.5) -> None:
        self.path = path
        self._refresh_seconds = refresh_seconds
        self._checked_at = float("-inf")
        self._stamp: tuple[int, int] | None = None
        self._records: dict[str, KeyRecord] = {}
        # The open lock file while this process holds the registry, and who holds it.
        self._held: IO[str] | None = None
        self._owner: tuple[int, int] | None = None

    def records(self) -> Mapping[str, KeyRecord]:
        """The current records; re-reads the file at most once per refresh interval."""
        now = time.monotonic()
        if now - self._checked_at >= self._refresh_seconds:
            self._checked_at = now
            self._reload_if_changed()
        return self._records

    def get(self, key_id: str) -> KeyRecord | None:
        return self.records().get(key_id)

    def reload(self) -> Mapping[str, KeyRecord]:
        """The records as the file holds them now, whatever the refresh interval (a
        ciphertext naming a version this process has not seen yet: another process may
        have just rotated). A stat per call; the file is read only if it changed."""
        self._checked_at = float("-inf")
        return self.records()

    def _lock_file(self) -> IO[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return open(self.path.with_suffix(self.path.suffix + ".lock"), "a+")

    def _current(self) -> dict[str, KeyRecord]:
        return _read(self.path) if self.path.exists() else {}

    @contextmanager
    def exclusive(self) -> Iterator[Mapping[str, KeyRecord]]:
        """Hold the registry against every other writer (process) for a change, blocking
        until it is free; re-entered by its holder (``edit`` inside ``changing``). Yields
        the records as they are now. Async callers use ``changing``."""
        if self._held is not None and self._owner == _caller():
            yield self._current()
            return
        with self._lock_file() as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._held, self._owner = lock, _caller()
            try:
                yield self._current()
            finally:
                self._held = self._owner = None

    @asynccontextmanager
    async def changing(self) -> AsyncIterator[Mapping[str, KeyRecord]]:
        """``exclusive`` for a whole change made by async code (read, change the token,
        then ``edit``): other tasks of this process wait their turn without blocking the
        event loop, and the file lock (other processes) is awaited off the loop.

        Without it two ``keys rotate`` could both pick version N+1 and make two token
        objects for it, which breaks the key."""
        async with _process_lock(self.path):
            with self._lock_file() as lock:
                await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
                self._held, self._owner = lock, _caller()
                try:
                    yield self._current()
                finally:
                    self._held = self._owner = None

    def _reload_if_changed(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._records, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            self._records = _read(self.path)
            self._stamp = stamp

    @contextmanager
    def edit(self) -> Iterator[dict[str, KeyRecord]]:
        """Lock the registry, yield its records to change in place, then write atomically.

        :raises RegistryError: if the file is unreadable.
        """
        with self.exclusive() as current:
            records = dict(current)
            yield records
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text(json.dumps({
                "format": _FORMAT,
                "keys": {k: r.to_json() for k, r in sorted(records.items())},
            }, indent=2) + "\n")
            os.replace(tmp, self.path)
        self._checked_at = float("-inf")

    def set_enabled(self, key_id: str, enabled: bool) -> KeyRecord:
        """:raises RegistryError: if the key does not exist."""
        with self.edit() as records:
            record = records.get(key_id)
            if record is None:
                raise RegistryError(f"no key {key_id!r}")
            records[key_id] = record = replace(record, enabled=enabled)
        return record


# One lock per registry file for the tasks of each event loop of this process
# (``changing``); the file lock alone would make a second task block the loop its holder
# needs. Per loop, as an asyncio.Lock belongs to one.
_PROCESS_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Path, asyncio.Lock]] = (
    weakref.WeakKeyDictionary())


def _process_lock(path: Path) -> asyncio.Lock:
    locks = _PROCESS_LOCKS.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(path.resolve(), asyncio.Lock())


def _caller() -> tuple[int, int]:
    """This thread and task: who may re-enter a held registry."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return threading.get_ident(), id(task) if task is not None else 0


def _read(path: Path) -> dict[str, KeyRecord]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read key registry {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise RegistryError(f"{path}: not a key registry of format {_FORMAT}")
    keys = data.get("keys")
    if not isinstance(keys, dict):
        raise RegistryError(f"{path}: keys must be an object")
    try:
        return {k: KeyRecord.from_json(v) for k, v in keys.items()}
    except RegistryError as exc:
        raise RegistryError(f"{path}: {exc}") from None
