"""Where sessions live: the store interface, and the in-memory store (the default).

A store holds `SessionRecord`s. Every change after creation is a compare-and-set: the
manager reads a record, computes, and `commit`s a `Change` against the record it read; the
store applies it only if the record it holds is still that one (its `revision`), and
otherwise answers with what it holds now (`Commit`). So when two writers race on a session
exactly one applies, and the other decides again from the winner's record: the same answer
if it was the very same step, 409 otherwise (sessions.py). Generations additionally hold a
lease (`lease` / `renew` / `release`): a token that every one of their writes carries, so a
writer whose lease has passed to someone else can never write (fencing).

`MemoryStore` keeps records in a dict of this process. The records it hands out *are* the
stored ones: `commit` checks that the stored object for the id is still the one the writer
read (a session replaced meanwhile is another object) and then applies the change to it in
place, so the memory path costs no copy and no serialisation. An expired record is gone for
`get` at once, and the background sweeper (`expire`) reclaims its memory. Other processes
cannot see it, so its leases only need to be tokens (the manager's per-session lock already
keeps one writer per session); `SNAPSHOT` (snapshot.py) carries its records across a
restart. The shared store is redisstore.py.

A record is small on purpose: one float32 row (state + last logits, see state.py) and a few
scalars in slots, so an idle session costs little more than its state.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


class SessionRecord:
    __slots__ = ("session_id", "model", "version", "position", "row", "created_at",
                 "last_used_at", "ttl_s", "last_start", "last_digest", "last_result", "owner",
                 "revision")

    def __init__(self, session_id: str, model: str, version: int, row, ttl_s: float,
                 now: float | None = None, position: int = 0) -> None:
        now = time.time() if now is None else now
        self.session_id = session_id
        self.model = model
        self.version = version
        self.position = position  # steps (the byte LM: tokens) consumed so far
        self.row = row  # float32: state tensors, then the adapter's extras (state.py)
        self.created_at = now
        self.last_used_at = now
        self.ttl_s = ttl_s
        self.last_start: int = -1  # position before the last applied step (for retries)
        self.last_digest: bytes | None = None  # digest of that step's inputs
        self.last_result = None  # that step's result, where the row cannot recompute it
        self.owner: str | None = None  # reserved for authentication (tenants)
        self.revision: int = 0  # changes with every write: what compare-and-set compares

    @property
    def expires_at(self) -> float:
        return self.last_used_at + self.ttl_s

    def expired(self, now: float) -> bool:
        return now >= self.last_used_at + self.ttl_s

    def apply(self, change: Change, revision: int) -> None:
        self.row = change.row
        self.position = change.position
        self.last_start = change.last_start
        self.last_digest = change.last_digest
        self.last_result = change.last_result
        self.last_used_at = change.used_at
        self.revision = revision


@dataclass(slots=True)
class Change:
    """What a write makes of a session: its new row and position, and the step that led
    there, for retries (`last_start` -1 after a generation, which cannot be retried)."""

    row: object
    position: int
    last_start: int = -1
    last_digest: bytes | None = None
    last_result: object = None
    used_at: float = 0.0


class Status(enum.Enum):
    APPLIED = "applied"
    CONFLICT = "conflict"  # the record changed since it was read: `Commit.current` is it now
    GONE = "gone"  # deleted or expired meanwhile (a deleted session stays deleted)
    BUSY = "busy"  # another writer holds the session's lease
    FENCED = "fenced"  # the writer's lease is no longer its own


@dataclass(slots=True)
class Commit:
    status: Status
    current: SessionRecord | None = None  # the record as the store holds it (CONFLICT)
    retry_after: float = 1.0  # BUSY: about when the lease ends (seconds)


@dataclass(frozen=True, slots=True)
class Expired:
    session_id: str
    model: str


class StoreFull(Exception):
    """A create found the store at the session cap (counted by the store, across replicas)."""


class SessionStore(Protocol):
    shared: bool  # other processes see these records (and may write them)

    def cached(self, session_id: str) -> SessionRecord | None:
        """A record this process holds without asking the store, or None. It may be stale
        in a shared store: a step computed on it only applies if `commit` finds it current."""

    async def get(self, session_id: str) -> SessionRecord | None:
        """The live record, as the store holds it now; None if it does not exist or expired."""

    async def put(self, record: SessionRecord, *, create: bool = False,
                  limit: int | None = None) -> bool:
        """create=True adds a new record (False if the id is live; StoreFull when `limit`
        sessions are live); otherwise only a record that still exists is replaced (a
        session deleted meanwhile stays deleted). True if written."""

    async def commit(self, record: SessionRecord, change: Change, *, lease: int | None = None,
                     release: bool = False) -> Commit:
        """Compare-and-set: apply `change` to the session if the store still holds `record`
        (same revision), and no other writer's lease is held on it (or `lease` is the
        writer's own, renewed by the write; `release` ends it). On APPLIED `record` is the
        new record."""

    async def lease(self, record: SessionRecord, ttl_s: float) -> Commit | int:
        """Take the session's lease for `ttl_s` if the store still holds `record` and no one
        else holds it: the lease's token, or why not (Commit)."""

    async def renew(self, leases: dict[str, int], ttl_s: float) -> set[str]:
        """Extend these leases (session id -> token); the ids whose lease is no longer theirs."""

    async def release(self, session_id: str, token: int) -> None:
        """End a lease without writing (nothing to write back)."""

    async def delete(self, session_id: str) -> SessionRecord | None:
        """Remove a record; returns it, or None if there was none."""

    async def expire(self, now: float | None = None) -> list[Expired]:
        """Remove every expired record; returns which."""

    async def count(self) -> int:
        """Live records."""

    async def ping(self) -> bool:
        """Whether the store is reachable."""

    async def close(self) -> None: ...


