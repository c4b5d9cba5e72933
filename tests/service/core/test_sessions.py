"""Sessions over the real scheduler, store and adapters with fake engines: positions and
retries, rejected requests change nothing, per-session order, capacity, TTL, fork, named
sessions, predictions, streams (generations) written back; the same for a tensor model."""

from __future__ import annotations

import asyncio
import hashlib
import time

import numpy as np
import pytest
from carousel.service.bytelm import digest
from carousel.service.errors import (
    AtCapacity,
    EmptyInput,
    InferenceFailed,
    InvalidInput,
    PositionMismatch,
    QueueFull,
    TokenOutOfRange,
    UnknownModel,
    UnknownSession,
    UnknownVersion,
)
from carousel.service.generation import Generation
from carousel.service.registry import Registry
from carousel.service.sampling import SamplingParams
from carousel.service.scheduler import Scheduler
from carousel.service.sessions import SessionManager, Step
from carousel.service.store import MemoryStore
from core_fakes import (
    LM_STATE,
    fake_lm,
    fake_tensor,
    greedy,
    reference_row,
    row_after,
    sampled,
    tensor_reference,
    tensor_row,
    tensor_state,
    top,
)

ATOL = 1e-4  # float32 state between calls against a float64 reference


def tok(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def lm(tokens: np.ndarray, k: int = 3):
    """A byte LM step, as the data plane prepares it."""
    def prepare(mv) -> Step:
        return Step(mv.adapter.inputs(tokens), len(tokens), k, digest(tokens))

    return prepare


def lm_replay(mv, record, step: Step):
    answer = mv.adapter.replay(record.row, record.position, step.options, mv.layout)
    return answer.top_tokens, answer.top_logprobs


def check_result(result, *calls: list[int], k: int = 3) -> None:
    """A byte LM step's answer (top k), against the reference after `calls`, one call each."""
    tokens, logprobs = result
    want_tokens, want_logprobs = top(row_after(*calls)[LM_STATE:], k)
    assert tokens.tolist() == want_tokens
    np.testing.assert_allclose(logprobs, want_logprobs, rtol=0, atol=ATOL)


def with_manager(test, scheduler_kw=None, **kw):
    """Run `test(manager, engine)` on a fresh manager whose byte LM 'fake' has versions 1
    (its engine is `engine`) and 2, and tensor model 'fakets' version 1."""
    async def main():
        v1 = fake_lm("fake", 1)
        registry = Registry([v1, fake_lm("fake", 2), fake_tensor("fakets", 1)])
        registry.start(lambda mv: Scheduler(mv.engine, mv.adapter, max_batch_delay_s=0.01,
                                            **(scheduler_kw or {})))
        args = dict(session_ttl_s=60.0, max_session_ttl_s=120.0, max_sessions=100)
        args.update(kw)
        manager = SessionManager(registry, MemoryStore(), **args)
        try:
            return await test(manager, v1.engine)
        finally:
            await registry.close()

    return asyncio.run(main())


def test_steps_carry_state_and_positions():
    async def test(m, engine):
        mv = m.registry.get("fake")
        assert mv.version == 2, "latest version by default"
        record, first = await m.create(mv, step=lm(tok(1, 2))(mv))
        assert (first.position, record.position, record.version) == (2, 2, 2)
        check_result(first.result, [1, 2])
        _, a2 = await m.step(record.session_id, lm(tok(3)), position=2)
        _, a3 = await m.step(record.session_id, lm(tok(4, 5)))
        assert (a2.position, a3.position, a3.replayed) == (3, 5, False)
        check_result(a3.result, [1, 2], [3], [4, 5])
        np.testing.assert_allclose(record.row, reference_row([1, 2, 3, 4, 5]), atol=ATOL)
        assert a3.row is record.row and (await m.get(record.session_id)).position == 5

    with_manager(test)


def test_a_fresh_session_starts_from_zero_and_shares_one_read_only_row():
    async def test(m, engine):
        mv = m.registry.get("fake")
        a, none = await m.create(mv)
        b, _ = await m.create(mv)
        assert none is None and a.position == 0 and a.row is b.row
        assert not a.row.any() and not a.row.flags.writeable
        await m.step(a.session_id, lm(tok(6)))
        assert not b.row.any(), "a step makes a new row"
        np.testing.assert_allclose(a.row, reference_row([6]), atol=ATOL)

    with_manager(test)


def test_a_retried_step_is_answered_again_without_applying_twice():
    async def test(m, engine):
        mv = m.registry.get("fake", 1)
        record, _ = await m.create(mv, step=lm(tok(1))(mv))
        _, first = await m.step(record.session_id, lm(tok(7, 8), 4), 1, replay=lm_replay)
        calls = len(engine.calls)
        _, again = await m.step(record.session_id, lm(tok(7, 8), 4), 1, replay=lm_replay)
        assert len(engine.calls) == calls, "the retry ran nothing"
        assert again.replayed and not first.replayed
        assert again.position == first.position == 3 and record.position == 3
        assert again.result[0].tolist() == first.result[0].tolist()
        np.testing.assert_allclose(again.result[1], first.result[1], atol=1e-6)
        check_result(again.result, [1], [7, 8], k=4)
        # The retry is answered from the row, with the k it asks for now.
        _, other_k = await m.step(record.session_id, lm(tok(7, 8), 6), 1, replay=lm_replay)
        check_result(other_k.result, [1], [7, 8], k=6)
        with pytest.raises(PositionMismatch) as e:  # same position, other input
            await m.step(record.session_id, lm(tok(9)), 1, replay=lm_replay)
        assert e.value.position == 3 and e.value.status == 409
        with pytest.raises(PositionMismatch):  # ahead of the session
            await m.step(record.session_id, lm(tok(9)), 4, replay=lm_replay)
        assert len(engine.calls) == calls and record.position == 3

    with_manager(test)


def test_a_rejected_step_changes_nothing():
    async def test(m, engine):
        mv = m.registry.get("fake", 1)
        record, _ = await m.create(mv, step=lm(tok(1, 2, 3))(mv))
        row, position, calls = record.row.copy(), record.position, len(engine.calls)
        last = (record.last_start, record.last_digest)
        for bad in (tok(256), tok(-1), tok()):
            with pytest.raises((TokenOutOfRange, EmptyInput)):
                await m.step(record.session_id, lm(bad))
        with pytest.raises(PositionMismatch):
            await m.step(record.session_id, lm(tok(4)), position=0)
        assert record.position == position and len(engine.calls) == calls
        assert (record.last_start, record.last_digest) == last
        np.testing.assert_array_equal(record.row, row)
        _, after = await m.step(record.session_id, lm(tok(4)))  # not left locked
        assert after.position == 4

    with_manager(test)


def test_a_failed_step_changes_nothing():
    async def test(m, engine):
        mv = m.registry.get("fake", 1)
        record, _ = await m.create(mv, step=lm(tok(1, 2))(mv))
        row = record.row
        engine.fail = True
        with pytest.raises(InferenceFailed):
            await m.step(record.session_id, lm(tok(3)), position=2)
        assert record.row is row and record.position == 2
        engine.fail = False
        _, outcome = await m.step(record.session_id, lm(tok(3)), position=2)
        assert outcome.position == 3
        np.testing.assert_allclose(record.row, reference_row([1, 2, 3]), atol=ATOL)

    with_manager(test)


def test_concurrent_steps_on_one_session_apply_in_arrival_order():
    async def test(m, engine):
        mv = m.registry.get("fake", 1)
        record, _ = await m.create(mv, step=lm(tok(1))(mv))
        steps = [m.step(record.session_id, lm(tok(10 + i))) for i in range(6)]
        answers = await asyncio.gather(*steps)
        assert [a.position for _, a in answers] == [2, 3, 4, 5, 6, 7]
        for i, (_, a) in enumerate(answers):
            check_result(a.result, [1], *[[10 + j] for j in range(i + 1)])
        np.testing.assert_allclose(record.row, reference_row([1, 10, 11, 12, 13, 14, 15]),
                                   atol=ATOL)
        assert engine.calls[1:] == [[1]] * 6, "never two of one session in a batch"
        assert [c.feeds["tokens"].tolist() for c in engine.log[1:]] == [[[10 + i]]
                                                                       for i in range(6)]

    with_manager(test)


def test_many_sessions_batch_together_and_each_gets_its_own_answer():
    async def test(m, engine):
        mv = m.registry.get("fake", 1)
        records = [(await m.create(mv, step=lm(tok(i + 1))(mv)))[0] for i in range(16)]
        engine.log.clear()
        results = await asyncio.gather(*(m.step(r.session_id, lm(tok(100 + i)))
                                         for i, r in enumerate(records)))
        assert max(len(c) for c in engine.calls) > 1, "batches formed"
        assert sorted(n for c in engine.calls for n in c) == [1] * 16
        for i, (record, outcome) in enumerate(results):
            np.testing.assert_allclose(record.row, reference_row([i + 1, 100 + i]), atol=ATOL)
            check_result(outcome.result, [i + 1], [100 + i])

    with_manager(test)


def test_predictions_run_stateless_and_batched():
    async def test(m, engine):
        mv = m.registry.get("fake", 1)
        inputs = [tok(1, 2, 3), tok(4), tok(5, 6)]
        outcomes = await m.predict(mv, [lm(x, 2)(mv) for x in inputs])
        assert engine.calls == [[3, 1, 2]]
        for x, o in zip(inputs, outcomes, strict=True):
            assert o.position == len(x)
            check_result(o.result, x.tolist(), k=2)
            np.testing.assert_allclose(o.row, reference_row(x.tolist()), atol=ATOL)
        with pytest.raises(QueueFull) as e:  # more than the queue can ever take at once
            await m.predict(mv, [lm(tok(1))(mv)] * 5)
        assert e.value.headers() == {"Retry-After": "1"} and engine.calls == [[3, 1, 2]]
        assert await m.store.count() == 0

    with_manager(test, scheduler_kw={"max_queue": 4})


def test_unknown_model_version_and_session():
    async def test(m, engine):
        with pytest.raises(UnknownModel):
            m.registry.get("nope")
        with pytest.raises(UnknownVersion):
            m.registry.get("fake", 9)
        with pytest.raises(UnknownSession):
            await m.step("missing", lm(tok(1)))
        with pytest.raises(UnknownSession):
            await m.get("missing")
        with pytest.raises(UnknownSession):
            await m.delete("missing")
        with pytest.raises(UnknownSession):
            await m.fork("missing")
        assert await m.store.count() == 0

    with_manager(test)


def test_a_failed_priming_creates_no_session():
    async def test(m, engine):
        mv = m.registry.get("fake", 1)
        with pytest.raises(TokenOutOfRange):
            await m.create(mv, step=lm(tok(1, 999))(mv))
        engine.fail = True
        with pytest.raises(InferenceFailed):
            await m.create(mv, step=lm(tok(1))(mv))
        assert await m.store.count() == 0
        engine.fail = False
        await m.create(mv)  # the failed creations hold no capacity
        assert await m.store.count() == 1

    with_manager(test, max_sessions=1)


def test_named_sessions_are_unique_unless_replaced():
    async def test(m, engine):
        mv = m.registry.get("fake", 1)
        record, _ = await m.create(mv, step=lm(tok(1, 2))(mv), session_id="seq-1")
        assert record.session_id == "seq-1"
        with pytest.raises(InvalidInput, match="exists already"):
            await m.create(mv, step=lm(tok(3))(mv), session_id="seq-1")
        assert (await m.get("seq-1")).position == 2
        await m.create(mv)  # the server is full now
        fresh, outcome = await m.create(mv, step=lm(tok(3))(mv), session_id="seq-1",
                                        replace=True)  # replacing a live one needs no room
        assert fresh.position == outcome.position == 1 and await m.store.count() == 2
        np.testing.assert_allclose((await m.get("seq-1")).row, reference_row([3]), atol=ATOL)
        with pytest.raises(AtCapacity):  # a new name does
            await m.create(mv, session_id="seq-2", replace=True)

    with_manager(test, max_sessions=2)


def test_capacity_answers_503_with_retry_after():
    async def test(m, engine):
        mv = m.registry.get("fake")
        a, _ = await m.create(mv)
        await m.create(mv)
        with pytest.raises(AtCapacity) as e:
            await m.create(mv)
        assert e.value.status == 503 and e.value.headers() == {"Retry-After": "10"}
        with pytest.raises(AtCapacity):
            await m.fork(a.session_id)
        assert await m.store.count() == 2
        await m.delete(a.session_id)
        await m.create(mv)
        assert await m.store.count() == 2

    with_manager(test, max_sessions=2)


def test_ttl_override_is_bounded_and_expired_sessions_are_gone():
    async def test(m, engine):
        mv = m.registry.get("fake")
        with pytest.raises(InvalidInput):
            await m.create(mv, ttl_s=121)
        with pytest.raises(InvalidInput):
            await m.create(mv, ttl_s=0)
        record, _ = await m.create(mv, ttl_s=100)
        assert record.ttl_s == 100
        record.last_used_at = time.time() - 101  # idle past its TTL
        with pytest.raises(UnknownSession):
            await m.get(record.session_id)
        assert await m.sweep() == 1 and await m.store.count() == 0

    with_manager(test)


def test_fork_copies_state_and_then_goes_its_own_way():
    async def test(m, engine):
        mv = m.registry.get("fake")
        parent, _ = await m.create(mv, step=lm(tok(1, 2))(mv))
        child = await m.fork(parent.session_id)
        assert child.session_id != parent.session_id and child.position == 2
        assert child.version == parent.version and child.ttl_s == parent.ttl_s
        await m.step(child.session_id, lm(tok(3)))
        await m.step(parent.session_id, lm(tok(4)))
        np.testing.assert_allclose(child.row, reference_row([1, 2, 3]), atol=ATOL)
        np.testing.assert_allclose(parent.row, reference_row([1, 2, 4]), atol=ATOL)

    with_manager(test)


def generation(**kw):
    """A `make` for start_stream, as the data plane builds generations."""
    def make(mv, record) -> Generation:
        if record.position == 0:
            raise EmptyInput("the session has consumed no input yet")
        return Generation(key=record.session_id, row=record.row, position=record.position,
                          model=record.model, **kw)

    return make


def test_generation_is_written_back_and_the_next_step_continues_from_it():
    async def test(m, engine):
        mv = m.registry.get("fake", 1)
        record, _ = await m.create(mv, step=lm(tok(5, 6))(mv))
        gen = await m.start_stream(record.session_id, generation(
            params=SamplingParams(0.0), seed=1, max_tokens=4))
        step = asyncio.ensure_future(m.step(record.session_id, lm(tok(7))))
        await gen.done
        _, answer = await step  # waited for the write-back
        assert gen.tokens == greedy([5, 6], 4)
        assert answer.position == 7
        np.testing.assert_allclose(record.row, reference_row([7], reference_row(
            [5, 6, *gen.tokens])), atol=ATOL)
        check_result(answer.result, [5, 6], *[[t] for t in gen.tokens], [7])
        # A step retried after a generation is a mismatch: the generation moved the session.
        with pytest.raises(PositionMismatch):
            await m.step(record.session_id, lm(tok(5, 6)), 0, replay=lm_replay)

    with_manager(test)


def test_same_seed_same_tokens_and_a_stream_that_cannot_start_changes_nothing():
    async def test(m, engine):
        mv = m.registry.get("fake", 1)
        a, _ = await m.create(mv, step=lm(tok(1, 2, 3))(mv))
        b = await m.fork(a.session_id)
        make = generation(params=SamplingParams(1.0), seed=42, max_tokens=12)
        ga = await m.start_stream(a.session_id, make)
        gb = await m.start_stream(b.session_id, make)
        await asyncio.gather(ga.done, gb.done)
        assert ga.tokens == gb.tokens == sampled([1, 2, 3], 12, 1.0, 42)
        empty, _ = await m.create(mv)
        with pytest.raises(EmptyInput):
            await m.start_stream(empty.session_id, make)
        _, outcome = await m.step(empty.session_id, lm(tok(9)))  # the lock was released
        assert outcome.position == 1

    with_manager(test)


def test_a_session_deleted_during_generation_stays_deleted():
    async def test(m, engine):
        mv = m.registry.get("fake", 1)
        record, _ = await m.create(mv, step=lm(tok(1))(mv))
        gen = await m.start_stream(record.session_id, generation(
            params=SamplingParams(0.0), seed=1, max_tokens=50))
        assert m.busy == 1
        await m.delete(record.session_id)
        await gen.done
        await m.wait_idle(1.0)
        assert m.busy == 0
        with pytest.raises(UnknownSession):
            await m.get(record.session_id)

    with_manager(test)


# ------------------------------------------------------------------- a tensor model


def tensor_step(x: np.ndarray, u: np.ndarray, scale: float | None = None):
    """A tensor model's step (x (T, 3), u (T,)), checked by its adapter."""
    def prepare(mv) -> Step:
        tensors = {"x": x.astype(np.float32), "u": u.astype(np.float32)}
        if scale is not None:
            tensors["scale"] = np.array(scale, dtype=np.float32)
        inputs, length = mv.adapter.inputs(tensors)
        h = hashlib.blake2b(digest_size=16)
        for name in sorted(inputs):
            h.update(name.encode() + inputs[name].tobytes())
        return Step(inputs, length, None, h.digest())

    return prepare


RNG = np.random.default_rng(5)
X1, U1 = RNG.normal(size=(3, 3)), RNG.normal(size=3)
X2, U2 = RNG.normal(size=(2, 3)), RNG.normal(size=2)


def test_a_tensor_session_carries_its_state_and_answers_retries_from_the_kept_result():
    async def test(m, engine):
        mv = m.registry.get("fakets")
        record, first = await m.create(mv, step=tensor_step(X1, U1)(mv))
        y1, e1, h1, c1 = tensor_reference(X1, U1)
        assert first.position == 3 and set(first.result) == {"y", "energy"}
        np.testing.assert_allclose(first.result["y"], y1, atol=1e-5)
        np.testing.assert_allclose(first.result["energy"], e1, atol=1e-5)
        _, second = await m.step(record.session_id, tensor_step(X2, U2, scale=0.5), 3)
        y2, e2, h2, c2 = tensor_reference(X2, U2, *tensor_state(tensor_row(h1, c1)), 0.5)
        assert second.position == 5
        np.testing.assert_allclose(second.result["y"], y2, atol=1e-5)
        np.testing.assert_allclose(record.row, tensor_row(h2, c2), atol=1e-5)
        calls = len(mv.engine.log)
        _, again = await m.step(record.session_id, tensor_step(X2, U2, scale=0.5), 3)
        assert again.replayed and again.result is second.result and again.position == 5
        assert len(mv.engine.log) == calls
        with pytest.raises(PositionMismatch):  # the same tensors with another scale
            await m.step(record.session_id, tensor_step(X2, U2, scale=0.25), 3)

    with_manager(test)


def test_a_rejected_tensor_step_changes_nothing():
    async def test(m, engine):
        mv = m.registry.get("fakets")
        record, _ = await m.create(mv, step=tensor_step(X1, U1)(mv))
        row, calls = record.row, len(mv.engine.log)
        bad = [
            (tensor_step(X1[:, :2], U1), "input 'x' must be float32 ['time', 3] per row"),
            (tensor_step(X1, U1[:2]), "the inputs hold different numbers of steps"),
            (tensor_step(X1[:0], U1[:0]), "has no steps"),
        ]
        for prepare, words in bad:
            with pytest.raises(InvalidInput, match=words.replace("[", r"\[")):
                await m.step(record.session_id, prepare)

        def unknown(mv):
            return Step(*mv.adapter.inputs({"x": X1.astype(np.float32), "u": U1.astype(
                np.float32), "z": np.zeros(1, dtype=np.float32)}))

        with pytest.raises(InvalidInput, match="unknown input 'z'"):
            await m.step(record.session_id, unknown)
        assert record.row is row and record.position == 3 and len(mv.engine.log) == calls

    with_manager(test)
