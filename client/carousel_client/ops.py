"""What each client call does, as plain generators that never touch the network.

An operation is a generator that yields *actions* (`Call`, `Sleep`, `OpenStream`,
`NextEvent`, `CloseStream`, `Emit`) and is sent back each action's outcome: the answer, or
the `CarouselError` it failed with (sent, not raised, so the operation decides whether to
retry). It returns the call's result. A driver (drivers.py) performs the actions, sync or
async, over HTTP or a WebSocket, so the retry rules and the position bookkeeping below are
written once for all four.

Exactly-once steps. A session's `SessionState.position` is the number of bytes the client
believes the session has consumed, and every step carries it. The server applies a step
only at that position, and answers the exact same step again (same position, same tokens)
by replaying the answer without applying it twice. So a step whose answer was lost (a
dropped connection, a timeout, a load balancer's 502) or that was refused with 503 +
Retry-After is simply sent again, unchanged; whichever copy arrives first applies, any
other is a replay. One case
needs care: if the server can no longer replay (the session moved on in between), the retry
gets `409 position_mismatch`; when the real position is exactly ours plus the step's length
after an attempt that may have applied, the step did apply, and is reported as such.

Generations carry no position, so a generation whose request may have reached the server is
never sent again. When one fails or is abandoned mid-stream the session's position is read
back (`settle`), so the client's position always ends equal to the server's.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from . import protocol
from .errors import (
    ApiError,
    CarouselError,
    GenerationInterrupted,
    NotSupported,
    PositionMismatch,
    ProtocolError,
    TransportError,
    UnknownSession,
)
from .types import GenerationEnd, StepResult

# ------------------------------------------------------------------------ actions


@dataclass(frozen=True, slots=True)
class Call:
    """One request and its whole answer: a dict (JSON), bytes, or None (no body)."""

    method: str
    path: str
    json: dict | None = None
    expect: str = "json"  # json | bytes | empty


@dataclass(frozen=True, slots=True)
class Connect:
    """Open the WebSocket now (WebSocket transports; they also open it on first use)."""


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class OpenStream:
    """Start a streamed generation; the outcome is a handle for NextEvent / CloseStream."""

    path: str
    json: dict


@dataclass(frozen=True, slots=True)
class NextEvent:
    """The stream's next event as a dict ("event": "token" | "end"), or None at its end."""

    stream: Any


@dataclass(frozen=True, slots=True)
class CloseStream:
    stream: Any
    finished: bool  # the end event came: read what is left so the connection can be reused


@dataclass(frozen=True, slots=True)
class Emit:
    """A text piece for whoever iterates the operation (streams only)."""

    value: str


class Abandoned(BaseException):  # noqa: N818 (a signal, not an error)
    """Thrown into an operation when its consumer left (a break, Ctrl-C, a cancelled task):
    the operation cleans up (closes its stream, marks what it no longer knows) and re-raises.
    A BaseException, so that no `except CarouselError` of an operation catches it."""


Op = Generator[Any, Any, Any]


# ------------------------------------------------------------------------ retries


@dataclass(frozen=True)
class Retry:
    """When a failed request is sent again.

    Retried: a 503 with Retry-After (after that long, up to `max_retry_after_s`), and a
    request that got no answer (connection failed or dropped, timeout, a load balancer's
    502 or 504), after `backoff_s`
    doubling up to `max_backoff_s`; at most `attempts` tries in all. Requests that cannot be
    applied twice (steps carry their position) or change nothing are retried on any of
    these; a generation only when it surely never reached the server. `on_retry(error,
    attempt, wait_s)` is called before each wait (for logs)."""

    attempts: int = 8
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    max_retry_after_s: float = 60.0
    on_retry: Callable[[CarouselError, int, float], None] | None = None

    def wait(self, error: CarouselError, attempt: int, *, resend_safe: bool) -> float | None:
        """Seconds to wait before trying again after `attempt` failed, or None: give up."""
        if attempt >= self.attempts:
            return None
        if isinstance(error, TransportError):
            if error.may_have_applied and not resend_safe:
                return None
            return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        if isinstance(error, ApiError) and error.status == 503 and error.retry_after is not None:
            return error.retry_after if error.retry_after <= self.max_retry_after_s else None
        return None


class Attempts:
    """The tries of one request: counts them, remembers whether any may have applied."""

    def __init__(self, policy: Retry, *, resend_safe: bool) -> None:
        self.policy = policy
        self.resend_safe = resend_safe
        self.count = 0
        self.maybe_applied = False

    def after(self, error: CarouselError) -> Op:
        """Wait before the next try, or raise `error` if there is none."""
        self.count += 1
        if isinstance(error, TransportError):
            self.maybe_applied |= error.may_have_applied
        wait = self.policy.wait(error, self.count, resend_safe=self.resend_safe)
        if wait is None:
            raise error
        if self.policy.on_retry is not None:
            self.policy.on_retry(error, self.count, wait)
        if wait > 0:
            yield Sleep(wait)


