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
    iterations: int  # onnxruntime calls that succeeded
    error: Exception | None = None  # onnxruntime failed after `iterations` good calls


# post(generations, their fed tokens (g,), finish reasons, seconds in onnxruntime):
# called once per onnxruntime call, from the inference thread
Post = Callable[[list[Generation], np.ndarray, list, float], None]


class _Group:
    """Up to a batch of generations decoding together: their state lives in the graph's
    own tensors from one call to the next."""

    def __init__(self, engine, gens: list[Generation]) -> None:
        self.engine = engine
        self.gens = gens
        self.state = engine.layout.stack([gen.row for gen in gens])
        self.tokens = np.array([gen.pending for gen in gens], dtype=np.int64).reshape(-1, 1)
        self.lengths = np.ones(len(gens), dtype=np.int32)
        self.sampling = SamplingBatch([gen.params for gen in gens], engine.vocab_size)
        self.rules = [gen.rule for gen in gens]
        self.pending = self.tokens[:, 0]
        self.reasons: list[str | None] = [None] * len(gens)
        self.last = self.outputs = None

    def step(self) -> tuple[np.ndarray, float]:
        """Feed the pending tokens, sample the next ones: (tokens fed, seconds in the
        graph). Raises if onnxruntime fails, leaving the group as it was."""
        if self.outputs is not None:
            self.state = self.engine.layout.feeds_from(self.outputs)
            self.tokens = self.pending.reshape(-1, 1)
        t0 = time.perf_counter()
        self.last, self.outputs = self.engine.infer(self.tokens, self.lengths, self.state)
        seconds = time.perf_counter() - t0
        fed = self.tokens[:, 0]
        uniforms = np.array([gen.draw() for gen in self.gens])
        self.reasons = [rule.check(t) for rule, t in zip(self.rules, fed.tolist(), strict=True)]
        self.pending = sample(self.last, self.sampling, uniforms)
        return fed, seconds

    def rows(self) -> list[np.ndarray]:
        if self.outputs is None:
            return [gen.row for gen in self.gens]
        return self.engine.layout.unstack(self.outputs, self.last)


def decode_run(engine, gens: Sequence[Generation], post: Post,
               should_stop: Callable[[], bool], max_batch: int) -> RunResult:
    """Feed the generations' pending tokens, then each newly sampled one, in calls of at
    most `max_batch` rows taken in turn, until told to stop or a generation ends. Called
    in an inference thread; the generations are in flight, so nothing else touches their
    rows, rules or random generators meanwhile."""
    groups = [_Group(engine, list(gens[i: i + max_batch])) for i in range(0, len(gens), max_batch)]
    iterations = 0
    error = None
    running = True
    while running:
        for group in groups:
            try:
                fed, seconds = group.step()
            except Exception as e:  # the rows stay as the last good call left them
                error = e
                running = False
                break
            iterations += 1
            post(group.gens, fed, group.reasons, seconds)
            if any(group.reasons) or should_stop():
                running = False
                break
    return RunResult(
        rows=[row for group in groups for row in group.rows()],
        pending=np.concatenate([group.pending for group in groups]),
        reasons=[r for group in groups for r in group.reasons],
        iterations=iterations,
        error=error,
    )
