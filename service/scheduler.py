"""The batching loop: one per model version, batching work across sessions.

The scheduler knows named tensors and state rows, nothing of tokens: a `Work` is one step of
one session (or one stateless input): its per-step input tensors without the batch axis,
its state row, and the options its model's adapter answers it with. A `Stream` is work that
feeds itself (a generation): the adapter chooses each next input from the last outputs.

Read `_loop` and `_start_batch` top to bottom. When there is queued work, start a batch of
it, up to `max_batch_size` rows (an idle thread first gives it up to `max_batch_delay` to
gather); it runs as one onnxruntime call on the first inference thread, then each row gets
its result. Up to two batches are in flight: the next one waits in the thread's queue, so
the thread never idles while the event loop hands results back. (Running step batches on
two threads at once was measured slower: the event loop, which reads and answers every
step, loses its core.) Streams run as decode runs (decode.py): the threads step them
iteration after iteration by themselves, on every thread when nothing else is queued, on the
last one only while steps are (so neither waits for the other), until new work, a joining
or ending stream, or shutdown needs the event loop, or (with `checkpoint_tokens` /
`checkpoint_s` set, for a shared store) half a checkpoint interval has passed, so that
the streams' rows come out for their sessions to write (sessions.py).

Rules a batch respects:
- never two rows of one session (`key`) in a batch; a session's work keeps its order;
- rows of one batch share every dimension but the batch axis (their `signature`); a model
  with a lengths input lets rows of different lengths share a padded batch, but only while
  padding at most doubles the work, and runs an input longer than `prefill_chunk` in chunks
  over several iterations (carrying its state), so other sessions' steps never wait for a
  long prefill; a graph without one is never padded;
- queued work forms batches of about half the sessions sending it, so two batches alternate
  (one in the thread, one being answered and refilled by the event loop);
- the queue is bounded: `submit` raises QueueFull (503 + Retry-After) when it is full.

Nothing here knows HTTP: results go back through futures and stream events.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .decode import Stream, decode_run
from .errors import InferenceFailed, QueueFull, ShuttingDown

log = logging.getLogger("carousel.service")

RECENT_HORIZON_S = 0.1  # sources seen this recently are expected to send more work soon
MIN_DECODE_SPLIT = 8  # streams per thread before a decode run is split across threads


@dataclass(slots=True, eq=False)
class Work:
    """Input to consume from a state: a session step or one stateless prediction."""

    key: object | None  # the session; None for stateless work
    inputs: dict[str, np.ndarray]  # per-step inputs, batch axis removed
    length: int  # steps along the sequence axis (1 for a model without one)
    row: np.ndarray | None  # the session's row; None starts from zero state
    options: object  # what the adapter needs to answer (the byte LM: top k)
    future: asyncio.Future
    signature: tuple = ()  # rows of one batch share it (see Batcher.signature)
    enqueued_at: float = field(default_factory=time.perf_counter)
    consumed: int = 0  # steps already run (long inputs run in chunks)


@dataclass(slots=True)
class WorkResult:
    row: np.ndarray  # the new row: state after the input, then the adapter's extras
    result: object  # the adapter's answer for this work


class Adapter(Protocol):
    """What a model's adapter does in the inference thread, once per call."""

    extra_size: int  # floats it keeps after the state in each row

    def finish(self, outputs: dict[str, np.ndarray], lengths: np.ndarray,
               works: list[Work]) -> tuple[np.ndarray | None, list]:
        """The rows' extras (B, extra_size) or None, and each work's result."""


class SchedulerHooks:
    """What the scheduler reports (metrics); the default does nothing."""

    def batch(self, size: int, tokens: int, seconds: float) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def generated(self, tokens: int) -> None: ...


