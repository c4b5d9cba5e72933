"""HTTP routes (v1). Thin: read and validate the body, call the core, shape the answer.

These are plain Starlette routes (`ROUTES`, mounted first by app.py) rather than FastAPI
path operations: a step is the hot path, and FastAPI's per-request dependency solving and
route matching cost more than the step itself (profiled: ~60% of the request's CPU). Bodies
are validated by the pydantic models in schemas.py, which also document each route at
/docs (app.install_openapi builds the document from `ROUTES`).
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from . import views
from .errors import InvalidInput, RequestTooLarge, TooManyTokens
from .runtime import Service
from .sampling import SamplingParams
from .schemas import (
    CreateSessionRequest,
    ForkRequest,
    GenerateRequest,
    PredictRequest,
    StepRequest,
    parse,
    to_tokens,
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


async def read(request: Request, model: type):
    svc = service(request)
    svc.check_accepting()
    return parse(model, await read_body(request, svc.settings.max_body_bytes))


def generation_args(req: GenerateRequest, max_generate_tokens: int) -> dict:
    """Keyword arguments for SessionManager.start_generation (seed included)."""
    if req.max_tokens > max_generate_tokens:
        raise InvalidInput(f"max_tokens: at most {max_generate_tokens} per generation")
    stop = tuple(s.encode("utf-8", errors="surrogatepass") for s in (req.stop or ()))
    if any(not s for s in stop):
        raise InvalidInput("stop: stop strings must not be empty")
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    return {
        "params": SamplingParams(req.temperature, req.top_k, req.top_p),
        "seed": seed,
        "max_tokens": req.max_tokens,
        "stop": stop,
        "stream": req.stream,
    }


# ---------------------------------------------------------------------------- models


@route("GET", "/v1/models", "Every model and version", tag="models")
async def list_models(request: Request) -> Response:
    registry = service(request).registry
    models = []
    for name in registry.names():
        latest = registry.get(name).version
        for mv in registry.versions_of(name):
            models.append({**mv.manifest.essentials(), "latest": mv.version == latest})
    return json_response({"models": models})


@route("GET", "/v1/models/{name}", "One model version (latest unless ?version=N)",
       tag="models", query=("version",))
async def get_model(request: Request) -> Response:
    name = request.path_params["name"]
    registry = service(request).registry
    mv = registry.get(name, _version_param(request))
    versions = [v.version for v in registry.versions_of(name)]
    return json_response({**mv.manifest.essentials(), "latest": mv.version == versions[-1],
                          "versions": versions})


def _version_param(request: Request) -> int | None:
    raw = request.query_params.get("version")
    if raw is None:
        return None
    if not raw.isdigit():
        raise InvalidInput(f"version must be a non-negative integer, got {raw!r}")
    return int(raw)


@route("POST", "/v1/models/{name}/predict",
       "Stateless next-token prediction for one input or a batch", tag="models",
       body=PredictRequest, query=("version",))
async def predict(request: Request) -> Response:
    name = request.path_params["name"]
    svc = service(request)
    req: PredictRequest = await read(request, PredictRequest)
    s = svc.settings
    if req.inputs is not None:
        if req.text is not None or req.tokens is not None:
            raise InvalidInput("send either inputs or a single text/tokens, not both")
        if not req.inputs:
            raise InvalidInput("inputs: send at least one input")
        if len(req.inputs) > s.max_predict_inputs:
            raise RequestTooLarge(
                f"{len(req.inputs)} inputs; the limit is {s.max_predict_inputs} per request")
        items = [(i.text, i.tokens) for i in req.inputs]
    else:
        items = [(req.text, req.tokens)]
    budget = s.max_tokens_per_request
    inputs = []
    for text, tokens in items:
        x = to_tokens(text, tokens, required=True, limit=s.max_tokens_per_request)
        budget -= len(x)
        if budget < 0:
            raise TooManyTokens(f"the inputs are over {s.max_tokens_per_request} tokens in all")
        inputs.append(x)
    query_version = _version_param(request)
    if req.version is not None and query_version is not None and req.version != query_version:
        raise InvalidInput(f"version {req.version} in the body but {query_version} in the URL")
    mv = svc.registry.get(name, req.version if req.version is not None else query_version)
    request.scope["carousel.model"] = mv.name
    answers = await svc.sessions.predict(mv, inputs, req.top_k)
    outputs = []
    for x, answer in zip(inputs, answers, strict=True):
        fields = views.answer_fields(answer, req.return_logits)
        del fields["position"]
        outputs.append({"length": len(x), **fields})
    return json_response({"model": mv.name, "version": mv.version, "outputs": outputs})


# ---------------------------------------------------------------------------- sessions


@route("POST", "/v1/sessions", "Create a session (optionally primed with input)",
       body=CreateSessionRequest, status=201)
async def create_session(request: Request) -> Response:
    svc = service(request)
    req: CreateSessionRequest = await read(request, CreateSessionRequest)
    tokens = to_tokens(req.text, req.tokens, required=False,
                       limit=svc.settings.max_tokens_per_request)
    record, answer = await svc.sessions.create(req.model, req.version, req.ttl_s, tokens,
                                               req.top_k)
    request.scope["carousel.model"] = record.model
    out = views.session_body(record)
    if answer is not None:
        out.update(views.answer_fields(answer, req.return_logits))
    return json_response(out, 201)


@route("POST", "/v1/sessions/{session_id}/step",
       "Consume input; answer the next-token prediction", body=StepRequest, hot=True)
async def step(request: Request) -> Response:
    svc = service(request)
    body = await read_body(request, svc.settings.max_body_bytes)
    return json_response(await run_step(svc, request.path_params["session_id"], body,
                                        request.scope))


async def run_step(svc: Service, session_id: str, body: bytes, scope: dict) -> dict:
    """A step from its JSON body to its answer. Shared by the route above and its fast path
    (app.RequestMiddleware), which serves it without the framework's layers."""
    svc.check_accepting()
    req: StepRequest = parse(StepRequest, body)
    tokens = to_tokens(req.text, req.tokens, required=True,
                       limit=svc.settings.max_tokens_per_request)
    record, answer = await svc.sessions.step(session_id, tokens, req.position, req.top_k)
    scope["carousel.model"] = record.model
    return views.step_body(session_id, answer, req.return_logits)


