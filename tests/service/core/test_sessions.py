"""Sessions over the real scheduler and store with a fake engine: positions and retries,
rejected requests change nothing, per-session order, capacity, TTL, fork, generation."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from carousel.service.errors import (
    AtCapacity,
    EmptyInput,
    InferenceFailed,
    InvalidInput,
    PositionMismatch,
    TokenOutOfRange,
    UnknownModel,
    UnknownSession,
    UnknownVersion,
)
from carousel.service.registry import ModelVersion, Registry
from carousel.service.sampling import SamplingParams
from carousel.service.scheduler import Scheduler
from carousel.service.sessions import SessionManager
from carousel.service.store import MemoryStore
from core_fakes import FakeEngine, fake_manifest, greedy, reference_row

ATOL = 1e-4  # float32 state between calls against a float64 reference


def tok(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def with_manager(test, **kw):
    """Run `test(manager, engine)` on a fresh manager whose model 'fake' has versions 1, 2."""
    async def main():
        engine = FakeEngine()
        registry = Registry([ModelVersion(fake_manifest("fake", 1), engine),
                             ModelVersion(fake_manifest("fake", 2), FakeEngine())])
        registry.start(lambda mv: Scheduler(mv.engine, max_batch_delay_s=0.01))
        args = dict(session_ttl_s=60.0, max_session_ttl_s=120.0, max_sessions=100)
        args.update(kw)
        manager = SessionManager(registry, MemoryStore(), **args)
        try:
            return await test(manager, engine)
        finally:
            await registry.close()

    return asyncio.run(main())


def test_steps_carry_state_and_positions():
    async def test(m, engine):
        record, answer = await m.create("fake", tokens=tok(1, 2))
        assert answer.position == 2 and record.version == 2, "latest version by default"
        _, a2 = await m.step(record.session_id, tok(3), position=2)
        _, a3 = await m.step(record.session_id, tok(4, 5))
        assert (a2.position, a3.position) == (3, 5)
        np.testing.assert_allclose(record.row, reference_row([1, 2, 3, 4, 5]), atol=ATOL)

    with_manager(test)


def test_a_retried_step_is_answered_again_without_applying_twice():
    async def test(m, engine):
        record, _ = await m.create("fake", version=1, tokens=tok(1))
        _, first = await m.step(record.session_id, tok(7, 8), position=1, k=4)
        calls = len(engine.calls)
        _, again = await m.step(record.session_id, tok(7, 8), position=1, k=4)
        assert len(engine.calls) == calls, "the retry ran nothing"
        assert again.position == first.position == 3 and record.position == 3
        assert again.top_tokens.tolist() == first.top_tokens.tolist()
        np.testing.assert_allclose(again.top_logprobs, first.top_logprobs, atol=1e-6)
        with pytest.raises(PositionMismatch) as e:  # same position, other input
            await m.step(record.session_id, tok(9), position=1)
        assert e.value.position == 3 and e.value.status == 409
        with pytest.raises(PositionMismatch):  # ahead of the session
            await m.step(record.session_id, tok(9), position=4)

    with_manager(test)


def test_a_rejected_step_changes_nothing():
    async def test(m, engine):
        record, _ = await m.create("fake", tokens=tok(1, 2, 3))
        row, position = record.row.copy(), record.position
        for bad in (tok(256), tok(-1), tok()):
            with pytest.raises((TokenOutOfRange, EmptyInput)):
                await m.step(record.session_id, bad)
        with pytest.raises(PositionMismatch):
            await m.step(record.session_id, tok(4), position=0)
        assert record.position == position
        np.testing.assert_array_equal(record.row, row)

    with_manager(test)


def test_concurrent_steps_on_one_session_apply_in_arrival_order():
    async def test(m, engine):
        record, _ = await m.create("fake", tokens=tok(1))
        steps = [m.step(record.session_id, tok(10 + i)) for i in range(6)]
        answers = await asyncio.gather(*steps)
        assert [a.position for _, a in answers] == [2, 3, 4, 5, 6, 7]
        np.testing.assert_allclose(record.row, reference_row([1, 10, 11, 12, 13, 14, 15]),
                                   atol=ATOL)
        assert all(len(call) == 1 for call in engine.calls[1:]), "never two of one session"

    with_manager(test)


def test_many_sessions_batch_together_and_each_gets_its_own_answer():
    async def test(m, engine):
        records = [(await m.create("fake", version=1, tokens=tok(i + 1)))[0] for i in range(16)]
        engine.calls.clear()
        results = await asyncio.gather(*(m.step(r.session_id, tok(100 + i))
                                         for i, r in enumerate(records)))
        assert max(len(c) for c in engine.calls) > 1, "batches formed"
        for i, (record, _) in enumerate(results):
            np.testing.assert_allclose(record.row, reference_row([i + 1, 100 + i]), atol=ATOL)

    with_manager(test)


def test_unknown_model_version_and_session():
    async def test(m, engine):
        with pytest.raises(UnknownModel):
            await m.create("nope")
        with pytest.raises(UnknownVersion):
            await m.create("fake", version=9)
        with pytest.raises(UnknownSession):
            await m.step("missing", tok(1))
        assert await m.store.count() == 0

    with_manager(test)


def test_a_failed_priming_creates_no_session():
    async def test(m, engine):
        with pytest.raises(TokenOutOfRange):
            await m.create("fake", tokens=tok(1, 999))
        m.registry.get("fake").engine.fail = True
        with pytest.raises(InferenceFailed):
            await m.create("fake", tokens=tok(1))
        assert await m.store.count() == 0

    with_manager(test)


def test_capacity_answers_503_with_retry_after():
    async def test(m, engine):
        await m.create("fake")
        await m.create("fake")
        with pytest.raises(AtCapacity) as e:
            await m.create("fake")
        assert e.value.status == 503 and "Retry-After" in e.value.headers()
        assert await m.store.count() == 2

    with_manager(test, max_sessions=2)


def test_ttl_override_is_bounded_and_expired_sessions_are_gone():
    async def test(m, engine):
        with pytest.raises(InvalidInput):
            await m.create("fake", ttl_s=121)
        with pytest.raises(InvalidInput):
            await m.create("fake", ttl_s=0)
        record, _ = await m.create("fake", ttl_s=100)
        assert record.ttl_s == 100
        record.last_used_at = time.time() - 101  # idle past its TTL
        with pytest.raises(UnknownSession):
            await m.get(record.session_id)
        assert await m.sweep() == 1 and await m.store.count() == 0

    with_manager(test)


def test_fork_copies_state_and_then_goes_its_own_way():
    async def test(m, engine):
        parent, _ = await m.create("fake", tokens=tok(1, 2))
        child = await m.fork(parent.session_id)
        assert child.session_id != parent.session_id and child.position == 2
        await m.step(child.session_id, tok(3))
        await m.step(parent.session_id, tok(4))
        np.testing.assert_allclose(child.row, reference_row([1, 2, 3]), atol=ATOL)
        np.testing.assert_allclose(parent.row, reference_row([1, 2, 4]), atol=ATOL)

    with_manager(test)


def test_generation_is_written_back_and_the_next_step_continues_from_it():
    async def test(m, engine):
        record, _ = await m.create("fake", tokens=tok(5, 6))
        gen = await m.start_generation(record.session_id, params=SamplingParams(0.0), seed=1,
                                       max_tokens=4)
        await gen.done
        assert gen.tokens == greedy([5, 6], 4)
        _, answer = await m.step(record.session_id, tok(7))  # waits for the write-back
        assert answer.position == 7
        np.testing.assert_allclose(record.row, reference_row([5, 6, *gen.tokens, 7]), atol=ATOL)

    with_manager(test)


def test_same_seed_same_tokens_and_an_empty_session_cannot_generate():
    async def test(m, engine):
        a, _ = await m.create("fake", tokens=tok(1, 2, 3))
        b = await m.fork(a.session_id)
        params = SamplingParams(1.0, top_p=0.95)
        ga = await m.start_generation(a.session_id, params=params, seed=42, max_tokens=12)
        gb = await m.start_generation(b.session_id, params=params, seed=42, max_tokens=12)
        await asyncio.gather(ga.done, gb.done)
        assert ga.tokens == gb.tokens
        empty, _ = await m.create("fake")
        with pytest.raises(EmptyInput):
            await m.start_generation(empty.session_id, params=params, seed=1, max_tokens=1)

    with_manager(test)


def test_a_session_deleted_during_generation_stays_deleted():
    async def test(m, engine):
        record, _ = await m.create("fake", tokens=tok(1))
        gen = await m.start_generation(record.session_id, params=SamplingParams(0.0), seed=1,
                                       max_tokens=50)
        await m.delete(record.session_id)
        await gen.done
        await m.wait_idle(1.0)
        with pytest.raises(UnknownSession):
            await m.get(record.session_id)

    with_manager(test)
