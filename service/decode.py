"""Generations alone: the inference thread decodes iteration after iteration.

When a batch holds nothing but the running generations and no other work waits, handing
every iteration back to the event loop is the largest cost after onnxruntime itself: the
thread waited ~0.9 ms of every 3.4 ms iteration for the loop to take the tokens and hand
the next batch over, and rebuilt the batch's state from the rows every time (bench/README.md).
So the thread keeps the batch in the graph's own tensors (each iteration's state outputs
are the next one's inputs: no stacking, no copies), samples the next tokens, posts the
iteration's tokens to the event loop (one callback per iteration, which emits them) and
goes on at once. It stops when a generation finishes, one is cancelled, or the scheduler
wants the thread back (new work queued, a generation joining, shutdown); only then are the
rows split out, once.

Every posted token has been fed to the state the run returns, so wherever a run stops, a
generation's row holds exactly the tokens its client saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .generation import Generation
from .sampling import SamplingBatch, sample


@dataclass(slots=True)
class RunResult:
    rows: list[np.ndarray]  # each generation's row after the last token fed
    pending: np.ndarray  # (G,) the next tokens, sampled from those rows' logits
    reasons: list[str | None]  # why each generation finished in the run, or None
    iterations: int
    error: Exception | None = None  # onnxruntime failed after `iterations` good ones


# post(fed tokens (G,), finish reasons, seconds in onnxruntime): called once per iteration
Post = Callable[[np.ndarray, list, float], None]


def decode_run(engine, gens: Sequence[Generation], post: Post,
               should_stop: Callable[[], bool]) -> RunResult:
    """Run the generations' pending tokens, then each newly sampled one, until told to stop
    or a generation ends. Called in the inference thread; the generations are in flight,
    so nothing else touches their rows, rules or random generators meanwhile."""
    layout = engine.layout
    g = len(gens)
    state = layout.stack([gen.row for gen in gens])
    tokens = np.array([gen.pending for gen in gens], dtype=np.int64).reshape(g, 1)
    lengths = np.ones(g, dtype=np.int32)
    sampling = SamplingBatch([gen.params for gen in gens], engine.vocab_size)
    rules = [gen.rule for gen in gens]
    last = outputs = None
    reasons: list[str | None] = [None] * g
    pending = tokens[:, 0]
    iterations = 0
    error = None
    while True:
        t0 = time.perf_counter()
        try:
            new_last, new_outputs = engine.infer(tokens, lengths, state)
        except Exception as e:  # the rows stay as the last good iteration left them
            error = e
            break
        seconds = time.perf_counter() - t0
        last, outputs = new_last, new_outputs
        iterations += 1
        fed = tokens[:, 0]
        uniforms = np.array([gen.draw() for gen in gens])
        reasons = [rule.check(t) for rule, t in zip(rules, fed.tolist(), strict=True)]
        pending = sample(last, sampling, uniforms)
        post(fed, reasons, seconds)
        if any(reasons) or should_stop():
            break
        state = layout.feeds_from(outputs)
        tokens = pending.reshape(g, 1)
    rows = layout.unstack(outputs, last) if outputs is not None else [gen.row for gen in gens]
    return RunResult(rows, pending, reasons, iterations, error)
