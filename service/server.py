"""Running the app under uvicorn with a graceful drain, exiting 0 after SIGTERM.

uvicorn alone, on SIGTERM, stops listening at once and, after its own graceful shutdown,
re-raises the signal (uvicorn/server.py `capture_signals`), so the process ends *by* the
signal (status -15), not with 0. This server instead, on the first SIGTERM or SIGINT:
1. marks the service draining: /readyz turns 503 and new /v1 work gets 503 shutting_down,
   while the listener stays open so clients and load balancers see that;
2. waits until in-flight requests, streams and generations finish, up to the grace period;
3. if some are still running then, ends them: every generation stops with finish reason
   `shutdown`, so its client gets the stream's final event (SSE `event: end`, the WebSocket
   end frame, the OpenAI stream's last chunk and `[DONE]`) instead of a cut connection, and
   queued work is answered 503 shutting_down; the answers are given a moment to go out;
4. lets uvicorn shut down (closing idle connections and sockets), and returns normally.
A second signal stops at once.

SIGHUP re-reads the API keys file (auth.py): new keys work and revoked ones stop at once,
sessions stay as they are, and a file that does not parse keeps the keys in force. (Left
alone, SIGHUP would end the process: uvicorn handles only SIGINT and SIGTERM.)
Connections are served by connections.GuardedHttpToolsProtocol: uvicorn's httptools
protocol with limits on headers, timeouts and the number of connections.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import sys

import uvicorn

from .auth import KeyRedactor
from .connections import ConnectionLimits, GuardedHttpToolsProtocol
from .runtime import Service

log = logging.getLogger("carousel.service")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service, grace_s: float) -> None:
        super().__init__(config)
        self.service = service
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self.exit_signal: int | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGHUP, self.service.auth.reload)
        try:
            await super().serve(sockets)
        finally:
            self._loop.remove_signal_handler(signal.SIGHUP)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        # Everything loaded so far lives as long as the process: keep it out of the cyclic
        # collector's scans, which otherwise grow with it and stall the loop.
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame) -> None:
        # Not calling super(): it records the signal for uvicorn to re-raise on the way out.
        if self.exit_signal is not None or not self.started or self._loop is None:
            self.should_exit = True
            self.force_exit = self.exit_signal is not None  # a second signal: stop now
            self.exit_signal = self.exit_signal or sig
            return
        self.exit_signal = sig
        log.info("%s received: draining (grace %.1fs)", signal.Signals(sig).name, self.grace_s)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self.service.drain(self.grace_s)
        finally:
            self.should_exit = True


class _DeniedHandshakeNoise(logging.Filter):
    """uvicorn's websockets-sansio protocol logs an ERROR ("ASGI callable returned without
    completing handshake.") after every WebSocket refused with an HTTP answer, as a missing
    key's is: the client got its 401 and nothing failed (Kludex/uvicorn pull request 3138,
    open). carousel accepts every other socket before its handler returns, so the message
    means nothing else here."""

    MESSAGE = "ASGI callable returned without completing handshake."

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.MESSAGE


def run_server(app, settings) -> int:
    service: Service = app.state.service
    # The inference thread needs the GIL back after every onnxruntime call; while the event
    # loop runs Python it only gets it when the loop's switch interval runs out.
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000.0)
    protocol = functools.partial(GuardedHttpToolsProtocol, limits=ConnectionLimits.of(settings),
                                 refused=service.metrics.connection_refused)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=protocol,
        backlog=settings.backlog,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        lifespan="on",
        log_level=settings.log_level,
        access_log=settings.access_log,
        # The drain already waited for in-flight work; what is left is idle connections.
        timeout_graceful_shutdown=2,
        # Oversized frames get an error frame from the app, not a protocol close.
        ws_max_size=max(16 * 1024 * 1024, 4 * settings.max_body_bytes),
    )
    if service.auth.enabled:
        logging.getLogger("uvicorn.error").addFilter(_DeniedHandshakeNoise())
        # On the handlers (uvicorn's Config has just made its own), so every record that
        # is written, whichever logger it came from, passes the redactor.
        redactor = KeyRedactor()
        for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
            for handler in logging.getLogger(name).handlers:
                handler.addFilter(redactor)
    server = DrainingServer(config, service, settings.shutdown_grace_s)
    service.metrics.watch_connections(server.server_state.connections)
    server.run()
    return 0 if server.started else 3
