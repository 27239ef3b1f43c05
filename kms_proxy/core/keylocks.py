"""One change at a time per key.

A change reads a key, may wait (an import unwraps material in a worker thread, a token
call may run in one), then saves a copy of what it read. Without a lock a change that
ran in that wait (ScheduleKeyDeletion, SetDeletionProtection, a description) was saved
over and lost, though both requests were told they succeeded. Reads (crypto, Describe)
take no lock.

The lock is re-entrant within a task: a change resolves its key, and resolving may
settle it (the end of a deletion window, a material expiry), which is itself a change.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

__all__ = ["KeyLocks"]


@dataclass(slots=True)
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    owner: asyncio.Task[object] | None = None
    users: int = 0  # Tasks holding or waiting; the entry goes when none is left.


class KeyLocks:
    """A lock per key id, made on first use and dropped when no task holds or awaits it."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @asynccontextmanager
    async def hold(self, key_id: str) -> AsyncIterator[None]:
        task = asyncio.current_task()
        entry = self._entries.get(key_id)
        if entry is not None and task is not None and entry.owner is task:
            yield  # Re-entered by the task that holds it.
            return
        if entry is None:
            entry = self._entries[key_id] = _Entry()
        entry.users += 1
        try:
            async with entry.lock:
                entry.owner = task
                try:
                    yield
                finally:
                    entry.owner = None
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[key_id]