def request(policy: Retry, call: Call | Connect, *, resend_safe: bool = True) -> Op:
    """A request, retried by the policy; returns its answer."""
    tries = Attempts(policy, resend_safe=resend_safe)
    while True:
        outcome = yield call
        if not isinstance(outcome, CarouselError):
            return outcome
        yield from tries.after(outcome)


def connect(policy: Retry) -> Op:
    """Open a session's WebSocket, retried like a read (opening one changes nothing)."""
    return (yield from request(policy, Connect()))


# ------------------------------------------------------------------------ sessions


class SessionState:
    """What the client knows of one session. `position` is None while unknown: during a
    generation, or after one that failed before its position could be read back; the next
    operation reads it back first."""

    __slots__ = ("session_id", "model", "position")

    def __init__(self, session_id: str, model: str, position: int | None) -> None:
        self.session_id = session_id
        self.model = model
        self.position = position

    @property
    def path(self) -> str:
        return f"/v1/sessions/{quote(self.session_id, safe='')}"


def models(policy: Retry) -> Op:
    return protocol.model_list((yield from request(policy, Call("GET", "/v1/models"))))


def model(policy: Retry, name: str, version: int | None) -> Op:
    query = f"?version={version}" if version is not None else ""
    path = f"/v1/models/{quote(name, safe='')}{query}"
    return protocol.model_info((yield from request(policy, Call("GET", path))))


def predict(policy: Retry, name: str, body: dict, version: int | None) -> Op:
    path = f"/v1/models/{quote(name, safe='')}/predict"
    body = {**body, **protocol.options(version=version)}
    return protocol.predictions((yield from request(policy, Call("POST", path, body))))


def create(policy: Retry, body: dict) -> Op:
    """POST /v1/sessions: (SessionInfo, the priming answer or None). Retried like a read: a
    create whose answer was lost leaves an unused session that expires after its TTL."""
    obj = yield from request(policy, Call("POST", "/v1/sessions", body))
    return protocol.session_info(obj), protocol.priming(obj)


def fork(policy: Retry, state: SessionState, ttl_s: float | None) -> Op:
    body = protocol.options(ttl_s=ttl_s)
    obj = yield from request(policy, Call("POST", f"{state.path}/fork", body or None))
    return protocol.session_info(obj)


def info(policy: Retry, state: SessionState) -> Op:
    return protocol.session_info((yield from request(policy, Call("GET", state.path))))


def delete(policy: Retry, state: SessionState) -> Op:
    tries = Attempts(policy, resend_safe=True)
    while True:
        outcome = yield Call("DELETE", state.path, expect="empty")
        if not isinstance(outcome, CarouselError):
            return None
        if isinstance(outcome, UnknownSession) and tries.maybe_applied:
            return None  # an earlier try deleted it; its answer was lost
        yield from tries.after(outcome)


def export_state(policy: Retry, state: SessionState) -> Op:
    """GET /v1/sessions/{id}/state: the session as a portable blob (servers with portable
    sessions only; others answer 404/405, raised as NotSupported)."""
    try:
        return (yield from request(policy, Call("GET", f"{state.path}/state", expect="bytes")))
    except ApiError as e:
        if e.code in ("not_found", "method_not_allowed"):
            raise NotSupported(
                f"this server cannot export sessions (GET {state.path}/state answered "
                f"{e.status} {e.code}): it needs a server with portable sessions",
                code=e.code, status=e.status) from e
        raise


def import_session(policy: Retry, blob: bytes, ttl_s: float | None) -> Op:
    """POST /v1/sessions with {"state": base64 blob}: a new session from an exported one."""
    body = {"state": base64.b64encode(blob).decode("ascii"), **protocol.options(ttl_s=ttl_s)}
    try:
        obj = yield from request(policy, Call("POST", "/v1/sessions", body))
    except ApiError as e:
        # A server without portable sessions has no "state" field: it refuses the body as
        # an unknown field, or asks for the model a plain create needs.
        unknown_field = e.code == "invalid_input" and ("'state'" in e.message
                                                       or e.message.startswith("model:"))
        if e.code in ("not_found", "method_not_allowed") or unknown_field:
            raise NotSupported(
                "this server cannot import sessions (POST /v1/sessions refused the state: "
                f"{e.message}): it needs a server with portable sessions",
                code=e.code, status=e.status) from e
        raise
    return protocol.session_info(obj)


# A position no session reaches: a step sent there is refused with the real position.
PROBE_POSITION = 2**62


def settle(policy: Retry, state: SessionState) -> Op:
    """Read back the session's position, once whatever runs on it has finished.

    GET /v1/sessions/{id} answers at once, even while a generation still holds the session
    (a generation's tokens are written back when it ends), so it can show the position from
    before. A step waits its turn behind the generation, so the probe is a step that cannot
    apply: sent at a position no session reaches, it is refused with `409 position_mismatch`
    and the real position, and changes nothing (a refused request leaves state unchanged)."""
    probe = {"tokens": [0], "position": PROBE_POSITION, "top_k": 0}
    try:
        obj = yield from request(policy, Call("POST", f"{state.path}/step", probe))
    except PositionMismatch as e:
        if e.position is None:
            raise ProtocolError("a position_mismatch error without the position") from e
        state.position = e.position
        return e.position
    raise ProtocolError(f"the position probe was answered as a step: {str(obj)[:200]}")


