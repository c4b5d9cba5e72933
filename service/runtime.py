"""The running service without HTTP: registry, store, sessions, metrics, and the lifecycle
(start, drain, stop). The FastAPI app (app.py) and the CLI's server (server.py) drive it.

The store is the memory store unless `store_url` names Redis. The memory store loads its
snapshot at start (if `snapshot_path` is set) and writes it at stop, after the drain, so a
restart of a single node keeps every session; a Redis store needs neither, and gets
checkpoints of generations as they go instead.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import snapshot
from .dataplane import DataPlane
from .errors import NotReady, ShuttingDown
from .metrics import Metrics
from .registry import Registry
from .scheduler import make_scheduler
from .sessions import Checkpoints, SessionManager
from .settings import Settings
from .store import MemoryStore, SessionStore, open_store
from .v2plane import V2Plane

log = logging.getLogger("carousel.service")


class Service:
    def __init__(self, settings: Settings, *, registry: Registry | None = None,
                 store: SessionStore | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.registry = registry  # loaded in start() unless given
        self.store = store
        self.sessions: SessionManager | None = None
        self.plane = DataPlane(self)  # what every transport calls
        self.v2 = V2Plane(self)  # the same, for the Open Inference Protocol
        self.ready = False
        self.draining = False
        self.inflight = 0  # HTTP requests and WebSocket messages being answered
        self._tasks: list[asyncio.Task] = []  # the sweeper and the lease keeper

    async def start(self) -> None:
        s = self.settings
        if self.registry is None:
            # onnxruntime sessions take a moment to build: keep the loop free meanwhile.
            self.registry = await asyncio.to_thread(
                Registry.load, s.model_repository, intra_op_threads=s.intra_op_threads,
                inter_op_threads=s.inter_op_threads, wide_threads=s.inference_threads)
        if self.store is None:
            self.store = open_store(s, self.builds())
        checkpoints = Checkpoints(s.checkpoint_tokens, s.checkpoint_ms / 1000)
        if s.snapshot_path is not None and isinstance(self.store, MemoryStore):
            await asyncio.to_thread(snapshot.load, s.snapshot_path, self.store, self.builds())

        def scheduler_for(mv):
            hooks = self.metrics.scheduler_hooks(mv.name, mv.version)
            scheduler = make_scheduler(mv.engine, mv.adapter, s, hooks, f"{mv.name}-{mv.version}")
            if self.store.shared:  # decode runs stop for checkpoints
                scheduler.checkpoint_tokens = checkpoints.tokens
                scheduler.checkpoint_s = checkpoints.seconds
            self.metrics.register_model(mv.name, mv.version)
            self.metrics.watch_scheduler(mv.name, mv.version, scheduler)
            return scheduler

        self.registry.start(scheduler_for)
        self.sessions = SessionManager(
            self.registry, self.store, session_ttl_s=s.session_ttl_s,
            max_session_ttl_s=s.max_session_ttl_s, max_sessions=s.max_sessions,
            sweep_interval_s=s.sweep_interval_s, hooks=self.metrics.session_hooks(),
            lease_s=s.lease_s, checkpoints=checkpoints)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.sessions.run_sweeper()),
                       loop.create_task(self.sessions.run_lease_keeper())]
        self.ready = True
        names = ", ".join(f"{mv.name}/{mv.version}" for mv in self.registry.versions())
        log.info("carousel ready: %s", names)

    def builds(self) -> dict[tuple[str, int], str]:
        """Each served (model, version) and its manifest's sha256: the build a session's
        state belongs to."""
        return {(mv.name, mv.version): mv.manifest.sha256 for mv in self.registry.versions()}

    def check_accepting(self) -> None:
        """Raise unless new work may start."""
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another instance",
                               retry_after=1)
        if not self.ready:
            raise NotReady("the server is starting: models are loading", retry_after=1)

    async def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting_down"
        if not self.ready:
            return False, "not_ready"
        try:
            reachable = await asyncio.wait_for(self.store.ping(), timeout=2.0)
        except Exception:
            reachable = False
        return (True, "ready") if reachable else (False, "store_unreachable")

    @property
    def busy(self) -> int:
        return self.inflight + (self.sessions.busy if self.sessions else 0)

    async def drain(self, grace_s: float) -> None:
        """Refuse new work and wait (up to grace_s) for what is in flight to finish."""
        if not self.draining:
            log.info("draining: %d in flight, up to %.1fs", self.busy, grace_s)
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.busy:
            log.warning("grace period over with %d still in flight; stopping them", self.busy)

    async def stop(self) -> None:
        self.ready = False
        self.draining = True
        for task in self._tasks:
            task.cancel()
        if self.registry is not None:
            await self.registry.close()  # ends generations, fails queued work
        if self.sessions is not None:
            await self.sessions.wait_idle(timeout=5)
        s = self.settings
        if s.snapshot_path is not None and isinstance(self.store, MemoryStore):
            try:
                n = await asyncio.to_thread(snapshot.save, s.snapshot_path, self.store,
                                            self.builds())
                log.info("snapshot: %d sessions written to %s", n, s.snapshot_path)
            except OSError as e:
                log.error("snapshot: could not write %s: %s", s.snapshot_path, e)
        if self.store is not None:
            await self.store.close()
