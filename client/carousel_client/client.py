"""`Client` and `AsyncClient`, their sessions, streams and WebSockets: one surface, written
once.

Each method of the surface classes below builds its operation (ops.py) and hands it to the
object's driver (drivers.py): a `SyncDriver` performs it and returns the result, an
`AsyncDriver` returns an awaitable of the same result. So `Client` and `AsyncClient` (and
`Session` / `AsyncSession`, `SessionSocket` / `AsyncSessionSocket`) have the same methods
with the same arguments by construction; only entering and leaving (`with` / `async with`)
and iterating (`for` / `async for`) are spelled twice.

Connections are reused: a client holds one httpx connection pool for all its requests;
a session's WebSocket is one connection, reopened only after it drops.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import httpx

from . import ops, protocol
from .drivers import AsyncDriver, SyncDriver
from .errors import CarouselError, UnknownSession
from .transport import (
    AsyncHttpTransport,
    AsyncWsTransport,
    HttpTransport,
    WsSettings,
    WsTransport,
)
from .types import GenerationEnd, StepResult

__version__ = "0.1.0"
DEFAULT_URL = "http://127.0.0.1:8000"


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"carousel-client/{__version__}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


# ------------------------------------------------------------------------ the surfaces


class _ClientSurface:
    """What both clients offer. Sync: each call returns its result; async: an awaitable."""

    _driver: Any
    _retry: ops.Retry

    def models(self):
        """Every model and version the server has (list of ModelInfo)."""
        return self._driver.run(ops.models(self._retry))

    def model(self, name: str, version: int | None = None):
        """One model version (the latest unless `version`), with all its versions."""
        return self._driver.run(ops.model(self._retry, name, version))

    def predict(self, model: str, text: str | None = None, *, tokens: list[int] | None = None,
                top_k: int | None = None, return_logits: bool | None = None,
                version: int | None = None):
        """Stateless next-token prediction after one input, from a zero state (Prediction)."""
        body = {**protocol.input_fields(text, tokens)[0],
                **protocol.options(top_k=top_k, return_logits=return_logits)}
        return self._driver.run(_first(ops.predict(self._retry, model, body, version)))

    def predict_many(self, model: str, inputs: list[str | list[int]], *,
                     top_k: int | None = None, return_logits: bool | None = None,
                     version: int | None = None):
        """Predictions for a batch of inputs (texts or token lists), in order."""
        items = [{"text": x} if isinstance(x, str) else {"tokens": list(x)} for x in inputs]
        body = {"inputs": items, **protocol.options(top_k=top_k, return_logits=return_logits)}
        return self._driver.run(ops.predict(self._retry, model, body, version))

    def session(self, model: str, text: str | None = None, *, tokens: list[int] | None = None,
                version: int | None = None, ttl_s: float | None = None,
                top_k: int | None = None, return_logits: bool | None = None,
                keep: bool = False):
        """A new session, optionally primed with input (its answer: `session.primed`).
        A context manager that deletes the session on exit unless `keep`."""
        body = {"model": model, **protocol.input_fields(text, tokens)[0],
                **protocol.options(version=version, ttl_s=ttl_s, top_k=top_k,
                                   return_logits=return_logits)}
        return self._open(ops.create(self._retry, body), keep)

    def attach(self, session_id: str, *, keep: bool = True):
        """A Session for an existing session id (kept on exit unless `keep=False`)."""
        state = ops.SessionState(session_id, "", None)
        return self._open(_attached(self._retry, state), keep)

    def import_session(self, blob: bytes, *, ttl_s: float | None = None, keep: bool = False):
        """A new session from `Session.export_state()`'s blob, on this server or another
        serving the same model build. A server without portable sessions (before they came)
        raises NotSupported."""
        return self._open(_with_no_priming(ops.import_session(self._retry, blob, ttl_s)), keep)


class _Stepping:
    """What a session and its WebSocket both offer: steps and generations, positions kept."""

    _driver: Any
    _retry: ops.Retry
    _state: ops.SessionState

    @property
    def id(self) -> str:
        return self._state.session_id

    @property
    def position(self) -> int | None:
        """Bytes the session has consumed, as last known (None: to be read back, which the
        next step does first; `sync_position()` does it now)."""
        return self._state.position

    def step(self, text: str | None = None, *, tokens: list[int] | None = None,
             top_k: int | None = None, return_logits: bool | None = None):
        """Consume input and answer the next-token prediction (StepResult). Applied exactly
        once: retried with the session's position after a lost answer, a timeout or a 503."""
        return self._driver.run(ops.step(self._retry, self._state, text, tokens, top_k,
                                         return_logits))

    def generate(self, *, max_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: list[str] | None = None):
        """Sample a continuation and answer it whole (Generation). None: the server's default
        (max_tokens 64, temperature 1, top_k 0 = all, top_p 1, a random seed)."""
        fields = protocol.generation_fields(max_tokens, temperature, top_k, top_p, seed, stop)
        return self._driver.run(ops.generate(self._retry, self._state, fields))

    def stream(self, *, max_tokens: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop: list[str] | None = None):
        """Sample a continuation as it is generated: iterate the returned stream for text
        pieces (whole characters); then `.end` has the finish reason and position. Leaving
        it early (break, Ctrl-C) stops the generation; the session stays usable."""
        fields = protocol.generation_fields(max_tokens, temperature, top_k, top_p, seed, stop)
        transcript = ops.Transcript()
        return self._stream_class(self._driver, ops.stream(self._retry, self._state, fields,
                                                           transcript), transcript)

    def sync_position(self):
        """Read the session's position back from the server now (int)."""
        return self._driver.run(ops.settle(self._retry, self._state))


