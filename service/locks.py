"""Per-session ordering: one FIFO lock per session, alive only while it is held or awaited.

Steps of one session run one at a time in arrival order (asyncio.Lock wakes waiters first
come, first served). Idle sessions hold no lock object, so they cost no memory here.
`users(key)` counts the holder and the waiters, so a caller can bound the waiting: each
waiter is a request held in memory, and without a bound a client could park any number of
them on one session (sessions.py refuses past `max_waiting`).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class KeyedLocks:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    async def acquire(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        entry.users += 1
        try:
            await entry.lock.acquire()
        except BaseException:  # cancelled while waiting: leave no trace
            self._drop(key, entry)
            raise

    def users(self, key: str) -> int:
        """The holder and the waiters of `key`'s lock (0: free)."""
        entry = self._entries.get(key)
        return 0 if entry is None else entry.users

    def release(self, key: str) -> None:
        entry = self._entries[key]
        entry.lock.release()
        self._drop(key, entry)

    def _drop(self, key: str, entry: _Entry) -> None:
        entry.users -= 1
        if entry.users == 0:
            del self._entries[key]

    @asynccontextmanager
    async def hold(self, key: str):
        await self.acquire(key)
        try:
            yield
        finally:
            self.release(key)

    def __len__(self) -> int:
        return len(self._entries)
