"""A fault-injecting TCP proxy for the client tests: between the SDK and a real server, it
forwards bytes both ways and, for the requests a plan picks, breaks things the way networks
do:

- `drop`: forward the request, let the server apply it and answer, then close both
  connections as the answer's first bytes arrive, so the client never sees it;
- `delay`: hold the request `delay_s` before forwarding it (a client with a shorter timeout
  gives up and retries while the original is still on its way);
- `busy`: answer `503` with `Retry-After` itself, without forwarding (an overloaded front);
- `cut`: relay `cut_after` bytes of the answer, then close (a stream broken mid-way);
- `gateway`: forward the request, let the server apply it, and answer `502` in its place
  (a load balancer whose server died before its answer got through).

It reads just enough HTTP to see where a request starts (its request line and headers,
which it records) and when a connection becomes a WebSocket; after the upgrade every frame
the client sends counts as a request of the socket's path. Runs its own event loop in a
thread, so sync and async clients alike can use it.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
from collections import Counter
from dataclasses import dataclass, field

REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]\r\n")
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"retry-after: %d\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s")
BUSY_BODY = b'{"error":{"code":"queue_full","message":"the proxy is busy; retry later"}}'
GATEWAY = (b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\n"
           b"connection: close\r\ncontent-length: %d\r\n\r\n%s")
GATEWAY_BODY = b'{"error":{"code":"bad_gateway","message":"the server failed before answering"}}'


@dataclass
class Plan:
    """Which requests get which fault: rates are probabilities per request whose path
    matches `paths` (a regex); `script` forces the faults of the next matching requests."""

    paths: str = r"$^"  # none
    drop: float = 0.0
    delay: float = 0.0
    busy: float = 0.0
    delay_s: float = 2.0
    retry_after: int = 1
    cut_after: int = 0
    script: list[str] = field(default_factory=list)

    def choose(self, path: str, rng: random.Random) -> str:
        if not re.search(self.paths, path):
            return "pass"
        if self.script:
            return self.script.pop(0)
        x = rng.random()
        for kind in ("drop", "delay", "busy"):
            rate = getattr(self, kind)
            if x < rate:
                return kind
            x -= rate
        return "pass"


@dataclass
class RequestHead:
    method: str
    path: str
    headers: dict[str, str]


class _Conn:
    def __init__(self) -> None:
        self.websocket_path: str | None = None  # set once the upgrade is answered
        self.upgrade_path: str | None = None
        self.drop_on_answer = False
        self.gateway_on_answer = False
        self.cut_left: int | None = None


class FaultProxy:
    def __init__(self, target_port: int, *, seed: int = 0) -> None:
        self.target_port = target_port
        self.plan = Plan()
        self.stats: Counter[str] = Counter()
        self.requests: list[RequestHead] = []
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- lifecycle

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    # --- one connection

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        task = asyncio.current_task()
        self._tasks.add(task)
        self.stats["connections"] += 1
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        conn = _Conn()
        pumps = [asyncio.create_task(self._up(client_r, server_w, client_w, conn)),
                 asyncio.create_task(self._down(server_r, client_w, conn))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (client_w, server_w):
                w.close()
            self._tasks.discard(task)

    async def _up(self, reader, server_w, client_w, conn: _Conn) -> None:
        """Client to server: one chunk at a time, faults decided where a request starts."""
        while chunk := await reader.read(65536):
            fault = self._fault_for(chunk, conn)
            if fault == "busy":
                self.stats["busy"] += 1
                body = BUSY_BODY
                client_w.write(BUSY % (self.plan.retry_after, len(body), body))
                await client_w.drain()
                return
            if fault == "delay":
                self.stats["delay"] += 1
                await asyncio.sleep(self.plan.delay_s)
            elif fault == "drop":
                self.stats["drop"] += 1
                conn.drop_on_answer = True
            elif fault == "gateway":
                self.stats["gateway"] += 1
                conn.gateway_on_answer = True
            elif fault == "cut":
                self.stats["cut"] += 1
                conn.cut_left = self.plan.cut_after
            server_w.write(chunk)
            await server_w.drain()

    async def _down(self, reader, client_w, conn: _Conn) -> None:
        """Server to client, unless the answer is to be dropped or cut."""
        while chunk := await reader.read(65536):
            if conn.drop_on_answer:
                return  # the server has answered, so it applied the request: drop it
            if conn.gateway_on_answer:  # ...or say so, as a load balancer would
                client_w.write(GATEWAY % (len(GATEWAY_BODY), GATEWAY_BODY))
                await client_w.drain()
                return
            if conn.upgrade_path and chunk.startswith(b"HTTP/1.1 101"):
                conn.websocket_path, conn.upgrade_path = conn.upgrade_path, None
            if conn.cut_left is not None:
                chunk = chunk[: conn.cut_left]
                conn.cut_left -= len(chunk)
                client_w.write(chunk)
                await client_w.drain()
                if conn.cut_left <= 0:
                    return
                continue
            client_w.write(chunk)
            await client_w.drain()

    def _fault_for(self, chunk: bytes, conn: _Conn) -> str:
        if conn.websocket_path is not None:  # a frame on an open socket
            self.stats["frames"] += 1
            fault = self._choose(conn.websocket_path)
            # no HTTP answers inside a socket
            return "pass" if fault in ("busy", "gateway") else fault
        m = REQUEST_LINE.match(chunk)
        if m is None:
            return "pass"  # the rest of a request's body
        method, path = m[1].decode(), m[2].decode()
        head = chunk.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
        headers = {}
        for line in head:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.requests.append(RequestHead(method, path, headers))
        self.stats["requests"] += 1
        if headers.get("upgrade", "").lower() == "websocket":
            conn.upgrade_path = path
        fault = self._choose(path)
        if fault in ("busy", "gateway") and conn.upgrade_path:
            return "pass"
        return fault

    def _choose(self, path: str) -> str:
        fault = self.plan.choose(path, self._rng)
        if fault == "cut" and not self.plan.cut_after:
            raise ValueError("a cut fault needs plan.cut_after")
        return fault
