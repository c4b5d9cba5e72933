"""The batching loop: one per model version, batching work across sessions.

Read `_loop` and `_start_batch` top to bottom: when there is work, start a batch: every
active generation (one token each: continuous batching) plus queued work, up to
`max_batch_size` rows; an idle inference thread first gives queued work up to
`max_batch_delay` to gather. The batch runs as one onnxruntime call in an inference thread
(the first of `threads`), then each row gets its result. Up to two batches are in flight: the
next one waits in the thread's queue, so the thread never idles while the event loop hands
results back. (Running step batches on two threads at once was measured slower: the event
loop, which reads and answers every step, loses its core.)

When nothing but generations is running, the batch is a decode run instead (decode.py): the
threads decode iteration after iteration by themselves, each its share of the generations,
until new work, a joining or ending generation, or shutdown needs the event loop.

Rules the batch respects:
- never two rows of one session (`key`) in a batch; a session's work keeps its order;
- queued work forms batches of about half the sessions sending it, so two batches alternate
  (one in the thread, one being answered and refilled by the event loop);
- rows of different lengths share a padded batch with their lengths, but only while padding
  at most doubles the work; an input longer than `prefill_chunk` runs in chunks over several
  iterations (carrying its state), so decode steps of other sessions never wait for a long
  prefill;
- the queue is bounded: `submit` raises QueueFull (503 + Retry-After) when it is full.

Nothing here knows HTTP: results go back through futures and generation events.
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

import numpy as np

from .decode import RunResult, decode_run
from .errors import InferenceFailed, QueueFull, ShuttingDown
from .generation import Generation
from .sampling import sample, top_logprobs

log = logging.getLogger("carousel.service")

RECENT_HORIZON_S = 0.1  # sources seen this recently are expected to send more work soon
MIN_DECODE_SPLIT = 8  # generations per thread before a decode run is split across threads


@dataclass(slots=True, eq=False)
class Work:
    """Input to consume from a state: a session step or one stateless prediction."""

    key: object | None  # the session; None for stateless work
    tokens: np.ndarray  # (T,) int64, T >= 1
    row: np.ndarray | None  # the session's row; None starts from zero state
    top_k: int  # how many likeliest next tokens the answer lists
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.perf_counter)
    consumed: int = 0  # tokens already run (long inputs run in chunks)


@dataclass(slots=True)
class WorkResult:
    row: np.ndarray  # the new row: state after the input, then the last position's logits
    top_tokens: np.ndarray  # (k,) likeliest next tokens
    top_logprobs: np.ndarray  # (k,)


@dataclass(slots=True)
class BatchOutput:
    rows: list[np.ndarray]
    top_tokens: np.ndarray  # (W, kmax) for the work rows
    top_logprobs: np.ndarray
    sampled: np.ndarray  # (G,) next tokens for the generation rows
    seconds: float  # time inside onnxruntime


class SchedulerHooks:
    """What the scheduler reports (metrics); the default does nothing."""

    def batch(self, size: int, tokens: int, seconds: float) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def generated(self, tokens: int) -> None: ...


class Scheduler:
    def __init__(self, engine, *, max_batch_size: int = 64, max_batch_delay_s: float = 0.002,
                 max_queue: int = 1024, prefill_chunk: int = 256, threads: int = 1,
                 hooks: SchedulerHooks | None = None, name: str = "model") -> None:
        self.engine = engine
        self.layout = engine.layout
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.hooks = hooks or SchedulerHooks()
        self.name = name
        self._queue: deque[Work] = deque()
        self._active: list[Generation] = []
        self._recent: dict[object, float] = {}  # key -> last time it submitted work
        self._recent_pruned = 0.0
        self._wake: asyncio.Future | None = None  # set while the loop sleeps
        self._wake_at: float = 1  # queue length that wakes the sleeping loop
        self._deadline: float | None = None  # perf_counter time that wakes it
        # Batches in flight: two at most, or one decode run part per thread.
        self._running: set[asyncio.Task] = set()
        self._stateless = 0  # work without a session (predictions) in the queue right now
        # Thread 0 runs every batch, one at a time; generations alone are split over all.
        self._executors = [ThreadPoolExecutor(1, thread_name_prefix=f"infer-{name}-{i}")
                           for i in range(threads)]
        self._task: asyncio.Task | None = None
        self._closed = False
        self._gens_yielded = False  # the last iteration left the generations out
        # A decode run (generations alone, decode.py) gives the thread back when this is set.
        self._interrupt = False
        self.batches = 0  # iterations run, for tests and /metrics

    # ---------------------------------------------------------------- what callers use

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"sched-{self.name}")

    def submit(self, work: Work) -> None:
        """Queue work; its future gets a WorkResult (or the error of a failed batch)."""
        self._admit(len(self._queue), "requests already queued")
        self._queue.append(work)
        self._interrupt = True
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

    async def run(self, key: object | None, tokens: np.ndarray, row: np.ndarray | None,
                  k: int) -> WorkResult:
        """Submit work and wait for its result."""
        future = asyncio.get_running_loop().create_future()
        self.submit(Work(key, tokens, row, k, future))
        return await future

    def start_generation(self, gen: Generation) -> None:
        """Join the running generations; the first token is sampled from the row's logits."""
        self._admit(len(self._active), "generations running")
        logits = self.layout.logits(gen.row)[None]
        gen.pending = int(sample(logits, [gen.params], np.array([gen.draw()]))[0])
        self._active.append(gen)
        self._interrupt = True
        self._wake_loop()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def generating(self) -> int:
        return len(self._active)

    async def close(self) -> None:
        """Stop: queued work fails with ShuttingDown, generations end with 'shutdown'."""
        self._closed = True
        self._interrupt = True
        self._wake_loop()
        pending = [t for t in (self._task, *self._running) if t is not None]
        if pending:
            # Batches in flight finish (their rows get their answers); then the loop ends.
            _, late = await asyncio.wait(pending, timeout=10.0)
            for task in late:
                task.cancel()
        while self._queue:
            w = self._queue.popleft()
            if not w.future.done():
                w.future.set_exception(ShuttingDown("the server shut down before this ran"))
        for gen in self._active:
            gen.finish("shutdown")
        self._active.clear()
        for executor in self._executors:
            executor.shutdown(wait=False)

    # ---------------------------------------------------------------- the loop

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self._start_batch(loop):
                await self._sleep(loop)  # until new work, a batch ends, or the fill deadline

    def _start_batch(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Start the next batch if it should start now; else say what to wake up for.

        Two batches may be in flight: the second waits in the inference thread's queue and
        starts the moment the first ends, with no hand-over through the event loop (which
        costs ~1 ms of thread wake-up and GIL wait per batch on a busy machine)."""
        self._wake_at, self._deadline = 1, None
        if len(self._running) >= 2:
            self._wake_at = math.inf  # only a finished batch wakes the loop
            return False
        ready_gens = any(not g.in_flight for g in self._active)
        if ready_gens and not self._queue:
            if self._running:
                # Generations only: those waiting join the ones in flight when that batch
                # ends, so all of them decode together in one run instead of splitting
                # into two batches that alternate for good.
                return False
            self._start_decode(loop)
            return True
        if not ready_gens:
            if not self._queue:
                return False
            now = time.perf_counter()
            limit = self._batch_limit(now)
            if len(self._queue) < limit:
                if self._running:  # the thread is busy anyway: the batch can grow meanwhile
                    self._wake_at = limit
                    return False
                deadline = self._queue[0].enqueued_at + self.max_batch_delay_s
                if now < deadline:  # idle thread: give the batch a moment to fill
                    self._wake_at, self._deadline = limit, deadline
                    return False
        gens = self._take_generations()
        works, chunks, head_left = self._take_work(gens)
        if head_left and gens and not self._gens_yielded:
            # The oldest work is too long to share a batch with the generations' single
            # tokens: it runs without them this once (they go on next iteration).
            self._queue.extendleft(reversed(works))
            gens = []
            works, chunks, _ = self._take_work(gens)
        self._gens_yielded = head_left and not gens
        if not gens and not works:
            return False
        for g in gens:
            g.in_flight = True
        self._launch(loop, self._run_batch(loop, gens, works, chunks))
        return True

    def _start_decode(self, loop: asyncio.AbstractEventLoop) -> None:
        """Every generation and nothing else: the threads decode until they are needed
        (decode.py), each thread its share of the generations (one core each, no
        coordination), in calls of at most `max_batch_size` rows taken in turn."""
        self._drop_cancelled()
        gens = self._active
        if not gens:
            return
        self._interrupt = False
        parts = min(len(self._executors), len(gens) // MIN_DECODE_SPLIT) or 1
        for i in range(parts):
            share = gens[i::parts]
            for g in share:
                g.in_flight = True
            self._launch(loop, self._run_generations(loop, share, i))

    def _launch(self, loop: asyncio.AbstractEventLoop, batch) -> None:
        task = loop.create_task(batch)
        self._running.add(task)
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
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
        for gen in [g for g in self._active if g.cancelled and not g.in_flight]:
            # Left between iterations: the pending token was never fed, so it is dropped.
            gen.finish("cancelled")
        self._prune_finished()

    def _prune_finished(self) -> None:
        self._active = [g for g in self._active if g.finish_reason is None]

    def _take_generations(self) -> list[Generation]:
        self._drop_cancelled()
        ready = [g for g in self._active if not g.in_flight]
        room = self.max_batch_size
        if self._queue:  # keep room for queued work so steps never starve behind generations
            room -= min(len(self._queue), self.max_batch_size // 2)
        gens = ready[:room]
        if len(ready) > room:  # round-robin when there are more than fit
            taken = set(map(id, gens))
            self._active = [g for g in self._active if id(g) not in taken] + gens
        return gens

    def _take_work(self, gens: list[Generation]
                   ) -> tuple[list[Work], list[np.ndarray], bool]:
        """Queued work for this batch, oldest first, within the size and padding budget;
        also whether the oldest work had to stay queued."""
        limit = self.max_batch_size if gens else self._batch_limit(time.perf_counter())
        works: list[Work] = []
        chunks: list[np.ndarray] = []
        taken_keys = {g.key for g in gens}
        blocked: set = set()  # a key whose older work stays queued keeps its later work too
        real = len(gens)  # real tokens in the batch (one per generation)
        longest = 1 if gens else 0
        rows = len(gens)
        left: deque[Work] = deque()
        head_left = False
        while self._queue:
            w = self._queue.popleft()
            if w.future.done():  # its caller gave up: skip without running it
                if w.key is None:
                    self._stateless -= 1
                continue
            chunk = w.tokens[w.consumed: w.consumed + self.prefill_chunk]
            n = len(chunk)
            fits = (
                rows < limit
                and (w.key is None or (w.key not in taken_keys and w.key not in blocked))
                # padding may at most double the computed tokens (small batches always fit)
                and (rows + 1) * max(longest, n) <= max(2 * (real + n), 16)
            )
            if not fits:
                head_left = head_left or (not works and not left)
                left.append(w)
                if w.key is not None:
                    blocked.add(w.key)
                if rows >= limit:
                    break
                continue
            works.append(w)
            chunks.append(chunk)
            if w.key is not None:
                taken_keys.add(w.key)
            else:
                self._stateless -= 1
            rows += 1
            real += n
            longest = max(longest, n)
        left.extend(self._queue)
        self._queue = left
        return works, chunks, head_left

    async def _run_batch(self, loop, gens: list[Generation], works: list[Work],
                         chunks: list[np.ndarray]) -> None:
        started = time.perf_counter()
        for w in works:
            if w.consumed == 0:
                self.hooks.queue_wait(started - w.enqueued_at)
        uniforms = np.array([g.draw() for g in gens])
        inputs = [np.array([g.pending], dtype=np.int64) for g in gens] + chunks
        rows = [g.row for g in gens] + [w.row for w in works]
        kmax = max((w.top_k for w in works), default=0)
        params = [g.params for g in gens]
        try:
            out: BatchOutput = await loop.run_in_executor(
                self._executors[0], self._compute, inputs, rows, kmax, params, uniforms)
        except Exception as e:  # onnxruntime failed: every row of the batch fails with it
            log.exception("%s: inference failed on a batch of %d", self.name, len(rows))
            err = InferenceFailed(f"inference failed: {e}")
            for w in works:
                if not w.future.done():
                    w.future.set_exception(err)
            for g in gens:
                g.in_flight = False
                g.finish("error")
            return
        self.batches += 1
        self.hooks.batch(len(rows), sum(len(x) for x in inputs), out.seconds)
        try:
            self._hand_back(gens, works, chunks, out)
        except Exception:  # a bug here must not stop the loop that every request waits on
            log.exception("%s: handing back a batch failed", self.name)
            for w in works:
                if not w.future.done():
                    w.future.set_exception(InferenceFailed("internal error handing back"))
            for g in gens:
                g.in_flight = False
                g.finish("error")

    async def _run_generations(self, loop, gens: list[Generation], thread: int) -> None:
        """Generations alone, decoded back to back in the thread (decode.py); each
        iteration's tokens reach their streams while the next iteration runs."""

        def post(group: list[Generation], fed: np.ndarray, reasons: list,
                 seconds: float) -> None:
            loop.call_soon_threadsafe(self._deliver, group, fed, reasons, seconds)

        def should_stop() -> bool:
            return self._interrupt or any(g.cancelled for g in gens)

        try:
            run: RunResult = await loop.run_in_executor(
                self._executors[thread], decode_run, self.engine, gens, post, should_stop,
                self.max_batch_size)
        except Exception as e:  # a bug in the run itself: nothing was fed, all fail
            log.exception("%s: a decode run of %d failed", self.name, len(gens))
            run = RunResult([g.row for g in gens], np.full(len(gens), -1), [None] * len(gens),
                            0, e)
        if run.error is not None:
            log.error("%s: inference failed in a decode run of %d after %d iterations: %s",
                      self.name, len(gens), run.iterations, run.error)
        for i, gen in enumerate(gens):
            gen.in_flight = False
            gen.row = run.rows[i]
            if run.reasons[i] is not None:
                gen.finish(run.reasons[i])
            elif run.error is not None:
                gen.finish("error")
            else:
                gen.pending = int(run.pending[i])
        self._prune_finished()
        # Runs that share the generations end together, so the next run takes them all.
        self._interrupt = True

    def _deliver(self, gens: list[Generation], fed: np.ndarray, reasons: list,
                 seconds: float) -> None:
        """One iteration of a decode run, on the event loop: its tokens become events."""
        self.batches += 1
        self.hooks.batch(len(gens), len(gens), seconds)
        self.hooks.generated(len(gens))
        for gen, token, reason in zip(gens, fed.tolist(), reasons, strict=True):
            gen.emit_token(token, reason is not None)

    def _compute(self, inputs: list[np.ndarray], rows: list, kmax: int,
                 params: list, uniforms: np.ndarray) -> BatchOutput:
        """The worker thread's part: pad, run, split, and the per-row arithmetic."""
        lengths = np.fromiter((len(x) for x in inputs), dtype=np.int32, count=len(inputs))
        longest = int(lengths.max())
        if longest == 1:  # decode steps: one token each, no padding
            tokens = np.concatenate(inputs).reshape(-1, 1)
        else:
            tokens = np.zeros((len(inputs), longest), dtype=np.int64)
            for i, x in enumerate(inputs):
                tokens[i, : len(x)] = x
        state = self.layout.stack(rows)
        # A prefill is long and rows cannot split it across threads: the engine's wide
        # session runs it on all of them (decode steps at batch 1 gained nothing: measured).
        wide = longest > 1
        t0 = time.perf_counter()
        last, outputs = self.engine.infer(tokens, lengths, state, wide)
        seconds = time.perf_counter() - t0
        new_rows = self.layout.unstack(outputs, last)
        g = len(params)
        sampled = sample(last[:g], params, uniforms) if g else np.empty(0, dtype=np.int64)
        top_tokens, top_lps = top_logprobs(last[g:], kmax)
        return BatchOutput(new_rows, top_tokens, top_lps, sampled, seconds)

    def _hand_back(self, gens: list[Generation], works: list[Work], chunks: list[np.ndarray],
                   out: BatchOutput) -> None:
        g = len(gens)
        finished = 0
        for i, gen in enumerate(gens):
            gen.in_flight = False
            finished += gen.advance(out.rows[i], int(out.sampled[i]))
        if g:
            self.hooks.generated(g)
            if finished:
                self._prune_finished()
        unfinished: list[Work] = []
        for j, (w, chunk) in enumerate(zip(works, chunks, strict=True)):
            row = out.rows[g + j]
            w.consumed += len(chunk)
            if w.consumed < len(w.tokens):  # a long input: its next chunk goes first next time
                w.row = row
                unfinished.append(w)
                if w.key is None:  # back in the queue: counted again (see _batch_limit)
                    self._stateless += 1
            elif not w.future.done():
                k = w.top_k
                w.future.set_result(WorkResult(row, out.top_tokens[j, :k], out.top_logprobs[j, :k]))
        self._queue.extendleft(reversed(unfinished))


def make_scheduler(engine, settings, hooks: SchedulerHooks | None, name: str,
                   factory: Callable[..., Scheduler] = Scheduler) -> Scheduler:
    return factory(
        engine,
        max_batch_size=settings.max_batch_size,
        max_batch_delay_s=settings.max_batch_delay_ms / 1000.0,
        max_queue=settings.max_queue,
        prefill_chunk=settings.prefill_chunk_tokens,
        threads=settings.inference_threads,
        hooks=hooks,
        name=name,
    )
