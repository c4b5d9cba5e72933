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
it fed is written back (writeback.py: checkpoints as it goes for a shared store, the final
write, then the end event).

Rows are never changed in place (the scheduler always makes new ones), so a fresh session
shares one zero row and a fork shares its parent's row until either moves on.

Tenants (auth.py): every operation takes the caller's `tenant` (None on a server without
keys). A session belongs to the tenant that made it (a fork to the tenant that forked it),
and to any other caller it does not exist: `get` raises UnknownSession for it exactly as for
a missing id, and every other operation looks the session up through `get`. The manager
also keeps each tenant's limits that depend on what it holds: live sessions (counted here
as records are made and removed: created, forked, deleted, replaced, swept) and running
generations (from joining to the write-back), and it spends the tenant's tokens/s bucket
for work about to run, giving back what then did not run.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .decode import Stream
from .errors import (
    AtCapacity,
    InvalidInput,
    PositionMismatch,
    ServiceError,
    SessionBusy,
    SessionContended,
    StoreUnavailable,
    TenantLimit,
    UnknownSession,
)
from .locks import KeyedLocks
from .registry import ModelVersion, Registry
from .store import Change, Commit, SessionRecord, SessionStore, Status, StoreFull
from .writeback import Checkpoints, StreamWriter

if TYPE_CHECKING:
    from .auth import Tenant

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


class SessionHooks:
    """What the manager reports (metrics); the default does nothing."""

    def created(self, model: str) -> None: ...
    def ended(self, model: str, reason: str) -> None: ...  # reason: expired | deleted
    def consumed(self, model: str, version: int, tokens: int) -> None: ...


def new_session_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits, URL-safe


def owner_of(tenant: Tenant | None) -> str | None:
    return None if tenant is None else tenant.name


