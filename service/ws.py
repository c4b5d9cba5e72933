"""WebSocket `/v1/sessions/{id}/ws`: steps and generations on one session over one socket.

Each text frame is a step (`{"text"|"tokens", "position"?, "top_k"?, "return_logits"?}`,
answered by one frame shaped like /step's body) or `{"generate": {...}}` (token frames
`{"event": "token", ...}`, then `{"event": "end", ...}`; with "stream": false one frame
shaped like /generate's body). Frames are handled in order. A bad frame is answered with an
`{"error": ...}` frame and the socket stays open; an unknown session closes it (4404).

A step may also be a binary frame of the compact layout in wsbinary.py (first byte 0x00),
answered by a binary frame; it is checked as a JSON step is and its errors are the same JSON
error frames. JSON frames are parsed as HTTP bodies are (pydantic's JSON parser: the same
refusals for lone surrogates, the same bounded nesting), and the size limit of every frame,
`max_body_bytes`, counts UTF-8 bytes as HTTP's does. While a generation with "stream": false
runs, the socket's next message is read ahead: if it says the client left, the generation is
cancelled (a frame read meanwhile is answered next, in order).

With API keys, the handshake was authenticated before it reached this module (a missing or
wrong key is answered with HTTP 401 and no socket; auth.py), and the socket is accepted with
the subprotocol `carousel` when the client offered it. Every frame is one request of the
tenant (its requests/s bucket), and after a reload of the keys its key is checked again: a
revoked key gets an error frame and the socket closes (4401).
"""

from __future__ import annotations

import asyncio
import time

from fastapi import WebSocket
from pydantic_core import from_json
from starlette.websockets import WebSocketDisconnect

from . import views, wsbinary
from .auth import Tenant, accepted_subprotocol
from .errors import (
    InvalidInput,
    InvalidJson,
    RequestTooLarge,
    ServiceError,
    Unauthorized,
    UnknownSession,
    error_body,
)
from .generation import TokenEvent
from .runtime import Service
from .schemas import WsGenerateFrame, parse

ROUTE = "/v1/sessions/{session_id}/ws"
CLOSE_UNKNOWN_SESSION = 4404
CLOSE_SHUTTING_DOWN = 1012  # "service restart"
CLOSE_UNAUTHORIZED = 4401


def _text(obj) -> str:
    return views.dumps(obj).decode("utf-8")


async def session_socket(websocket: WebSocket) -> None:
    session_id = websocket.path_params["session_id"]
    svc: Service = websocket.app.state.service
    await websocket.accept(subprotocol=accepted_subprotocol(websocket.scope))
    try:
        svc.check_accepting()
        record = await svc.plane.session(session_id, tenant=svc.auth.current(websocket.scope))
    except ServiceError as e:
        await websocket.send_text(_text(error_body(e)))
        code = (CLOSE_UNKNOWN_SESSION if isinstance(e, UnknownSession)
                else CLOSE_UNAUTHORIZED if isinstance(e, Unauthorized) else CLOSE_SHUTTING_DOWN)
        await websocket.close(code=code, reason=e.code)
        return
    model = record.model
    inbox = Inbox(websocket)
    try:
        while True:
            message = await inbox.next()
            if message["type"] == "websocket.disconnect":
                return
            started = time.perf_counter()
            status = 200
            svc.inflight += 1
            try:
                tenant = svc.auth.current(websocket.scope)  # raises once its key is revoked
                await _frame(svc, inbox, session_id,
                             message.get("text") or message.get("bytes"), tenant)
            except Unauthorized as e:
                status = e.status
                await websocket.send_text(_text(error_body(e)))
                await websocket.close(code=CLOSE_UNAUTHORIZED, reason=e.code)
                return
            except ServiceError as e:
                status = e.status
                await websocket.send_text(_text(error_body(e)))
            except (WebSocketDisconnect, OSError):  # the client went away mid-answer
                return
            finally:
                svc.inflight -= 1
                svc.metrics.observe_request(model, ROUTE, "WS", status,
                                            time.perf_counter() - started)
    finally:
        if inbox.ahead is not None:
            inbox.ahead.cancel()


