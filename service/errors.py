"""The service's one error hierarchy, and the one place that turns an error into JSON.

Every error a client can cause is a `ServiceError` with an HTTP status and a snake_case code;
routes and the WebSocket both render it with `error_body`. The codes:

| status | code               | when                                                           |
|--------|--------------------|----------------------------------------------------------------|
| 400    | invalid_json       | the body is not JSON (or not UTF-8)                            |
| 400    | invalid_v2_request | an Open Inference Protocol (v2) request the codec cannot parse |
| 400    | invalid_http       | bytes that are not an HTTP/1.1 request (connections.py)        |
| 400    | host_not_allowed   | the Host header is not in `allowed_hosts` (DNS rebinding)      |
| 403    | origin_not_allowed | a browser request from an origin not in `cors_origins`         |
| 401    | unauthorized       | no API key, or not a valid one (has WWW-Authenticate)          |
| 403    | forbidden          | a valid key without the admin mark, on an admin route          |
| 400    | invalid_state      | a portable session blob that cannot be read (portable.py)      |
| 404    | not_found          | no such path                                                   |
| 405    | method_not_allowed | the path exists, the method does not (has Allow)               |
| 408    | request_timeout    | the headers or the body did not arrive in time (connections.py)|
| 409    | position_mismatch  | a step's `position` is not the session's (error has `position`)|
| 409    | model_mismatch     | a session's state was made by another build of its model       |
| 413    | request_too_large  | body over `max_body_bytes`, or more inputs than allowed        |
| 413    | too_many_tokens    | input over `max_tokens_per_request`                            |
| 415    | unsupported_media_type | a body that is not `application/json` (v2: not octet-stream) |
| 422    | invalid_input      | wrong shape or type, value out of range, unknown field         |
| 422    | empty_input        | empty text / tokens, or generating from a session with no input|
| 422    | token_out_of_range | a token outside the model's vocabulary                         |
| 422    | unsupported_model  | a v1 (text/tokens) call on a tensor model: use the v2 API      |
| 404    | unknown_model      | no model of that name                                          |
| 404    | unknown_version    | the model exists, that version does not                        |
| 404    | unknown_session    | no such session, it expired, or another tenant's               |
| 429    | rate_limited       | the tenant's requests/s or tokens/s bucket is empty (has       |
|        |                    | Retry-After)                                                   |
| 429    | tenant_limit       | the tenant holds its most sessions or generations (Retry-After)|
| 429    | tenant_queue_full  | the tenant holds its share of the model's queue (Retry-After)  |
| 429    | session_busy       | `max_waiting_per_session` requests already wait on the session |
| 431    | headers_too_large  | request headers over `max_header_bytes` or `max_headers`       |
| 499    | client_disconnected| the client left before its answer (logged and counted only)   |
| 503    | at_capacity        | the session cap is reached (has Retry-After)                   |
| 503    | queue_full         | the model's work queue is full (has Retry-After)               |
| 503    | not_ready          | models are still loading or the store is unreachable           |
| 503    | shutting_down      | the server is draining after SIGTERM                           |
| 503    | too_many_connections | `max_connections` are open (has Retry-After)                 |
| 503    | store_unavailable  | the session store (Redis) cannot be reached (has Retry-After)  |
| 503    | session_busy       | another replica is generating on the session (has Retry-After) |
| 500    | inference_failed   | onnxruntime failed on a batch (never caused by input)          |
| 500    | internal_error     | a bug; the message says no more                                |
"""

from __future__ import annotations

import math


class ServiceError(Exception):
    """An error with a status, a code and a message that says what to do."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None, **extra) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.extra = extra  # more fields for the error object, e.g. the real position

    def headers(self) -> dict[str, str] | None:
        if self.retry_after is None:
            return None
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class Unauthorized(ServiceError):
    """No API key, or one that is not valid. The challenge says which (RFC 6750): a request
    without credentials gets the bare challenge, a wrong key `error="invalid_token"`."""

    status, code = 401, "unauthorized"

    def __init__(self, message: str, *, invalid_token: bool = False) -> None:
        super().__init__(message)
        self.challenge = 'Bearer realm="carousel"' + (
            ', error="invalid_token"' if invalid_token else "")

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": self.challenge}


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class RateLimited(ServiceError):
    """A tenant's request or token bucket is empty (always has Retry-After)."""

    status, code = 429, "rate_limited"


class TenantLimit(RateLimited):
    """A tenant holds as many sessions or generations as it may: a 429, not a 403, because
    it passes as the tenant's own sessions end (Retry-After says when to look again)."""

    code = "tenant_limit"


