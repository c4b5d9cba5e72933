"""The client's one exception hierarchy.

Everything the SDK raises for a failed request is a `CarouselError` with the same four
fields, whether the server answered with an error, the connection failed, or the answer
could not be read:

- `code`: the server's snake_case error code (`position_mismatch`, `unknown_session`, ...),
  or one of the client's own: `connection_error`, `timeout`, `bad_response`, `interrupted`;
- `message`: what happened and, for server errors, what to do (the server's own words);
- `status`: the HTTP status, or None when no answer came;
- `retry_after`: the server's Retry-After in seconds, or None.

    CarouselError
    ├── ApiError                  the server answered with an error
    │   ├── InvalidRequest          400, 413, 422: the request itself is wrong
    │   ├── Unauthorized            401: no API key or a wrong one; 403: not an admin key
    │   ├── NotFound                404 (UnknownSession, UnknownModel below it)
    │   ├── PositionMismatch        409: the session is not where the step says (.position)
    │   ├── RateLimited             429: over the tenant's rate or its caps (has Retry-After)
    │   ├── Unavailable             503: come back later (retried when it has Retry-After)
    │   ├── ServerError             500
    │   └── NotSupported            the server has no such feature (yet)
    ├── TransportError            no (whole) answer: the request may or may not have applied
    │   ├── ConnectionFailed
    │   ├── Timeout
    │   └── GatewayError            502/504 from a load balancer: the server's answer was lost
    ├── ProtocolError             an answer that is not what the API says (bad JSON, fields)
    └── GenerationInterrupted     a streamed generation stopped before its end event

Server codes map to classes in `ApiError.of` (by code first, then by status), so a code this
version does not know still gets the class of its status.
"""

from __future__ import annotations


class CarouselError(Exception):
    code = "error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 retry_after: float | None = None, details: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.status = status
        self.retry_after = retry_after
        self.details = details or {}  # further fields of the server's error object

    def __str__(self) -> str:
        where = f" (HTTP {self.status})" if self.status is not None else ""
        return f"{self.code}{where}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, " \
               f"message={self.message!r}, retry_after={self.retry_after!r})"


class ApiError(CarouselError):
    """The server answered with `{"error": {"code", "message", ...}}`."""

    @staticmethod
    def of(code: str, message: str, status: int | None, retry_after: float | None = None,
           details: dict | None = None) -> ApiError:
        cls = _BY_CODE.get(code) or _BY_STATUS.get(status or 0, ApiError)
        if cls is PositionMismatch:
            return PositionMismatch(message, status=status, details=details)
        return cls(message, code=code, status=status, retry_after=retry_after, details=details)


class InvalidRequest(ApiError):
    code = "invalid_input"


class Unauthorized(ApiError):
    """The server needs an API key (`Client(api_key=...)`), or the key is not valid (401);
    or the route needs an admin key (403)."""

    code = "unauthorized"


class RateLimited(ApiError):
    """The key's tenant is over its requests/s or tokens/s, or holds its most sessions or
    generations (`tenant_limit`); `retry_after` says when to try again."""

    code = "rate_limited"


class NotFound(ApiError):
    code = "not_found"


class UnknownSession(NotFound):
    code = "unknown_session"


class UnknownModel(NotFound):
    code = "unknown_model"


class PositionMismatch(ApiError):
    """A step's position is not the session's; `position` is where the session really is."""

    code = "position_mismatch"

    def __init__(self, message: str, *, status: int | None = 409,
                 details: dict | None = None) -> None:
        super().__init__(message, code="position_mismatch", status=status, details=details)
        position = self.details.get("position")
        self.position: int | None = position if isinstance(position, int) else None


class Unavailable(ApiError):
    code = "unavailable"


class ServerError(ApiError):
    code = "internal_error"


class NotSupported(ApiError):
    """The server does not offer this feature: the route is missing or refuses the request's
    shape (code and status are the server's)."""


_BY_CODE: dict[str, type[ApiError]] = {
    "unknown_session": UnknownSession,
    "unknown_model": UnknownModel,
    "unknown_version": UnknownModel,
    "position_mismatch": PositionMismatch,
}
_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest, 413: InvalidRequest, 422: InvalidRequest, 401: Unauthorized,
    403: Unauthorized, 404: NotFound, 405: NotFound, 409: ApiError, 429: RateLimited,
    500: ServerError, 503: Unavailable,
}

# The status of each code the server documents: WebSocket error frames carry the code only.
STATUS_OF_CODE = {
    "invalid_json": 400, "not_found": 404, "method_not_allowed": 405, "position_mismatch": 409,
    "request_too_large": 413, "too_many_tokens": 413, "invalid_input": 422, "empty_input": 422,
    "token_out_of_range": 422, "unknown_model": 404, "unknown_version": 404,
    "unknown_session": 404, "at_capacity": 503, "queue_full": 503, "not_ready": 503,
    "shutting_down": 503, "inference_failed": 500, "internal_error": 500,
    "unauthorized": 401, "forbidden": 403, "rate_limited": 429, "tenant_limit": 429,
}


class TransportError(CarouselError):
    """No whole answer arrived. `may_have_applied` is False only when the request surely
    never reached the server (the connection could not be made)."""

    def __init__(self, message: str, *, code: str, may_have_applied: bool) -> None:
        super().__init__(message, code=code)
        self.may_have_applied = may_have_applied


class ConnectionFailed(TransportError):
    code = "connection_error"

    def __init__(self, message: str, *, may_have_applied: bool) -> None:
        super().__init__(message, code="connection_error", may_have_applied=may_have_applied)


class Timeout(TransportError):
    code = "timeout"

    def __init__(self, message: str, *, may_have_applied: bool) -> None:
        super().__init__(message, code="timeout", may_have_applied=may_have_applied)


class GatewayError(TransportError):
    """A gateway in front of the server (a load balancer) answered 502 or 504: it passed
    the request on and the server's answer never came back (the server died, or was too
    slow), so the request may have applied, as with a dropped connection. carousel itself
    never answers 502 or 504. `code` and `message` are the gateway's when it sent them in
    the API's error shape."""

    code = "bad_gateway"

    def __init__(self, message: str, *, code: str | None, status: int) -> None:
        super().__init__(message, code=code or ("gateway_timeout" if status == 504
                                                else "bad_gateway"), may_have_applied=True)
        self.status = status


# What a gateway answers when the server's answer was lost on the way.
GATEWAY_STATUSES = (502, 504)


class ProtocolError(CarouselError):
    """The server's answer is not what the API promises (not JSON, a field missing)."""

    code = "bad_response"


class GenerationInterrupted(CarouselError):
    """A streamed generation ended without its end event (the connection dropped, or the
    stream stopped). The session's position has been re-read from the server, so the
    session is consistent; `text` is what arrived before the interruption."""

    code = "interrupted"

    def __init__(self, message: str, *, text: str, cause: CarouselError | None) -> None:
        super().__init__(message, code="interrupted",
                         status=cause.status if cause is not None else None)
        self.text = text
        self.cause = cause
