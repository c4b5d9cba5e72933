"""Sessions: create, step, stream, fork, delete; positions that make retries safe.

The manager is the only writer of session records, and knows steps only as tensors: a
`Step` is a model's per-step inputs (checked by its adapter), how many steps along the
sequence axis they hold, the adapter's answer options, and a digest that recognises the
very same step when a client retries it. Every operation validates everything first and
writes last, so a rejected request changes nothing.

Writes are compare-and-set (store.py): a step is computed from the record the manager
holds and committed against it; if the store holds another record by then (another replica
applied a step), the step was not applied, and it is decided again from the store's record:
a retry of the step that won is answered as that step was, any other position is a 409, a
step without a position runs again on the new state. So no step is ever applied twice, and
an answer is sent only once its write is confirmed. Steps on one session also hold its lock
here (locks.py): in one process they apply one at a time in arrival order without ever
conflicting; across replicas the compare-and-set is the guarantee.

A stream (a generation) holds the lock and, in the store, the session's lease, until what
it fed is written back (`_Writer`): a shared store gets checkpoints as it goes (at least
every `checkpoint_tokens` tokens and `checkpoint_ms` ms), each one only of tokens whose
events its consumer has already taken, so what the store holds is always a prefix of what
the client received; the end event follows the final write and says where the session is.

Rows are never changed in place (the scheduler always makes new ones), so a fresh session
shares one zero row and a fork shares its parent's row until either moves on.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .decode import Stream
from .errors import (
    AtCapacity,
    InvalidInput,
    PositionMismatch,
    QueueFull,
    ServiceError,
    SessionBusy,
    StoreUnavailable,
    UnknownSession,
)
from .locks import KeyedLocks
from .registry import ModelVersion, Registry
from .store import Change, Commit, SessionRecord, SessionStore, Status, StoreFull

log = logging.getLogger("carousel.service")

CONFLICT_ATTEMPTS = 4  # a step recomputed this often on newer state gives up (503)


@dataclass(slots=True)
class Step:
    """One step for a session, as its model's adapter prepared it."""

    inputs: dict[str, np.ndarray]  # per-step inputs, batch axis removed
    length: int  # steps along the sequence axis: what the position advances by
    options: object = None  # the adapter's answer options (the byte LM: top k)
    digest: bytes = b""  # recognises the same step again (a retry)


@dataclass(slots=True)
class Outcome:
    """What a step left: the session's row and position after it, and the adapter's result
    (a replayed step's result is recomputed, or kept, by the adapter)."""

    row: np.ndarray
    position: int
    result: object
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Checkpoints:
    """How often a generation's state is written to a shared store as it goes (0: never)."""

    tokens: int = 0
    seconds: float = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.seconds)


class SessionHooks:
    """What the manager reports (metrics); the default does nothing."""

    def created(self, model: str) -> None: ...
    def ended(self, model: str, reason: str) -> None: ...  # reason: expired | deleted
    def consumed(self, model: str, version: int, tokens: int) -> None: ...


def new_session_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits, URL-safe


