"""One running generation of the byte LM: its state row, sampler, stop rules and events.

The scheduler steps it as a stream (decode.py): each iteration the byte LM adapter samples
its next token from the logits its row ends with, the graph consumes the token, and the
event loop calls `emit` with it. A generation's consumer (the SSE or WebSocket stream, or
a plain response) reads `events()` or waits on `done`. Every emitted token has already been
consumed by the state, so wherever a generation stops, the session holds exactly the
tokens its client saw.

A generation on a session has a `watcher` (sessions.py's writer): then finishing does not
end it at once. The watcher writes the state back first (and checkpoints it as it goes,
from `rested`, for tokens whose events `delivered` says the consumer has taken), and ends
it with `end`, whose event says where the session is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from .sampling import SamplingParams
from .text import Utf8Stream, decode


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token: int
    text: str  # whole characters only; '' while a character is incomplete
    position: int  # the session's position once this token is consumed


@dataclass(frozen=True, slots=True)
class EndEvent:
    finish_reason: str  # stop | length | cancelled | shutdown | error | lease_lost |
    #                     store_unavailable (the last two: the session kept only `position`)
    position: int


class StopRule:
    """When a generation ends: its output ends with a stop string, or max_tokens is reached.

    Kept apart from the emitted text because whoever runs the generation checks it (the
    event loop, or the inference thread while it decodes iterations back to back) while the
    event loop emits the text."""

    __slots__ = ("left", "stops", "keep", "tail")

    def __init__(self, max_tokens: int, stops: tuple[bytes, ...]) -> None:
        self.left = max_tokens
        self.stops = stops
        self.keep = max(map(len, stops), default=0)
        self.tail = bytearray()  # the last `keep` output bytes

    def check(self, token: int) -> str | None:
        """The reason the generation ends with this token, or None."""
        self.left -= 1
        if self.stops:
            self.tail.append(token)
            if len(self.tail) > self.keep:
                del self.tail[0]
            if any(self.tail.endswith(s) for s in self.stops):
                return "stop"
        return "length" if self.left <= 0 else None


class Generation:
    """Sampling state of one generation on one session (or a stateless caller)."""

    def __init__(self, *, key: object, row: np.ndarray, position: int, params: SamplingParams,
                 seed: int, max_tokens: int, stop: tuple[bytes, ...] = (),
                 stream: bool = False, model: str = "") -> None:
        self.key = key
        self.model = model  # for metrics labels
        self.row = row  # state after the tokens fed so far, then their last logits
        self.start_position = position
        self.params = params
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.rule = StopRule(max_tokens, stop)  # checked by whoever runs the iteration
        self.tokens: list[int] = []  # fed and emitted
        self.finish_reason: str | None = None
        self.cancelled = False
        self.in_flight = False  # in a decode run (owned by the scheduler meanwhile)
        self.watcher = None  # writes the session back before the end (sessions.py)
        self.delivered = position  # position of the last event the consumer has taken
        self._out = bytearray()
        self._utf8 = Utf8Stream() if stream else None
        self._events: list[TokenEvent | EndEvent] | None = [] if stream else None
        self._waiter: asyncio.Future | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def position(self) -> int:
        return self.start_position + len(self.tokens)

    @property
    def text(self) -> str:
        return decode(self._out)

    def draw(self) -> float:
        """The uniform draw for the next sampled token."""
        return self.rng.random()

    @property
    def streaming(self) -> bool:
        """Whether a consumer takes events as they come (else the answer is sent whole)."""
        return self._events is not None

    def cancel(self) -> None:
        """The consumer is gone: leave at the next iteration boundary."""
        self.cancelled = True
        if self.watcher is not None:
            self.watcher.delivered()  # it waits for no consumer any more

    def emit(self, token: int, final: bool) -> None:
        """A fed token becomes output (and an event); `final` when it is the last one."""
        self.tokens.append(token)
        self._out.append(token)
        if self._utf8 is not None:
            self._emit(TokenEvent(token, self._utf8.feed(token, final), self.position))

    def rested(self) -> None:
        """A decode run ended and the generation goes on: `row` holds everything fed."""
        if self.watcher is not None:
            self.watcher.rested()

    def finish(self, reason: str) -> None:
        """Nothing more is fed (the scheduler is done with it); it ends now, or once its
        watcher has written the session back."""
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        if self.watcher is not None:
            self.watcher.finish()
        else:
            self.end(reason, self.position)

    def end(self, reason: str, position: int) -> None:
        """The end: its event, with the position the session is at."""
        if self.done.done():
            return
        self.finish_reason = reason
        self._emit(EndEvent(reason, position))
        self.done.set_result(None)

    def _emit(self, event: TokenEvent | EndEvent) -> None:
        if self._events is None:
            return
        self._events.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def events(self) -> AsyncIterator[list[TokenEvent | EndEvent]]:
        """Batches of events as they come (everything ready at once), ending with EndEvent."""
        assert self._events is not None, "a generation made with stream=False has no events"
        while True:
            if not self._events:
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
                self._waiter = None
            batch, self._events = self._events, []
            yield batch
            if isinstance(batch[-1], EndEvent):
                return
            # Asked for more: the consumer has sent everything it was given.
            self.delivered = batch[-1].position
            if self.watcher is not None:
                self.watcher.delivered()
