"""The request nonces the front accepted, appended to files as they are accepted, so that a
restart, a crash too, cannot reopen the replay window.

A nonce must be refused for as long as its request's date passes the date check: up to
``window`` each side of the server clock, so an entry matters for at most two windows
after it arrived. The journal is cut into segments of one window each
(``<base>.<n>``, n = arrival time // window); a segment older than the two before the
current one holds nothing that matters and is removed. So the files never need rewriting.

Each accepted nonce is one ``os.write`` of one line (``<date µs> <JSON string>``) on a
descriptor opened with ``O_APPEND``: the kernel has it once the call returns, so it
survives the process's crash (a machine crash is out of scope: nothing is fsynced). A
torn last line, from a crash in the middle of a write, is skipped on reading.

Files are the process owner's only (0600, no symlinks followed); a segment that is not,
or that cannot be read, makes ``load`` report the journal as unusable, and the caller then
refuses every request dated before its start.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from pathlib import Path
from typing import Final

__all__ = ["NonceJournal"]

log = logging.getLogger("kms_proxy.nonces")

_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)


class NonceJournal:
    """Segments ``<base>.<n>`` of accepted ``(entry, date)`` pairs (dates in µs since the
    epoch, as ``NonceCache`` keeps them). Not thread-safe: one event loop writes."""

    def __init__(self, base: Path, *, window_us: int) -> None:
        self._base = base
        self._window_us = window_us
        self._segment: int | None = None
        self._fd: int | None = None

    def segments(self) -> list[tuple[int, Path]]:
        """The segment files present, oldest first."""
        found = []
        prefix = self._base.name + "."
        # By name, not glob: a database named "kms[1].db" holds glob syntax.
        for path in self._base.parent.iterdir():
            suffix = path.name[len(prefix):]
            if path.name.startswith(prefix) and suffix.isdigit():
                found.append((int(suffix), path))
        return sorted(found)

    def load(self) -> list[tuple[str, int]] | None:
        """Every entry the segments hold, in arrival order; None if there are no segments
        (nothing was ever journaled here) or one is not safe to trust (not a regular file
        owned by this user with mode 0600, or unreadable)."""
        segments = self.segments()
        if not segments:
            return None
        entries: list[tuple[str, int]] = []
        for _, path in segments:
            try:
                info = path.lstat()
                if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid()
                        or info.st_mode & 0o077):
                    log.warning("nonce journal %s is not a private file of this user", path)
                    return None
                lines = path.read_bytes().split(b"\n")
            except OSError as exc:
                log.warning("nonce journal %s is unreadable: %s", path, exc.strerror)
                return None
            for line in lines:
                date, _, entry = line.partition(b" ")
                try:
                    parsed = json.loads(entry)
                    if isinstance(parsed, str) and date.isdigit():
                        entries.append((parsed, int(date)))
                except ValueError:
                    continue  # The empty tail, or a line torn by a crash mid-write.
        return entries

    def create(self, now_us: int) -> None:
        """Make the current segment (empty) without writing to it: ``kms-proxy init`` marks
        a new database as one that has journaled everything it accepted (nothing)."""
        self._open(now_us // self._window_us)
        self.close()

    def append(self, entry: str, dated_us: int, now_us: int) -> None:
        """Journal one accepted nonce. :raises OSError: if it cannot be written (the caller
        must then not accept the request)."""
        segment = now_us // self._window_us
        if segment != self._segment:
            self._open(segment)
        assert self._fd is not None
        line = f"{dated_us} {json.dumps(entry)}\n".encode()
        written = os.write(self._fd, line)
        if written != len(line):
            # A full disk took part of it: take that part back (a torn line would also eat
            # the next one), and the request is not accepted.
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            raise OSError(errno.ENOSPC, "the nonce journal took only part of a line")

    def _open(self, segment: int) -> None:
        self.close()
        path = self._base.with_name(f"{self._base.name}.{segment}")
        fd = os.open(path, _FLAGS, 0o600)
        os.fchmod(fd, 0o600)  # It may have existed with another mode.
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.write(fd, b"\n")  # End a line torn by a crash, so the next one stands alone.
        self._fd, self._segment = fd, segment
        for number, old in self.segments():
            if number < segment - 2:
                old.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._segment = None
