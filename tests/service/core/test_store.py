"""The in-memory store behind the store interface."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from carousel.service.store import MemoryStore, SessionRecord


def record(sid: str, ttl: float = 60.0, now: float | None = None) -> SessionRecord:
    return SessionRecord(sid, "m", 1, np.zeros(4, dtype=np.float32), ttl, now=now)


def test_put_get_delete_count():
    async def main():
        s = MemoryStore()
        assert await s.put(record("a"), create=True)
        assert not await s.put(record("a"), create=True), "an id is never created twice"
        assert (await s.get("a")).session_id == "a" and await s.count() == 1
        assert (await s.delete("a")).session_id == "a"
        assert await s.get("a") is None and await s.delete("a") is None
        assert await s.count() == 0

    asyncio.run(main())


def test_update_of_a_deleted_session_does_not_bring_it_back():
    async def main():
        s = MemoryStore()
        r = record("a")
        await s.put(r, create=True)
        await s.delete("a")
        r.position = 5
        assert not await s.put(r)
        assert await s.get("a") is None

    asyncio.run(main())


def test_expired_sessions_are_gone_at_once_and_swept_later():
    async def main():
        s = MemoryStore()
        old = time.time() - 100
        await s.put(record("stale", ttl=10, now=old), create=True)
        await s.put(record("stale2", ttl=10, now=old), create=True)
        await s.put(record("fresh", ttl=10), create=True)
        assert await s.get("stale") is None  # expired: invisible even before a sweep
        removed = await s.expire()
        assert sorted(r.session_id for r in removed) == ["stale", "stale2"]
        assert await s.count() == 1 and (await s.get("fresh")) is not None

    asyncio.run(main())


def test_idle_ttl_counts_from_last_use():
    r = record("a", ttl=10, now=1000.0)
    assert r.expires_at == 1010.0 and not r.expired(1009.9) and r.expired(1010.0)
    r.last_used_at = 1005.0
    assert r.expires_at == 1015.0
