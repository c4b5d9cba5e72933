"""Transports: perform one action (ops.py) over HTTP (httpx) or a session's WebSocket
(websockets), sync or async, and raise the SDK's errors when it fails.

Each transport is the only place its library is called, so the four stay small and alike:
the request is built from the action, the answer goes through protocol.py. Errors are told
apart by whether the request may have reached the server (`may_have_applied`): a connection
that could not be opened, or a frame that could not be sent, surely did not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import httpx
from websockets.asyncio.client import connect as async_ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException
from websockets.sync.client import connect as sync_ws_connect

from . import protocol
from .errors import (
    STATUS_OF_CODE,
    ApiError,
    CarouselError,
    ConnectionFailed,
    ProtocolError,
    Timeout,
    TransportError,
)
from .ops import Call, CloseStream, Connect, NextEvent, OpenStream

# ------------------------------------------------------------------------ HTTP


@contextlib.contextmanager
def httpx_errors(what: str) -> Iterator[None]:
    """httpx's exceptions as the SDK's."""
    try:
        yield
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
        raise CarouselError(f"{what}: {e}", code="invalid_url") from None
    except (httpx.ConnectTimeout, httpx.PoolTimeout) as e:
        raise Timeout(f"{what}: could not connect in time ({type(e).__name__})",
                      may_have_applied=False) from None
    except httpx.TimeoutException as e:
        raise Timeout(f"{what}: no answer in time ({type(e).__name__})",
                      may_have_applied=True) from None
    except httpx.ConnectError as e:
        raise ConnectionFailed(f"{what}: could not connect ({e})", may_have_applied=False) \
            from None
    except (httpx.DecodingError, httpx.TooManyRedirects) as e:
        raise ProtocolError(f"{what}: {e}") from None
    except httpx.HTTPError as e:  # read/write errors, the server closing mid-answer
        raise ConnectionFailed(f"{what}: the connection failed ({type(e).__name__}: {e})",
                               may_have_applied=True) from None


def answer(response: httpx.Response, call: Call):
    """A whole response as the call expects it, or its error raised."""
    if not 200 <= response.status_code < 300:
        raise protocol.error_from_body(response.status_code, response.content,
                                       protocol.retry_after(response.headers.get("retry-after")))
    if call.expect == "bytes":
        return response.content
    if call.expect == "empty" or not response.content:
        return None
    return protocol.json_answer(response.status_code, response.content,
                                f"{call.method} {call.path}")


def stream_error(response: httpx.Response) -> CarouselError:
    return protocol.error_from_body(response.status_code, response.content,
                                    protocol.retry_after(response.headers.get("retry-after")))


class EventStream:
    """An open SSE response and where its parsing is."""

    __slots__ = ("response", "lines", "sse")

    def __init__(self, response: httpx.Response, lines) -> None:
        self.response = response
        self.lines = lines
        self.sse = protocol.SseParser()


class HttpTransport:
    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def perform(self, action):
        what = f"{getattr(action, 'method', 'POST')} {getattr(action, 'path', 'stream')}"
        with httpx_errors(what):
            if isinstance(action, Call):
                return answer(self.http.request(action.method, action.path, json=action.json),
                              action)
            if isinstance(action, OpenStream):
                request = self.http.build_request("POST", action.path, json=action.json)
                response = self.http.send(request, stream=True)
                if response.status_code != 200:
                    try:
                        response.read()
                    finally:
                        response.close()
                    raise stream_error(response)
                return EventStream(response, response.iter_lines())
            if isinstance(action, NextEvent):
                stream: EventStream = action.stream
                for line in stream.lines:
                    if (event := stream.sse.feed(line)) is not None:
                        return event
                return None
            if isinstance(action, CloseStream):
                stream = action.stream
                try:
                    if action.finished:  # read the (empty) rest: the connection is reused
                        for _ in stream.lines:
                            pass
                finally:
                    stream.response.close()
                return None
        raise TypeError(f"not an HTTP action: {action!r}")


class AsyncHttpTransport:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def perform(self, action):
        what = f"{getattr(action, 'method', 'POST')} {getattr(action, 'path', 'stream')}"
        with httpx_errors(what):
            if isinstance(action, Call):
                response = await self.http.request(action.method, action.path, json=action.json)
                return answer(response, action)
            if isinstance(action, OpenStream):
                request = self.http.build_request("POST", action.path, json=action.json)
                response = await self.http.send(request, stream=True)
                if response.status_code != 200:
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
                    raise stream_error(response)
                return EventStream(response, response.aiter_lines())
            if isinstance(action, NextEvent):
                stream: EventStream = action.stream
                async for line in stream.lines:
                    if (event := stream.sse.feed(line)) is not None:
                        return event
                return None
            if isinstance(action, CloseStream):
                stream = action.stream
                try:
                    if action.finished:
                        async for _ in stream.lines:
                            pass
                finally:
                    await stream.response.aclose()
                return None
        raise TypeError(f"not an HTTP action: {action!r}")


# ------------------------------------------------------------------------ WebSocket


class WsSettings:
    """How a session's socket connects; shared by both WebSocket transports."""

    def __init__(self, url: str, headers: dict[str, str], timeout: float | None,
                 trust_env: bool, max_size: int | None = 2**24, *, session_id: str = "",
                 binary: bool = False) -> None:
        self.url = url
        self.session_id = session_id
        self.binary = binary  # steps as compact binary frames (protocol.binary_step)
        self.headers = headers
        self.timeout = timeout
        self.proxy = True if trust_env else None  # True: the environment's proxy settings
        self.max_size = max_size

    def kwargs(self) -> dict:
        return {"additional_headers": self.headers, "open_timeout": self.timeout,
                "max_size": self.max_size, "proxy": self.proxy}

    def frame(self, action) -> str | bytes:
        """The frame an action sends: a step is its body (or its binary frame), a generation
        {"generate": body}."""
        if action.path.endswith("/step"):
            frame = protocol.binary_step(action.json) if self.binary else None
            return frame if frame is not None else protocol.dumps(action.json)
        if action.path.endswith("/generate"):
            return protocol.dumps({"generate": action.json})
        raise TypeError(f"a session's WebSocket cannot carry {action!r}")

    def connect_error(self, e: Exception) -> CarouselError:
        if isinstance(e, InvalidStatus):  # the handshake was answered with an HTTP error
            r = e.response
            error = protocol.error_from_body(r.status_code, r.body or b"",
                                             protocol.retry_after(r.headers.get("Retry-After")))
            if isinstance(error, TransportError):  # a gateway's 502: no frame was sent yet
                error.may_have_applied = False
            return error
        if isinstance(e, InvalidURI):
            return CarouselError(f"{self.url}: {e}", code="invalid_url")
        if isinstance(e, TimeoutError):
            return Timeout(f"WebSocket {self.url}: could not connect in time",
                           may_have_applied=False)
        return ConnectionFailed(f"WebSocket {self.url}: could not connect ({e})",
                                may_have_applied=False)


    def closed_error(self, e: ConnectionClosed | OSError, *, sent: bool) -> CarouselError:
        """The error a closed socket means. The server closes with the error's code as the
        reason when it refuses the socket itself (4404 unknown_session, 1012 shutting_down,
        4401 unauthorized: its key was revoked), right after an error frame that may not have
        been read."""
        close = getattr(e, "rcvd", None)
        if close is not None and close.code in (4404, 4401, 1012) \
                and close.reason in STATUS_OF_CODE:
            return ApiError.of(close.reason, f"the server closed the WebSocket: {close.reason}",
                               STATUS_OF_CODE[close.reason])
        when = "the answer" if sent else "the frame went"
        return ConnectionFailed(f"the WebSocket closed before {when} ({e})",
                                may_have_applied=sent)


