"""Tenants in the session manager (service/sessions.py): a session is its tenant's and no one
else's, the per-tenant caps on sessions and generations are counted right through every way
a session is made or removed, and tokens are spent only for work that runs.

The model here is a stand-in implementing just what the manager calls (a scheduler whose
state row is the count of steps consumed), so each test sees exactly what was applied."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from carousel.service.auth import Limits, Tenant
from carousel.service.errors import (
    AtCapacity,
    InvalidInput,
    PositionMismatch,
    QueueFull,
    RateLimited,
    TenantLimit,
    UnknownSession,
)
from carousel.service.sessions import SessionManager, Step
from carousel.service.store import MemoryStore


class Scheduler:
    """Consumes a step by adding its length to the row's one number."""

    def __init__(self) -> None:
        self.queued, self.max_queue = 0, 1000
        self.refuse = False
        self.delay = 0.0
        self.ran: list[int] = []
        self.streams: list[Stream] = []

    def check_room(self, items, tenant=None) -> None:
        if self.queued + items > self.max_queue:
            raise QueueFull("full", retry_after=1)

    async def run(self, key, inputs, length, row, options, tenant=None):
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.refuse:
            raise QueueFull("full", retry_after=1)
        self.ran.append(length)
        before = 0.0 if row is None else float(row[0])
        return SimpleNamespace(row=np.array([before + length], dtype=np.float32), result=length)

    def start_stream(self, stream) -> None:
        if self.refuse:
            raise QueueFull("full", retry_after=1)
        self.streams.append(stream)


class Stream:
    """A generation the test ends by hand (`produce`): a plain answer (no events), written
    back by its watcher (the manager's writer, writeback.py) before it ends."""

    streaming = False

    def __init__(self, record) -> None:
        self.row, self.position = record.row, record.position
        self.delivered = record.position
        self.cancelled = False
        self.finish_reason = None
        self.watcher = None
        self.done = asyncio.get_running_loop().create_future()

    def produce(self, n: int) -> None:
        self.row = np.array([float(self.row[0]) + n], dtype=np.float32)
        self.position += n
        self.finish_reason = "length"
        if self.watcher is not None:
            self.watcher.finish()
        else:
            self.end("length", self.position)

    def cancel(self) -> None:
        self.cancelled = True

    def end(self, reason: str, position: int) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Model:
    name, version = "m", 1

    def __init__(self) -> None:
        self.scheduler = Scheduler()
        self.layout = SimpleNamespace(initial_row=lambda: np.zeros(1, dtype=np.float32),
                                      extra_size=0)

    def get(self, name, version=None):  # the registry: one model
        return self


def step(n: int = 1) -> Step:
    return Step({}, n, None, digest=bytes([n]))


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def tenant(name: str, clock=None, **limits) -> Tenant:
    return Tenant(name, False, Limits(**limits), clock=clock or Clock())


def with_manager(test, **kw):
    async def main():
        model = Model()
        args = dict(session_ttl_s=60.0, max_session_ttl_s=120.0, max_sessions=100,
                    sweep_interval_s=5.0)
        args.update(kw)
        return await test(SessionManager(model, MemoryStore(), **args), model)

    return asyncio.run(main())


# ------------------------------------------------------------------- ownership


def test_another_tenants_session_does_not_exist_for_any_operation():
    alice, bob = tenant("alice"), tenant("bob")

    async def test(m, model):
        record, _ = await m.create(model, step=step(3), tenant=alice)
        sid = record.session_id
        assert record.owner == "alice"

        async def missing_message(call) -> str:
            with pytest.raises(UnknownSession) as e:
                await call()
            return e.value.message

        expected = (await missing_message(lambda: m.get("x" * len(sid), alice))).replace(
            "x" * len(sid), sid)
        for who in (bob, None):
            calls = [
                lambda who=who: m.get(sid, who),
                lambda who=who: m.step(sid, lambda mv: step(2), tenant=who),
                lambda who=who: m.step(sid, lambda mv: step(2), 3, tenant=who),
                lambda who=who: m.start_stream(sid, lambda mv, r: Stream(r), tenant=who),
                lambda who=who: m.fork(sid, tenant=who),
                lambda who=who: m.delete(sid, who),
            ]
            for call in calls:
                assert await missing_message(call) == expected  # the same as a missing id
        assert model.scheduler.ran == [3] and not model.scheduler.streams
        mine = await m.get(sid, alice)
        assert (mine.position, float(mine.row[0]), mine.owner) == (3, 3.0, "alice")
        assert await m.store.count() == 1

    with_manager(test)


def test_a_session_made_without_keys_is_no_tenants():
    async def test(m, model):
        record, _ = await m.create(model)
        assert record.owner is None
        with pytest.raises(UnknownSession):
            await m.get(record.session_id, tenant("alice"))
        assert (await m.get(record.session_id)).owner is None

    with_manager(test)


