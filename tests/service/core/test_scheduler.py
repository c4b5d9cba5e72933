"""The batching loop with the fake byte LM and the real ByteLM adapter: batches form across
sessions, never mix state, keep one session's work apart and in order, pad mixed lengths,
chunk long inputs, bound the queue, fail a whole batch together; generations run only as
decode runs (the first token sampled there from the row's stored logits), continuously,
split across threads, never starving steps nor mixed with them."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from carousel.service.errors import InferenceFailed, QueueFull, ShuttingDown
from carousel.service.generation import Generation
from carousel.service.sampling import SamplingParams
from carousel.service.scheduler import Scheduler, Work, WorkResult
from core_fakes import (
    LM_STATE,
    FakeEngine,
    fake_lm,
    greedy,
    reference_row,
    sampled,
    top,
    until,
)

GREEDY = SamplingParams(temperature=0.0)
ADAPTER = fake_lm().adapter  # the real ByteLM for the fake model's manifest
# State goes through float32 between calls, the reference stays in float64: 1e-4 is the
# issue's bound between two computations of the same logits.
ATOL = 1e-4


def run(coro):
    return asyncio.run(coro)


def tokens(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


async def started(engine, **kw) -> Scheduler:
    kw.setdefault("max_batch_delay_s", 0.05)
    kw.setdefault("name", "m")
    s = Scheduler(engine, ADAPTER, **kw)
    s.start()
    return s


def submit(s: Scheduler, key, toks, row=None, k=3) -> asyncio.Future:
    fut = asyncio.get_running_loop().create_future()
    inputs = ADAPTER.inputs(toks)
    s.submit(Work(key, inputs, len(toks), row, k, fut, s.batcher.signature(inputs)))
    return fut


def thread(call) -> int:
    """Which inference thread ran a call (executor threads are infer-<name>-<i>_0)."""
    return int(call.thread.rsplit("-", 1)[1].split("_")[0])


def is_decode(call) -> bool:
    return set(call.lengths) == {1}


def fed(call) -> list[list[int]]:
    """The real tokens of each row of a call."""
    t = call.feeds["tokens"]
    return [t[i, :n].tolist() for i, n in enumerate(call.lengths)]


def check_answer(result: WorkResult, history: list[int], k: int = 3,
                 chunk: int | None = None) -> None:
    want = reference_row(history, chunk=chunk)
    np.testing.assert_allclose(result.row, want, rtol=0, atol=ATOL)
    top_tokens, top_logprobs = result.result
    want_tokens, want_logprobs = top(want[LM_STATE:], k)
    assert top_tokens.tolist() == want_tokens
    np.testing.assert_allclose(top_logprobs, want_logprobs, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------ work


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
    assert [fed(c) for c in engine.log] == [[x.tolist() for x in inputs.values()][:4],
                                            [x.tolist() for x in inputs.values()][4:]]
    for key, x in inputs.items():
        check_answer(results[key], x.tolist())


def test_each_work_gets_its_own_top_k():
    engine = FakeEngine()

    async def main():
        s = await started(engine)
        futs = [submit(s, None, tokens(4, 5), k=k) for k in (0, 2, 12)]
        results = [await f for f in futs]
        await s.close()
        return results

    results = run(main())
    assert engine.calls == [[2, 2, 2]]
    for r, k in zip(results, (0, 2, 12), strict=True):
        check_answer(r, [4, 5], k)
        assert len(r.result[0]) == k


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
    assert fed(engine.log[1]) == [[4, 4, 4, 4], [5]]


def test_stateful_rows_continue_from_the_row_given():
    engine = FakeEngine()
    start = reference_row([5, 6, 7])

    async def main():
        s = await started(engine)
        r = await submit(s, "a", tokens(8, 9), row=start)
        await s.close()
        return r

    check_answer(run(main()), [5, 6, 7, 8, 9])


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
    assert [fed(c) for c in engine.log] == [[[1, 2, 3, 4]], [[5, 6, 7, 8]], [[9, 10]]]
    check_answer(r, list(range(1, 11)), chunk=4)


def test_padding_never_more_than_doubles_the_work():
    engine = FakeEngine()

    async def main():
        s = await started(engine, prefill_chunk=64)
        futs = [submit(s, "long", tokens(*range(1, 41)))]
        futs += [submit(s, f"d{i}", tokens(i + 1)) for i in range(6)]
        results = [await f for f in futs]
        await s.close()
        return results

    results = run(main())
    for call in engine.calls:
        assert len(call) * max(call) <= max(2 * sum(call), 16), call
    assert sorted(n for call in engine.calls for n in call) == [1] * 6 + [40]
    check_answer(results[0], list(range(1, 41)))
    for i, r in enumerate(results[1:]):
        check_answer(r, [i + 1])


def test_full_queue_answers_queue_full_with_retry_after():
    engine = FakeEngine()
    engine.gate = threading.Event()  # hold the first batch inside the engine

    async def main():
        s = await started(engine, max_queue=2, max_batch_delay_s=0.0)
        first = submit(s, "a", tokens(1))
        await until(lambda: engine.calls, "the first batch")  # running; the queue is empty
        submit(s, "b", tokens(2))
        submit(s, "c", tokens(3))
        with pytest.raises(QueueFull) as err:
            submit(s, "d", tokens(4))
        assert s.queued == 2
        engine.gate.set()
        await first
        await s.close()
        return err.value

    err = run(main())
    assert err.status == 503 and err.headers() == {"Retry-After": "1"}


def test_a_failed_call_fails_every_row_of_its_batch_and_the_next_batch_runs():
    engine = FakeEngine(fail=True)

    async def main():
        s = await started(engine, max_batch_size=4)
        futs = [submit(s, None, tokens(i + 1)) for i in range(3)]  # stateless: one batch
        errors = []
        for f in futs:
            with pytest.raises(InferenceFailed) as e:
                await f
            errors.append(e.value)
        engine.fail = False
        after = await submit(s, "a", tokens(9))
        await s.close()
        return errors, after

    errors, after = run(main())
    assert engine.calls == [[1, 1, 1], [1]] and len(errors) == 3
    assert all(e.status == 500 and "fake engine failure" in e.message for e in errors)
    check_answer(after, [9])


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
        await until(lambda: engine.calls, "the first batch")
        second = submit(s, "b", tokens(2))
        await until(lambda: s.queued == 0, "the second batch")  # in flight behind the first
        queued = submit(s, "c", tokens(3))  # two in flight: this one waits in the queue
        closing = asyncio.ensure_future(s.close())
        await asyncio.sleep(0)
        engine.gate.set()
        await closing
        check_answer(await running, [1])
        check_answer(await second, [2])
        with pytest.raises(ShuttingDown):
            await queued
        with pytest.raises(ShuttingDown):
            submit(s, "d", tokens(4))

    run(main())
    assert engine.calls == [[1], [1]]


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
        check_answer(r, x.tolist(), chunk=4)


def test_prefills_ask_for_the_wide_session_and_decode_steps_do_not():
    # Rows cannot split a long input across threads: it runs on every thread in one call.
    # Decode steps are split by rows instead and stay on the one-thread session.
    engine = FakeEngine()

    async def main():
        s = await started(engine, max_batch_delay_s=0.02)
        await submit(s, "alone", tokens(5))
        await submit(s, "long", tokens(*range(1, 40)))
        await asyncio.gather(*(submit(s, f"s{i}", tokens(i + 1)) for i in range(8)))
        g = make_gen([1, 2], 3, "g")
        s.start_stream(g)
        await g.done
        await s.close()

    run(main())
    calls = list(zip(engine.calls, engine.wide, strict=True))
    assert calls[:2] == [([1], False), ([39], True)]
    assert all(not wide for _, wide in calls[2:]) and len(calls) > 2 + 3


# ----------------------------------------------------------------------- generations


def make_gen(prompt, max_tokens, key, row=None, **kw) -> Generation:
    return Generation(key=key, row=reference_row(prompt) if row is None else row,
                      position=len(prompt), params=kw.pop("params", GREEDY),
                      seed=kw.pop("seed", 0), max_tokens=max_tokens, **kw)


def generate_together(engine, make_gens, **kw) -> list[Generation]:
    """Start the generations `make_gens()` builds, all at once, on a fresh scheduler; return
    them once every one has finished."""

    async def main():
        s = await started(engine, **kw)
        gens = make_gens()
        for g in gens:
            s.start_stream(g)
        await asyncio.gather(*(g.done for g in gens))
        await s.close()
        return gens

    return run(main())


def check_generation(g: Generation, prompt: list[int], n: int, reason: str = "length") -> None:
    assert g.tokens == greedy(prompt, n), g.key
    assert g.finish_reason == reason and g.position == len(prompt) + n
    np.testing.assert_allclose(g.row, reference_row(prompt + g.tokens), rtol=0, atol=ATOL)


def test_generations_batch_continuously_and_each_decodes_as_alone():
    engine = FakeEngine()
    prompts = {"g1": [10, 20], "g2": [30], "g3": [40, 50, 60]}
    lengths = {"g1": 3, "g2": 6, "g3": 4}

    gens = generate_together(engine, lambda: [make_gen(p, lengths[k], k)
                                              for k, p in prompts.items()])
    for key, g in zip(prompts, gens, strict=True):
        check_generation(g, prompts[key], lengths[key])
    # Continuous batching: three rows while all run, then they leave as they finish. Every
    # call feeds one token per row: no step and no prompt is mixed in.
    assert engine.calls == [[1] * 3] * 3 + [[1, 1], [1], [1]]


def test_the_first_token_is_sampled_in_the_decode_run_from_the_rows_stored_logits():
    # The row keeps the state after [7, 8] and, as its extras, logits that only allow token
    # 200 (not the logits [7, 8] would give): the first token must come from those.
    engine = FakeEngine()
    row = reference_row([7, 8]).copy()
    row[LM_STATE:] = -50.0
    row[LM_STATE + 200] = 50.0
    assert greedy([7, 8], 1) != [200]

    (g,) = generate_together(engine, lambda: [make_gen([7, 8], 5, "g", row=row)])
    assert g.tokens[0] == 200 and g.tokens[1:] == greedy([7, 8, 200], 4)
    # Five iterations, each feeding the token it sampled, starting from the row's state.
    assert [fed(c) for c in engine.log] == [[[t]] for t in g.tokens]
    first = engine.log[0].feeds
    np.testing.assert_array_equal(first["state_a"][:, 0], row[:6].reshape(2, 3))
    np.testing.assert_array_equal(first["state_b"][0], row[6:LM_STATE])
    np.testing.assert_allclose(g.row, reference_row([7, 8] + g.tokens), rtol=0, atol=ATOL)


def test_seeded_tokens_equal_an_independent_computation_alone_or_batched():
    engine = FakeEngine()
    prompts = [[3, 1, 4], [1, 5], [9, 2, 6]]
    seeds = [11, 12, 13]

    def gens():
        return [make_gen(p, 20, f"g{i}", params=SamplingParams(0.9), seed=seed)
                for i, (p, seed) in enumerate(zip(prompts, seeds, strict=True))]

    together = generate_together(engine, gens)
    alone = [generate_together(FakeEngine(), lambda i=i: [gens()[i]])[0] for i in range(3)]
    for p, seed, a, b in zip(prompts, seeds, together, alone, strict=True):
        assert a.tokens == b.tokens == sampled(p, 20, 0.9, seed)
        np.testing.assert_allclose(a.row, reference_row(p + a.tokens), rtol=0, atol=ATOL)


def test_cancelled_generation_keeps_exactly_the_tokens_it_emitted():
    engine = FakeEngine()

    async def main():
        s = await started(engine)
        g = make_gen([3, 4], 1000, "g", stream=True, params=SamplingParams(1.0), seed=7)
        s.start_stream(g)
        seen = []
        async for events in g.events():
            seen += [e.token for e in events if hasattr(e, "token")]
            if len(seen) >= 5:
                g.cancel()
        await s.close()
        return g, seen, events[-1]

    g, seen, end = run(main())
    assert g.finish_reason == "cancelled" and end.finish_reason == "cancelled"
    assert g.tokens == seen and 5 <= len(seen) < 1000 and end.position == 2 + len(seen)
    assert seen == sampled([3, 4], len(seen), 1.0, 7)
    assert len(engine.calls) == len(seen), "every call's token was emitted"
    np.testing.assert_allclose(g.row, reference_row([3, 4] + seen), rtol=0, atol=ATOL)


def test_stop_string_ends_generation_after_it():
    engine = FakeEngine()
    expected = greedy([9], 50)
    stop = bytes(expected[3:5])  # a stop string that greedy decoding will produce
    first = bytes(expected).find(stop)

    (g,) = generate_together(engine, lambda: [make_gen([9], 50, "g", stop=(stop,))])
    check_generation(g, [9], first + len(stop), reason="stop")


def test_close_ends_running_generations_with_shutdown():
    engine = FakeEngine(delay_s=0.001)

    async def main():
        s = await started(engine)
        g = make_gen([1], 10_000, "g")
        s.start_stream(g)
        await until(lambda: len(g.tokens) >= 2, "two tokens")
        await s.close()
        return g

    g = run(main())
    assert g.finish_reason == "shutdown" and 2 <= len(g.tokens) < 10_000
    check_generation(g, [1], len(g.tokens), reason="shutdown")


def test_generations_alone_decode_on_while_the_event_loop_is_blocked():
    # With nothing but generations to run, the inference thread goes from one iteration to
    # the next by itself: a blocked event loop does not stop it (handing every iteration
    # back to the loop would allow at most the two batches already in flight).
    engine = FakeEngine()

    async def main():
        s = await started(engine)
        gens = [make_gen([i + 5], 30, f"g{i}") for i in range(3)]
        for g in gens:
            s.start_stream(g)
        await until(lambda: engine.calls, "the first iteration")
        # Block the event loop until 20 iterations have run (or give up after 10 s).
        deadline = time.monotonic() + 10
        while len(engine.calls) < 20 and time.monotonic() < deadline:
            time.sleep(0.001)
        calls_while_blocked = len(engine.calls)
        await asyncio.gather(*(g.done for g in gens))
        await s.close()
        return gens, calls_while_blocked

    gens, calls_while_blocked = run(main())
    assert calls_while_blocked >= 20, "the decode run waited for the event loop"
    for i, g in enumerate(gens):
        check_generation(g, [i + 5], 30)
    assert engine.calls == [[1] * 3] * 30


def test_many_generations_split_across_inference_threads_and_each_decodes_as_alone():
    engine = FakeEngine()
    n = 20  # more than two threads' minimum share each

    gens = generate_together(
        engine, lambda: [make_gen([i + 1, 2 * i + 3], 12, f"g{i}") for i in range(n)],
        threads=2)
    for i, g in enumerate(gens):
        check_generation(g, [i + 1, 2 * i + 3], 12)
    # Two halves, never one batch of 20. The half that finishes first ends the other's run,
    # which goes on where it stopped (on the last thread: fewer than twice MIN_DECODE_SPLIT
    # streams are left).
    assert engine.calls == [[1] * 10] * 24, "two halves, never one batch of 20"
    assert {thread(c) for c in engine.log} == {0, 1}


@pytest.mark.parametrize("max_batch, fail_after, emitted", [
    (64, 4, [4, 4, 4]),  # one group: four good iterations
    (2, 5, [3, 3, 2]),  # groups of two and one: the sixth call (the second group's) fails
])
def test_inference_failing_mid_run_leaves_rows_matching_the_tokens_emitted(
        max_batch, fail_after, emitted):
    engine = FakeEngine(fail_after=fail_after)

    async def main():
        s = await started(engine, max_batch_size=max_batch)
        gens = [make_gen([i + 1], 100, f"g{i}", stream=True) for i in range(3)]
        for g in gens:
            s.start_stream(g)
        seen = {g.key: [] for g in gens}

        async def consume(g):
            async for events in g.events():
                seen[g.key] += [e.token for e in events if hasattr(e, "token")]

        await asyncio.gather(*(consume(g) for g in gens))
        await s.close()
        return gens, seen

    gens, seen = run(main())
    assert len(engine.calls) == fail_after + 1
    for i, (g, n) in enumerate(zip(gens, emitted, strict=True)):
        assert g.tokens == seen[g.key]
        check_generation(g, [i + 1], n, reason="error")


def test_more_generations_than_a_batch_take_turns_in_calls_of_at_most_a_batch():
    engine = FakeEngine()

    gens = generate_together(engine, lambda: [make_gen([i + 2], 9, f"g{i}") for i in range(10)],
                             max_batch_size=4)
    for i, g in enumerate(gens):
        check_generation(g, [i + 2], 9)
    # Every generation is fed exactly its own tokens, in calls of at most four rows, the
    # groups taking turns.
    assert engine.calls == [[1] * 4, [1] * 4, [1] * 2] * 9
    for j, call in enumerate(engine.log):
        group = gens[4 * (j % 3): 4 * (j % 3) + 4]
        assert fed(call) == [[g.tokens[j // 3]] for g in group]


# ------------------------------------------------- generations and work side by side


def test_with_two_threads_steps_run_on_thread_0_while_streams_run_on_thread_1():
    engine = FakeEngine()
    release = threading.Event()
    engine.hold = (lambda call: thread(call) == 1, release)  # streams stall on thread 1

    async def main():
        s = await started(engine, threads=2, max_batch_delay_s=0.0)
        g = make_gen([1, 2], 20, "g")
        s.start_stream(g)
        await until(lambda: engine.calls, "the first iteration")
        r = await submit(s, "stepper", tokens(7, 8))  # answered while thread 1 is held
        emitted_meanwhile = list(g.tokens)
        release.set()
        await g.done
        await s.close()
        return r, g, emitted_meanwhile

    r, g, emitted_meanwhile = run(main())
    check_answer(r, [7, 8])
    assert emitted_meanwhile == [], "the step did not wait for the stream's iteration"
    check_generation(g, [1, 2], 20)
    assert [thread(c) for c in engine.log if not is_decode(c)] == [0]
    assert {thread(c) for c in engine.log if is_decode(c)} == {1}


def test_while_work_is_queued_streams_run_on_the_last_thread_only():
    # 20 streams decode in two parts, one per thread; a step moves them all to the last
    # thread while it runs on the first (held there until they have), then they take both
    # threads again.
    engine = FakeEngine()
    release = threading.Event()
    engine.hold = (lambda call: not is_decode(call), release)  # the step stalls in thread 0

    async def main():
        s = await started(engine, threads=2, max_batch_delay_s=0.0)
        gens = [make_gen([i + 1], 10_000, f"g{i}") for i in range(20)]
        for g in gens:
            s.start_stream(g)
        await until(lambda: {0, 1} <= {thread(c) for c in engine.log}, "a split run")
        submitted_at = len(engine.log)
        step = submit(s, "stepper", tokens(7, 8, 9))
        await until(lambda: any(len(c.lengths) == 20 for c in engine.log),
                    "all streams on one thread")
        release.set()
        r = await step
        step_at = next(j for j, c in enumerate(engine.log) if not is_decode(c))
        await until(lambda: any(thread(c) == 0 for c in engine.log[step_at + 1:]),
                    "the streams on thread 0 again")
        for g in gens:
            g.cancel()
        await asyncio.gather(*(g.done for g in gens))
        await s.close()
        return r, gens, step_at, submitted_at

    r, gens, step_at, submitted_at = run(main())
    check_answer(r, [7, 8, 9])
    log = engine.log
    assert thread(log[step_at]) == 0 and log[step_at].lengths == [3]
    assert sum(1 for c in log if not is_decode(c)) == 1, "the step ran alone"
    whole = [j for j, c in enumerate(log) if len(c.lengths) == 20]
    assert whole and all(thread(log[j]) == 1 and j >= submitted_at for j in whole), \
        "while the step was queued or in flight, every stream decoded on the last thread"
    assert {len(c.lengths) for c in log if is_decode(c)} == {10, 20}
    assert {len(c.lengths) for c in log[whole[-1] + 1:] if is_decode(c)} == {10}, \
        "split again after it"
    for i, g in enumerate(gens):
        check_generation(g, [i + 1], len(g.tokens), reason="cancelled")


def test_with_two_threads_a_long_input_is_not_starved_by_generations_nor_mixed_with_them():
    engine = FakeEngine()
    release = threading.Event()
    engine.hold = (lambda call: thread(call) == 1, release)

    async def main():
        s = await started(engine, prefill_chunk=8, threads=2)
        gens = [make_gen([i + 1], 40, f"g{i}") for i in range(3)]
        for g in gens:
            s.start_stream(g)
        await until(lambda: engine.calls, "the first iteration")
        long = await submit(s, "long", tokens(*range(1, 31)))  # 30 tokens: 4 chunks
        emitted_meanwhile = [len(g.tokens) for g in gens]
        release.set()
        await asyncio.gather(*(g.done for g in gens))
        await s.close()
        return long, gens, emitted_meanwhile

    long, gens, emitted_meanwhile = run(main())
    check_answer(long, list(range(1, 31)), chunk=8)
    assert emitted_meanwhile == [0, 0, 0]
    for i, g in enumerate(gens):
        check_generation(g, [i + 1], 40)
    chunks = [c for c in engine.log if not is_decode(c)]
    assert [c.lengths for c in chunks] == [[8], [8], [8], [6]], "chunks never pad generations"
    assert {thread(c) for c in chunks} == {0}
    assert [c.lengths for c in engine.log if is_decode(c)] == [[1, 1, 1]] * 40


def test_with_one_thread_work_batches_and_decode_iterations_alternate():
    # One inference thread: a step queued while a stream's iteration runs goes next, before
    # the stream's next iteration (steps are not starved by generations).
    engine = FakeEngine()
    release = threading.Event()
    engine.hold = (lambda call: len(engine.log) == 3, release)  # the stream's third call

    async def main():
        s = await started(engine, threads=1, max_batch_delay_s=0.0)
        g = make_gen([1, 2], 30, "g")
        s.start_stream(g)
        await until(lambda: len(engine.log) == 3, "the third iteration")
        step = submit(s, "stepper", tokens(7, 8))
        release.set()
        r = await step
        done_before_step = g.done.done()
        await g.done
        await s.close()
        return r, g, done_before_step

    r, g, done_before_step = run(main())
    check_answer(r, [7, 8])
    check_generation(g, [1, 2], 30)
    step_at = next(j for j, c in enumerate(engine.log) if not is_decode(c))
    assert step_at == 3 and not done_before_step, (
        f"with one inference thread a step queued during decode iteration 3 ran as call "
        f"{step_at + 1} of {len(engine.log)}: it waited for {step_at - 3} more decode "
        f"iterations (the generation finished first: {done_before_step}) instead of going "
        f"right after the iteration in flight")


def test_with_one_thread_a_long_input_is_not_starved_by_generations_nor_mixed_with_them():
    engine = FakeEngine()
    release = threading.Event()
    engine.hold = (lambda call: len(engine.log) == 1, release)  # the first iteration

    async def main():
        s = await started(engine, prefill_chunk=8, threads=1)
        gens = [make_gen([i + 1], 40, f"g{i}") for i in range(3)]
        for g in gens:
            s.start_stream(g)
        await until(lambda: engine.calls, "the first iteration")
        fut = submit(s, "long", tokens(*range(1, 31)))  # 30 tokens: 4 chunks
        release.set()
        long = await fut
        await asyncio.gather(*(g.done for g in gens))
        await s.close()
        return long, gens

    long, gens = run(main())
    check_answer(long, list(range(1, 31)), chunk=8)
    for i, g in enumerate(gens):
        check_generation(g, [i + 1], 40)
    kinds = "".join("d" if is_decode(c) else "W" for c in engine.log)
    chunks = [c for c in engine.log if not is_decode(c)]
    assert [c.lengths for c in chunks] == [[8], [8], [8], [6]], "chunks never pad generations"
    assert [c.lengths for c in engine.log if is_decode(c)] == [[1, 1, 1]] * 40
    # Alternating: at most one iteration between two chunks, so the input is done long
    # before the 40 iterations are.
    between = kinds[kinds.index("W"):kinds.rindex("W")]
    assert "dd" not in between and kinds.rindex("W") < kinds.rindex("d"), (
        f"with one inference thread, the chunks of a long input (W) and decode iterations "
        f"(d) must alternate; the calls ran as {kinds}")