class Batcher:
    """How rows of one model join a batch and leave it: stacking per-step inputs along their
    batch axes (padding along the sequence axis where the graph takes lengths), state rows
    through the layout, and the call itself."""

    def __init__(self, engine) -> None:
        m = engine.manifest
        self.engine = engine
        self.layout = engine.layout
        self.inputs = m.inputs
        self.overridable = tuple(c.name for c in m.constants if c.overridable)
        self.lengths = m.lengths  # None: rows are never padded
        self.paddable = m.lengths is not None

    def signature(self, inputs: dict[str, np.ndarray]) -> tuple:
        """What rows of one batch must share: every dimension but the batch axis, and, where
        rows may be padded, not the sequence axis either."""
        if self.paddable and len(self.inputs) == 1 and not self.overridable:
            return ()  # the byte LM's tokens: (T,) only; the hot path, kept cheap
        sig: list = []
        for spec in self.inputs:
            shape = inputs[spec.name].shape
            if self.paddable:
                shape = tuple(d for i, d in enumerate(shape) if i != spec.row_seq_axis)
            sig.append(shape)
        # a constant a request overrides is fed once for the whole batch: equal values only
        sig += [inputs[n].tobytes() if n in inputs else None for n in self.overridable]
        return tuple(sig)

    def chunk(self, work: Work, size: int) -> dict[str, np.ndarray]:
        """The next `size` steps of a work's inputs (all of them for a graph without lengths)."""
        if not self.paddable or (work.consumed == 0 and work.length <= size):
            return work.inputs
        lo, hi = work.consumed, work.consumed + size
        chunk = {s.name: _slice(work.inputs[s.name], s.row_seq_axis, lo, hi) for s in self.inputs}
        return {**work.inputs, **chunk}  # overridden constants go along

    def feeds(self, chunks: list[dict[str, np.ndarray]], lengths: np.ndarray,
              rows: list) -> dict[str, np.ndarray]:
        """The graph's feeds for a batch: per-step inputs stacked, lengths, state."""
        feeds = self.layout.stack(rows)
        longest = int(lengths.max())
        for spec in self.inputs:
            parts = [c[spec.name] for c in chunks]
            if self.paddable and longest != int(lengths.min()):
                feeds[spec.name] = _pad(parts, spec, longest)
            elif spec.batch_axis == 0:
                feeds[spec.name] = np.stack(parts) if len(parts) > 1 else parts[0][None]
            else:
                feeds[spec.name] = np.stack(parts, axis=spec.batch_axis)
        if self.lengths is not None:
            feeds[self.lengths.name] = lengths.astype(self.lengths.dtype, copy=False)
        for name in self.overridable:
            if name in chunks[0]:
                feeds[name] = chunks[0][name]
        return feeds


def _slice(x: np.ndarray, axis: int, lo: int, hi: int) -> np.ndarray:
    index = [slice(None)] * x.ndim
    index[axis] = slice(lo, hi)
    return x[tuple(index)]


def _pad(parts: list[np.ndarray], spec, longest: int) -> np.ndarray:
    """Rows of different lengths as one zero-padded batch (lengths tell the graph where each
    row ends, so padding never reaches a session's state)."""
    axis = spec.row_seq_axis
    shape = list(parts[0].shape)
    shape[axis] = longest
    batch = np.zeros((len(parts), *shape), dtype=parts[0].dtype)
    for i, x in enumerate(parts):
        index = [i] + [slice(None)] * x.ndim
        index[axis + 1] = slice(0, x.shape[axis])
        batch[tuple(index)] = x
    return batch if spec.batch_axis == 0 else np.moveaxis(batch, 0, spec.batch_axis)