def test_a_fork_belongs_to_the_caller_and_a_named_session_to_its_maker():
    alice = tenant("alice")

    async def test(m, model):
        parent, _ = await m.create(model, step=step(2), tenant=alice)
        child = await m.fork(parent.session_id, tenant=alice)
        assert child.owner == "alice" and child.position == 2
        seq, _ = await m.create(model, step=step(1), session_id="seq-1", tenant=alice)
        assert seq.owner == "alice"
        with pytest.raises(Exception, match="exists already"):  # another's live name
            await m.create(model, step=step(1), session_id="seq-1", replace=True,
                           tenant=tenant("bob"))
        assert (await m.get("seq-1", alice)).position == 1

    with_manager(test)


# ------------------------------------------------------------------- session cap


def test_the_session_cap_counts_every_way_a_session_comes_and_goes():
    alice, bob = tenant("alice", max_sessions=2), tenant("bob", max_sessions=1)

    async def test(m, model):
        a, _ = await m.create(model, tenant=alice)
        b = await m.fork(a.session_id, tenant=alice)
        with pytest.raises(TenantLimit) as e:
            await m.create(model, tenant=alice)
        assert e.value.status == 429 and e.value.code == "tenant_limit"
        assert e.value.headers() == {"Retry-After": "5"}
        with pytest.raises(TenantLimit):
            await m.fork(a.session_id, tenant=alice)
        await m.create(model, tenant=bob)  # another tenant's cap is its own
        assert m.held(alice) == 2 and await m.store.count() == 3

        await m.delete(b.session_id, alice)  # deleted: a place is free
        seq, _ = await m.create(model, session_id="seq", tenant=alice)
        for _ in range(3):  # restarting a live sequence takes no more places
            await m.create(model, step=step(1), session_id="seq", replace=True, tenant=alice)
        assert m.held(alice) == 2
        with pytest.raises(TenantLimit):
            await m.create(model, tenant=alice)

        model.scheduler.refuse = True  # a priming that fails holds no place
        await m.delete("seq", alice)
        with pytest.raises(QueueFull):
            await m.create(model, step=step(1), tenant=alice)
        model.scheduler.refuse = False
        assert m.held(alice) == 1

        short, _ = await m.create(model, ttl_s=1, tenant=alice)  # expired and swept
        short.last_used_at -= 10
        assert await m.sweep() == 1 and m.held(alice) == 1
        await m.create(model, tenant=alice)
        assert m.held(alice) == 2 and m.held(bob) == 1

    with_manager(test)


def test_a_restored_session_is_the_importers_and_counts_toward_its_cap():
    alice, bob = tenant("alice", max_sessions=2), tenant("bob", max_sessions=2)
    row = np.array([7.0], dtype=np.float32)

    async def test(m, model):
        mine = await m.restore(model, row, 7, tenant=alice)  # whoever exported it
        assert mine.owner == "alice" and m.held(alice) == 1
        with pytest.raises(UnknownSession):
            await m.get(mine.session_id, bob)
        _, out = await m.step(mine.session_id, lambda mv: step(1), 7, tenant=alice)
        assert out.position == 8 and float(out.row[0]) == 8.0
        seq = await m.restore(model, row, 7, session_id="seq", tenant=alice)
        with pytest.raises(TenantLimit):
            await m.restore(model, row, 7, tenant=alice)
        with pytest.raises(InvalidInput):  # another tenant's id is not bob's to replace
            await m.restore(model, row, 7, session_id="seq", replace=True, tenant=bob)
        again = await m.restore(model, row, 3, session_id="seq", replace=True, tenant=alice)
        assert again is not seq and again.position == 3 and m.held(alice) == 2
        await m.delete("seq", alice)
        assert m.held(alice) == 1 and m.held(bob) == 0

    with_manager(test)


def test_a_generation_longer_than_the_ttl_keeps_its_session_and_its_retry():
    alice = tenant("alice")

    async def test(m, model):
        record, _ = await m.create(model, ttl_s=0.4, step=step(2), tenant=alice)
        stream = await m.start_stream(record.session_id, lambda mv, r: Stream(r), tenant=alice)
        await asyncio.sleep(1.2)  # three TTLs: the writer touched it every half TTL
        assert await m.sweep() == 0 and (await m.get(record.session_id, alice)).position == 2
        assert record.last_start == 0  # a touch writes nothing new: the retry still answers
        stream.produce(3)
        await m.wait_idle(timeout=5)
        assert (await m.get(record.session_id, alice)).position == 5
        await asyncio.sleep(0.5)  # idle from the final write on: it expires
        with pytest.raises(UnknownSession):
            await m.get(record.session_id, alice)

    with_manager(test)