def new_token() -> int:
    return secrets.randbits(63) or 1  # 0 means "no lease"


class MemoryStore:
    """Sessions in this process's memory."""

    shared = False
    SWEEP_CHUNK = 2000  # records checked between yields, so a big sweep never stalls the loop

    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}
        self._expired: list[SessionRecord] = []  # found expired by get, not yet reported
        self._leases: dict[str, int] = {}

    def cached(self, session_id: str) -> SessionRecord | None:
        record = self._records.get(session_id)
        if record is not None and record.expired(time.time()):
            del self._records[session_id]
            self._expired.append(record)
            return None
        return record

    async def get(self, session_id: str) -> SessionRecord | None:
        return self.cached(session_id)

    async def put(self, record: SessionRecord, *, create: bool = False,
                  limit: int | None = None) -> bool:
        exists = record.session_id in self._records
        if exists == create:  # creating over a live id, or updating a deleted session
            return False
        if create and limit is not None and len(self._records) >= limit:
            raise StoreFull
        self._records[record.session_id] = record
        return True

    async def commit(self, record: SessionRecord, change: Change, *, lease: int | None = None,
                     release: bool = False) -> Commit:
        current = self.cached(record.session_id)
        if current is None:
            return Commit(Status.GONE)
        if current is not record:  # replaced meanwhile (a v2 sequence started afresh)
            return Commit(Status.CONFLICT, current)
        if lease is not None and self._leases.get(record.session_id) != lease:
            return Commit(Status.FENCED)
        record.apply(change, record.revision + 1)
        if release:
            self._leases.pop(record.session_id, None)
        return Commit(Status.APPLIED)

    async def lease(self, record: SessionRecord, ttl_s: float) -> Commit | int:
        # The manager's lock keeps one generation per session in this process, and no
        # other process sees these records: the token only fences this process's own writes.
        current = self.cached(record.session_id)
        if current is None:
            return Commit(Status.GONE)
        if current is not record:
            return Commit(Status.CONFLICT, current)
        token = self._leases[record.session_id] = new_token()
        record.last_used_at = time.time()  # in use: not idle while it generates
        return token

    async def renew(self, leases: dict[str, int], ttl_s: float) -> set[str]:
        return {sid for sid, token in leases.items() if self._leases.get(sid) != token}

    async def release(self, session_id: str, token: int) -> None:
        if self._leases.get(session_id) == token:
            del self._leases[session_id]

    async def delete(self, session_id: str) -> SessionRecord | None:
        self._leases.pop(session_id, None)
        return self._records.pop(session_id, None)

    async def expire(self, now: float | None = None) -> list[Expired]:
        now = time.time() if now is None else now
        removed, self._expired = self._expired, []
        ids = list(self._records)
        for start in range(0, len(ids), self.SWEEP_CHUNK):
            for session_id in ids[start: start + self.SWEEP_CHUNK]:
                record = self._records.get(session_id)
                if record is not None and record.expired(now):
                    del self._records[session_id]
                    removed.append(record)
            await asyncio.sleep(0)
        return [Expired(r.session_id, r.model) for r in removed]

    async def count(self) -> int:
        return len(self._records)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._records.clear()

    # ---------------------------------------------------------------- the snapshot's side

    def live(self, now: float | None = None) -> Iterator[SessionRecord]:
        """Every record that has not expired (for the snapshot)."""
        now = time.time() if now is None else now
        return (r for r in list(self._records.values()) if not r.expired(now))

    def restore(self, records: list[SessionRecord]) -> None:
        """Records loaded from a snapshot, at start-up (before any request)."""
        for record in records:
            self._records[record.session_id] = record


def open_store(settings, builds: dict[tuple[str, int], str]) -> SessionStore:
    """The store `settings.store_url` names. `builds` maps each served (model, version) to
    its manifest's sha256, which a shared store records with each session."""
    url = settings.store_url
    if url.startswith("memory://"):
        return MemoryStore()
    from .redisstore import RedisStore  # only a shared store needs redis-py

    password = settings.store_password
    return RedisStore(url, password=password.get_secret_value() if password else None,
                      timeout_s=settings.store_timeout_s,
                      cache_size=settings.store_cache_sessions, builds=builds)
