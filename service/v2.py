"""HTTP routes of the Open Inference Protocol (KServe v2), as stock Triton clients speak it.

Thin: read the raw body (whatever its Content-Type: tritonclient sends none, or
application/octet-stream with binary tensors), decode it with v2codec, call the v2 data
plane (v2plane.py), encode the answer. Errors are the protocol's `{"error": "<message>"}`:
404 for an unknown model or version, 413 for a body over the limit, 503 (with Retry-After)
while the server cannot take work, 400 for anything else a client can send.

Beyond the protocol, `GET|PUT /v2/models/{name}/sequences/{sequence_id}/state` move a
sequence's state out and back in as a portable blob (portable.py): a sequence continued on
another server, or after its state was kept elsewhere.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from carousel import __version__

from .api import read_body
from .errors import ServiceError
from .portable import MEDIA_TYPE
from .v2codec import encode_error, parse_header_length, parse_infer_request

JSON = "application/json"


def _plane(request: Request):
    return request.app.state.service.v2


def _json(obj, status: int = 200) -> Response:
    from .views import dumps

    return Response(dumps(obj), status_code=status, media_type=JSON)


def error_response(error: ServiceError) -> Response:
    """The protocol's error shape, with the status Triton gives the same mistake."""
    status = error.status if error.status in (404, 413, 429, 503) or error.status >= 500 else 400
    return Response(encode_error(error.message), status_code=status, media_type=JSON,
                    headers=error.headers())


def _endpoint(handler):
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ServiceError as e:
            return error_response(e)

    endpoint.__name__ = handler.__name__
    return endpoint


async def server_metadata(request: Request) -> Response:
    return _json(_plane(request).server_metadata(__version__))


async def live(request: Request) -> Response:
    return _json({"live": True})


async def ready(request: Request) -> Response:
    ok, _ = await request.app.state.service.readiness()
    return _json({"ready": ok}, 200 if ok else 503)


async def model_metadata(request: Request) -> Response:
    p = request.path_params
    return _json(_plane(request).model_metadata(p["name"], p.get("version")))


async def model_ready(request: Request) -> Response:
    p = request.path_params
    _plane(request).model(p["name"], p.get("version"))  # 404 if unknown
    ok, _ = await request.app.state.service.readiness()
    return _json({"name": p["name"], "ready": ok}, 200 if ok else 503)


async def infer(request: Request) -> Response:
    p = request.path_params
    svc = request.app.state.service
    body = await read_body(request, svc.settings.max_body_bytes)
    header = parse_header_length(request.headers.get("inference-header-content-length"))
    parsed = parse_infer_request(body, header)
    request.scope["carousel.model"] = p["name"]
    payload, headers = await _plane(request).infer(p["name"], p.get("version"), parsed)
    content_type = headers.pop("Content-Type", headers.pop("content-type", JSON))
    return Response(payload, media_type=content_type, headers=headers)


async def export_sequence(request: Request) -> Response:
    p = request.path_params
    request.scope["carousel.model"] = p["name"]
    blob = await _plane(request).export_sequence(p["name"], p["sequence_id"])
    return Response(blob, media_type=MEDIA_TYPE)


async def import_sequence(request: Request) -> Response:
    p = request.path_params
    svc = request.app.state.service
    body = await read_body(request, svc.settings.max_body_bytes)
    request.scope["carousel.model"] = p["name"]
    return _json(await _plane(request).import_sequence(p["name"], p["sequence_id"], body))


_MODEL = "/v2/models/{name}"
_VERSION = "/v2/models/{name}/versions/{version}"

ROUTES = [
    Route(_MODEL + "/infer", _endpoint(infer), methods=["POST"]),
    Route(_VERSION + "/infer", _endpoint(infer), methods=["POST"]),
    Route("/v2", _endpoint(server_metadata), methods=["GET"]),
    Route("/v2/health/live", _endpoint(live), methods=["GET"]),
    Route("/v2/health/ready", _endpoint(ready), methods=["GET"]),
    Route(_MODEL, _endpoint(model_metadata), methods=["GET"]),
    Route(_VERSION, _endpoint(model_metadata), methods=["GET"]),
    Route(_MODEL + "/ready", _endpoint(model_ready), methods=["GET"]),
    Route(_VERSION + "/ready", _endpoint(model_ready), methods=["GET"]),
    # carousel's own: a sequence's state as a portable blob, out and back in (portable.py)
    Route(_MODEL + "/sequences/{sequence_id}/state", _endpoint(export_sequence),
          methods=["GET"]),
    Route(_MODEL + "/sequences/{sequence_id}/state", _endpoint(import_sequence),
          methods=["PUT"]),
]
