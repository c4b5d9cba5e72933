"""A minimal HTTP/1.1 and WebSocket client on raw asyncio streams, for the load generator.

Why not aiohttp: on this machine the client shares two cores with the server it measures,
and aiohttp spends ~65 µs of CPU per small request where these few lines spend ~23 µs
(measured against the floor server, 64 connections). It speaks only what the bench needs:
keep-alive requests with Content-Length or chunked answers, a chunked stream read as it
arrives (SSE), and WebSocket text frames. Timeouts are the caller's (one deadline per run).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import AsyncIterator

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class ProtocolError(Exception):
    """The server answered something this client does not understand."""


class Connection:
    """One keep-alive connection; requests on it run one at a time."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.head = f"Host: {host}:{port}\r\n".encode()

    async def _connected(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self.reader, self.writer

    def _request_bytes(self, method: str, path: str, body: bytes | None,
                       extra: bytes = b"") -> bytes:
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self.head + extra
        if body is None:
            return head + b"\r\n"
        return (head + b"Content-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("server closed the connection")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {status_line[:80]!r}")
        headers: dict[bytes, bytes] = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    async def _chunks(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while True:
            size = int((await reader.readline()).split(b";", 1)[0], 16)
            if size == 0:
                await reader.readline()  # the empty trailer
                return
            data = await reader.readexactly(size + 2)  # chunk and its CRLF
            yield data[:-2]

    def _after(self, headers: dict[bytes, bytes]) -> None:
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()

    async def request(self, method: str, path: str, body: bytes | None = None
                      ) -> tuple[int, bytes]:
        status, payload, _ = await self.request_with_headers(method, path, body)
        return status, payload

    async def request_with_headers(self, method: str, path: str, body: bytes | None = None,
                                   extra: bytes = b""
                                   ) -> tuple[int, bytes, dict[bytes, bytes]]:
        """A request with `extra` header lines (each ending in CRLF); the answer's status,
        body and headers."""
        reused = self.writer is not None
        reader, writer = await self._connected()
        writer.write(self._request_bytes(method, path, body, extra))
        try:
            status, headers = await self._read_head(reader)
        except ConnectionResetError:
            if not reused:
                raise
            # The server closed a connection idle past its keep-alive timeout before reading
            # this request (nothing was answered, so nothing was applied): once more, afresh.
            self.close()
            reader, writer = await self._connected()
            writer.write(self._request_bytes(method, path, body, extra))
            status, headers = await self._read_head(reader)
        if b"content-length" in headers:
            payload = await reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            payload = b"".join([chunk async for chunk in self._chunks(reader)])
        else:
            payload = b""
        self._after(headers)
        return status, payload, headers

    async def stream(self, path: str, body: bytes) -> AsyncIterator[tuple[int, bytes]]:
        """POST and yield (status, chunk) as each chunk of the answer arrives."""
        reader, writer = await self._connected()
        writer.write(self._request_bytes("POST", path, body))
        status, headers = await self._read_head(reader)
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            async for chunk in self._chunks(reader):
                yield status, chunk
        else:
            yield status, await reader.readexactly(int(headers.get(b"content-length", b"0")))
        self._after(headers)

    async def websocket(self, path: str) -> WebSocket:
        """Upgrade this connection; it then belongs to the returned WebSocket."""
        reader, writer = await self._connected()
        key = base64.b64encode(os.urandom(16))
        writer.write(f"GET {path} HTTP/1.1\r\n".encode() + self.head +
                     b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: " + key + b"\r\n\r\n")
        status, headers = await self._read_head(reader)
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        if status != 101 or headers.get(b"sec-websocket-accept") != accept:
            raise ProtocolError(f"websocket upgrade refused: {status}")
        self.reader = self.writer = None  # the socket is the WebSocket's now
        return WebSocket(reader, writer)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class WebSocket:
    """Client side of RFC 6455 text and binary frames: masked out, unmasked in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        # XOR with the repeated mask as one big integer: no per-byte Python loop.
        repeated = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
            n, "big") if n else b""
        return head + mask + masked

    async def send_text(self, text: str) -> None:
        self.writer.write(self._frame(0x1, text.encode()))

    async def send_binary(self, data: bytes) -> None:
        self.writer.write(self._frame(0x2, data))

    async def receive_text(self) -> str:
        """The next text message (fragments joined); answers pings on the way."""
        return (await self.receive())[1].decode()

    async def receive(self) -> tuple[int, bytes]:
        """The next message, (opcode of its first frame: 1 text, 2 binary; its payload)."""
        parts: list[bytes] = []
        kind = 0
        while True:
            first, second = await self.reader.readexactly(2)
            n = second & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(n) if n else b""
            opcode = first & 0x0F
            if opcode == 0x9:  # ping
                self.writer.write(self._frame(0xA, payload))
            elif opcode == 0x8:
                raise ConnectionResetError(f"websocket closed by server: {payload[:2]!r}")
            elif opcode in (0x0, 0x1, 0x2):
                kind = kind or opcode
                parts.append(payload)
                if first & 0x80:  # FIN
                    return kind, b"".join(parts)
            elif opcode != 0xA:
                raise ProtocolError(f"unexpected websocket opcode {opcode}")

    async def close(self) -> None:
        try:
            self.writer.write(self._frame(0x8, struct.pack("!H", 1000)))
            await self.writer.drain()
        except ConnectionError:
            pass
        self.writer.close()
