"""HTTP routes (v1). Thin: read the body, call the data plane (dataplane.py), which
validates, runs and shapes the answer; render it.

These are plain Starlette routes (`ROUTES`, mounted first by app.py) rather than FastAPI
path operations: a step is the hot path, and FastAPI's per-request dependency solving and
route matching cost more than the step itself (profiled: ~60% of the request's CPU). Bodies
are validated by the pydantic models in schemas.py, which also document each route at
/docs (app.install_openapi builds the document from `ROUTES`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from . import portable, views
from .dataplane import DataPlane
from .errors import RequestTooLarge
from .runtime import Service
from .schemas import (
    CreateSessionRequest,
    ForkRequest,
    GenerateRequest,
    PredictRequest,
    StepRequest,
)


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str
    endpoint: object
    summary: str
    tag: str
    body: type | None = None  # the request model, for /docs
    status: int = 200
    query: tuple[str, ...] = ()  # optional integer query parameters


ROUTES: list[RouteSpec] = []  # hottest first: Starlette tries routes in order


def route(method: str, path: str, summary: str, *, tag: str = "sessions", body=None,
          status: int = 200, query: tuple[str, ...] = (), hot: bool = False):
    def register(endpoint):
        spec = RouteSpec(method, path, endpoint, summary, tag, body, status, query)
        ROUTES.insert(0, spec) if hot else ROUTES.append(spec)
        return endpoint

    return register


def service(request: Request) -> Service:
    return request.app.state.service


def plane(request: Request) -> DataPlane:
    return request.app.state.service.plane


def json_response(obj, status: int = 200) -> Response:
    return Response(views.dumps(obj), status_code=status, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestTooLarge(f"the body is {length} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------- models


@route("GET", "/v1/models", "Every model and version", tag="models")
async def list_models(request: Request) -> Response:
    return json_response(plane(request).list_models())


@route("GET", "/v1/models/{name}", "One model version (latest unless ?version=N)",
       tag="models", query=("version",))
async def get_model(request: Request) -> Response:
    return json_response(plane(request).describe_model(
        request.path_params["name"], request.query_params.get("version")))


@route("POST", "/v1/models/{name}/predict",
       "Stateless next-token prediction for one input or a batch", tag="models",
       body=PredictRequest, query=("version",))
async def predict(request: Request) -> Response:
    dp = plane(request)
    body = await read_body(request, dp.settings.max_body_bytes)
    out = await dp.predict(request.path_params["name"], body,
                           request.query_params.get("version"))
    request.scope["carousel.model"] = out["model"]
    return json_response(out)


# ---------------------------------------------------------------------------- sessions


@route("POST", "/v1/sessions", "Create a session (optionally primed with input), or restore "
       "one from its portable state ({\"state\": base64} or the raw blob with its media type)",
       body=CreateSessionRequest, status=201)
async def create_session(request: Request) -> Response:
    dp = plane(request)
    body = await read_body(request, dp.settings.max_body_bytes)
    return json_response(await dp.create_session(
        body, request.scope, request.headers.get("content-type", "")), 201)


@route("GET", "/v1/sessions/{session_id}/state",
       f"The session as a portable blob ({portable.MEDIA_TYPE}; see README)")
async def export_session(request: Request) -> Response:
    blob = await plane(request).export_session(request.path_params["session_id"],
                                               request.scope)
    return Response(blob, media_type=portable.MEDIA_TYPE)


@route("POST", "/v1/sessions/{session_id}/step",
       "Consume input; answer the next-token prediction", body=StepRequest, hot=True)
async def step(request: Request) -> Response:
    # Served by app.RequestMiddleware's fast path; this route documents it and answers 405s.
    dp = plane(request)
    body = await read_body(request, dp.settings.max_body_bytes)
    return json_response(await dp.step(request.path_params["session_id"], body, request.scope))


@route("POST", "/v1/sessions/{session_id}/generate",
       "Sample tokens from the session (stream: server-sent events)", body=GenerateRequest)
async def generate(request: Request) -> Response:
    session_id = request.path_params["session_id"]
    dp = plane(request)
    body = await read_body(request, dp.settings.max_body_bytes)
    gen, args = await dp.generate(session_id, body)
    request.scope["carousel.model"] = gen.model
    if args["stream"]:
        return EventStream(_sse(gen, args["seed"]), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        await asyncio.shield(gen.done)
    except asyncio.CancelledError:
        gen.cancel()
        raise
    return json_response(views.generation_body(session_id, gen, args["seed"]))


async def _sse(gen, seed: int):
    try:
        async for events in gen.events():
            yield views.sse(events, seed)
    finally:
        gen.cancel()  # the client left: stop at the next iteration (no-op once finished)


class EventStream(StreamingResponse):
    """A stream that always closes its iterator, so a vanished client stops its generation
    at once rather than whenever the iterator is garbage-collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            except RuntimeError:  # still being closed by the cancelled stream task
                pass


@route("GET", "/v1/sessions/{session_id}", "A session's position and times")
async def get_session(request: Request) -> Response:
    return json_response(await plane(request).get_session(
        request.path_params["session_id"], request.scope))


@route("DELETE", "/v1/sessions/{session_id}", "Delete a session", status=204)
async def delete_session(request: Request) -> Response:
    await plane(request).delete_session(request.path_params["session_id"])
    return Response(status_code=204)


@route("POST", "/v1/sessions/{session_id}/fork",
       "A new session with a copy of this one's state and position (body optional)",
       body=ForkRequest, status=201)
async def fork_session(request: Request) -> Response:
    dp = plane(request)
    body = await read_body(request, dp.settings.max_body_bytes)
    return json_response(await dp.fork(request.path_params["session_id"], body,
                                       request.scope), 201)