class SessionManager:
    def __init__(self, registry: Registry, store: SessionStore, *, session_ttl_s: float,
                 max_session_ttl_s: float, max_sessions: int, sweep_interval_s: float = 10.0,
                 hooks: SessionHooks | None = None, lease_s: float = 5.0,
                 checkpoints: Checkpoints = Checkpoints()) -> None:
        self.registry = registry
        self.store = store
        self.session_ttl_s = session_ttl_s
        self.max_session_ttl_s = max_session_ttl_s
        self.max_sessions = max_sessions
        self.sweep_interval_s = sweep_interval_s
        self.hooks = hooks or SessionHooks()
        self.lease_s = lease_s
        # Checkpoints only where they outlive the process.
        self.checkpoints = checkpoints if store.shared else Checkpoints()
        self._locks = KeyedLocks()
        self._zero_rows: dict[ModelVersion, np.ndarray] = {}
        self._writers: dict[str, _Writer] = {}  # streams holding their session's lease
        self._creating = 0
        self._last_sweep = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def create(self, mv: ModelVersion, ttl_s: float | None = None,
                     step: Step | None = None, session_id: str | None = None,
                     replace: bool = False) -> tuple[SessionRecord, Outcome | None]:
        """A new session, primed with `step` if given (the priming runs before the session
        exists: a failure leaves none). `session_id` names it (a v2 sequence); `replace`
        starts that id afresh if it is live."""
        ttl = self._ttl(ttl_s)
        session_id = session_id or new_session_id()
        self._creating += 1
        try:
            if not replace or await self.store.get(session_id) is None:
                await self._check_capacity()
            outcome = None
            row, position = self._zero_row(mv), 0
            if step is not None:
                result = await mv.scheduler.run(session_id, step.inputs, step.length, None,
                                                step.options)
                row, position = result.row, step.length
                outcome = Outcome(row, position, result.result)
            record = SessionRecord(session_id, mv.name, mv.version, row, ttl, position=position)
            if step is not None:
                record.last_start, record.last_digest = 0, step.digest
                record.last_result = self._kept(mv, outcome.result)
            if replace:
                await self.store.delete(session_id)
            await self._insert(record)
        finally:
            self._creating -= 1
        self.hooks.created(mv.name)
        if step is not None:
            self.hooks.consumed(mv.name, mv.version, step.length)
        return record, outcome

    async def restore(self, mv: ModelVersion, row: np.ndarray, position: int,
                      ttl_s: float | None = None, session_id: str | None = None,
                      replace: bool = False) -> SessionRecord:
        """A new session holding a given state (a portable session imported); `session_id`
        and `replace` as for `create`."""
        ttl = self._ttl(ttl_s)
        session_id = session_id or new_session_id()
        self._creating += 1
        try:
            if not replace or await self.store.get(session_id) is None:
                await self._check_capacity()
            record = SessionRecord(session_id, mv.name, mv.version, row, ttl,
                                   position=position)
            if replace:
                await self.store.delete(session_id)
            await self._insert(record)
        finally:
            self._creating -= 1
        self.hooks.created(mv.name)
        return record

    async def get(self, session_id: str) -> SessionRecord:
        record = await self.store.get(session_id)
        if record is None:
            raise UnknownSession(session_id)
        return record

    async def delete(self, session_id: str) -> None:
        record = await self.store.delete(session_id)
        if record is None:
            raise UnknownSession(session_id)
        if record.expired(time.time()):  # it was already gone, the sweeper had not seen it
            self.hooks.ended(record.model, "expired")
            raise UnknownSession(session_id)
        self.hooks.ended(record.model, "deleted")

    async def fork(self, session_id: str, ttl_s: float | None = None) -> SessionRecord:
        await self._locks.acquire(session_id)  # the copy sees no half-applied step
        try:
            src = await self.get(session_id)
            ttl = src.ttl_s if ttl_s is None else self._ttl(ttl_s)
            self._creating += 1
            try:
                await self._check_capacity()
                record = SessionRecord(new_session_id(), src.model, src.version, src.row, ttl,
                                       position=src.position)
                await self._insert(record)
            finally:
                self._creating -= 1
        finally:
            self._locks.release(session_id)
        self.hooks.created(record.model)
        return record

    # ------------------------------------------------------------------ steps

    async def step(self, session_id: str, prepare: Callable[[ModelVersion], Step],
                   position: int | None = None, *, replay: Callable | None = None,
                   ) -> tuple[SessionRecord, Outcome]:
        """Apply a step. `prepare(mv)` builds it once the session's model is known (and
        raises for bad input, changing nothing). With `position`: apply only if the session
        is there; if this exact step (same position, same digest) was the last one applied,
        answer it again: `replay(mv, record, step)` recomputes its result, else the record's
        kept copy is returned."""
        await self._locks.acquire(session_id)
        try:
            # A cached record may be stale (another replica moved the session): computing on
            # it is safe, since the commit only applies on the record it was computed from.
            record = self.store.cached(session_id)
            current = record is not None and not self.store.shared
            if record is None:
                record, current = await self.get(session_id), True
            mv = step = None
            for _ in range(CONFLICT_ATTEMPTS):
                if mv is None or (record.model, record.version) != (mv.name, mv.version):
                    try:
                        mv = self.registry.get(record.model, record.version)
                        step = prepare(mv)
                    except ServiceError:
                        if current:
                            raise
                        mv = None  # refuse only on what the store holds
                        record, current = await self.get(session_id), True
                        continue
                if position is not None and position != record.position:
                    if not current:  # decide on what the store holds, not on a stale copy
                        record, current = await self.get(session_id), True
                        continue
                    if position == record.last_start and step.digest == record.last_digest:
                        result = (replay(mv, record, step) if replay is not None
                                  else record.last_result)
                        return record, Outcome(record.row, record.position, result, True)
                    raise PositionMismatch(position, record.position)
                result = await mv.scheduler.run(session_id, step.inputs, step.length,
                                                record.row, step.options)
                change = Change(result.row, record.position + step.length, record.position,
                                step.digest, self._kept(mv, result.result), time.time())
                commit = await self.store.commit(record, change)
                if commit.status is Status.APPLIED:
                    break
                record, current = self._refused(session_id, commit), True
            else:
                raise SessionBusy(f"session {session_id!r} kept changing under this step; "
                                  "retry it with its position", retry_after=1)
        finally:
            self._locks.release(session_id)
        self.hooks.consumed(mv.name, mv.version, step.length)
        return record, Outcome(record.row, record.position, result.result)

    def _refused(self, session_id: str, commit: Commit) -> SessionRecord:
        """The record to decide again from after a refused commit, or the error to answer."""
        if commit.status is Status.CONFLICT:
            return commit.current
        if commit.status is Status.BUSY:
            raise SessionBusy(f"session {session_id!r} is generating on another replica; "
                              "retry once it ends", retry_after=commit.retry_after)
        raise UnknownSession(session_id)  # deleted while the step ran

    async def predict(self, mv: ModelVersion, steps: list[Step]) -> list[Outcome]:
        """Stateless: each step from a zero state, batched with everything else queued."""
        scheduler = mv.scheduler
        if scheduler.queued + len(steps) > scheduler.max_queue:
            raise QueueFull(f"{mv.name}: the queue cannot take {len(steps)} more inputs now",
                            retry_after=1)
        results = await asyncio.gather(
            *(scheduler.run(None, s.inputs, s.length, None, s.options) for s in steps))
        self.hooks.consumed(mv.name, mv.version, sum(s.length for s in steps))
        return [Outcome(r.row, s.length, r.result) for r, s in zip(results, steps, strict=True)]

    # ------------------------------------------------------------------ streams

    async def start_stream(self, session_id: str,
                           make: Callable[[ModelVersion, SessionRecord], Stream]) -> Stream:
        """Join the model's running streams (generations); returns once it has joined (or
        raises). `make(mv, record)` builds the stream from the session (and raises for bad
        input). The session stays locked, and leased in the store, until what the stream
        fed is written back."""
        await self._locks.acquire(session_id)
        try:
            record = await self.get(session_id)  # what the store holds (a cheap check)
            for _ in range(CONFLICT_ATTEMPTS):
                mv = self.registry.get(record.model, record.version)
                stream = make(mv, record)
                token = await self.store.lease(record, self.lease_s)
                if isinstance(token, int):
                    break
                record = self._refused(session_id, token)
            else:
                raise SessionBusy(f"session {session_id!r} kept changing; retry", retry_after=1)
            writer = _Writer(self, record, token, stream)
            stream.watcher = writer
            try:
                mv.scheduler.start_stream(stream)
            except BaseException:
                await self.store.release(session_id, token)
                raise
        except BaseException:
            self._locks.release(session_id)
            raise
        self._writers[session_id] = writer
        return stream

    def _stream_ended(self, writer: _Writer) -> None:
        self._writers.pop(writer.record.session_id, None)
        self._locks.release(writer.record.session_id)

    async def run_lease_keeper(self) -> None:
        """Renew the leases of running streams well before they expire; a stream whose
        lease is gone (the store was unreachable for longer than the lease) stops."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            writers = dict(self._writers)
            if not writers:
                continue
            now = time.monotonic()
            try:
                lost = await self.store.renew({sid: w.token for sid, w in writers.items()},
                                              self.lease_s)
            except StoreUnavailable:  # not renewed: lost once the lease has run out
                lost = {sid for sid, w in writers.items() if now - w.renewed >= self.lease_s}
            except Exception:
                log.exception("renewing generation leases failed")
                continue
            for sid, writer in writers.items():
                if sid in lost:
                    writer.lose()
                else:
                    writer.renewed = now

    @property
    def busy(self) -> int:
        """Streams still running or being written back (shutdown waits for them)."""
        return len(self._writers)

    async def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._writers and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ expiry

    async def sweep(self) -> int:
        self._last_sweep = time.monotonic()
        removed = await self.store.expire()
        for gone in removed:
            self.hooks.ended(gone.model, "expired")
        return len(removed)

    async def run_sweeper(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.sweep()
            except Exception as e:  # a failing store must not kill the sweeper
                if not failing:  # once per outage, not every interval
                    log.warning("session sweep failed: %s", e)
                failing = True
            else:
                if failing:
                    log.info("session sweep works again")
                failing = False

    # ------------------------------------------------------------------ helpers

    def _ttl(self, ttl_s: float | None) -> float:
        if ttl_s is None:
            return self.session_ttl_s
        if not (0 < ttl_s <= self.max_session_ttl_s):
            raise InvalidInput(f"ttl_s must be > 0 and at most {self.max_session_ttl_s:g} seconds")
        return float(ttl_s)

    def _full(self) -> AtCapacity:
        return AtCapacity(
            f"the server holds its maximum of {self.max_sessions} sessions; delete unused "
            "sessions or retry later",
            retry_after=self.sweep_interval_s,
        )

    async def _check_capacity(self) -> None:
        count = await self.store.count()
        if count + self._creating > self.max_sessions and time.monotonic() - self._last_sweep > 1:
            await self.sweep()  # expired sessions may still be counted: reclaim them first
            count = await self.store.count()
        if count + self._creating > self.max_sessions:
            raise self._full()

    async def _insert(self, record: SessionRecord) -> None:
        """Add a new record; the store counts the cap again (across replicas, atomically)."""
        try:
            created = await self.store.put(record, create=True, limit=self.max_sessions)
        except StoreFull:
            raise self._full() from None
        if not created:
            raise InvalidInput(f"session {record.session_id!r} exists already")

    def _zero_row(self, mv: ModelVersion) -> np.ndarray:
        row = self._zero_rows.get(mv)
        if row is None:
            row = self._zero_rows[mv] = mv.layout.initial_row()
            row.flags.writeable = False
        return row

    @staticmethod
    def _kept(mv: ModelVersion, result):
        """What a record keeps of its last step to answer a retry: nothing where the
        adapter recomputes it from the row (the byte LM's logits are there)."""
        return None if mv.layout.extra_size else result


class _Writer:
    """A stream's hold on its session: the lease's token, the checkpoints, the final write.

    The stream tells it when its row is current (`rested`: a decode run ended, the row
    holds everything fed), when its consumer has taken more events (`delivered`), and when
    it has finished. A row is written only once the consumer has taken every event up to
    its position (or has gone, or takes no events: a plain response is sent whole after the
    write), so the store never holds tokens the client was not sent. One write at a time;
    the end event comes after the final one, with the position the store holds."""

    def __init__(self, manager: SessionManager, record: SessionRecord, token: int,
                 stream) -> None:
        self.manager = manager
        self.record = record
        self.token = token
        self.stream = stream
        self.renewed = time.monotonic()
        self.written_at = time.monotonic()
        self.pending: tuple[np.ndarray, int] | None = None  # (row, position) to write
        self.finished = False
        self.lost = False
        self.gone = False
        self.unreachable = False
        self.released = False
        self._task: asyncio.Task | None = None

    # -- what the stream reports

    def rested(self) -> None:
        cp = self.manager.checkpoints
        s = self.stream
        if not cp.enabled or not s.streaming or self.lost or self.gone:
            return
        # Half the interval, since runs stop only every half interval (scheduler.py).
        due = ((cp.tokens and s.position - self.record.position >= cp.tokens / 2)
               or (cp.seconds and time.monotonic() - self.written_at >= cp.seconds / 2))
        if due and s.position > self.record.position:
            self.pending = (s.row, s.position)
            self._kick()

    def delivered(self) -> None:
        if self.pending is not None:
            self._kick()

    def finish(self) -> None:
        self.finished = True
        s = self.stream
        self.pending = (s.row, s.position) if s.position > self.record.position else None
        self._kick()

    def lose(self) -> None:
        """The lease is gone: stop the stream, write nothing more."""
        if not self.lost:
            self.lost = True
            log.warning("session %r: the generation lost its lease; stopping it",
                        self.record.session_id)
            self.stream.cancel()

    # -- writing

    def _writable(self) -> bool:
        if self.pending is None:
            return self.finished
        s = self.stream
        return not s.streaming or s.cancelled or s.delivered >= self.pending[1]

    def _kick(self) -> None:
        if (self._task is None or self._task.done()) and self._writable():
            self._task = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while self.pending is not None and self._writable():
            row, position = self.pending
            self.pending = None
            final = self.finished and self.pending is None
            await self._commit(row, position, final)
            if self.finished and self.pending is None:
                break
        if self.finished and self.pending is None:
            await self._end()

    async def _commit(self, row, position: int, final: bool) -> None:
        if self.lost or self.gone:
            return
        manager, store = self.manager, self.manager.store
        change = Change(row, position, used_at=time.time())
        deadline = self.renewed + manager.lease_s  # the lease holds this long unrenewed
        while True:
            try:
                commit = await store.commit(self.record, change, lease=self.token,
                                            release=final)
            except StoreUnavailable:
                # A checkpoint can wait for the next one; the final write tries until the
                # lease would have run out (the store may be back by then).
                if not final or time.monotonic() >= deadline:
                    self.unreachable = final
                    return
                await asyncio.sleep(0.1)
                continue
            break
        self.unreachable = False
        if commit.status is Status.APPLIED:
            self.written_at = time.monotonic()
            self.released = final
            return
        if commit.status is Status.GONE:
            self.gone = True  # deleted meanwhile: it stays deleted
        else:
            self.lose()

    async def _end(self) -> None:
        stream, record = self.stream, self.record
        try:
            if not (self.lost or self.gone or self.unreachable or self.released):
                try:  # nothing was left to write: just end the lease
                    await self.manager.store.release(record.session_id, self.token)
                except StoreUnavailable:
                    pass  # it expires by itself
        finally:
            self.manager._stream_ended(self)
        if self.lost:
            stream.end("lease_lost", record.position)
        elif self.unreachable:
            stream.end("store_unavailable", record.position)
        elif self.gone:
            stream.end(stream.finish_reason, stream.position)
        else:
            stream.end(stream.finish_reason, record.position)
