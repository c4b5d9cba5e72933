"""`create_app(settings)`: the FastAPI app around the service core.

Here, and only here, errors become JSON responses (`error_response`; the v2 and OpenAI routes
have their own shapes, `protocol_error_response` picks by path); the request middleware
authenticates every request first (auth.py), counts requests for /metrics and for
draining, and refuses new work once SIGTERM arrived.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException
from starlette.routing import Route, WebSocketRoute

from . import api, openai_api, openai_views, playground, v2, views
from .auth import TENANT
from .errors import (
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    RequestTooLarge,
    ServiceError,
    ShuttingDown,
    error_body,
)
from .metrics import CONTENT_TYPE
from .registry import Registry
from .runtime import Service
from .settings import Settings
from .store import SessionStore
from .ws import ROUTE as WS_PATH
from .ws import session_socket

log = logging.getLogger("carousel.service")

DESCRIPTION = """Stateful serving of recurrent byte-level language models (LSTM / GRU).

Stateless predictions, sessions that keep hidden state between steps, sampling with
server-sent events, and a WebSocket per session. Errors are
`{"error": {"code", "message"}}` with a meaningful status."""


ROUTE_OF_ENDPOINT = {r.endpoint: r.path
                     for r in [*api.ROUTES, *openai_api.ROUTES, *playground.ROUTES]}


async def read_asgi_body(scope, receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise RequestTooLarge(f"the body is {int(value)} bytes; the limit is {limit}")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput("the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def error_response(error: ServiceError) -> Response:
    return Response(views.dumps(error_body(error)), status_code=error.status,
                    media_type="application/json", headers=error.headers())


def protocol_error_response(path: str, error: ServiceError) -> Response:
    """An error answered before routing (no key, over a limit) in the shape of the protocol
    the path belongs to."""
    first = path.split("/", 2)[1] if path.startswith("/") else ""
    if first == "v2":
        return v2.error_response(error)
    if first == "openai":
        return openai_views.error_response(error)
    return error_response(error)


def _header_pairs(error: ServiceError) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in (error.headers() or {}).items()]


async def refuse_handshake(receive, send, scope, error: ServiceError) -> None:
    """Refuse a WebSocket before accepting it: an HTTP answer with the error's status, headers
    and body where the server can send one (uvicorn can), else a close with 4000 + status."""
    await receive()  # websocket.connect
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 4000 + error.status,
                    "reason": error.code})
        return
    body = views.dumps(error_body(error))
    await send({"type": "websocket.http.response.start", "status": error.status, "headers": [
        JSON_HEADER, (b"content-length", str(len(body)).encode()), *_header_pairs(error)]})
    await send({"type": "websocket.http.response.body", "body": body})


STEP_PATH = re.compile(r"/v1/sessions/([^/]+)/step")
STEP_ROUTE = "/v1/sessions/{session_id}/step"
JSON_HEADER = (b"content-type", b"application/json")


class RequestMiddleware:
    """Pure ASGI (cheap): authenticates (auth.py: the tenant goes in the scope, a WebSocket
    handshake is checked before it is accepted), counts in-flight requests, records
    metrics, refuses /v1 work while draining, and serves the hot route, POST /step, itself.

    A step is the one request clients send thousands of times a second, and the framework's
    layers (exception middleware, router, request/response objects) cost more than the rest
    of the step. So the step is answered here by the same `DataPlane.step` its route uses, with
    the same errors; the route stays registered for everything else (405, docs)."""

    def __init__(self, app, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket" and self.service.auth.enabled:
                try:
                    self.service.auth.authenticate(scope)
                except ServiceError as e:
                    await refuse_handshake(receive, send, scope, e)
                    return
            await self.app(scope, receive, send)
            return
        svc = self.service
        if svc.draining and scope["path"].startswith("/v1/"):
            await error_response(ShuttingDown(
                "the server is shutting down; retry on another instance", retry_after=1,
            ))(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        svc.inflight += 1
        try:
            if svc.auth.enabled:
                try:
                    svc.auth.authenticate(scope)
                except ServiceError as e:
                    status = e.status
                    await protocol_error_response(scope["path"], e)(scope, receive, send)
                    return
            step = STEP_PATH.fullmatch(scope["path"]) if scope["method"] == "POST" else None
            if step is not None:
                scope["carousel.route"] = STEP_ROUTE
                status = await self.step(scope, receive, send, step.group(1))
            else:
                await self.app(scope, receive, send_status)
        finally:
            svc.inflight -= 1
            svc.metrics.observe_request(
                scope.get("carousel.model", ""), self.route_of(scope), scope["method"], status,
                time.perf_counter() - started)

    async def step(self, scope, receive, send, session_id: str) -> int:
        svc = self.service
        try:
            body = await read_asgi_body(scope, receive, svc.settings.max_body_bytes)
            answer = await svc.plane.step(session_id, body, scope, tenant=scope.get(TENANT))
            status, payload, extra = 200, views.dumps(answer), ()
        except ServiceError as e:
            status, payload = e.status, views.dumps(error_body(e))
            extra = tuple(_header_pairs(e))
        await send({"type": "http.response.start", "status": status, "headers": [
            JSON_HEADER, (b"content-length", str(len(payload)).encode()), *extra]})
        await send({"type": "http.response.body", "body": payload})
        return status

    @staticmethod
    def route_of(scope) -> str:
        """The matched route's template (never the raw path: ids would explode the labels)."""
        route = scope.get("route")
        if route is not None:
            return route.path
        if "carousel.route" in scope:
            return scope["carousel.route"]
        spec = ROUTE_OF_ENDPOINT.get(scope.get("endpoint"))
        return spec if spec is not None else "unmatched"


