"""Connection-level limits: what a client may do before its bytes become a request.

uvicorn's httptools protocol (the fast one, kept for the hot /step path) parses whatever
arrives: headers of any size and number, as slowly as the client likes, on as many
connections as it opens, and a connection that never sends a byte is never closed. So one
client could hold the server's memory and sockets without sending a single request.
`GuardedHttpToolsProtocol` is that protocol with the limits (read from uvicorn's source,
0.54: it has a keep-alive timer between requests and nothing else):

| limit                  | setting                | beyond it                                    |
|------------------------|------------------------|----------------------------------------------|
| open connections       | `max_connections`      | 503 too_many_connections at once, closed     |
| request line + headers | `max_header_bytes`     | 431 headers_too_large, counted as they come  |
| header count           | `max_headers`          | 431 headers_too_large                        |
| headers' arrival       | `header_timeout_s`     | 408 request_timeout, from the first byte     |
| body's arrival         | `body_timeout_s`       | 408 request_timeout, from the headers' end   |
| idle connection        | `keep_alive_timeout_s` | closed (a new one that sends nothing too)    |

Body size is limited where the body is read (app.py, api.py: 413 before reading a body whose
Content-Length is over the limit, and as soon as a streamed one passes it).

A refused connection gets a JSON error in the service's shape, then the server stops
writing (half-close) and discards what the client still sends for `LINGER_S` before it
closes: closing a socket with unread input makes the kernel reset the connection, and the
client would lose the answer that says what went wrong.

Phases of a connection, which decide which timer runs (one at a time, in `_deadline`):
IDLE (no request in progress: keep-alive), HEAD (a request line and headers arriving),
BODY (the body arriving), BUSY (the app is answering: no timer, an answer may take long),
CLOSING (refused: lingering). Each timer is armed only when a request is still incomplete
after a read, so a request that arrives in one read (nearly every API call) arms none.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import views
from .errors import (
    HeadersTooLarge,
    InvalidHttp,
    RequestTimeout,
    ServiceError,
    TooManyConnections,
    error_body,
)

log = logging.getLogger("carousel.service")

IDLE, HEAD, BODY, BUSY, CLOSING = range(5)
LINGER_S = 1.0  # how long a refused connection's remaining input is read and dropped


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    body_timeout_s: float
    keep_alive_timeout_s: float

    @classmethod
    def of(cls, settings) -> ConnectionLimits:
        return cls(settings.max_connections, settings.max_header_bytes, settings.max_headers,
                   settings.header_timeout_s, settings.body_timeout_s,
                   settings.keep_alive_timeout_s)


def _response(error: ServiceError) -> bytes:
    body = views.dumps(error_body(error))
    head = [f"HTTP/1.1 {error.status} {_reason(error.status)}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            "connection: close"]
    head += [f"{k.lower()}: {v}" for k, v in (error.headers() or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _reason(status: int) -> str:
    from http import HTTPStatus

    return HTTPStatus(status).phrase


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing (httptools wraps it)."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args, limits: ConnectionLimits,
                 refused: Callable[[str], None] = lambda code: None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.refused = refused  # reports a refusal's code (metrics)
        self._phase = IDLE
        self._deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes received since the request began, until its headers end
        self._header_size = 0  # the headers parsed so far, exactly (the URL is in self.url)
        self._headers = 0
        self._refusal: ServiceError | None = None

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(TooManyConnections(
                f"the server has its maximum of {self.limits.max_connections} connections "
                "open; retry soon", retry_after=1))
            return
        self._arm(self.limits.keep_alive_timeout_s)  # uvicorn arms none until a response

    def connection_lost(self, exc) -> None:
        self._disarm()
        self._phase = CLOSING
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == CLOSING:
            return  # refused: dropped while lingering
        self._unset_keepalive_if_required()
        if self._phase <= HEAD:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._disarm()  # a WebSocket now: its protocol has its own pings and limits
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._refuse(self._refusal or InvalidHttp(
                "the bytes received are not an HTTP/1.1 request"))
            return
        if self._phase == HEAD:  # still in the headers: every byte read so far is theirs
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(self._too_large())
            elif self._deadline is None:
                self._arm(self.limits.header_timeout_s)
        elif self._phase == BODY and self._deadline is None:
            self._arm(self.limits.body_timeout_s)

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._disarm()  # the idle timer: a request has begun
        self._phase = HEAD
        self._headers = self._header_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers += 1
        self._header_size += len(name) + len(value) + 4  # ": " and CRLF
        if self._headers > self.limits.max_headers:
            self._refusal = HeadersTooLarge(
                f"more than {self.limits.max_headers} request headers; send fewer")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        # Exact here: the read that completed the headers may carry the body too.
        if self._header_size + len(self.url) > self.limits.max_header_bytes:
            self._refusal = self._too_large()
            raise _Refused
        self._disarm()
        self._head_bytes = 0
        self._phase = BODY
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        if self.cycle is not None and self.cycle.response_complete:
            # Answered before its body was read (a 413, 415, 429): the rest was dropped, and
            # the connection is idle again (the reads cancelled uvicorn's keep-alive timer).
            self._phase = IDLE
            self._arm(self.limits.keep_alive_timeout_s)
        else:
            self._phase = BUSY

    def on_response_complete(self) -> None:
        if self._phase == BUSY:
            self._phase = IDLE  # uvicorn arms its keep-alive timer (or starts a pipelined one)
        super().on_response_complete()

    # ------------------------------------------------------------------ limits

    def _too_large(self) -> HeadersTooLarge:
        return HeadersTooLarge(f"the request line and headers are over "
                               f"{self.limits.max_header_bytes} bytes")

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._phase == HEAD:
            self._refuse(RequestTimeout(
                f"the request's headers did not arrive within {self.limits.header_timeout_s:g}"
                " seconds"))
        elif self._phase == BODY and self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # answered already (say 413): only its unread body is late
        elif self._phase == BODY:
            self._refuse(RequestTimeout(
                f"the request's body did not arrive within {self.limits.body_timeout_s:g} "
                "seconds"))
        elif self._phase == IDLE and not self.transport.is_closing():
            self.transport.close()

    def _refuse(self, error: ServiceError) -> None:
        """Answer `error`, stop reading requests, and close once the client had time to
        read the answer."""
        self._disarm()
        self._phase = CLOSING
        self.refused(error.code)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # an answer is half written: nothing else can go
                self.transport.close()
                return
            # The app waits for a body that will not come: it is told the client left, and
            # anything it answers is dropped (uvicorn's cycle ignores sends once disconnected).
            cycle.disconnected = True
            cycle.message_event.set()
        if self.transport.is_closing():
            return
        self.transport.write(_response(error))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self._close)
        else:
            self.transport.close()

    def _close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()