WS_CONNECT_ERRORS = (OSError, TimeoutError, WebSocketException)


class WsTransport:
    """One session's socket, reconnected on the next action after it dropped."""

    def __init__(self, settings: WsSettings) -> None:
        self.settings = settings
        self.ws = None

    def connect(self) -> None:
        if self.ws is None:
            try:
                self.ws = sync_ws_connect(self.settings.url, **self.settings.kwargs())
            except WS_CONNECT_ERRORS as e:
                raise self.settings.connect_error(e) from None

    def close(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            ws.close()

    def perform(self, action):
        if isinstance(action, Connect):
            return self.connect()
        if isinstance(action, Call | OpenStream):
            frame = self.settings.frame(action)
            self.connect()
            try:
                self.ws.send(frame)
            except (ConnectionClosed, OSError) as e:
                self.close()
                raise self.settings.closed_error(e, sent=False) from None
            return self.receive() if isinstance(action, Call) else self
        if isinstance(action, NextEvent):
            return self.receive()
        if isinstance(action, CloseStream):
            if not action.finished:
                self.close()  # the server stops a generation whose socket went away
            return None
        raise TypeError(f"not a WebSocket action: {action!r}")

    def receive(self) -> dict:
        if self.ws is None:
            raise ConnectionFailed("the WebSocket is closed", may_have_applied=True)
        try:
            raw = self.ws.recv(timeout=self.settings.timeout)
        except TimeoutError:
            self.close()  # a late answer must not be read as the next one's
            raise Timeout("no WebSocket answer in time", may_have_applied=True) from None
        except (ConnectionClosed, OSError) as e:
            self.close()
            raise self.settings.closed_error(e, sent=True) from None
        return protocol.ws_frame(raw, self.settings.session_id)


class AsyncWsTransport:
    def __init__(self, settings: WsSettings) -> None:
        self.settings = settings
        self.ws = None

    async def connect(self) -> None:
        if self.ws is None:
            try:
                self.ws = await async_ws_connect(self.settings.url, **self.settings.kwargs())
            except WS_CONNECT_ERRORS as e:
                raise self.settings.connect_error(e) from None

    async def close(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            await ws.close()

    async def perform(self, action):
        if isinstance(action, Connect):
            return await self.connect()
        if isinstance(action, Call | OpenStream):
            frame = self.settings.frame(action)
            await self.connect()
            try:
                await self.ws.send(frame)
            except (ConnectionClosed, OSError) as e:
                await self.close()
                raise self.settings.closed_error(e, sent=False) from None
            return (await self.receive()) if isinstance(action, Call) else self
        if isinstance(action, NextEvent):
            return await self.receive()
        if isinstance(action, CloseStream):
            if not action.finished:
                await self.close()
            return None
        raise TypeError(f"not a WebSocket action: {action!r}")

    async def receive(self) -> dict:
        if self.ws is None:
            raise ConnectionFailed("the WebSocket is closed", may_have_applied=True)
        try:
            async with asyncio.timeout(self.settings.timeout):
                raw = await self.ws.recv()
        except TimeoutError:
            await self.close()
            raise Timeout("no WebSocket answer in time", may_have_applied=True) from None
        except (ConnectionClosed, OSError) as e:
            await self.close()
            raise self.settings.closed_error(e, sent=True) from None
        return protocol.ws_frame(raw, self.settings.session_id)
