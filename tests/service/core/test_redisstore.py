"""The Redis store against the machine's real Redis (127.0.0.1:6379, database 12, flushed
before and after each test): two store objects on one database are two replicas.

Compare-and-set (exactly one of two racing writers applies; the loser gets the winner's
record back), stale cached rows never applied, leases (busy for others, fenced once lost,
expiring by themselves), the cap counted across replicas, expiry, one pipeline per
event-loop tick, a record of another model build refused, recovery from an emptied script
cache, and an unreachable Redis as StoreUnavailable."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import numpy as np
import pytest
import redis
from carousel.service import recordcodec
from carousel.service.errors import ModelMismatch, StoreUnavailable
from carousel.service.redisstore import RedisStore
from carousel.service.store import Change, SessionRecord, Status, StoreFull

DB = 12
URL = f"redis://127.0.0.1:6379/{DB}"
BUILDS = {("m", 1): "ab" * 32}


@pytest.fixture(autouse=True)
def clean_db():
    r = redis.Redis(host="127.0.0.1", port=6379, db=DB)
    r.flushdb()
    yield r
    r.flushdb()
    r.close()


def record(sid: str, ttl: float = 60.0, position: int = 0) -> SessionRecord:
    return SessionRecord(sid, "m", 1, np.arange(4, dtype=np.float32), ttl, position=position)


def change(rec: SessionRecord, value: float, n: int = 1) -> Change:
    return Change(np.full(4, value, dtype=np.float32), rec.position + n, rec.position,
                  b"d%d" % value, None, time.time())


def run(test, **kw):
    async def main():
        a = RedisStore(URL, builds=BUILDS, **kw)
        b = RedisStore(URL, builds=BUILDS, **kw)
        try:
            return await test(a, b)
        finally:
            await a.close()
            await b.close()

    return asyncio.run(main())


def test_two_writers_race_and_exactly_one_applies():
    async def test(a, b):
        assert await a.put(record("s"), create=True)
        ra, rb = await a.get("s"), await b.get("s")
        ca, cb = await asyncio.gather(a.commit(ra, change(ra, 1.0)), b.commit(rb, change(rb, 2.0)))
        statuses = sorted([ca.status.value, cb.status.value])
        assert statuses == ["applied", "conflict"]
        loser = cb if ca.status is Status.APPLIED else ca
        winner_value = 1.0 if ca.status is Status.APPLIED else 2.0
        # The loser gets the winner's record in the same reply: position and row applied once.
        assert loser.current.position == 1 and loser.current.last_start == 0
        assert loser.current.row.tolist() == [winner_value] * 4
        fresh = await RedisStore(URL, builds=BUILDS, cache_size=0).get("s")
        assert fresh.position == 1 and fresh.row.tolist() == [winner_value] * 4

    run(test)


def test_a_stale_cached_row_is_never_applied():
    async def test(a, b):
        await a.put(record("s"), create=True)
        ra = await a.get("s")
        await a.commit(ra, change(ra, 1.0))
        rb = await b.get("s")
        assert (await b.commit(rb, change(rb, 2.0))).status is Status.APPLIED
        stale = a.cached("s")
        assert stale is not None and stale.position == 1, "a holds its own last write"
        refused = await a.commit(stale, change(stale, 3.0))
        assert refused.status is Status.CONFLICT and refused.current.position == 2
        assert a.cached("s").position == 2, "the cache now holds what the store holds"
        # A validated read answers from the cache when it is current (no transfer) ...
        assert (await a.get("s")) is a.cached("s")
        stored = await RedisStore(URL, builds=BUILDS, cache_size=0).get("s")
        assert stored.row.tolist() == [2.0] * 4 and stored.position == 2

    run(test)


def test_a_lease_makes_others_busy_and_a_lost_lease_is_fenced():
    async def test(a, b):
        await a.put(record("s"), create=True)
        ra = await a.get("s")
        token = await a.lease(ra, 0.3)
        assert isinstance(token, int)
        rb = await b.get("s")
        busy = await b.commit(rb, change(rb, 9.0))
        assert busy.status is Status.BUSY and 0 < busy.retry_after <= 0.3
        assert (await b.lease(rb, 5.0)).status is Status.BUSY
        assert (await a.commit(ra, change(ra, 1.0), lease=token)).status is Status.APPLIED
        assert await a.renew({"s": token}, 0.3) == set()
        await asyncio.sleep(0.5)  # A "died": its lease ran out by itself
        assert await a.renew({"s": token}, 0.3) == {"s"}
        rb = await b.get("s")
        other = await b.lease(rb, 5.0)
        assert isinstance(other, int)
        fenced = await a.commit(ra, change(ra, 2.0), lease=token)
        assert fenced.status is Status.FENCED
        assert (await b.commit(rb, change(rb, 3.0), lease=other, release=True)).status \
            is Status.APPLIED
        assert (await a.get("s")).row.tolist() == [3.0] * 4
        ra = await a.get("s")
        assert (await a.commit(ra, change(ra, 4.0))).status is Status.APPLIED, "released"

    run(test)


def test_the_cap_counts_every_replicas_sessions():
    async def test(a, b):
        assert await a.put(record("1"), create=True, limit=3)
        assert await b.put(record("2"), create=True, limit=3)
        assert await a.put(record("3"), create=True, limit=3)
        with pytest.raises(StoreFull):
            await b.put(record("4"), create=True, limit=3)
        assert await a.count() == await b.count() == 3
        assert not await b.put(record("1"), create=True), "an id is never created twice"
        assert await b.delete("1") is not None and await a.count() == 2
        assert await b.put(record("4"), create=True, limit=3)

    run(test)


def test_expired_sessions_vanish_and_one_sweeper_counts_each():
    async def test(a, b):
        await a.put(record("short", ttl=0.2), create=True)
        await a.put(record("long", ttl=60), create=True)
        await asyncio.sleep(0.4)
        assert await b.get("short") is None and a.cached("short") is None
        assert await a.count() == 1
        swept = await a.expire() + await b.expire()
        assert [(e.session_id, e.model) for e in swept] == [("short", "m")]
        assert await a.get("long") is not None

    run(test)


def test_a_tick_of_calls_is_one_pipeline():
    async def test(a, b):
        for i in range(50):
            await a.put(record(f"s{i}"), create=True)
        sent = []
        real = b._execute

        async def counting(batch):
            sent.append(len(batch))
            return await real(batch)

        b._execute = counting
        records = await asyncio.gather(*(b.get(f"s{i}") for i in range(50)))
        assert sent == [50], sent
        commits = await asyncio.gather(*(b.commit(r, change(r, 1.0)) for r in records))
        # One round trip: each record's bytes staged by a SET, then one script for all 50.
        assert sent == [50, 51] and all(c.status is Status.APPLIED for c in commits)

    run(test)


def test_a_record_of_another_model_build_is_refused():
    async def test(a, b):
        await a.put(record("s"), create=True)
        other = RedisStore(URL, builds={("m", 1): "cd" * 32})
        try:
            with pytest.raises(ModelMismatch):
                await other.get("s")
        finally:
            await other.close()

    run(test)


def test_a_tensor_models_kept_result_survives_the_store():
    async def test(a, b):
        await a.put(record("s"), create=True)
        ra = await a.get("s")
        kept = {"y": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array([7], np.int64)}
        c = Change(ra.row, 2, 0, b"digest", kept, time.time())
        assert (await a.commit(ra, c)).status is Status.APPLIED
        rb = await b.get("s")
        assert rb.last_digest == b"digest" and rb.last_start == 0
        assert set(rb.last_result) == {"y", "n"}
        np.testing.assert_array_equal(rb.last_result["y"], kept["y"])
        assert rb.last_result["n"].dtype == np.int64

    run(test)


def test_an_emptied_script_cache_is_reloaded(clean_db):
    async def test(a, b):
        await a.put(record("s"), create=True)
        clean_db.script_flush()  # as after a Redis restart
        assert (await a.get("s")).position == 0

    run(test)


def test_an_unreachable_redis_is_store_unavailable():
    async def main():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # nothing listens here
        store = RedisStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
        try:
            assert not await store.ping()
            with pytest.raises(StoreUnavailable):
                await store.get("s")
            with pytest.raises(StoreUnavailable):
                await store.count()
        finally:
            await store.close()

    asyncio.run(main())


def test_records_round_trip_and_corrupt_bytes_are_refused():
    rec = record("s", position=5)
    rec.last_start, rec.last_digest, rec.owner = 3, b"\x01" * 16, None
    data = recordcodec.encode(rec, b"\x02" * 32, 77)
    back, sha = recordcodec.decode("s", data)
    assert sha == b"\x02" * 32 and back.revision == 77 and back.position == 5
    assert (back.last_start, back.last_digest, back.owner) == (3, b"\x01" * 16, None)
    assert back.row.tolist() == rec.row.tolist() and not back.row.flags.writeable
    assert data[:8] == recordcodec.revision_bytes(77), "scripts compare the first 8 bytes"
    for bad in (data[:-1], data + b"x", data[:8] + b"XXXX" + data[12:], b""):
        with pytest.raises(recordcodec.CorruptRecord):
            recordcodec.decode("s", bad)


def test_the_new_core_modules_import_nothing_from_fastapi():
    code = ("import carousel.service.redisstore, carousel.service.recordcodec, "
            "carousel.service.snapshot, carousel.service.portable\nimport sys\n"
            "print(' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert not {m for m in out if m.split(".")[0] in ("fastapi", "starlette")}
