"""`create_app(settings)`: the FastAPI app around the service core.

Here, and only here, errors become JSON responses (`render_error`: the v1 shape, or the v2 or
OpenAI shape under their prefixes). The request middleware refuses what origins.py refuses
(a Host not served, an Origin not allowed), counts requests for /metrics and for draining,
authenticates every request (auth.py: the tenant goes in the scope; a WebSocket handshake
is checked before it is accepted), refuses new work once SIGTERM arrived, and serves the hot
/step itself. CORS is on only when
`cors_origins` lists origins. The OpenAPI document is openapi.py's, shown at /docs (docs.py).
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route, WebSocketRoute

from . import api, docs, openai_api, openai_views, playground, v2, views
from .api import read_asgi_body
from .auth import TENANT
from .disconnect import unless_disconnected
from .errors import (
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    ServiceError,
    ShuttingDown,
    error_body,
)
from .metrics import CONTENT_TYPE
from .openapi import install_openapi
from .origins import RequestGuard
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
                     for r in [*api.ROUTES, *openai_api.ROUTES, *playground.ROUTES, *docs.ROUTES]}


def error_response(error: ServiceError) -> Response:
    return Response(views.dumps(error_body(error)), status_code=error.status,
                    media_type="application/json", headers=error.headers())


def render_error(path: str, error: ServiceError) -> Response:
    """An error in the shape of the protocol the path belongs to."""
    if path.startswith("/v2"):
        return v2.error_response(error)
    if path.startswith("/openai/"):
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
CLOSE_POLICY_VIOLATION = 1008  # a WebSocket handshake refused by the guard


class RequestMiddleware:
    """Pure ASGI (cheap): refuses requests the guard refuses (origins.py: Host, Origin),
    authenticates (auth.py: the tenant goes in the scope, a WebSocket handshake is checked
    before it is accepted), counts in-flight requests, records metrics, refuses /v1 work
    while draining, and serves the hot route, POST /step, itself.

    A step is the one request clients send thousands of times a second, and the framework's
    layers (exception middleware, router, request/response objects) cost more than the rest
    of the step. So the step is answered here by the same `DataPlane.step` its route uses, with
    the same errors; the route stays registered for everything else (405, docs)."""

    def __init__(self, app, service: Service, guard: RequestGuard) -> None:
        self.app = app
        self.service = service
        self.guard = guard

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, send)
            return
        host = origin = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"origin":
                origin = value
        refusal = self.guard.refusal(host, origin)
        if kind == "websocket":
            if refusal is not None:  # before the handshake is accepted: an HTTP 403
                self.service.metrics.observe_request("", "refused", "WS", refusal.status, 0.0)
                await send({"type": "websocket.close", "code": CLOSE_POLICY_VIOLATION,
                            "reason": refusal.code})
                return
            if self.service.auth.enabled:
                try:
                    self.service.auth.authenticate(scope)
                except ServiceError as e:
                    await refuse_handshake(receive, send, scope, e)
                    return
            await self.app(scope, receive, send)
            return
        svc = self.service
        if refusal is None and svc.draining and scope["path"].startswith("/v1/"):
            refusal = ShuttingDown("the server is shutting down; retry on another instance",
                                   retry_after=1)
        if refusal is not None:
            svc.metrics.observe_request("", "refused", scope["method"], refusal.status, 0.0)
            await render_error(scope["path"], refusal)(scope, receive, send)
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
                    await render_error(scope["path"], e)(scope, receive, send)
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
        plane = svc.plane
        try:
            ahead = plane.admit(session_id)  # 429 before the body is read if it is busy
            # The body goes straight into the call: nothing here holds it while it waits.
            step = plane.step(
                session_id, await read_asgi_body(scope, receive, svc.settings.max_body_bytes),
                scope, tenant=scope.get(TENANT))
            # A step that queues behind others on its session is cancelled if its client
            # leaves meanwhile (disconnect.py). One that does not wait is answered within a
            # batch or two, and watching it would cost the hot path a task per step
            # (measured: ~10% more server CPU per step).
            answer = await (unless_disconnected(step, receive) if ahead else step)
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


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route serves at `path` (Starlette's 405 names one route's only)."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods and route.path_regex.fullmatch(path):
            methods |= route.methods
    return sorted(methods)


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
    # this service's telemetry, so it is off. Its /docs and /redoc load their files from a
    # CDN: off too, docs.py serves /docs from this server.
    app = FastAPI(title="carousel", version="1", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.service = service
    # The API's routes go first, the hottest first (routes are matched in order).
    served = [WebSocketRoute(WS_PATH, session_socket)]
    served += [Route(r.path, r.endpoint, methods=[r.method]) for r in api.ROUTES]
    served += v2.ROUTES
    served += openai_api.ROUTES + playground.ROUTES  # /openai/v1/..., the playground page
    served += docs.ROUTES + health_routes(service)
    app.router.routes[:0] = served
    guard = RequestGuard(settings.allowed_hosts, settings.cors_origins, settings.host)
    app.add_middleware(RequestMiddleware, service=service, guard=guard)
    if settings.cors_origins:  # outermost: its headers go on every answer, the hot /step's too
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "content-type", "inference-header-content-length"],
            expose_headers=["retry-after", "inference-header-content-length"], max_age=600)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return render_error(request.url.path, exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        path = request.url.path
        if exc.status_code == 404:
            return render_error(path, NotFound(f"no route {request.method} {path}"))
        if exc.status_code == 405:
            allowed = allowed_methods(app, path)
            response = render_error(path, MethodNotAllowed(
                f"{request.method} is not allowed on {path}; use {', '.join(allowed)}"))
            response.headers["Allow"] = ", ".join(allowed)
            return response
        err = ServiceError(str(exc.detail))
        err.status, err.code = exc.status_code, "http_error"
        return render_error(path, err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return render_error(request.url.path, InvalidInput(f"{where}: {first.get('msg')}"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return render_error(request.url.path,
                            ServiceError("internal error; the server log has the details"))

    install_openapi(app)
    return app


def health_routes(service: Service) -> list[Route]:
    async def healthz(request: Request) -> Response:
        return api.json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ok, state = await service.readiness()
        if ok:
            return api.json_response({"status": "ready", "models": len(service.registry.names())})
        return Response(views.dumps({"status": state, "error": {
            "code": state, "message": f"not ready: {state.replace('_', ' ')}"}}),
            status_code=503, media_type="application/json", headers={"Retry-After": "1"})

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    return [Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"])]