def test_an_expired_session_not_yet_swept_is_reclaimed_when_the_cap_is_reached():
    alice = tenant("alice", max_sessions=1)

    async def test(m, model):
        old, _ = await m.create(model, ttl_s=1, tenant=alice)
        old.last_used_at -= 10  # expired; the sweeper has not run
        record, _ = await m.create(model, tenant=alice)
        assert m.held(alice) == 1 and await m.get(record.session_id, alice)

    with_manager(test)


def test_concurrent_creations_cannot_pass_the_cap_together():
    alice = tenant("alice", max_sessions=3)

    async def test(m, model):
        model.scheduler.delay = 0.01  # every priming awaits: all eight are in flight at once
        results = await asyncio.gather(
            *(m.create(model, step=step(1), tenant=alice) for _ in range(8)),
            return_exceptions=True)
        made = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, TenantLimit)]
        assert (len(made), len(refused)) == (3, 5)
        assert m.held(alice) == await m.store.count() == 3

    with_manager(test)


def test_the_servers_cap_still_comes_first():
    async def test(m, model):
        await m.create(model, tenant=tenant("alice", max_sessions=10))
        with pytest.raises(AtCapacity):
            await m.create(model, tenant=tenant("bob", max_sessions=10))

    with_manager(test, max_sessions=1)


# ------------------------------------------------------------------- generations


def test_the_generation_cap_counts_generations_from_start_to_write_back():
    alice, bob = tenant("alice", max_generations=1), tenant("bob", max_generations=1)

    async def test(m, model):
        a1, _ = await m.create(model, step=step(1), tenant=alice)
        a2, _ = await m.create(model, step=step(1), tenant=alice)
        b1, _ = await m.create(model, step=step(1), tenant=bob)
        first = await m.start_stream(a1.session_id, lambda mv, r: Stream(r), tenant=alice)
        with pytest.raises(TenantLimit) as e:
            await m.start_stream(a2.session_id, lambda mv, r: Stream(r), tenant=alice)
        assert e.value.headers() == {"Retry-After": "1"} and m.generating(alice) == 1
        await m.start_stream(b1.session_id, lambda mv, r: Stream(r), tenant=bob)
        # the refused one left its session unlocked and unchanged
        _, out = await m.step(a2.session_id, lambda mv: step(1), tenant=alice)
        assert out.position == 2

        first.produce(5)
        await m.wait_idle(timeout=5)
        assert m.generating(alice) == 0 and (await m.get(a1.session_id, alice)).position == 6
        model.scheduler.refuse = True  # one the scheduler refuses is not counted
        with pytest.raises(QueueFull):
            await m.start_stream(a2.session_id, lambda mv, r: Stream(r), tenant=alice)
        assert m.generating(alice) == 0
        model.scheduler.refuse = False
        await m.start_stream(a2.session_id, lambda mv, r: Stream(r), tenant=alice)
        assert m.generating(alice) == 1

    with_manager(test)


# ------------------------------------------------------------------- tokens


def test_tokens_are_spent_for_work_that_runs_and_only_for_it():
    clock = Clock()
    alice = tenant("alice", clock=clock, tokens_per_s=10, burst_tokens=10)

    async def test(m, model):
        record, _ = await m.create(model, step=step(4), tenant=alice)
        sid = record.session_id
        await m.step(sid, lambda mv: step(3), 4, tenant=alice)
        assert alice.tokens.level == pytest.approx(3)
        _, again = await m.step(sid, lambda mv: step(3), 4, tenant=alice)  # a retry: free
        assert again.replayed and alice.tokens.level == pytest.approx(3)
        with pytest.raises(PositionMismatch):  # refused before anything is spent
            await m.step(sid, lambda mv: step(1), 0, tenant=alice)
        with pytest.raises(RateLimited) as e:
            await m.step(sid, lambda mv: step(5), tenant=alice)
        assert e.value.retry_after == pytest.approx(0.2)
        assert record.position == 7 and float(record.row[0]) == 7.0  # nothing applied

        model.scheduler.refuse = True  # the queue refuses: the tokens come back
        with pytest.raises(QueueFull):
            await m.step(sid, lambda mv: step(2), tenant=alice)
        with pytest.raises(QueueFull):
            await m.predict(model, [step(1), step(1)], tenant=alice)
        model.scheduler.refuse = False
        assert alice.tokens.level == pytest.approx(3)
        await m.predict(model, [step(1), step(2)], tenant=alice)
        assert alice.tokens.level == pytest.approx(0)

        clock.now += 1  # full again: 10
        stream = await m.start_stream(sid, lambda mv, r: Stream(r), tenant=alice, budget=8)
        assert alice.tokens.level == pytest.approx(2)  # max_tokens is reserved...
        stream.produce(3)
        await m.wait_idle(timeout=5)
        assert alice.tokens.level == pytest.approx(7)  # ...and what was not generated returned
        with pytest.raises(RateLimited):
            await m.start_stream(sid, lambda mv, r: Stream(r), tenant=alice, budget=9)
        assert (await m.get(sid, alice)).position == 10

    with_manager(test)