def create_app(settings: Settings, *, registry: Registry | None = None,
               store: SessionStore | None = None) -> FastAPI:
    """The app; models load when it starts (its lifespan). `registry` / `store` replace the
    repository's models / the configured store (tests)."""
    service = Service(settings, registry=registry, store=store)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    # FastAPI's native OpenTelemetry checks its providers on every request; /metrics is
    # this service's telemetry, so it is off.
    app = FastAPI(title="carousel", version="1", description=DESCRIPTION, lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.service = service
    # The API's routes go first, the hottest first (routes are matched in order).
    served = [WebSocketRoute(WS_PATH, session_socket)]
    served += [Route(r.path, r.endpoint, methods=[r.method]) for r in api.ROUTES]
    served += v2.ROUTES
    served += openai_api.ROUTES + playground.ROUTES  # /openai/v1/..., the playground page
    app.router.routes[:0] = served
    app.add_middleware(RequestMiddleware, service=service)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.method} {request.url.path}"))
        if exc.status_code == 405:
            return error_response(MethodNotAllowed(
                f"{request.method} is not allowed on {request.url.path}"))
        err = ServiceError(str(exc.detail))
        err.status, err.code = exc.status_code, "http_error"
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(InvalidInput(f"{where}: {first.get('msg')}"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ServiceError("internal error; the server log has the details"))

    @app.get("/healthz", tags=["health"], summary="The process is alive")
    async def healthz() -> Response:
        return api.json_response({"status": "ok"})

    @app.get("/readyz", tags=["health"], summary="Models loaded and store reachable")
    async def readyz() -> Response:
        ok, state = await service.readiness()
        if ok:
            return api.json_response({"status": "ready", "models": len(service.registry.names())})
        return Response(views.dumps({"status": state, "error": {
            "code": state, "message": f"not ready: {state.replace('_', ' ')}"}}),
            status_code=503, media_type="application/json", headers={"Retry-After": "1"})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    install_openapi(app)
    return app


def install_openapi(app: FastAPI) -> None:
    """The API's routes are plain Starlette routes (see api.py); document them from their
    specs and request models, next to what FastAPI documents itself."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description,
                          routes=app.routes)
        bodies = {r.body for r in api.ROUTES if r.body is not None}
        _, defs = models_json_schema([(m, "validation") for m in bodies],
                                     ref_template="#/components/schemas/{model}")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(defs.get("$defs", {}))
        schemas["Error"] = ERROR_SCHEMA
        paths = doc.setdefault("paths", {})
        for r in sorted(api.ROUTES, key=lambda r: r.path):
            paths.setdefault(r.path, {})[r.method.lower()] = operation(r)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi


ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}}}},
}


def operation(r: api.RouteSpec) -> dict:
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in re.findall(r"{(\w+)}", r.path)]
    params += [{"name": name, "in": "query", "required": False, "schema": {"type": "integer"}}
               for name in r.query]
    error = {"description": "error", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}
    op = {
        "tags": [r.tag], "summary": r.summary, "operationId": r.endpoint.__name__,
        "parameters": params,
        "responses": {str(r.status): {"description": "success"}, "4XX": error, "503": error},
    }
    if r.body is not None:
        op["requestBody"] = {
            "required": r.body is not api.ForkRequest,
            "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{r.body.__name__}"}}},
        }
    return op
