"""The HTTP floor: carousel's routes on the same stack (uvicorn + FastAPI) doing nothing.

Every route answers a fixed small JSON (or a fixed stream), so the load generator drives it
exactly as it drives carousel; no server on this stack can answer faster. Nothing here
parses a step's body or touches a model.

Two lower layers of the same stack answer the step routes too, to show what each layer
costs per request: `--flavour starlette` (plain Starlette routes, no FastAPI) and
`--flavour asgi` (one bare ASGI function under uvicorn).

    python -m carousel.bench.floor_server --port 8001 [--flavour fastapi|starlette|asgi]
"""

from __future__ import annotations

import argparse
import json

import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response, StreamingResponse
from starlette.applications import Starlette
from starlette.routing import Route

TOP_K = [{"token": 32, "text": " ", "logprob": -1.0}]
STEP = json.dumps({"session_id": "floor", "position": 1, "top_k": TOP_K}).encode()
CREATED = json.dumps({"session_id": "floor", "model": "floor", "version": 1,
                      "position": 0}).encode()
PREDICTED = json.dumps({"model": "floor", "version": 1,
                        "outputs": [{"length": 1, "top_k": TOP_K}]}).encode()
TOKEN_EVENT = b'data: {"token": 32, "text": " ", "position": 1}\n\n'
END_EVENT = b'event: end\ndata: {"finish_reason": "length", "position": 1}\n\n'


def create_app() -> FastAPI:
    app = FastAPI(title="carousel bench floor")

    @app.get("/readyz")
    async def ready() -> Response:
        return Response(b'{"status":"ready"}', media_type="application/json")

    @app.post("/v1/sessions")
    async def create_session() -> Response:
        return Response(CREATED, status_code=201, media_type="application/json")

    @app.post("/v1/sessions/{session_id}/step")
    async def step(session_id: str) -> Response:
        return Response(STEP, media_type="application/json")

    @app.post("/v1/models/{name}/predict")
    async def predict(name: str) -> Response:
        return Response(PREDICTED, media_type="application/json")

    @app.post("/v1/sessions/{session_id}/generate")
    async def generate(session_id: str, request: Request) -> StreamingResponse:
        # The one thing read: how many events to stream, so a stream is as long as carousel's.
        count = int((await request.json()).get("max_tokens", 1))

        async def events():
            for _ in range(count):
                yield TOKEN_EVENT
            yield END_EVENT

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.websocket("/v1/sessions/{session_id}/ws")
    async def ws(websocket: WebSocket, session_id: str) -> None:
        await websocket.accept()
        text = STEP.decode()
        try:
            while True:
                await websocket.receive_text()
                await websocket.send_text(text)
        except WebSocketDisconnect:
            pass

    return app


def create_starlette_app() -> Starlette:
    """Session create and step (and /readyz) as plain Starlette routes."""

    async def ready(request) -> Response:
        return Response(b'{"status":"ready"}', media_type="application/json")

    async def create_session(request) -> Response:
        return Response(CREATED, status_code=201, media_type="application/json")

    async def step(request) -> Response:
        return Response(STEP, media_type="application/json")

    return Starlette(routes=[Route("/readyz", ready),
                             Route("/v1/sessions", create_session, methods=["POST"]),
                             Route("/v1/sessions/{session_id}/step", step, methods=["POST"])])


async def asgi_app(scope, receive, send) -> None:
    """The same three routes as one bare ASGI function: the bottom of the stack."""
    if scope["type"] != "http":  # lifespan: nothing to start
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):  # a request's body is read, not parsed
        pass
    path = scope["path"]
    if path == "/v1/sessions":
        status, body = 201, CREATED
    elif path == "/readyz" or path.endswith("/step"):
        status, body = 200, STEP
    else:
        status, body = 404, b'{"error":{"code":"not_found","message":"no such route"}}'
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


FLAVOURS = {"fastapi": create_app, "starlette": create_starlette_app, "asgi": lambda: asgi_app}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--flavour", choices=sorted(FLAVOURS), default="fastapi")
    args = parser.parse_args(argv)
    # No access log: it would cost the floor more than the endpoint itself.
    uvicorn.run(FLAVOURS[args.flavour](), host=args.host, port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
