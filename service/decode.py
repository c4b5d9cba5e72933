"""Streams: work that feeds itself, stepped back to back in an inference thread.

A stream is a generation: each iteration its adapter chooses the next input from the last
outputs (the byte LM samples a token from the logits), the graph consumes it, and the event
loop emits what was fed. This is the one place streams are stepped, the first iteration
included: its input is chosen from the extras the session's row keeps (the byte LM's stored
logits), every later one from the previous call's outputs.

Handing every iteration back to the event loop was the largest cost after onnxruntime
itself: the thread waited ~0.9 ms of every 3.4 ms iteration for the loop to take the tokens
and hand the next batch over, and rebuilt the batch's state from the rows every time
(bench/README.md). So the thread keeps the batch in the graph's own tensors (each
iteration's state outputs are the next one's inputs: no stacking, no copies), chooses the
next inputs, posts the iteration's fed values to the event loop (one callback per
iteration) and goes on at once. It stops when a stream finishes, one is cancelled, or the
scheduler wants the thread back (new work queued, a stream joining, shutdown); only then
are the rows split out, once.

Every posted value has been fed to the state the run returns, so wherever a run stops, a
stream's row holds exactly what its consumer saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Stream(Protocol):
    """What the scheduler needs of a generation (generation.py has the byte LM's)."""

    key: object
    row: np.ndarray  # state after everything fed so far, with the adapter's extras
    in_flight: bool  # in a decode run (owned by the scheduler meanwhile)
    cancelled: bool
    finish_reason: str | None

    def emit(self, value, final: bool) -> None: ...  # a fed value, on the event loop
    def rested(self) -> None: ...  # a run ended and it goes on: `row` holds all it was fed
    def finish(self, reason: str) -> None: ...


class StreamGroup(Protocol):
    """The adapter's side of a group of streams decoding together (adapter.open_streams)."""

    def next(self, extras: np.ndarray) -> tuple[dict[str, np.ndarray], list, list]:
        """From the rows' extras (B, extra_size): the next call's per-step inputs (batched),
        what each stream is fed, and why each stream ends with it (None: it goes on)."""


@dataclass(slots=True)
class RunResult:
    rows: list[np.ndarray]  # each stream's row after the last value fed
    reasons: list[str | None]  # why each stream finished in the run, or None
    iterations: int  # onnxruntime calls that succeeded
    error: Exception | None = None  # onnxruntime failed after `iterations` good calls


# post(streams, their fed values, finish reasons, seconds in onnxruntime):
# called once per onnxruntime call, from the inference thread
Post = Callable[[list, list, list, float], None]


class _Group:
    """Up to a batch of streams decoding together: their state lives in the graph's own
    tensors from one call to the next."""

    def __init__(self, engine, adapter, streams: list) -> None:
        self.engine = engine
        self.adapter = adapter
        self.streams = streams
        layout = engine.layout
        self.state = layout.stack([s.row for s in streams])
        self.extras = layout.extras([s.row for s in streams])
        self.ones = np.ones(len(streams), dtype=np.int64)
        lengths = engine.manifest.lengths
        self.lengths = None if lengths is None else (lengths.name, self.ones.astype(lengths.dtype))
        self.choose = adapter.open_streams(streams)
        self.reasons: list[str | None] = [None] * len(streams)
        self.outputs: dict[str, np.ndarray] | None = None

    def step(self) -> tuple[list, float]:
        """Choose and feed the next inputs: (values fed, seconds in the graph). Raises if
        onnxruntime fails, leaving the group as it was."""
        inputs, fed, reasons = self.choose.next(self.extras)
        feeds = {**inputs, **self.state}
        if self.lengths is not None:
            feeds[self.lengths[0]] = self.lengths[1]
        t0 = time.perf_counter()
        outputs = self.engine.run(feeds)
        seconds = time.perf_counter() - t0
        self.outputs = outputs
        self.state = self.engine.layout.feeds_from(outputs)
        self.extras, _ = self.adapter.finish(outputs, self.ones, [])
        self.reasons = reasons
        return fed, seconds

    def rows(self) -> list[np.ndarray]:
        if self.outputs is None:
            return [s.row for s in self.streams]
        return self.engine.layout.unstack(self.outputs, self.extras, len(self.streams))


def decode_run(engine, adapter, streams: Sequence, post: Post,
               should_stop: Callable[[], bool], max_batch: int) -> RunResult:
    """Step the streams in calls of at most `max_batch` rows, each group once a round,
    until a stream ends or the scheduler asks for the thread (checked once a round, so
    every group gets its turn). Called in an inference thread; the streams are in flight,
    so nothing else touches their rows, rules or random generators meanwhile."""
    groups = [_Group(engine, adapter, list(streams[i: i + max_batch]))
              for i in range(0, len(streams), max_batch)]
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
            post(group.streams, fed, group.reasons, seconds)
            if any(r is not None for r in group.reasons):
                running = False  # the round ends, then the run: the stream's end is due
        running = running and not should_stop()
    return RunResult(
        rows=[row for group in groups for row in group.rows()],
        reasons=[r for group in groups for r in group.reasons],
        iterations=iterations,
        error=error,
    )
