"""The service's one error hierarchy, and the one place that turns an error into JSON.

Every error a client can cause is a `ServiceError` with an HTTP status and a snake_case code;
routes and the WebSocket both render it with `error_body`. The codes:

| status | code               | when                                                           |
|--------|--------------------|----------------------------------------------------------------|
| 400    | invalid_json       | the body is not JSON (or not UTF-8)                            |
| 400    | invalid_v2_request | an Open Inference Protocol (v2) request the codec cannot parse |
| 400    | invalid_state      | a portable session blob that cannot be read (portable.py)      |
| 404    | not_found          | no such path                                                   |
| 405    | method_not_allowed | the path exists, the method does not                           |
| 409    | position_mismatch  | a step's `position` is not the session's (error has `position`)|
| 409    | model_mismatch     | a session's state was made by another build of its model       |
| 413    | request_too_large  | body over `max_body_bytes`, or more inputs than allowed        |
| 413    | too_many_tokens    | input over `max_tokens_per_request`                            |
| 422    | invalid_input      | wrong shape or type, value out of range, unknown field         |
| 422    | empty_input        | empty text / tokens, or generating from a session with no input|
| 422    | token_out_of_range | a token outside the model's vocabulary                         |
| 422    | unsupported_model  | a v1 (text/tokens) call on a tensor model: use the v2 API      |
| 404    | unknown_model      | no model of that name                                          |
| 404    | unknown_version    | the model exists, that version does not                        |
| 404    | unknown_session    | no such session, or it expired                                 |
| 503    | at_capacity        | the session cap is reached (has Retry-After)                   |
| 503    | queue_full         | the model's work queue is full (has Retry-After)               |
| 503    | not_ready          | models are still loading or the store is unreachable           |
| 503    | shutting_down      | the server is draining after SIGTERM                           |
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


class InvalidJson(ServiceError):
    status, code = 400, "invalid_json"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class MethodNotAllowed(ServiceError):
    status, code = 405, "method_not_allowed"


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


class StoreUnavailable(Unavailable):
    """The session store cannot be reached; nothing was applied that the client was told
    about, and a retry with `position` is safe."""

    code = "store_unavailable"

    def __init__(self, message: str = "the session store cannot be reached; retry shortly",
                 *, retry_after: float = 1) -> None:
        super().__init__(message, retry_after=retry_after)


class SessionBusy(Unavailable):
    """Another replica holds the session's generation lease."""

    code = "session_busy"


class InferenceFailed(ServiceError):
    status, code = 500, "inference_failed"


def error_body(error: ServiceError) -> dict:
    """The JSON every error response and error frame carries."""
    return {"error": {"code": error.code, "message": error.message, **error.extra}}
