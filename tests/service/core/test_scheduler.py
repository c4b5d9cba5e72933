"""The batching loop with a fake engine: batches form across sessions, never mix state, keep
one session's work apart and in order, pad mixed lengths, chunk long inputs, bound the
queue, fail a whole batch together, and run generations continuously."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from carousel.service.errors import InferenceFailed, QueueFull, ShuttingDown
from carousel.service.generation import Generation
from carousel.service.sampling import SamplingParams
from carousel.service.scheduler import Scheduler, Work
from core_fakes import FakeEngine, greedy, reference_row

GREEDY = SamplingParams(temperature=0.0)
# State goes through float32 between calls, the reference stays in float64: 1e-4 is the
# issue's bound between two computations of the same logits.


def run(coro):
    return asyncio.run(coro)


def tokens(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


async def started(engine, **kw) -> Scheduler:
    kw.setdefault("max_batch_delay_s", 0.05)
    s = Scheduler(engine, **kw)
    s.start()
    return s


def submit(s: Scheduler, key, toks, row=None, k=3) -> asyncio.Future:
    fut = asyncio.get_running_loop().create_future()
    s.submit(Work(key, toks, row, k, fut))
    return fut


def test_batches_form_across_sessions_and_each_row_gets_its_own_answer():
    engine = FakeEngine()
    inputs = {f"s{i}": tokens(*range(i + 1, i + 2 + i % 3)) for i in range(8)}  # lengths 1..3

    async def main():
        s = await started(engine)
        futs = {key: submit(s, key, x) for key, x in inputs.items()}
        results = {key: await f for key, f in futs.items()}
        await s.close()
        return results

    results = run(main())
    # Eight sessions sending: two alternating padded batches of four.
    assert engine.calls == [[1, 2, 3, 1], [2, 3, 1, 2]]
    for key, x in inputs.items():
        want = reference_row(x.tolist())
        np.testing.assert_allclose(results[key].row, want, rtol=0, atol=1e-4)
        expected_top = np.argsort(-want[-256:], kind="stable")[:3]
        assert results[key].top_tokens.tolist() == expected_top.tolist()


def test_two_items_of_one_session_never_share_a_batch_and_keep_their_order():
    engine = FakeEngine()

    async def main():
        s = await started(engine)
        futs = [submit(s, "same", tokens(1, 2)), submit(s, "a", tokens(3, 3, 3)),
                submit(s, "b", tokens(4, 4, 4, 4)), submit(s, "same", tokens(5)),
                submit(s, "c", tokens(*[6] * 5))]
        for f in futs:
            await f
        await s.close()

    run(main())
    # Four sessions sending: batches of two. The second 'same' (length 1) is never in the
    # batch of the first, and runs after it.
    assert engine.calls == [[2, 3], [4, 1], [5]]


def test_stateful_rows_continue_from_the_row_given():
    engine = FakeEngine()
    start = reference_row([5, 6, 7])

    async def main():
        s = await started(engine)
        r = await submit(s, "a", tokens(8, 9), row=start)
        await s.close()
        return r

    r = run(main())
    np.testing.assert_allclose(r.row, reference_row([5, 6, 7, 8, 9]), rtol=0, atol=1e-4)


def test_long_input_runs_in_chunks_and_equals_one_pass():
    engine = FakeEngine()
    long_input = tokens(*range(1, 11))

    async def main():
        s = await started(engine, prefill_chunk=4)
        r = await submit(s, "long", long_input)
        await s.close()
        return r

    r = run(main())
    assert engine.calls == [[4], [4], [2]]
    np.testing.assert_allclose(r.row, reference_row(list(range(1, 11))), rtol=0, atol=1e-4)


def test_padding_never_more_than_doubles_the_work():
    engine = FakeEngine()

    async def main():
        s = await started(engine, prefill_chunk=64)
        futs = [submit(s, "long", tokens(*range(1, 41)))]
        futs += [submit(s, f"d{i}", tokens(i + 1)) for i in range(6)]
        for f in futs:
            await f
        await s.close()

    run(main())
    for call in engine.calls:
        assert len(call) * max(call) <= max(2 * sum(call), 16), call
    assert sorted(n for call in engine.calls for n in call) == [1] * 6 + [40]


def test_full_queue_answers_queue_full_with_retry_after():
    engine = FakeEngine()
    engine.gate = threading.Event()  # hold the first batch inside the engine

    async def main():
        s = await started(engine, max_queue=2, max_batch_delay_s=0.0)
        first = submit(s, "a", tokens(1))
        while not engine.calls:  # the first batch is running; the queue is empty again
            await asyncio.sleep(0.001)
        submit(s, "b", tokens(2))
        submit(s, "c", tokens(3))
        with pytest.raises(QueueFull) as err:
            submit(s, "d", tokens(4))
        engine.gate.set()
        await first
        await s.close()
        return err.value

    err = run(main())
    assert err.status == 503 and err.headers() == {"Retry-After": "1"}


def test_a_failed_call_fails_every_row_of_its_batch():
    engine = FakeEngine(fail=True)

    async def main():
        s = await started(engine, max_batch_size=4)
        futs = [submit(s, None, tokens(i + 1)) for i in range(3)]  # stateless: one batch
        errors = []
        for f in futs:
            with pytest.raises(InferenceFailed) as e:
                await f
            errors.append(e.value)
        await s.close()
        return errors

    errors = run(main())
    assert engine.calls == [[1, 1, 1]] and len(errors) == 3


def test_work_whose_caller_gave_up_is_not_run():
    engine = FakeEngine()

    async def main():
        s = await started(engine)
        gone = submit(s, "gone", tokens(1))
        gone.cancel()
        kept = submit(s, "kept", tokens(2, 3))
        await kept
        await s.close()

    run(main())
    assert engine.calls == [[2]]


def test_close_lets_running_batches_finish_and_fails_queued_work():
    engine = FakeEngine()
    engine.gate = threading.Event()

    async def main():
        s = await started(engine, max_batch_size=1, max_batch_delay_s=0.0)
        running = submit(s, "a", tokens(1))
        while not engine.calls:
            await asyncio.sleep(0.001)
        second = submit(s, "b", tokens(2))  # in flight behind the first
        await asyncio.sleep(0.01)
        queued = submit(s, "c", tokens(3))  # two in flight: this one waits in the queue
        closing = asyncio.ensure_future(s.close())
        await asyncio.sleep(0.01)
        engine.gate.set()
        await closing
        assert (await running).row is not None and (await second).row is not None
        with pytest.raises(ShuttingDown):
            await queued
        with pytest.raises(ShuttingDown):
            s.submit(Work("d", tokens(4), None, 1, asyncio.get_running_loop().create_future()))

    run(main())
    assert engine.calls == [[1], [1]]


def make_gen(prompt, max_tokens, key, **kw) -> Generation:
    return Generation(key=key, row=reference_row(prompt), position=len(prompt),
                      params=kw.pop("params", GREEDY), seed=kw.pop("seed", 0),
                      max_tokens=max_tokens, **kw)


def generate_together(engine, make_gens, **kw) -> list[Generation]:
    """Start the generations `make_gens()` builds, all at once, on a fresh scheduler; return
    them once every one has finished."""

    async def main():
        s = await started(engine, **kw)
        gens = make_gens()
        for g in gens:
            s.start_generation(g)
        await asyncio.gather(*(g.done for g in gens))
        await s.close()
        return gens

    return run(main())


def test_generations_batch_continuously_and_each_decodes_as_alone():
    engine = FakeEngine()
    prompts = {"g1": [10, 20], "g2": [30], "g3": [40, 50, 60]}
    lengths = {"g1": 3, "g2": 6, "g3": 4}

    gens = generate_together(engine, lambda: [make_gen(p, lengths[k], k)
                                              for k, p in prompts.items()])
    for key, g in zip(prompts, gens, strict=True):
        assert g.tokens == greedy(prompts[key], lengths[key]), key
        assert g.finish_reason == "length" and g.position == len(prompts[key]) + lengths[key]
        np.testing.assert_allclose(g.row, reference_row(prompts[key] + g.tokens),
                                   rtol=0, atol=1e-4)
    # Continuous batching: three rows while all run, then they leave as they finish.
    assert [len(c) for c in engine.calls] == [3, 3, 3, 2, 1, 1]


def test_a_step_is_not_held_up_by_running_generations():
    engine = FakeEngine(delay_s=0.001)

    async def main():
        s = await started(engine)
        g = make_gen([1, 2], 200, "g")
        s.start_generation(g)
        await asyncio.sleep(0.005)
        r = await submit(s, "stepper", tokens(7))
        still_running = not g.done.done()
        await g.done
        await s.close()
        return r, still_running, g

    r, still_running, g = run(main())
    np.testing.assert_allclose(r.row, reference_row([7]), rtol=0, atol=1e-4)
    assert still_running and g.tokens == greedy([1, 2], 200)


def test_cancelled_generation_keeps_exactly_the_tokens_it_emitted():
    engine = FakeEngine()

    async def main():
        s = await started(engine)
        g = make_gen([3, 4], 1000, "g", stream=True, params=SamplingParams(1.0), seed=7)
        s.start_generation(g)
        seen = []
        async for events in g.events():
            seen += [e.token for e in events if hasattr(e, "token")]
            if len(seen) >= 5:
                g.cancel()
        await s.close()
        return g, seen

    g, seen = run(main())
    assert g.finish_reason == "cancelled"
    assert g.tokens == seen and 5 <= len(seen) < 1000
    np.testing.assert_allclose(g.row, reference_row([3, 4] + seen), rtol=0, atol=1e-4)


def test_stop_string_ends_generation_after_it():
    engine = FakeEngine()
    expected = greedy([9], 50)

    async def main():
        s = await started(engine)
        stop = bytes(expected[3:5])  # a stop string that greedy decoding will produce
        g = make_gen([9], 50, "g", stop=(stop,))
        s.start_generation(g)
        await g.done
        await s.close()
        return g, stop

    g, stop = run(main())
    assert g.finish_reason == "stop"
    first = bytes(expected).find(stop)
    assert g.tokens == expected[: first + len(stop)]


def test_close_ends_running_generations_with_shutdown():
    engine = FakeEngine(delay_s=0.001)

    async def main():
        s = await started(engine)
        g = make_gen([1], 10_000, "g")
        s.start_generation(g)
        while len(g.tokens) < 2:
            await asyncio.sleep(0.001)
        await s.close()
        return g

    g = run(main())
    assert g.finish_reason == "shutdown" and 2 <= len(g.tokens) < 10_000


def test_a_long_input_is_not_starved_by_generations_nor_mixed_with_them():
    engine = FakeEngine()

    async def main():
        s = await started(engine, prefill_chunk=8)
        gens = [make_gen([i + 1], 40, f"g{i}") for i in range(3)]
        for g in gens:
            s.start_generation(g)
        await asyncio.sleep(0)
        long = await submit(s, "long", tokens(*range(1, 31)))  # 30 tokens: 4 chunks
        await asyncio.gather(*(g.done for g in gens))
        await s.close()
        return long, gens

    long, gens = run(main())
    np.testing.assert_allclose(long.row, reference_row(list(range(1, 31))), rtol=0, atol=1e-4)
    for i, g in enumerate(gens):
        assert g.tokens == greedy([i + 1], 40)
    chunk_calls = [c for c in engine.calls if max(c) > 1]
    assert [max(c) for c in chunk_calls] == [8, 8, 8, 6]
    assert all(len(c) == 1 for c in chunk_calls), "a chunk never pads three generations"


def test_long_predictions_stay_batched_through_every_chunk():
    # Stateless inputs longer than a prefill chunk come back to the queue after each chunk;
    # they must still be taken together, not one row per call from the second chunk on.
    engine = FakeEngine()
    inputs = [tokens(*range(1 + i, 11 + i)) for i in range(4)]  # 10 tokens: chunks 4, 4, 2

    async def main():
        s = await started(engine, prefill_chunk=4)
        futs = [submit(s, None, x) for x in inputs]
        results = [await f for f in futs]
        await s.close()
        return results

    results = run(main())
    assert engine.calls == [[4, 4, 4, 4], [4, 4, 4, 4], [2, 2, 2, 2]]
    for x, r in zip(inputs, results, strict=True):
        np.testing.assert_allclose(r.row, reference_row(x.tolist()), rtol=0, atol=1e-4)


def test_generations_alone_decode_on_while_the_event_loop_is_blocked():
    # With nothing but generations to run, the inference thread goes from one iteration to
    # the next by itself: a blocked event loop does not stop it (handing every iteration
    # back to the loop would allow at most the two batches already in flight).
    engine = FakeEngine(delay_s=0.001)

    async def main():
        s = await started(engine)
        gens = [make_gen([i + 5], 30, f"g{i}") for i in range(3)]
        for g in gens:
            s.start_generation(g)
        while not engine.calls:
            await asyncio.sleep(0.001)
        time.sleep(0.1)  # the event loop is blocked: no hand-over can happen
        calls_while_blocked = len(engine.calls)
        await asyncio.gather(*(g.done for g in gens))
        await s.close()
        return gens, calls_while_blocked

    gens, calls_while_blocked = run(main())
    assert calls_while_blocked >= 10
    for i, g in enumerate(gens):
        assert g.tokens == greedy([i + 5], 30) and g.finish_reason == "length"
        np.testing.assert_allclose(g.row, reference_row([i + 5] + g.tokens), rtol=0, atol=1e-4)
    assert all(len(c) == 3 for c in engine.calls)


def test_many_generations_split_across_inference_threads_and_each_decodes_as_alone():
    engine = FakeEngine()
    n = 20  # more than two threads' minimum share each

    gens = generate_together(
        engine, lambda: [make_gen([i + 1, 2 * i + 3], 12, f"g{i}") for i in range(n)],
        threads=2)
    for i, g in enumerate(gens):
        prompt = [i + 1, 2 * i + 3]
        assert g.tokens == greedy(prompt, 12) and g.position == 2 + 12
        np.testing.assert_allclose(g.row, reference_row(prompt + g.tokens), rtol=0, atol=1e-4)
    assert sorted({len(c) for c in engine.calls}) == [10], "two halves, never one batch of 20"


def test_inference_failing_mid_run_leaves_rows_matching_the_tokens_emitted():
    engine = FakeEngine(fail_after=4)

    async def main():
        s = await started(engine)
        gens = [make_gen([i + 1], 100, f"g{i}", stream=True) for i in range(2)]
        for g in gens:
            s.start_generation(g)
        seen = {g.key: [] for g in gens}

        async def consume(g):
            async for events in g.events():
                seen[g.key] += [e.token for e in events if hasattr(e, "token")]

        await asyncio.gather(*(consume(g) for g in gens))
        await s.close()
        return gens, seen

    gens, seen = run(main())
    for i, g in enumerate(gens):
        assert g.finish_reason == "error"
        assert g.tokens == seen[g.key] == greedy([i + 1], 4)  # four good iterations
        np.testing.assert_allclose(g.row, reference_row([i + 1] + g.tokens), rtol=0, atol=1e-4)


def test_more_generations_than_a_batch_take_turns_in_calls_of_at_most_a_batch():
    engine = FakeEngine()

    gens = generate_together(engine, lambda: [make_gen([i + 2], 9, f"g{i}") for i in range(10)],
                             max_batch_size=4)
    for i, g in enumerate(gens):
        assert g.tokens == greedy([i + 2], 9) and g.finish_reason == "length"
        np.testing.assert_allclose(g.row, reference_row([i + 2] + g.tokens), rtol=0, atol=1e-4)
    assert max(len(c) for c in engine.calls) == 4
    # Every generation is fed exactly its own tokens, in calls of at most four rows.
    assert sum(len(c) for c in engine.calls) == 10 * 9


def test_prefills_ask_for_the_wide_session_and_decode_steps_do_not():
    # Rows cannot split a long input across threads: it runs on every thread in one call.
    # Decode steps are split by rows instead and stay on the one-thread session.
    engine = FakeEngine()

    async def main():
        s = await started(engine, max_batch_delay_s=0.02)
        await submit(s, "alone", tokens(5))
        await submit(s, "long", tokens(*range(1, 40)))
        await asyncio.gather(*(submit(s, f"s{i}", tokens(i + 1)) for i in range(8)))
        await s.close()

    run(main())
    calls = list(zip(engine.calls, engine.wide, strict=True))
    assert calls[:2] == [([1], False), ([39], True)]
    assert all(not wide for _, wide in calls[2:]) and len(calls) > 2