class Scheduler:
    def __init__(self, engine, adapter: Adapter, *, max_batch_size: int = 64,
                 max_batch_delay_s: float = 0.002, max_queue: int = 1024,
                 prefill_chunk: int = 256, threads: int = 1,
                 hooks: SchedulerHooks | None = None, name: str = "model") -> None:
        self.engine = engine
        self.adapter = adapter
        self.batcher = Batcher(engine)
        self.layout = engine.layout
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.hooks = hooks or SchedulerHooks()
        self.name = name
        self._queue: deque[Work] = deque()
        self._active: list[Stream] = []
        self._recent: dict[object, float] = {}  # key -> last time it submitted work
        self._recent_pruned = 0.0
        self._wake: asyncio.Future | None = None  # set while the loop sleeps
        self._wake_at: float = 1  # queue length that wakes the sleeping loop
        self._deadline: float | None = None  # perf_counter time that wakes it
        self._batches: set[asyncio.Task] = set()  # work batches in flight: two at most
        self._decoding: dict[asyncio.Task, int] = {}  # decode run parts -> their thread
        self._stateless = 0  # work without a session (predictions) in the queue right now
        # Thread 0 runs every work batch, one at a time; streams run on the others, or on
        # all of them when nothing else waits.
        self._executors = [ThreadPoolExecutor(1, thread_name_prefix=f"infer-{name}-{i}")
                           for i in range(threads)]
        self._task: asyncio.Task | None = None
        self._closed = False
        # A decode run gives its thread back when this is set.
        self._interrupt = False
        # Decode runs also stop every half of these (0: never), for checkpoints.
        self.checkpoint_tokens = 0
        self.checkpoint_s = 0.0
        self.batches = 0  # iterations run, for tests and /metrics

    # ---------------------------------------------------------------- what callers use

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"sched-{self.name}")

    def submit(self, work: Work) -> None:
        """Queue work; its future gets a WorkResult (or the error of a failed batch)."""
        self._admit(len(self._queue), "requests already queued")
        self._queue.append(work)
        if 0 in self._decoding.values():
            self._interrupt = True  # a decode run holds the work thread: give it back
        if work.key is not None:
            self._recent[work.key] = work.enqueued_at
        else:
            self._stateless += 1
        self._poke()

    def _admit(self, waiting: int, what: str) -> None:
        """Refuse new work while closing, or when `waiting` has reached the bound."""
        if self._closed:
            raise ShuttingDown("the server is shutting down; retry on another instance")
        if waiting >= self.max_queue:
            raise QueueFull(f"{self.name}: {self.max_queue} {what}; retry soon", retry_after=1)

    async def run(self, key: object | None, inputs: dict[str, np.ndarray], length: int,
                  row: np.ndarray | None, options: object = None) -> WorkResult:
        """Submit work and wait for its result."""
        future = asyncio.get_running_loop().create_future()
        self.submit(Work(key, inputs, length, row, options, future,
                         self.batcher.signature(inputs)))
        return await future

    def start_stream(self, stream: Stream) -> None:
        """Join the running streams at the next iteration boundary."""
        self._admit(len(self._active), "generations running")
        self._active.append(stream)
        self._interrupt = True
        self._wake_loop()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def generating(self) -> int:
        return len(self._active)

    async def close(self) -> None:
        """Stop: queued work fails with ShuttingDown, streams end with 'shutdown'."""
        self._closed = True
        self._interrupt = True
        self._wake_loop()
        pending = [t for t in (self._task, *self._batches, *self._decoding) if t is not None]
        if pending:
            # Batches in flight finish (their rows get their answers); then the loop ends.
            _, late = await asyncio.wait(pending, timeout=10.0)
            for task in late:
                task.cancel()
        while self._queue:
            w = self._queue.popleft()
            if not w.future.done():
                w.future.set_exception(ShuttingDown("the server shut down before this ran"))
        for stream in self._active:
            stream.finish("shutdown")
        self._active.clear()
        for executor in self._executors:
            executor.shutdown(wait=False)

    # ---------------------------------------------------------------- the loop

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            started = self._start_streams(loop)
            if not self._start_batch(loop) and not started:
                await self._sleep(loop)  # until new work, a batch ends, or the fill deadline

    def _start_streams(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Start a decode run of every stream when none is running: on every thread when
        no work waits, else on the last thread (one thread: once the work has run)."""
        self._drop_cancelled()
        if self._decoding or not self._active:
            return False
        threads = list(range(len(self._executors)))
        busy = bool(self._queue or self._batches)
        if busy and len(threads) > 1:
            threads = threads[1:]
        # With one thread and work waiting, the run yields after one iteration, so work
        # batches and stream iterations take turns.
        self._interrupt = busy and len(threads) == 1 and threads[0] == 0
        parts = min(len(threads), len(self._active) // MIN_DECODE_SPLIT) or 1
        for i in range(parts):
            share = self._active[i::parts]
            for s in share:
                s.in_flight = True
            thread = threads[-parts + i]
            task = loop.create_task(self._run_streams(loop, share, thread))
            self._decoding[task] = thread
            task.add_done_callback(self._decode_done)
        return True

    def _start_batch(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Start the next work batch if it should start now; else say what to wake up for.

        The loop sleeps until the queue reaches `_wake_at` items, a batch ends, or
        `_deadline` passes (a batch waiting to fill); a queue with nothing to start does not
        wake it for every item (the wake-up and GIL wait per batch on a busy machine)."""
        self._wake_at, self._deadline = 1, None
        if len(self._batches) >= 2 or 0 in self._decoding.values():
            self._wake_at = math.inf  # only a finished batch or run wakes the loop
            return False
        if not self._queue:
            return False
        now = time.perf_counter()
        limit = self._batch_limit(now)
        if len(self._queue) < limit:
            if self._batches:  # the thread is busy anyway: the batch can grow meanwhile
                self._wake_at = limit
                return False
            deadline = self._queue[0].enqueued_at + self.max_batch_delay_s
            if now < deadline:  # idle thread: give the batch a moment to fill
                self._wake_at, self._deadline = limit, deadline
                return False
        works, chunks = self._take_work(limit)
        if not works:
            return False
        task = loop.create_task(self._run_batch(loop, works, chunks))
        self._batches.add(task)
        task.add_done_callback(self._batch_done)
        return True

    def _batch_done(self, task: asyncio.Task) -> None:
        self._batches.discard(task)
        if (not self._queue and not self._batches and self._decoding
                and len(self._decoding) < len(self._executors)
                and len(self._active) >= 2 * MIN_DECODE_SPLIT):
            self._interrupt = True  # the work is done: let the streams take every thread
        self._wake_loop()

    def _decode_done(self, task: asyncio.Task) -> None:
        del self._decoding[task]
        self._wake_loop()

    async def _sleep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake = loop.create_future()
        timer = None
        if self._deadline is not None:
            timer = loop.call_at(loop.time() + (self._deadline - time.perf_counter()),
                                 self._wake_loop)
        try:
            await self._wake
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()

    def _wake_loop(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _poke(self) -> None:
        """New work: wake the loop once there is enough of it to act on."""
        if len(self._queue) >= self._wake_at:
            self._wake_loop()

    def _expected_sources(self, now: float) -> int:
        """How many sessions are likely to send work soon: those seen in the last moments.
        A lone client thus never waits for a batch that cannot fill."""
        if now - self._recent_pruned > RECENT_HORIZON_S:
            cutoff = now - RECENT_HORIZON_S
            self._recent = {k: t for k, t in self._recent.items() if t >= cutoff}
            self._recent_pruned = now
        return len(self._recent)

    def _batch_limit(self, now: float) -> int:
        """Rows for the next batch of queued work: half the sessions that are sending, so
        their steps form two alternating batches. While one runs in the inference thread,
        the event loop answers the other and reads its next steps; one batch of everyone
        would leave each side idle while the other works (measured: +40% steps/s at 64
        sessions). Predictions arrive all at once, so all of them are taken."""
        half = -(-self._expected_sources(now) // 2)
        return min(self.max_batch_size, max(1, half, self._stateless))

    def _drop_cancelled(self) -> None:
        for s in [s for s in self._active if s.cancelled and not s.in_flight]:
            s.finish("cancelled")  # left between iterations
        self._prune_finished()

    def _prune_finished(self) -> None:
        self._active = [s for s in self._active if s.finish_reason is None]

    def _take_work(self, limit: int) -> tuple[list[Work], list[dict[str, np.ndarray]]]:
        """Queued work for this batch, oldest first, within the size and padding budget and
        sharing the oldest work's signature."""
        works: list[Work] = []
        chunks: list[dict[str, np.ndarray]] = []
        taken_keys: set = set()
        blocked: set = set()  # a key whose older work stays queued keeps its later work too
        real = longest = 0  # real steps in the batch, and the longest row
        signature = None
        left: deque[Work] = deque()
        paddable = self.batcher.paddable
        while self._queue:
            w = self._queue.popleft()
            if w.future.done():  # its caller gave up: skip without running it
                if w.key is None:
                    self._stateless -= 1
                continue
            n = min(w.length - w.consumed, self.prefill_chunk) if paddable else w.length
            if signature is None:
                signature = (w.signature, None if paddable else n)
            fits = (
                len(works) < limit
                and (w.signature, None if paddable else n) == signature
                and (w.key is None or (w.key not in taken_keys and w.key not in blocked))
                # padding may at most double the computed steps (small batches always fit)
                and (len(works) + 1) * max(longest, n) <= max(2 * (real + n), 16)
            )
            if not fits:
                left.append(w)
                if w.key is not None:
                    blocked.add(w.key)
                if len(works) >= limit:
                    break
                continue
            works.append(w)
            chunks.append(self.batcher.chunk(w, n))
            if w.key is not None:
                taken_keys.add(w.key)
            else:
                self._stateless -= 1
            real += n
            longest = max(longest, n)
        left.extend(self._queue)
        self._queue = left
        return works, chunks

    async def _run_batch(self, loop, works: list[Work],
                         chunks: list[dict[str, np.ndarray]]) -> None:
        started = time.perf_counter()
        for w in works:
            if w.consumed == 0:
                self.hooks.queue_wait(started - w.enqueued_at)
        paddable = self.batcher.paddable
        lengths = np.fromiter(
            (min(w.length - w.consumed, self.prefill_chunk) if paddable else w.length
             for w in works), dtype=np.int64, count=len(works))
        rows = [w.row for w in works]
        try:
            new_rows, results, seconds = await loop.run_in_executor(
                self._executors[0], self._compute, chunks, lengths, rows, works)
        except Exception as e:  # onnxruntime failed: every row of the batch fails with it
            log.exception("%s: inference failed on a batch of %d", self.name, len(rows))
            err = InferenceFailed(f"inference failed: {e}")
            for w in works:
                if not w.future.done():
                    w.future.set_exception(err)
            return
        self.batches += 1
        self.hooks.batch(len(rows), int(lengths.sum()), seconds)
        unfinished: list[Work] = []
        for w, n, row, result in zip(works, lengths.tolist(), new_rows, results, strict=True):
            w.consumed += n
            if w.consumed < w.length:  # a long input: its next chunk goes first next time
                w.row = row
                unfinished.append(w)
                if w.key is None:  # back in the queue: counted again (see _batch_limit)
                    self._stateless += 1
            elif not w.future.done():
                w.future.set_result(WorkResult(row, result))
        self._queue.extendleft(reversed(unfinished))

    def _compute(self, chunks: list[dict[str, np.ndarray]], lengths: np.ndarray, rows: list,
                 works: list[Work]) -> tuple[list[np.ndarray], list, float]:
        """The worker thread's part: stack, run, split, and the adapter's arithmetic."""
        feeds = self.batcher.feeds(chunks, lengths, rows)
        # A prefill is long and rows cannot split it across threads: the engine's wide
        # session runs it on all of them (decode steps at batch 1 gained nothing: measured).
        wide = self.batcher.paddable and int(lengths.max()) > 1
        t0 = time.perf_counter()
        outputs = self.engine.run(feeds, wide)
        seconds = time.perf_counter() - t0
        extras, results = self.adapter.finish(outputs, lengths, works)
        if len(results) != len(works):
            raise InferenceFailed(f"{len(results)} results for a batch of {len(works)}")
        return self.layout.unstack(outputs, extras, len(works)), results, seconds

    async def _run_streams(self, loop, streams: list[Stream], thread: int) -> None:
        """Streams alone, stepped back to back in the thread (decode.py); each iteration's
        outputs reach their consumers while the next iteration runs."""

        def post(group: list[Stream], fed: list, reasons: list, seconds: float) -> None:
            loop.call_soon_threadsafe(self._deliver, group, fed, reasons, seconds)

        started = time.perf_counter()
        rounds = 0
        tokens, seconds = self.checkpoint_tokens / 2, self.checkpoint_s / 2

        def should_stop() -> bool:  # once a round (every stream fed one more)
            nonlocal rounds
            rounds += 1
            return (self._interrupt or any(s.cancelled for s in streams)
                    or (tokens and rounds >= tokens)
                    or (seconds and time.perf_counter() - started >= seconds))

        try:
            run = await loop.run_in_executor(
                self._executors[thread], decode_run, self.engine, self.adapter, streams, post,
                should_stop, self.max_batch_size)
            rows, reasons, error = run.rows, run.reasons, run.error
        except Exception as e:  # a bug in the run itself: nothing was fed, all fail
            log.exception("%s: a decode run of %d failed", self.name, len(streams))
            rows, reasons, error = [s.row for s in streams], [None] * len(streams), e
        if error is not None:
            log.error("%s: inference failed in a decode run of %d: %s", self.name,
                      len(streams), error)
        for stream, row, reason in zip(streams, rows, reasons, strict=True):
            stream.in_flight = False
            stream.row = row
            if reason is not None:
                stream.finish(reason)
            elif error is not None:
                stream.finish("error")
            else:
                stream.rested()
        self._prune_finished()
        # Runs that share the streams end together, so the next run takes them all.
        self._interrupt = True

    def _deliver(self, streams: list[Stream], fed: list, reasons: list,
                 seconds: float) -> None:
        """One iteration of a decode run, on the event loop: its outputs become events."""
        self.batches += 1
        self.hooks.batch(len(streams), len(streams), seconds)
        self.hooks.generated(len(streams))
        for stream, value, reason in zip(streams, fed, reasons, strict=True):
            stream.emit(value, reason is not None)


def make_scheduler(engine, adapter, settings, hooks: SchedulerHooks | None, name: str,
                   factory: Callable[..., Scheduler] = Scheduler) -> Scheduler:
    return factory(
        engine,
        adapter,
        max_batch_size=settings.max_batch_size,
        max_batch_delay_s=settings.max_batch_delay_ms / 1000.0,
        max_queue=settings.max_queue,
        prefill_chunk=settings.prefill_chunk_tokens,
        threads=settings.inference_threads,
        hooks=hooks,
        name=name,
    )