@route("POST", "/v1/sessions/{session_id}/generate",
       "Sample tokens from the session (stream: server-sent events)", body=GenerateRequest)
async def generate(request: Request) -> Response:
    session_id = request.path_params["session_id"]
    svc = service(request)
    req: GenerateRequest = await read(request, GenerateRequest)
    args = generation_args(req, svc.settings.max_generate_tokens)
    gen = await svc.sessions.start_generation(session_id, **args)
    request.scope["carousel.model"] = gen.model
    if req.stream:
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
    session_id = request.path_params["session_id"]
    record = await service(request).sessions.get(session_id)
    request.scope["carousel.model"] = record.model
    return json_response(views.session_body(record))


@route("DELETE", "/v1/sessions/{session_id}", "Delete a session", status=204)
async def delete_session(request: Request) -> Response:
    await service(request).sessions.delete(request.path_params["session_id"])
    return Response(status_code=204)


@route("POST", "/v1/sessions/{session_id}/fork",
       "A new session with a copy of this one's state and position (body optional)",
       body=ForkRequest, status=201)
async def fork_session(request: Request) -> Response:
    session_id = request.path_params["session_id"]
    svc = service(request)
    svc.check_accepting()
    raw = await read_body(request, svc.settings.max_body_bytes)
    ttl = parse(ForkRequest, raw).ttl_s if raw.strip() else None  # the body is optional
    record = await svc.sessions.fork(session_id, ttl)
    request.scope["carousel.model"] = record.model
    return json_response({**views.session_body(record), "parent_id": session_id}, 201)
