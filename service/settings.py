"""The service's settings: one class, read from `CAROUSEL_*` environment variables or passed in.

Nothing reads the environment at import time: `Settings()` reads it when called (the CLI
does that once), and tests build `Settings(model_repository=..., ...)` directly. Each field's
description is the help text of its `carousel serve` flag.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from carousel.paths import bundled_model_repository


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAROUSEL_", extra="forbid")

    model_repository: Path = Field(
        default_factory=bundled_model_repository,
        description="model repository: <repo>/<name>/<version>/{model.onnx,manifest.json}",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    max_batch_size: int = Field(64, ge=1, le=4096, description="most rows in one inference call")
    max_batch_delay_ms: float = Field(
        2.0, ge=0.0, le=1000.0,
        description="longest wait for a batch to fill once work is queued (ms)",
    )
    max_queue: int = Field(
        1024, ge=1, description="queued items per model version before answering 503 queue_full"
    )
    inference_threads: int = Field(
        2, ge=1, le=64,
        description="inference threads per model version: generations running alone are "
        "decoded in this many parts at once, one core each, and a long input's prefill runs "
        "on this many onnxruntime threads (steps are batched on one thread)",
    )
    intra_op_threads: int = Field(
        1, ge=0, le=256, description="onnxruntime threads inside one operator (0: runtime default)"
    )
    inter_op_threads: int = Field(
        1, ge=0, le=256, description="onnxruntime threads across operators (0: runtime default)"
    )
    session_ttl_s: float = Field(
        3600.0, gt=0, description="a session expires after this long unused (seconds)"
    )
    max_session_ttl_s: float = Field(
        86400.0, gt=0, description="largest ttl_s a client may ask for (seconds)"
    )
    max_sessions: int = Field(
        100_000, ge=1, description="live sessions before answering 503 at_capacity"
    )
    sweep_interval_s: float = Field(
        10.0, gt=0, description="how often expired sessions are swept from memory (seconds)"
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="largest request body or WebSocket frame (bytes)"
    )
    max_tokens_per_request: int = Field(
        8192, ge=1, description="most input tokens in one request (all predict inputs together)"
    )
    max_generate_tokens: int = Field(
        4096, ge=1, description="largest max_tokens of one generation"
    )
    max_predict_inputs: int = Field(256, ge=1, description="most inputs in one predict batch")
    prefill_chunk_tokens: int = Field(
        256, ge=1,
        description="long inputs run in chunks of this many tokens, so decode steps of other "
        "sessions are not stuck behind them",
    )
    gil_switch_interval_ms: float = Field(
        0.5, gt=0, le=100,
        description="how long the event loop may hold the GIL while the inference thread "
        "waits for it (ms; Python's default of 5 stalls every batch under load)",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long in-flight work may take to finish (s)"
    )
    store_url: str = Field(
        "memory://",
        description="session store: memory:// (this process; see snapshot_path) or "
        "redis://HOST:PORT/DB, rediss://... for TLS, shared by every replica (a password may "
        "be in the URL: redis://:PASSWORD@HOST:PORT/DB)",
    )
    store_password: SecretStr | None = Field(
        None, description="password for the Redis store when the URL has none"
    )
    store_timeout_s: float = Field(
        2.0, gt=0, le=60,
        description="longest wait for the Redis store before a request answers 503 "
        "store_unavailable (seconds)",
    )
    store_cache_sessions: int = Field(
        4096, ge=0,
        description="sessions a replica keeps in memory beside the Redis store, so a step on "
        "one needs no read (the write still checks it is current); 0: read every step",
    )
    snapshot_path: Path | None = Field(
        None,
        description="memory store only: on SIGTERM every live session is written here "
        "(atomically), and loaded again at start",
    )
    checkpoint_tokens: int = Field(
        256, ge=0,
        description="Redis store: a generation's state is written to the store at least "
        "every this many tokens (0: not by tokens)",
    )
    checkpoint_ms: float = Field(
        250.0, ge=0,
        description="Redis store: ... and at least every this many ms (0: not by time)",
    )
    lease_s: float = Field(
        5.0, gt=0, le=600,
        description="a generation's lease on its session: another replica may continue the "
        "session this long after the one generating died (seconds)",
    )
    log_level: str = Field("info", description="log level: debug, info, warning, error")
    access_log: bool = Field(False, description="log every request (costs throughput)")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"critical", "error", "warning", "info", "debug", "trace"}:
            raise ValueError("log_level must be one of debug, info, warning, error, critical")
        return value

    @field_validator("store_url")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value.startswith("memory://"):
            return value
        url = urlsplit(value)
        if url.scheme not in ("redis", "rediss") or not url.hostname:
            raise ValueError("store_url must be memory:// or redis://HOST:PORT/DB "
                             "(rediss:// for TLS)")
        # The database number is required: replicas must agree on it, and sessions should
        # not land in database 0 beside whatever else uses it by default.
        db = url.path.lstrip("/")
        if not (db.isascii() and db.isdigit()):
            raise ValueError(f"store_url {url.scheme}://{url.hostname}...: add the database "
                             "number, e.g. redis://localhost:6379/0")
        try:
            url.port  # noqa: B018 - raises for a bad port
        except ValueError as e:
            raise ValueError(f"store_url: {e}") from None
        return value

    @model_validator(mode="after")
    def _snapshot_needs_memory(self) -> Settings:
        if self.snapshot_path is not None and not self.store_url.startswith("memory://"):
            raise ValueError("snapshot_path is for the memory store; a Redis store keeps the "
                             "sessions itself")
        return self