class _SessionSurface(_Stepping):
    _client: Any
    keep: bool
    primed: StepResult | None

    @property
    def model(self) -> str:
        return self._state.model

    def fork(self, *, ttl_s: float | None = None, keep: bool = False):
        """A new session with a copy of this one's state and position (a context manager,
        like `client.session`)."""
        return self._client._open(_with_no_priming(ops.fork(self._retry, self._state, ttl_s)),
                                  keep)

    def info(self):
        """The session's model, position and times (SessionInfo)."""
        return self._driver.run(ops.info(self._retry, self._state))

    def export_state(self):
        """The session as a portable blob (bytes: the npz file GET /v1/sessions/{id}/state
        answers) for `client.import_session`. A server without portable sessions raises
        NotSupported."""
        return self._driver.run(ops.export_state(self._retry, self._state))

    def delete(self):
        """Delete the session now (an already deleted or expired one is not an error)."""
        return self._driver.run(_quiet_delete(self._retry, self._state))

    def websocket(self, *, binary: bool = False):
        """The session's WebSocket: the same steps and generations over one connection
        (a context manager; the position is shared with this session). `binary`: steps go
        as compact binary frames and come back as such (the same StepResult; the server's
        README has the layout), which costs both ends less than JSON."""
        return self._client._socket(self._state, binary)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.model} at {self.position}>"


def _first(op: ops.Op):
    return (yield from op)[0]


def _with_no_priming(op: ops.Op):
    return (yield from op), None


def _attached(policy: ops.Retry, state: ops.SessionState):
    info = yield from ops.info(policy, state)
    state.model = info.model
    position = yield from ops.settle(policy, state)  # GET may predate a running generation
    return dataclasses.replace(info, position=position), None


def _quiet_delete(policy: ops.Retry, state: ops.SessionState):
    try:
        yield from ops.delete(policy, state)
    except UnknownSession:
        pass


# ------------------------------------------------------------------------ streams


class _StreamView:
    """The state of a streamed generation, readable while and after it runs."""

    def __init__(self, driver, op: ops.Op, transcript: ops.Transcript) -> None:
        self._driver = driver
        self._op = op
        self._transcript = transcript
        self._pieces = None

    @property
    def text(self) -> str:
        """The text so far (all of it once the stream ended)."""
        return self._transcript.text

    @property
    def tokens(self) -> list[int]:
        return list(self._transcript.tokens)

    @property
    def end(self) -> GenerationEnd | None:
        """The end event (None until the stream has ended)."""
        return self._transcript.end

    @property
    def finish_reason(self) -> str | None:
        return self.end.finish_reason if self.end else None

    @property
    def position(self) -> int | None:
        return self.end.position if self.end else None


class TextStream(_StreamView):
    """A streamed generation: `for piece in stream`; a context manager that stops the
    generation if left early."""

    def __iter__(self):
        if self._pieces is None:
            self._pieces = self._driver.iterate(self._op)
        return self._pieces

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pieces is None:
            self._pieces = self._driver.iterate(self._op)
        self._pieces.close()


class AsyncTextStream(_StreamView):
    """A streamed generation: `async for piece in stream`; an async context manager that
    stops the generation if left early."""

    def __aiter__(self):
        if self._pieces is None:
            self._pieces = self._driver.iterate(self._op)
        return self._pieces

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._pieces is None:
            self._pieces = self._driver.iterate(self._op)
        await self._pieces.aclose()


# ------------------------------------------------------------------------ sync


class Session(_SessionSurface):
    _stream_class = TextStream

    def __init__(self, client: Client, state: ops.SessionState, primed, keep: bool) -> None:
        self._client = client
        self._driver = client._driver
        self._retry = client._retry
        self._state = state
        self.primed = primed
        self.keep = keep

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.keep:
            try:
                self.delete()
            except CarouselError:
                if exc_type is None:
                    raise  # never hide the error that is already leaving the block


