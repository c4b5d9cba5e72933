"""carousel's Python client: `Client` (blocking) and `AsyncClient` (asyncio), same surface.

    from carousel_client import Client

    with Client("http://127.0.0.1:8000") as client:
        with client.session("bytelm", "def main(") as session:
            print(session.step("):").top_k[0])
            for piece in session.stream(max_tokens=40, temperature=0.7):
                print(piece, end="")

Sessions keep their position (bytes consumed) and send it with every step, so a step whose
answer was lost is sent again and applied once (ops.py explains how). Errors are
`CarouselError`s carrying the server's code, message, status and Retry-After (errors.py).

Layout: protocol.py (the wire format, no I/O), ops.py (each call as a generator of actions:
retries and positions, no I/O), drivers.py and transport.py (the I/O: sync and async, HTTP
and WebSocket), client.py (the public classes), chat.py (`carousel chat`). It depends on
httpx and websockets only, never on the server's packages.
"""

from .client import (
    DEFAULT_URL,
    AsyncClient,
    AsyncSession,
    AsyncSessionSocket,
    AsyncTextStream,
    Client,
    Session,
    SessionSocket,
    TextStream,
    __version__,
)
from .errors import (
    ApiError,
    CarouselError,
    ConnectionFailed,
    GatewayError,
    GenerationInterrupted,
    InvalidRequest,
    NotFound,
    NotSupported,
    PositionMismatch,
    ProtocolError,
    RateLimited,
    ServerError,
    Timeout,
    TransportError,
    Unauthorized,
    Unavailable,
    UnknownModel,
    UnknownSession,
)
from .ops import Retry
from .types import (
    Generation,
    GenerationEnd,
    ModelInfo,
    Prediction,
    SessionInfo,
    StepResult,
    TopToken,
)

__all__ = [
    "DEFAULT_URL", "ApiError", "AsyncClient", "AsyncSession", "AsyncSessionSocket",
    "AsyncTextStream", "CarouselError", "Client", "ConnectionFailed", "GatewayError",
    "Generation", "GenerationEnd", "GenerationInterrupted", "InvalidRequest", "ModelInfo",
    "NotFound", "NotSupported", "PositionMismatch", "Prediction", "ProtocolError",
    "RateLimited", "Retry", "ServerError", "Session", "SessionInfo", "SessionSocket",
    "StepResult", "TextStream", "Timeout", "TopToken", "TransportError", "Unauthorized",
    "Unavailable", "UnknownModel", "UnknownSession",
    "__version__",
]
