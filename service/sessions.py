"""Sessions: create, step, generate, fork, delete; positions that make retries safe.

The manager is the only writer of session records. Every operation validates everything
first and writes last, so a rejected request changes nothing. Steps on one session hold its
lock (locks.py), so they apply one at a time in arrival order; a generation holds it until
its tokens are written back.

Rows are never changed in place (the scheduler always makes new ones), so a fresh session
shares one zero row and a fork shares its parent's row until either moves on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass

import numpy as np

from .errors import (
    AtCapacity,
    EmptyInput,
    InvalidInput,
    PositionMismatch,
    QueueFull,
    TokenOutOfRange,
    UnknownSession,
)
from .generation import Generation
from .locks import KeyedLocks
from .registry import ModelVersion, Registry
from .sampling import SamplingParams, top_logprobs
from .scheduler import WorkResult
from .store import SessionRecord, SessionStore

log = logging.getLogger("carousel.service")


@dataclass(slots=True)
class Answer:
    """The next-token prediction after some input."""

    position: int
    top_tokens: np.ndarray
    top_logprobs: np.ndarray
    logits: np.ndarray  # (V,) the last position's logits (shown only when asked for)


class SessionHooks:
    """What the manager reports (metrics); the default does nothing."""

    def created(self, model: str) -> None: ...
    def ended(self, model: str, reason: str) -> None: ...  # reason: expired | deleted
    def consumed(self, model: str, version: int, tokens: int) -> None: ...


def new_session_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits, URL-safe


def digest(tokens: np.ndarray) -> bytes:
    return hashlib.blake2b(tokens.tobytes(), digest_size=16).digest()


def check_tokens(tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size == 0:
        raise EmptyInput("the input is empty: send at least one token or character")
    if tokens.size <= 32:  # a decode step: Python's min/max beat two numpy reductions
        values = tokens.tolist()
        low, high = min(values), max(values)
    else:
        low, high = tokens.min(), tokens.max()
    if low < 0 or high >= vocab_size:
        bad = int(tokens[(tokens < 0) | (tokens >= vocab_size)][0])
        raise TokenOutOfRange(
            f"token {bad} is outside the vocabulary: tokens are 0..{vocab_size - 1}")


class SessionManager:
    def __init__(self, registry: Registry, store: SessionStore, *, session_ttl_s: float,
                 max_session_ttl_s: float, max_sessions: int, sweep_interval_s: float = 10.0,
                 hooks: SessionHooks | None = None) -> None:
        self.registry = registry
        self.store = store
        self.session_ttl_s = session_ttl_s
        self.max_session_ttl_s = max_session_ttl_s
        self.max_sessions = max_sessions
        self.sweep_interval_s = sweep_interval_s
        self.hooks = hooks or SessionHooks()
        self._locks = KeyedLocks()
        self._zero_rows: dict[ModelVersion, np.ndarray] = {}
        self._jobs: set[asyncio.Task] = set()  # generation write-backs in flight
        self._creating = 0
        self._last_sweep = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def create(self, model: str, version: int | None = None, ttl_s: float | None = None,
                     tokens: np.ndarray | None = None, k: int = 5
                     ) -> tuple[SessionRecord, Answer | None]:
        mv = self.registry.get(model, version)
        ttl = self._ttl(ttl_s)
        if tokens is not None:
            check_tokens(tokens, mv.vocab_size)
        self._creating += 1
        try:
            await self._check_capacity()
            session_id = new_session_id()
            answer = None
            row = self._zero_row(mv)
            position = 0
            if tokens is not None:  # priming runs before the session exists: failure leaves none
                result = await mv.scheduler.run(session_id, tokens, None, k)
                row, position = result.row, len(tokens)
                answer = self._answer(mv, result, position)
            record = SessionRecord(session_id, mv.name, mv.version, row, ttl, position=position)
            if tokens is not None:
                record.last_start, record.last_digest = 0, digest(tokens)
            await self.store.put(record, create=True)
        finally:
            self._creating -= 1
        self.hooks.created(mv.name)
        if tokens is not None:
            self.hooks.consumed(mv.name, mv.version, len(tokens))
        return record, answer

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
                await self.store.put(record, create=True)
            finally:
                self._creating -= 1
        finally:
            self._locks.release(session_id)
        self.hooks.created(record.model)
        return record

    # ------------------------------------------------------------------ steps

    async def step(self, session_id: str, tokens: np.ndarray, position: int | None = None,
                   k: int = 5) -> tuple[SessionRecord, Answer]:
        """Consume tokens. With `position`: apply only if the session is there; if this exact
        step (same position, same tokens) was the last one applied, answer it again."""
        await self._locks.acquire(session_id)
        try:
            record = await self.get(session_id)
            mv = self.registry.get(record.model, record.version)
            check_tokens(tokens, mv.vocab_size)
            key = digest(tokens)
            if position is not None and position != record.position:
                if position == record.last_start and key == record.last_digest:
                    return record, self._replay(mv, record, k)
                raise PositionMismatch(position, record.position)
            result = await mv.scheduler.run(session_id, tokens, record.row, k)
            record.row = result.row
            record.last_start, record.last_digest = record.position, key
            record.position += len(tokens)
            record.last_used_at = time.time()
            if not await self.store.put(record):
                raise UnknownSession(session_id)  # deleted while the step ran
        finally:
            self._locks.release(session_id)
        self.hooks.consumed(mv.name, mv.version, len(tokens))
        return record, self._answer(mv, result, record.position)

    async def predict(self, mv: ModelVersion, inputs: list[np.ndarray], k: int) -> list[Answer]:
        """Stateless: each input from a zero state, batched with everything else queued."""
        for tokens in inputs:
            check_tokens(tokens, mv.vocab_size)
        scheduler = mv.scheduler
        if scheduler.queued + len(inputs) > scheduler.max_queue:
            raise QueueFull(f"{mv.name}: the queue cannot take {len(inputs)} more inputs now",
                            retry_after=1)
        results = await asyncio.gather(*(scheduler.run(None, t, None, k) for t in inputs))
        self.hooks.consumed(mv.name, mv.version, sum(len(t) for t in inputs))
        return [self._answer(mv, r, len(t)) for r, t in zip(results, inputs, strict=True)]

    # ------------------------------------------------------------------ generation

    async def start_generation(self, session_id: str, *, params: SamplingParams, seed: int,
                               max_tokens: int, stop: tuple[bytes, ...] = (),
                               stream: bool = False) -> Generation:
        """Join the model's running generations; returns once it has joined (or raises).
        The session stays locked until the generated tokens are written back."""
        await self._locks.acquire(session_id)
        try:
            record = await self.get(session_id)
            if record.position == 0:
                raise EmptyInput("the session has consumed no input yet, so there is nothing "
                                 "to continue: step or prime it with some text first")
            mv = self.registry.get(record.model, record.version)
            gen = Generation(key=session_id, row=record.row, position=record.position,
                             params=params, seed=seed, max_tokens=max_tokens, stop=stop,
                             stream=stream, model=record.model)
            mv.scheduler.start_generation(gen)
            record.last_used_at = time.time()  # in use: not idle while it generates
        except BaseException:
            self._locks.release(session_id)
            raise
        task = asyncio.get_running_loop().create_task(self._write_back(record, gen))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return gen

    async def _write_back(self, record: SessionRecord, gen: Generation) -> None:
        try:
            await asyncio.shield(gen.done)
            if gen.tokens:
                record.row = gen.row
                record.position = gen.position
                record.last_start, record.last_digest = -1, None
                record.last_used_at = time.time()
                await self.store.put(record)  # a session deleted meanwhile stays deleted
        finally:
            self._locks.release(record.session_id)

    @property
    def busy(self) -> int:
        """Generation write-backs still running (shutdown waits for them)."""
        return len(self._jobs)

    async def wait_idle(self, timeout: float) -> None:
        if self._jobs:
            await asyncio.wait(list(self._jobs), timeout=timeout)

    # ------------------------------------------------------------------ expiry

    async def sweep(self) -> int:
        self._last_sweep = time.monotonic()
        removed = await self.store.expire()
        for record in removed:
            self.hooks.ended(record.model, "expired")
        return len(removed)

    async def run_sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.sweep()
            except Exception:  # a failing store must not kill the sweeper
                log.exception("session sweep failed")

    # ------------------------------------------------------------------ helpers

    def _ttl(self, ttl_s: float | None) -> float:
        if ttl_s is None:
            return self.session_ttl_s
        if not (0 < ttl_s <= self.max_session_ttl_s):
            raise InvalidInput(f"ttl_s must be > 0 and at most {self.max_session_ttl_s:g} seconds")
        return float(ttl_s)

    async def _check_capacity(self) -> None:
        count = await self.store.count()
        if count + self._creating > self.max_sessions and time.monotonic() - self._last_sweep > 1:
            await self.sweep()  # expired sessions may still be counted: reclaim them first
            count = await self.store.count()
        if count + self._creating > self.max_sessions:
            raise AtCapacity(
                f"the server holds its maximum of {self.max_sessions} sessions; delete unused "
                "sessions or retry later",
                retry_after=self.sweep_interval_s,
            )

    def _zero_row(self, mv: ModelVersion) -> np.ndarray:
        row = self._zero_rows.get(mv)
        if row is None:
            row = self._zero_rows[mv] = mv.layout.initial_row()
            row.flags.writeable = False
        return row

    def _answer(self, mv: ModelVersion, result: WorkResult, position: int) -> Answer:
        return Answer(position, result.top_tokens, result.top_logprobs,
                      mv.layout.logits(result.row))

    def _replay(self, mv: ModelVersion, record: SessionRecord, k: int) -> Answer:
        logits = mv.layout.logits(record.row)
        tokens, logprobs = top_logprobs(logits[None], k)
        return Answer(record.position, tokens[0], logprobs[0], logits)