class SessionSocket(_Stepping):
    """A session's WebSocket (sync). Steps sent on it are exactly-once like HTTP steps: a
    dropped socket is reopened and the step sent again with the same position."""

    _stream_class = TextStream

    def __init__(self, client: Client, state: ops.SessionState,
                 binary: bool = False) -> None:
        self._retry = client._retry
        self._state = state
        self._transport = WsTransport(client._ws_settings(state, binary))
        self._driver = SyncDriver(self._transport)

    def __enter__(self) -> SessionSocket:
        self._driver.run(ops.connect(self._retry))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._transport.close()


class Client(_ClientSurface):
    """A carousel server's client (blocking). `base_url` is the server, `api_key` is sent
    as `Authorization: Bearer` on every request and WebSocket handshake, `timeout` bounds
    each request (and each WebSocket frame) in seconds, `retry` says what is retried.
    Requests share one pool of connections; close the client (or use `with`) when done."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None,
                 timeout: float | None = 30.0, retry: ops.Retry | None = None,
                 trust_env: bool = True) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = _headers(api_key)
        self._timeout = timeout
        self._trust_env = trust_env
        self._retry = retry or ops.Retry()
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers,
                                  timeout=timeout, trust_env=trust_env)
        self._driver = SyncDriver(HttpTransport(self._http))

    def _open(self, op: ops.Op, keep: bool) -> Session:
        info, primed = self._driver.run(op)
        return Session(self, ops.SessionState(info.session_id, info.model, info.position),
                       primed, keep)

    def _socket(self, state: ops.SessionState, binary: bool = False) -> SessionSocket:
        return SessionSocket(self, state, binary)

    def _ws_settings(self, state: ops.SessionState, binary: bool = False) -> WsSettings:
        return WsSettings(_ws_url(self.base_url, state), self._headers, self._timeout,
                          self._trust_env, session_id=state.session_id, binary=binary)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ws_url(base_url: str, state: ops.SessionState) -> str:
    scheme, rest = base_url.split("://", 1) if "://" in base_url else ("http", base_url)
    ws_scheme = {"https": "wss", "http": "ws"}.get(scheme, scheme)
    return f"{ws_scheme}://{rest}{state.path}/ws"


# ------------------------------------------------------------------------ async


class AsyncSession(_SessionSurface):
    """A session of an AsyncClient: the methods of Session, awaited."""

    _stream_class = AsyncTextStream

    def __init__(self, client: AsyncClient, state: ops.SessionState, primed,
                 keep: bool) -> None:
        self._client = client
        self._driver = client._driver
        self._retry = client._retry
        self._state = state
        self.primed = primed
        self.keep = keep

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if not self.keep:
            try:
                await self.delete()
            except CarouselError:
                if exc_type is None:
                    raise


class _Opening:
    """A session being opened: `await` it for the session, or `async with` it to have it
    deleted on exit."""

    def __init__(self, opening) -> None:
        self._opening = opening  # a coroutine giving the AsyncSession
        self._session: AsyncSession | None = None

    def __await__(self):
        return self._opening.__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._opening
        return self._session

    async def __aexit__(self, *exc) -> None:
        await self._session.__aexit__(*exc)


class AsyncSessionSocket(_Stepping):
    """A session's WebSocket (async): the methods of SessionSocket, awaited; its streams
    are async iterators. One exchange runs at a time (the frames of one socket are in
    order); concurrent calls wait their turn."""

    _stream_class = AsyncTextStream

    def __init__(self, client: AsyncClient, state: ops.SessionState,
                 binary: bool = False) -> None:
        self._retry = client._retry
        self._state = state
        self._transport = AsyncWsTransport(client._ws_settings(state, binary))
        self._driver = AsyncDriver(self._transport, lock=asyncio.Lock())

    async def __aenter__(self) -> AsyncSessionSocket:
        await self._driver.run(ops.connect(self._retry))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.close()


class AsyncClient(_ClientSurface):
    """The asyncio client: the methods of Client, awaited; `client.session(...)` is awaited
    or used with `async with`; streams are async iterators."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None,
                 timeout: float | None = 30.0, retry: ops.Retry | None = None,
                 trust_env: bool = True) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = _headers(api_key)
        self._timeout = timeout
        self._trust_env = trust_env
        self._retry = retry or ops.Retry()
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers,
                                       timeout=timeout, trust_env=trust_env)
        self._driver = AsyncDriver(AsyncHttpTransport(self._http))

    def _open(self, op: ops.Op, keep: bool) -> _Opening:
        async def opening() -> AsyncSession:
            info, primed = await self._driver.run(op)
            state = ops.SessionState(info.session_id, info.model, info.position)
            return AsyncSession(self, state, primed, keep)

        return _Opening(opening())

    def _socket(self, state: ops.SessionState, binary: bool = False) -> AsyncSessionSocket:
        return AsyncSessionSocket(self, state, binary)

    def _ws_settings(self, state: ops.SessionState, binary: bool = False) -> WsSettings:
        return WsSettings(_ws_url(self.base_url, state), self._headers, self._timeout,
                          self._trust_env, session_id=state.session_id, binary=binary)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
