"""Prometheus metrics, named by its conventions: base units (seconds), `_total` counters,
labelled by model and route, never by session (that would be unbounded).

One `Metrics` per app, on its own registry (tests run several apps in one process). The core
reports through small hook objects (`SchedulerHooks`, `SessionHooks`) so it never imports
this module; labelled children are looked up once and cached, since the hot path pays for
every label lookup.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from .scheduler import SchedulerHooks
from .sessions import SessionHooks

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
QUEUE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0, 5.0)
INFERENCE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# The method label's values: any other token a client sends counts as "other", so no client
# can add label values (each one a new series in every scrape, kept forever).
METHODS = frozenset({"GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "WS"})
# Why connections.py refuses a connection (the error codes it answers with).
REFUSALS = ("headers_too_large", "request_timeout", "too_many_connections", "invalid_http")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends
        self.requests = Counter(
            "carousel_requests_total", "HTTP requests and WebSocket messages answered",
            ["model", "route", "method", "status"], registry=r)
        self.request_duration = Histogram(
            "carousel_request_duration_seconds", "Time to answer a request (to the last byte "
            "of a stream)", ["model", "route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "carousel_queue_wait_seconds", "Time work waited in the model's queue before its "
            "batch ran", ["model", "version"], buckets=QUEUE_BUCKETS, registry=r)
        self.inference = Histogram(
            "carousel_inference_duration_seconds", "Time of one onnxruntime call (one batch)",
            ["model", "version"], buckets=INFERENCE_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "carousel_batch_size", "Rows in one inference call", ["model", "version"],
            buckets=BATCH_BUCKETS, registry=r)
        self.batch_tokens = Counter(
            "carousel_batch_tokens_total", "Real (unpadded) tokens run through the model",
            ["model", "version"], registry=r)
        self.active_sessions = Gauge(
            "carousel_active_sessions", "Sessions held", ["model"], registry=r)
        self.sessions_created = Counter(
            "carousel_sessions_created_total", "Sessions created (including forks)", ["model"],
            registry=r)
        self.sessions_expired = Counter(
            "carousel_sessions_expired_total", "Sessions removed after their idle TTL",
            ["model"], registry=r)
        self.sessions_evicted = Counter(
            "carousel_sessions_evicted_total", "Sessions removed before their TTL (DELETE)",
            ["model"], registry=r)
        self.tokens_consumed = Counter(
            "carousel_tokens_consumed_total", "Input tokens consumed (steps, priming, predict)",
            ["model", "version"], registry=r)
        self.tokens_generated = Counter(
            "carousel_tokens_generated_total", "Tokens generated", ["model", "version"],
            registry=r)
        self.queue_depth = Gauge(
            "carousel_queue_depth", "Work waiting in the model's queue", ["model", "version"],
            registry=r)
        self.generations = Gauge(
            "carousel_generations_active", "Generations running", ["model", "version"],
            registry=r)
        self.connections_refused = Counter(
            "carousel_connections_refused_total", "Connections answered with an error and "
            "closed before their request reached the API (connections.py), by error code",
            ["reason"], registry=r)
        for reason in REFUSALS:  # known up front: every series exists from the start
            self.connections_refused.labels(reason)
        self.connections_open = Gauge(
            "carousel_connections_open", "Open HTTP and WebSocket connections", registry=r)
        self._http: dict[tuple, tuple] = {}

    def observe_request(self, model: str, route: str, method: str, status: int,
                        seconds: float) -> None:
        if method not in METHODS:
            method = "other"
        key = (model, route, method, status)
        children = self._http.get(key)
        if children is None:
            children = self._http[key] = (
                self.requests.labels(model, route, method, str(status)),
                self.request_duration.labels(model, route, method),
            )
        children[0].inc()
        children[1].observe(seconds)

    def connection_refused(self, reason: str) -> None:
        self.connections_refused.labels(reason).inc()

    def watch_connections(self, connections) -> None:
        """Open connections, read at scrape time (uvicorn's set of them)."""
        self.connections_open.set_function(lambda: len(connections))

    def register_model(self, model: str, version: int) -> None:
        """Start every per-model series at zero, so dashboards and alerts see them before the
        first event (Prometheus' advice for known label values)."""
        v = str(version)
        for family in (self.sessions_created, self.sessions_expired, self.sessions_evicted,
                       self.active_sessions):
            family.labels(model)
        for family in (self.queue_wait, self.inference, self.batch_size, self.batch_tokens,
                       self.tokens_consumed, self.tokens_generated):
            family.labels(model, v)

    def scheduler_hooks(self, model: str, version: int) -> SchedulerHooks:
        return _SchedulerMetrics(self, model, str(version))

    def session_hooks(self) -> SessionHooks:
        return _SessionMetrics(self)

    def watch_scheduler(self, model: str, version: int, scheduler) -> None:
        """Queue depth and running generations, read at scrape time."""
        self.queue_depth.labels(model, str(version)).set_function(lambda: scheduler.queued)
        self.generations.labels(model, str(version)).set_function(lambda: scheduler.generating)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SchedulerMetrics(SchedulerHooks):
    def __init__(self, m: Metrics, model: str, version: str) -> None:
        self._wait = m.queue_wait.labels(model, version)
        self._infer = m.inference.labels(model, version)
        self._size = m.batch_size.labels(model, version)
        self._tokens = m.batch_tokens.labels(model, version)
        self._generated = m.tokens_generated.labels(model, version)

    def batch(self, size: int, tokens: int, seconds: float) -> None:
        self._size.observe(size)
        self._tokens.inc(tokens)
        self._infer.observe(seconds)

    def queue_wait(self, seconds: float) -> None:
        self._wait.observe(seconds)

    def generated(self, tokens: int) -> None:
        self._generated.inc(tokens)


class _SessionMetrics(SessionHooks):
    def __init__(self, m: Metrics) -> None:
        self._m = m
        self._consumed: dict[tuple, object] = {}

    def created(self, model: str) -> None:
        self._m.sessions_created.labels(model).inc()
        self._m.active_sessions.labels(model).inc()

    def ended(self, model: str, reason: str) -> None:
        counter = self._m.sessions_expired if reason == "expired" else self._m.sessions_evicted
        counter.labels(model).inc()
        self._m.active_sessions.labels(model).dec()

    def consumed(self, model: str, version: int, tokens: int) -> None:
        child = self._consumed.get((model, version))
        if child is None:
            child = self._consumed[(model, version)] = self._m.tokens_consumed.labels(
                model, str(version))
        child.inc(tokens)