class TenantQueueFull(RateLimited):
    """A tenant holds its share of a model's queue while other tenants have work queued: a
    429 (its own load, not the server's), and the others' work still gets in."""

    code = "tenant_queue_full"


class InvalidJson(ServiceError):
    status, code = 400, "invalid_json"


class InvalidFrame(ServiceError):
    """A binary WebSocket step frame that does not follow its layout (wsbinary.py)."""

    status, code = 400, "invalid_frame"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class MethodNotAllowed(ServiceError):
    status, code = 405, "method_not_allowed"


class InvalidHttp(ServiceError):
    status, code = 400, "invalid_http"


class HostNotAllowed(ServiceError):
    status, code = 400, "host_not_allowed"


class OriginNotAllowed(ServiceError):
    status, code = 403, "origin_not_allowed"


class RequestTimeout(ServiceError):
    status, code = 408, "request_timeout"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class SessionBusy(ServiceError):
    """429: too many requests already wait on one session; they run one at a time."""

    status, code = 429, "session_busy"


class HeadersTooLarge(ServiceError):
    status, code = 431, "headers_too_large"


class ClientDisconnected(ServiceError):
    """The client went away before its answer: the work was abandoned. Nobody reads this
    error; it is counted (nginx's 499) and ends the request without a traceback."""

    status, code = 499, "client_disconnected"


class InvalidInput(ServiceError):
    status, code = 422, "invalid_input"


class InvalidState(ServiceError):
    """A portable session blob (GET /v1/sessions/{id}/state) that cannot be read."""

    status, code = 400, "invalid_state"


class InvalidV2Request(InvalidInput):
    """A v2 (KServe / Triton) request that is malformed or does not fit the model.

    A 400, not the 422 of its parent: the protocol answers every bad request with 400 and a
    body of {"error": message}, and tritonclient only shows the message.
    """

    status, code = 400, "invalid_v2_request"


class EmptyInput(InvalidInput):
    code = "empty_input"


class TokenOutOfRange(InvalidInput):
    code = "token_out_of_range"


class UnsupportedModel(InvalidInput):
    code = "unsupported_model"


class RequestTooLarge(ServiceError):
    status, code = 413, "request_too_large"


class TooManyTokens(RequestTooLarge):
    code = "too_many_tokens"


class UnknownModel(ServiceError):
    status, code = 404, "unknown_model"


class UnknownVersion(ServiceError):
    status, code = 404, "unknown_version"


class UnknownSession(ServiceError):
    status, code = 404, "unknown_session"

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"no session {session_id!r}: it never existed, was deleted or expired; "
            "create a new one with POST /v1/sessions"
        )


class PositionMismatch(ServiceError):
    status, code = 409, "position_mismatch"

    def __init__(self, given: int, position: int) -> None:
        super().__init__(
            f"the step says position {given} but the session is at position {position}; "
            f"resend from position {position}",
            position=position,
        )
        self.position = position


class ModelMismatch(ServiceError):
    """A session whose state was made by another build of its model version (the manifest's
    sha256 differs): state from other weights would silently give wrong answers."""

    status, code = 409, "model_mismatch"


class Unavailable(ServiceError):
    """503s: the client should come back later."""

    status = 503


class AtCapacity(Unavailable):
    code = "at_capacity"


class QueueFull(Unavailable):
    code = "queue_full"


class NotReady(Unavailable):
    code = "not_ready"


class ShuttingDown(Unavailable):
    code = "shutting_down"


class TooManyConnections(Unavailable):
    code = "too_many_connections"


class StoreUnavailable(Unavailable):
    """The session store cannot be reached; nothing was applied that the client was told
    about, and a retry with `position` is safe."""

    code = "store_unavailable"

    def __init__(self, message: str = "the session store cannot be reached; retry shortly",
                 *, retry_after: float = 1) -> None:
        super().__init__(message, retry_after=retry_after)


class SessionContended(Unavailable):
    """503: another replica holds the session's generation lease (or kept changing the
    session under a step). The same code as `SessionBusy`'s 429, which is this replica's
    own queue on the session: either way the session is busy, retry after a while."""

    code = "session_busy"


class InferenceFailed(ServiceError):
    status, code = 500, "inference_failed"


def error_body(error: ServiceError) -> dict:
    """The JSON every error response and error frame carries."""
    return {"error": {"code": error.code, "message": error.message, **error.extra}}
