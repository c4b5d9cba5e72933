"""A stream's hold on its session: the lease's token, the checkpoints, the final write.

A generation takes its session for as long as it runs: in this process the manager's lock,
in the store a lease whose token every write carries (store.py). The writer here writes the
session back. A shared store gets checkpoints as it goes: decode runs stop every half
checkpoint interval (scheduler.py), and when a stream's row comes out due (half of
`checkpoint_tokens` tokens or of `checkpoint_ms` since the last write) it is written, so at
least one write falls in every full interval. A row is written only once the stream's
consumer has taken every event up to its position (or has gone, or takes no events: a plain
response is sent whole after the write), so the store never holds tokens the client was not
sent: after a crash the stored session is a prefix of what the client received. The end
event comes after the final write, with the position the store holds; a stream whose lease
was lost (or whose store stayed unreachable past the lease) ends `lease_lost` /
`store_unavailable` at the position last written.

Meanwhile the session is in use: a session's idle time (its TTL) counts from its last write,
so the writer writes it every half TTL (`keep_alive`: what the store holds, touched, nothing
new), and neither a read nor the sweeper finds it expired however long the stream runs; its
idle time starts again with the final write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import StoreUnavailable
from .store import Change, SessionRecord, SessionStore, Status

log = logging.getLogger("carousel.service")


@dataclass(frozen=True, slots=True)
class Checkpoints:
    """How often a generation's state is written to a shared store as it goes (0: never)."""

    tokens: int = 0
    seconds: float = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.seconds)


class StreamWriter:
    """A stream's hold on its session: the lease's token, the checkpoints, the final write.

    The stream tells it when its row is current (`rested`: a decode run ended, the row
    holds everything fed), when its consumer has taken more events (`delivered`), and when
    it has finished. A row is written only once the consumer has taken every event up to
    its position (or has gone, or takes no events: a plain response is sent whole after the
    write), so the store never holds tokens the client was not sent. One write at a time;
    the end event comes after the final one, with the position the store holds."""

    def __init__(self, store: SessionStore, record: SessionRecord, token: int, stream, *,
                 lease_s: float, checkpoints: Checkpoints,
                 ended: Callable[[StreamWriter], None]) -> None:
        self.store = store
        self.lease_s = lease_s
        self.checkpoints = checkpoints
        self.ended = ended  # the manager's: the lock is released, the stream forgotten
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
        self._timer: asyncio.TimerHandle | None = None  # the next keep_alive

    # -- what the stream reports

    def rested(self) -> None:
        cp = self.checkpoints
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

    def keep_alive(self) -> None:
        """Touch the session once half its TTL has passed since its last write (and look
        again later): one write at a time, so a write already under way does it."""
        self._timer = None
        if self.finished or self.lost or self.gone:
            return
        ttl = self.record.ttl_s
        wait = self.record.last_used_at + ttl / 2 - time.time()
        if wait <= 0:
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._touch())
            wait = ttl / 8  # soon again, in case the store could not take it
        self._timer = asyncio.get_running_loop().call_later(max(wait, ttl / 8),
                                                             self.keep_alive)

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

    async def _touch(self) -> None:
        record = self.record
        await self._commit(record.row, record.position, final=False)
        await self._write()  # what came meanwhile (one write at a time)

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
        store, record = self.store, self.record
        touch = position == record.position
        if touch:  # nothing new (a touch): the last step stays retryable
            change = Change(row, position, record.last_start, record.last_digest,
                            record.last_result, used_at=time.time())
        else:
            change = Change(row, position, used_at=time.time())
        deadline = self.renewed + self.lease_s  # the lease holds this long unrenewed
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
            if not touch:  # a checkpoint's interval counts from the last new state
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
                    await self.store.release(record.session_id, self.token)
                except StoreUnavailable:
                    pass  # it expires by itself
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self.ended(self)
        if self.lost:
            stream.end("lease_lost", record.position)
        elif self.unreachable:
            stream.end("store_unavailable", record.position)
        elif self.gone:
            stream.end(stream.finish_reason, stream.position)
        else:
            stream.end(stream.finish_reason, record.position)
