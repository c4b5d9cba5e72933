"""Where sessions live: a small interface, and the in-memory store this release ships.

The interface is async and record-based (get / put / delete / expire / count, plus ping for
readiness) so a shared store (Redis, a later issue) can implement it by serialising records.
`MemoryStore` keeps records in a dict; an expired record is gone for `get` at once, and the
background sweeper (`expire`) reclaims its memory.

A record is small on purpose: one float32 row (state + last logits, see state.py) and a few
scalars in slots, so an idle session costs little more than its state. Its `owner` is the
tenant that made it, fixed for its life; the session manager checks it, not the store.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class SessionRecord:
    __slots__ = ("session_id", "model", "version", "position", "row", "created_at",
                 "last_used_at", "ttl_s", "last_start", "last_digest", "last_result", "owner")

    def __init__(self, session_id: str, model: str, version: int, row, ttl_s: float,
                 now: float | None = None, position: int = 0, owner: str | None = None) -> None:
        now = time.time() if now is None else now
        self.session_id = session_id
        self.owner = owner  # the tenant that made it (auth.py); None on a server without keys
        self.model = model
        self.version = version
        self.position = position  # steps (the byte LM: tokens) consumed so far
        self.row = row  # float32: state tensors, then the adapter's extras (state.py)
        self.created_at = now
        self.last_used_at = now
        self.ttl_s = ttl_s
        self.last_start: int = -1  # position before the last applied step (for retries)
        self.last_digest: bytes | None = None  # digest of that step's inputs
        self.last_result = None  # that step's result, where the row cannot recompute it

    @property
    def expires_at(self) -> float:
        return self.last_used_at + self.ttl_s

    def expired(self, now: float) -> bool:
        return now >= self.last_used_at + self.ttl_s


class SessionStore(Protocol):
    async def get(self, session_id: str) -> SessionRecord | None:
        """The live record, or None if it does not exist or has expired."""

    async def put(self, record: SessionRecord, *, create: bool = False) -> bool:
        """Write a record. create=True adds a new one; otherwise only a record that still
        exists is replaced (a session deleted meanwhile stays deleted). True if written."""

    async def delete(self, session_id: str) -> SessionRecord | None:
        """Remove a record; returns it, or None if there was none."""

    async def expire(self, now: float | None = None) -> list[SessionRecord]:
        """Remove every expired record; returns them."""

    async def count(self) -> int:
        """Records held (expired ones not yet swept included)."""

    async def ping(self) -> bool:
        """Whether the store is reachable."""

    async def close(self) -> None: ...


class MemoryStore:
    """Sessions in this process's memory."""

    SWEEP_CHUNK = 2000  # records checked between yields, so a big sweep never stalls the loop

    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}
        self._expired: list[SessionRecord] = []  # found expired by get, not yet reported

    async def get(self, session_id: str) -> SessionRecord | None:
        record = self._records.get(session_id)
        if record is not None and record.expired(time.time()):
            del self._records[session_id]
            self._expired.append(record)
            return None
        return record

    async def put(self, record: SessionRecord, *, create: bool = False) -> bool:
        exists = record.session_id in self._records
        if exists == create:  # creating over a live id, or updating a deleted session
            return False
        self._records[record.session_id] = record
        return True

    async def delete(self, session_id: str) -> SessionRecord | None:
        return self._records.pop(session_id, None)

    async def expire(self, now: float | None = None) -> list[SessionRecord]:
        now = time.time() if now is None else now
        removed, self._expired = self._expired, []
        ids = list(self._records)
        for start in range(0, len(ids), self.SWEEP_CHUNK):
            for session_id in ids[start: start + self.SWEEP_CHUNK]:
                record = self._records.get(session_id)
                if record is not None and record.expired(now):
                    del self._records[session_id]
                    removed.append(record)
            await asyncio.sleep(0)
        return removed

    async def count(self) -> int:
        return len(self._records)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._records.clear()


def open_store(url: str) -> SessionStore:
    if url.startswith("memory://"):
        return MemoryStore()
    raise ValueError(f"unsupported store_url {url!r}: this release supports memory://")