def settle_quietly(policy: Retry, state: SessionState) -> Op:
    """`settle`, leaving the position unknown (read back later) if that fails too."""
    try:
        yield from settle(policy, state)
    except CarouselError:
        state.position = None


def step(policy: Retry, state: SessionState, text: str | None, tokens: list[int] | None,
         top_k: int | None, return_logits: bool | None) -> Op:
    """Consume input, exactly once (see the module docstring)."""
    if state.position is None:
        yield from settle(policy, state)
    fields, length = protocol.input_fields(text, tokens)
    start = state.position
    body = {**fields, "position": start,
            **protocol.options(top_k=top_k, return_logits=return_logits)}
    tries = Attempts(policy, resend_safe=True)
    try:
        while True:
            outcome = yield Call("POST", f"{state.path}/step", body)
            if isinstance(outcome, dict):
                try:
                    result = protocol.step_result(outcome)
                except ProtocolError:
                    state.position = None  # it applied, but the answer cannot say where
                    raise
                state.position = result.position
                return result
            if (isinstance(outcome, PositionMismatch) and tries.maybe_applied
                    and outcome.position == start + length):
                state.position = outcome.position  # applied; its answer was lost
                return StepResult(state.session_id, outcome.position, (), None, answer_lost=True)
            yield from tries.after(outcome)
    except Abandoned:
        state.position = None  # it may have applied: read back before the next step
        raise


def generate(policy: Retry, state: SessionState, fields: dict) -> Op:
    """A whole generation in one answer."""
    if state.position is None:
        yield from settle(policy, state)
    tries = Attempts(policy, resend_safe=False)
    try:
        while True:
            outcome = yield Call("POST", f"{state.path}/generate", {**fields, "stream": False})
            if isinstance(outcome, dict):
                result = protocol.generation(outcome)
                state.position = result.position
                return result
            if isinstance(outcome, TransportError) and outcome.may_have_applied:
                yield from settle_quietly(policy, state)
            yield from tries.after(outcome)
    except Abandoned:
        state.position = None
        raise


class Transcript:
    """What a streamed generation has produced so far: tokens, text pieces, the end."""

    __slots__ = ("tokens", "pieces", "end", "_utf8")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.end: GenerationEnd | None = None
        self._utf8 = protocol.Utf8Pieces()

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def token(self, token: int) -> str:
        self.tokens.append(token)
        piece = self._utf8.feed(token)
        if piece:
            self.pieces.append(piece)
        return piece

    def finish(self, end: GenerationEnd) -> str:
        self.end = end
        tail = self._utf8.flush()  # a character the generation stopped in the middle of
        if tail:
            self.pieces.append(tail)
        return tail


def stream(policy: Retry, state: SessionState, fields: dict, transcript: Transcript) -> Op:
    """A streamed generation: emits text pieces, returns the end event."""
    if state.position is None:
        yield from settle(policy, state)
    tries = Attempts(policy, resend_safe=False)
    try:
        while True:
            handle = yield OpenStream(f"{state.path}/generate", {**fields, "stream": True})
            if not isinstance(handle, CarouselError):
                break
            if isinstance(handle, TransportError) and handle.may_have_applied:
                yield from settle_quietly(policy, state)
                raise GenerationInterrupted(f"the generation's answer was lost: {handle}",
                                            text="", cause=handle) from handle
            yield from tries.after(handle)
    except Abandoned:
        state.position = None  # it may have started
        raise
    start, state.position = state.position, None  # the server holds it until the end
    try:
        end = yield from _events(handle, transcript)
    except CarouselError as e:
        if isinstance(e, ApiError) and not transcript.tokens:
            # Refused before it started (over a WebSocket the refusal is the first frame):
            # nothing changed.
            yield CloseStream(handle, finished=True)
            state.position = start
            raise
        yield CloseStream(handle, finished=False)
        yield from settle_quietly(policy, state)
        raise GenerationInterrupted(f"the generation stopped before its end: {e}",
                                    text=transcript.text, cause=e) from e
    except Abandoned:
        yield CloseStream(handle, finished=False)  # the server stops the generation
        yield from settle_quietly(policy, state)
        raise
    state.position = end.position
    tail = transcript.finish(end)
    yield CloseStream(handle, finished=True)
    if tail:
        yield Emit(tail)
    return end


def _events(handle, transcript: Transcript) -> Op:
    """Token events until the end event, which it returns."""
    while True:
        event = yield NextEvent(handle)
        if isinstance(event, CarouselError):
            raise event
        if event is None:
            raise ProtocolError("the stream ended without its end event")
        if event.get("event") == "end":
            return protocol.generation_end(event)
        token, _ = protocol.token_of(event)
        piece = transcript.token(token)
        if piece:
            yield Emit(piece)