class Inbox:
    """The socket's incoming messages, with at most one read ahead (see the module doc)."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.ahead: asyncio.Task | None = None

    async def next(self) -> dict:
        if self.ahead is not None:
            ahead, self.ahead = self.ahead, None
            return await ahead
        return await self.websocket.receive()

    async def unless_gone(self, done: asyncio.Future) -> bool:
        """Wait for `done`; False if the client left first (the read-ahead saw it)."""
        if self.ahead is None:
            self.ahead = asyncio.get_running_loop().create_task(self.websocket.receive())
        await asyncio.wait([done, self.ahead], return_when=asyncio.FIRST_COMPLETED)
        if done.done():
            return True
        if self.ahead.result()["type"] == "websocket.disconnect":
            return False
        await done  # a frame came: it is answered after this one
        return True


def decode_frame(raw: str | bytes | None) -> dict:
    """A frame's JSON object, or the error it deserves."""
    if not raw:
        raise InvalidJson("empty frame: send a JSON object")
    try:
        obj = from_json(raw)
    except ValueError as e:
        raise InvalidJson(f"the frame is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(obj, dict):
        raise InvalidInput("the frame must be a JSON object")
    return obj


def _size(raw: str | bytes, limit: int) -> int:
    """The frame's size in bytes (UTF-8 for text), without encoding a frame that is clearly
    within the limit (a character is at most 4 bytes) or clearly over it."""
    if isinstance(raw, bytes) or len(raw) > limit or 4 * len(raw) <= limit:
        return len(raw)
    return len(raw.encode("utf-8", errors="surrogatepass"))


async def _frame(svc: Service, inbox: Inbox, session_id: str, raw,
                 tenant: Tenant | None) -> None:
    svc.check_accepting()
    if tenant is not None:
        tenant.admit_request()
    limit = svc.settings.max_body_bytes
    if raw and _size(raw, limit) > limit:  # every frame, JSON or binary
        raise RequestTooLarge(f"the frame is over the limit of {limit} bytes")
    if wsbinary.is_binary_step(raw):
        await _binary_step(svc, inbox.websocket, session_id, raw, tenant)
        return
    obj = decode_frame(raw)
    if "generate" in obj:
        await _generate(svc, inbox, session_id, parse(WsGenerateFrame, obj), tenant)
        return
    answer = await svc.plane.step(session_id, obj, {}, tenant=tenant)
    await inbox.websocket.send_text(_text(answer))


async def _binary_step(svc: Service, websocket: WebSocket, session_id: str, raw: bytes,
                       tenant: Tenant | None) -> None:
    step = wsbinary.decode_step(raw, svc.settings.max_tokens_per_request)
    _, answer = await svc.plane.step_tokens(session_id, step.tokens, step.position, step.top_k,
                                            tenant=tenant)
    await websocket.send_bytes(wsbinary.encode_answer(answer, step.return_logits))


async def _generate(svc: Service, inbox: Inbox, session_id: str,
                    frame: WsGenerateFrame, tenant: Tenant | None) -> None:
    websocket = inbox.websocket
    args = svc.plane.generation_args(frame.generate)
    # Over a socket streaming is the default; "stream": false asks for one frame at the end.
    explicit = "stream" in frame.generate.model_fields_set
    stream = args["stream"] = frame.generate.stream or not explicit
    gen = await svc.plane.start_generation(session_id, args, tenant=tenant)
    try:
        if not stream:
            if await inbox.unless_gone(gen.done):
                await websocket.send_text(_text(views.generation_body(session_id, gen,
                                                                      args["seed"])))
            return
        async for events in gen.events():
            for e in events:
                if isinstance(e, TokenEvent):
                    await websocket.send_text(_text(views.token_event(e)))
                else:
                    await websocket.send_text(_text(views.end_event(e, args["seed"])))
    finally:
        gen.cancel()  # the socket went away mid-stream: stop at the next iteration