class SessionManager:
    def __init__(self, registry: Registry, store: SessionStore, *, session_ttl_s: float,
                 max_session_ttl_s: float, max_sessions: int, sweep_interval_s: float = 10.0,
                 max_waiting: int | None = None, hooks: SessionHooks | None = None,
                 lease_s: float = 5.0, checkpoints: Checkpoints | None = None) -> None:
        self.registry = registry
        self.store = store
        self.session_ttl_s = session_ttl_s
        self.max_session_ttl_s = max_session_ttl_s
        self.max_sessions = max_sessions
        self.sweep_interval_s = sweep_interval_s
        self.max_waiting = max_waiting  # requests waiting on one session's lock (None: any)
        self.hooks = hooks or SessionHooks()
        self.lease_s = lease_s
        # Checkpoints only where they outlive the process.
        self.checkpoints = (checkpoints or Checkpoints()) if store.shared else Checkpoints()
        self._locks = KeyedLocks()
        self._zero_rows: dict[ModelVersion, np.ndarray] = {}
        self._writers: dict[str, StreamWriter] = {}  # streams holding their session's lease
        self._creating = 0
        self._last_sweep = 0.0
        self._held: dict[str, int] = {}  # per tenant: live sessions, and ones being made
        self._generating: dict[str, int] = {}  # per tenant: generations running
        if not store.shared and hasattr(store, "live"):  # records a snapshot brought back
            for record in store.live():
                self._hold(record.owner)

    # ------------------------------------------------------------------ lifecycle

    async def create(self, mv: ModelVersion, ttl_s: float | None = None,
                     step: Step | None = None, session_id: str | None = None,
                     replace: bool = False, *, tenant: Tenant | None = None,
                     start: tuple[np.ndarray, int] | None = None,
                     ) -> tuple[SessionRecord, Outcome | None]:
        """A new session of `tenant`, primed with `step` if given (the priming runs before
        the session exists: a failure leaves none). `session_id` names it (a v2 sequence);
        `replace` starts that id afresh if it is live; `start` is the (row, position) it
        begins from instead of the zero state (restore)."""
        ttl = self._ttl(ttl_s)
        session_id = session_id or new_session_id()
        owner = owner_of(tenant)
        self._creating += 1
        held = False
        try:
            live = await self.store.get(session_id) if replace else None
            if live is not None and live.owner != owner:
                raise InvalidInput(f"session {session_id!r} exists already")
            if live is None:  # replacing a live session adds none
                await self._check_capacity(tenant)
            held = self._hold(owner)
            outcome = None
            row, position = start if start is not None else (self._zero_row(mv), 0)
            if step is not None:
                result = await self._run(mv, tenant, session_id, step, None)
                row, position = result.row, step.length
                outcome = Outcome(row, position, result.result)
            record = SessionRecord(session_id, mv.name, mv.version, row, ttl, position=position,
                                   owner=owner)
            if step is not None:
                record.last_start, record.last_digest = 0, step.digest
                record.last_result = self._kept(mv, outcome.result)
            if replace and (old := await self.store.delete(session_id)) is not None:
                self._removed(old, "deleted")
            await self._insert(record)
            held = False  # the record holds its place now
        finally:
            self._creating -= 1
            if held:
                self._let_go(owner)
        self.hooks.created(mv.name)
        if step is not None:
            self.hooks.consumed(mv.name, mv.version, step.length)
        return record, outcome

    async def restore(self, mv: ModelVersion, row: np.ndarray, position: int,
                      ttl_s: float | None = None, session_id: str | None = None,
                      replace: bool = False, *, tenant: Tenant | None = None) -> SessionRecord:
        """A new session of `tenant` holding a given state (a portable session imported:
        it belongs to whoever imports it); `session_id` and `replace` as for `create`."""
        record, _ = await self.create(mv, ttl_s, None, session_id, replace, tenant=tenant,
                                      start=(row, position))
        return record

    async def get(self, session_id: str, tenant: Tenant | None = None) -> SessionRecord:
        """The live session, if it is the caller's. Another tenant's session is answered
        exactly as a missing one: its existence is not disclosed."""
        record = await self.store.get(session_id)
        if record is None or record.owner != owner_of(tenant):
            raise UnknownSession(session_id)
        return record

    async def delete(self, session_id: str, tenant: Tenant | None = None) -> None:
        await self.get(session_id, tenant)
        record = await self.store.delete(session_id)
        if record is None:
            raise UnknownSession(session_id)
        if record.expired(time.time()):  # it was already gone, the sweeper had not seen it
            self._removed(record, "expired")
            raise UnknownSession(session_id)
        self._removed(record, "deleted")

    async def fork(self, session_id: str, ttl_s: float | None = None, *,
                   tenant: Tenant | None = None) -> SessionRecord:
        """A copy of the caller's session, owned by the caller."""
        owner = owner_of(tenant)
        await self._acquire(session_id)  # the copy sees no half-applied step
        try:
            src = await self.get(session_id, tenant)
            ttl = src.ttl_s if ttl_s is None else self._ttl(ttl_s)
            self._creating += 1
            held = False
            try:
                await self._check_capacity(tenant)
                held = self._hold(owner)
                record = SessionRecord(new_session_id(), src.model, src.version, src.row, ttl,
                                       position=src.position, owner=owner)
                await self._insert(record)
                held = False  # the record holds its place now
            finally:
                self._creating -= 1
                if held:
                    self._let_go(owner)
        finally:
            self._locks.release(session_id)
        self.hooks.created(record.model)
        return record

    # ------------------------------------------------------------------ steps

    async def step(self, session_id: str, prepare: Callable[[ModelVersion], Step],
                   position: int | None = None, *, replay: Callable | None = None,
                   tenant: Tenant | None = None) -> tuple[SessionRecord, Outcome]:
        """Apply a step. `prepare(mv)` builds it once the session's model is known (and
        raises for bad input, changing nothing). With `position`: apply only if the session
        is there; if this exact step (same position, same digest) was the last one applied,
        answer it again: `replay(mv, record, step)` recomputes its result, else the record's
        kept copy is returned."""
        await self._acquire(session_id)
        try:
            # A cached record may be stale (another replica moved the session): computing on
            # it is safe, since the commit only applies on the record it was computed from.
            owner = owner_of(tenant)
            record = self.store.cached(session_id)
            current = record is not None and not self.store.shared
            if record is None or (record.owner != owner and not current):
                record, current = await self.get(session_id, tenant), True
            elif record.owner != owner:
                raise UnknownSession(session_id)  # another tenant's: as if missing
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
                        record, current = await self.get(session_id, tenant), True
                        continue
                if position is not None and position != record.position:
                    if not current:  # decide on what the store holds, not on a stale copy
                        record, current = await self.get(session_id, tenant), True
                        continue
                    if position == record.last_start and step.digest == record.last_digest:
                        result = (replay(mv, record, step) if replay is not None
                                  else record.last_result)
                        return record, Outcome(record.row, record.position, result, True)
                    raise PositionMismatch(position, record.position)
                result = await self._run(mv, tenant, session_id, step, record.row)
                # Applied once committed: the commit is the only write, and a client that
                # leaves meanwhile is too late to cancel it (its retry is answered from the
                # record).
                change = Change(result.row, record.position + step.length, record.position,
                                step.digest, self._kept(mv, result.result), time.time())
                commit = await self.store.commit(record, change)
                if commit.status is Status.APPLIED:
                    break
                record, current = self._refused(session_id, commit, tenant), True
            else:
                raise SessionContended(f"session {session_id!r} kept changing under this step; "
                                       "retry it with its position", retry_after=1)
        finally:
            self._locks.release(session_id)
        self.hooks.consumed(mv.name, mv.version, step.length)
        return record, Outcome(record.row, record.position, result.result)

    def _refused(self, session_id: str, commit: Commit,
                 tenant: Tenant | None) -> SessionRecord:
        """The record to decide again from after a refused commit, or the error to answer."""
        if commit.status is Status.CONFLICT:
            if commit.current.owner != owner_of(tenant):  # replaced by another tenant's
                raise UnknownSession(session_id)
            return commit.current
        if commit.status is Status.BUSY:
            raise SessionContended(f"session {session_id!r} is generating on another "
                                   "replica; retry once it ends", retry_after=commit.retry_after)
        raise UnknownSession(session_id)  # deleted while the step ran

    async def predict(self, mv: ModelVersion, steps: list[Step], *,
                      tenant: Tenant | None = None) -> list[Outcome]:
        """Stateless: each step from a zero state, batched with everything else queued."""
        scheduler, owner = mv.scheduler, owner_of(tenant)
        scheduler.check_room(len(steps), owner)  # all of them or none
        taken = tenant.take_tokens(sum(s.length for s in steps)) if tenant is not None else 0
        try:
            results = await asyncio.gather(
                *(scheduler.run(None, s.inputs, s.length, None, s.options, tenant=owner)
                  for s in steps))
        except BaseException:
            if taken:
                tenant.give_tokens(taken)  # approximately: some rows may have run
            raise
        self.hooks.consumed(mv.name, mv.version, sum(s.length for s in steps))
        return [Outcome(r.row, s.length, r.result) for r, s in zip(results, steps, strict=True)]

    # ------------------------------------------------------------------ streams

    async def start_stream(self, session_id: str,
                           make: Callable[[ModelVersion, SessionRecord], Stream], *,
                           tenant: Tenant | None = None, budget: int = 0) -> Stream:
        """Join the model's running streams (generations); returns once it has joined (or
        raises). `make(mv, record)` builds the stream from the session (and raises for bad
        input). The session stays locked, and leased in the store, until what the stream
        fed is written back (writeback.py). `budget` is the most tokens the stream may
        produce: taken from the tenant's bucket now, the unused part given back when it
        ends."""
        owner = owner_of(tenant)
        await self._acquire(session_id)
        running = taken = 0
        try:
            record = await self.get(session_id, tenant)  # what the store holds (a cheap check)
            for _ in range(CONFLICT_ATTEMPTS):
                mv = self.registry.get(record.model, record.version)
                stream = make(mv, record)
                token = await self.store.lease(record, self.lease_s)
                if isinstance(token, int):
                    break
                record = self._refused(session_id, token, tenant)
            else:
                raise SessionContended(f"session {session_id!r} kept changing; retry",
                                       retry_after=1)
            try:
                running = self._start_generation(tenant)
                if tenant is not None:
                    taken = tenant.take_tokens(budget)
                ended = functools.partial(self._stream_ended, tenant=tenant, taken=taken,
                                          running=running, start=record.position)
                writer = StreamWriter(self.store, record, token, stream, lease_s=self.lease_s,
                                      checkpoints=self.checkpoints, ended=ended)
                stream.watcher = writer
                mv.scheduler.start_stream(stream)
            except BaseException:
                await self.store.release(session_id, token)
                raise
        except BaseException:
            if running:
                self._end_generation(owner)
            if taken:
                tenant.give_tokens(taken)
            self._locks.release(session_id)
            raise
        self._writers[session_id] = writer
        writer.keep_alive()
        return stream

    def _stream_ended(self, writer: StreamWriter, *, tenant: Tenant | None, taken: int,
                      running: int, start: int) -> None:
        """The stream is written back (or gave up): the session is free again, and the
        tenant's generation and unused tokens are given back."""
        self._writers.pop(writer.record.session_id, None)
        self._locks.release(writer.record.session_id)
        if running:
            self._end_generation(tenant.name)
        if taken:
            tenant.give_tokens(taken - (writer.stream.position - start))

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
                renewed = True
            except StoreUnavailable:  # not renewed: lost once the lease has run out
                lost = {sid for sid, w in writers.items() if now - w.renewed >= self.lease_s}
                renewed = False
            except Exception:
                log.exception("renewing generation leases failed")
                continue
            for sid, writer in writers.items():
                if sid in lost:
                    writer.lose()
                elif renewed:  # a failed renewal leaves the lease to run out from the last
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
            self._let_go(gone.owner)
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

    def admit(self, session_id: str) -> int:
        """How many requests a new one on this session would wait behind; SessionBusy if
        that is more than `max_waiting`: refused at once, holding nothing (transports call
        this before reading a body; acquiring checks again)."""
        ahead = self._locks.users(session_id)
        if self.max_waiting is not None and ahead > self.max_waiting:
            raise SessionBusy(
                f"{self.max_waiting} requests already wait on this session, which runs them "
                "one at a time; retry when they have been answered", retry_after=1)
        return ahead

    async def _acquire(self, session_id: str) -> None:
        self.admit(session_id)  # no await in between: the count cannot change meanwhile
        await self._locks.acquire(session_id)

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

    async def _check_capacity(self, tenant: Tenant | None = None) -> None:
        """Raise unless one more session fits: the server's cap, then the tenant's."""
        limit = tenant.limits.max_sessions if tenant is not None else 0
        count = await self.store.count()
        held = self._held.get(tenant.name, 0) if limit else 0  # read after the await
        full = count + self._creating > self.max_sessions or (limit and held >= limit)
        if full and time.monotonic() - self._last_sweep > 1:
            await self.sweep()  # expired sessions may still be counted: reclaim them first
            count = await self.store.count()
            held = self._held.get(tenant.name, 0) if limit else 0
        if count + self._creating > self.max_sessions:
            raise self._full()
        if limit and held >= limit:
            raise TenantLimit(
                f"tenant {tenant.name!r} holds its maximum of {limit} sessions (v2 sequences "
                "included); delete unused ones or retry later",
                retry_after=self.sweep_interval_s,
            )

    def _hold(self, owner: str | None) -> bool:
        """Count a session being made for its tenant (before the record exists, so two
        creations at once cannot both take the last place)."""
        if owner is None:
            return False
        self._held[owner] = self._held.get(owner, 0) + 1
        return True

    def _let_go(self, owner: str | None) -> None:
        if owner is not None:
            left = self._held.get(owner, 0) - 1
            if left > 0:
                self._held[owner] = left
            else:
                self._held.pop(owner, None)

    def _removed(self, record: SessionRecord, reason: str) -> None:
        """A record left the store (deleted, replaced, expired): count it off."""
        self._let_go(record.owner)
        self.hooks.ended(record.model, reason)

    def held(self, tenant: Tenant) -> int:
        """Sessions the tenant holds (counting ones being made)."""
        return self._held.get(tenant.name, 0)

    def generating(self, tenant: Tenant) -> int:
        return self._generating.get(tenant.name, 0)

    def _start_generation(self, tenant: Tenant | None) -> int:
        if tenant is None:
            return 0
        limit, running = tenant.limits.max_generations, self._generating.get(tenant.name, 0)
        if limit and running >= limit:
            raise TenantLimit(
                f"tenant {tenant.name!r} runs its maximum of {limit} generations at once; "
                "retry when one has finished", retry_after=1)
        self._generating[tenant.name] = running + 1
        return 1

    def _end_generation(self, owner: str) -> None:
        left = self._generating.get(owner, 0) - 1
        if left > 0:
            self._generating[owner] = left
        else:
            self._generating.pop(owner, None)

    async def _run(self, mv: ModelVersion, tenant: Tenant | None, session_id: str, step: Step,
                   row: np.ndarray | None):
        """Run a session's step as the tenant's work (its fair share in the scheduler), its
        tokens spent from the tenant's bucket first (and given back if it does not run)."""
        taken = tenant.take_tokens(step.length) if tenant is not None else 0
        try:
            return await mv.scheduler.run(session_id, step.inputs, step.length, row,
                                          step.options, tenant=owner_of(tenant))
        except BaseException:
            if taken:
                tenant.give_tokens(taken)
            raise

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
