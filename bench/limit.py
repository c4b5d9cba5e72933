"""The in-process limit: onnxruntime alone on the model's graph, no HTTP, no scheduling.

One decode step (one token per row, state fed back) at each batch size, a prefill of a
long input at batch 1, and prefills at the predict scenarios' shapes. Measured twice:
with onnxruntime's default threading and with the server's thread settings. The server
decodes running generations in parts on several inference threads at once (one
onnxruntime call each, sharing one session), so with the server's settings a decode step
of a large batch is timed the same way: the batch split into parts run concurrently; and
it runs prefills on a session with that many intra-op threads, so they are timed so too."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .graph import GraphRunner, ModelVersion


def _time_steps(runner: GraphRunner, batch: int, budget_s: float, repeats: int) -> float:
    """Median seconds per decode step, feeding each step's state into the next."""
    feeds = runner.feeds_for_step(batch)
    state_names = [(inp, out) for inp, out, *_ in runner.pairs]
    outputs = runner.session.run(runner.output_names, feeds)  # warm-up: first run allocates
    start = time.perf_counter()
    runner.session.run(runner.output_names, feeds)
    iters = max(5, int(budget_s / repeats / max(time.perf_counter() - start, 1e-6)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            outputs = runner.session.run(runner.output_names, feeds)
            for k, (inp, _) in enumerate(state_names):
                feeds[inp] = outputs[k + 1]
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples)


def _time_steps_parallel(runner: GraphRunner, batch: int, parts: int, budget_s: float,
                         repeats: int) -> float:
    """Median seconds per decode step of `batch` rows run as `parts` concurrent calls on
    one session, one thread each, each feeding its own state back (the server's decode
    runs)."""
    state_names = [inp for inp, *_ in runner.pairs]
    shares = [len(range(batch)[i::parts]) for i in range(parts)]
    feeds = [runner.feeds_for_step(n) for n in shares]

    def steps(k: int, iters: int) -> None:
        for _ in range(iters):
            outputs = runner.session.run(runner.output_names, feeds[k])
            for j, inp in enumerate(state_names):
                feeds[k][inp] = outputs[j + 1]

    with ThreadPoolExecutor(parts) as pool:
        def together(iters: int) -> float:
            start = time.perf_counter()
            list(pool.map(steps, range(parts), [iters] * parts))
            return time.perf_counter() - start

        together(1)  # warm-up: first runs allocate
        iters = max(5, int(budget_s / repeats / max(together(1), 1e-6)))
        samples = [together(iters) / iters for _ in range(repeats)]
    return statistics.median(samples)


def _time_prefill(runner: GraphRunner, batch: int, length: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    tokens = rng.integers(32, 127, size=(batch, length), dtype=np.int64)
    state = runner.zero_state(batch)
    runner.run(tokens, state)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(tokens, state)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(model: ModelVersion, batches: list[int], prefill_length: int,
            predict_shapes: list[tuple[int, int]], budget_s: float, repeats: int,
            threads: dict[str, dict]) -> dict:
    """threads maps a label to {"intra_op_threads", "inter_op_threads"} (None: ORT's own)."""
    results: dict = {}
    for label, setting in threads.items():
        runner = GraphRunner(model, setting.get("intra_op_threads"),
                             setting.get("inter_op_threads"), setting.get("spinning"))
        decode = {}
        threads_per_call = setting.get("inference_threads", 1)
        for batch in batches:
            # As the scheduler splits a decode run: at least 8 rows per part.
            parts = min(threads_per_call, batch // 8) or 1
            step_s = (_time_steps(runner, batch, budget_s, repeats) if parts == 1 else
                      _time_steps_parallel(runner, batch, parts, budget_s, repeats))
            decode[str(batch)] = {"us_per_step": step_s * 1e6, "tokens_per_s": batch / step_s}
        if threads_per_call > 1:  # the server's prefills run on its wide session
            runner = GraphRunner(model, threads_per_call, setting.get("inter_op_threads"),
                                 setting.get("spinning"))
        prefill_s = _time_prefill(runner, 1, prefill_length, repeats)
        prefill = {"length": prefill_length, "ms": prefill_s * 1e3,
                   "tokens_per_s": prefill_length / prefill_s}
        predict = {}
        for batch, length in predict_shapes:
            seconds = _time_prefill(runner, batch, length, repeats)
            predict[f"{batch}x{length}"] = {"ms": seconds * 1e3, "sequences_per_s": batch / seconds}
        results[label] = {"threads": setting, "decode": decode, "prefill": prefill,
                          "predict": predict}
    return results


def physical(model: ModelVersion, batch: int, cores: int, budget_s: float,
             repeats: int) -> dict:
    """The two limits carousel's own cost is judged against, in onnxruntime alone:

    - one-thread: one decode step of `batch` rows on one intra-op thread, nothing spinning:
      what steps can use while the event loop keeps the other core;
    - two-core: `cores` threads at once, each a step of batch // cores rows on one intra-op
      thread (the server's decode runs): what generation can use."""
    runner = GraphRunner(model, 1, 1, False)
    one = _time_steps(runner, batch, budget_s, repeats)
    both = _time_steps_parallel(runner, batch, cores, budget_s, repeats)
    return {"batch": batch,
            "one_thread": {"us_per_step": one * 1e6, "tokens_per_s": batch / one},
            "two_core": {"threads": cores, "us_per_step": both * 1e6,
                         "tokens_per_s": batch / both}}


def best(limits: dict, kind: str, key: str, field: str) -> float | None:
    """The best figure over thread settings: the limit is what onnxruntime can do at all."""
    values = [r[kind][key][field] for r in limits.values() if key in r[kind]]
    if not values:
        return None
    return min(values) if field in ("us_per_step", "ms") else max(values)
