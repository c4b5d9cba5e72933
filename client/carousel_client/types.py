"""What the client returns: frozen dataclasses, one per kind of answer.

They are built from the server's JSON by protocol.py, which checks every field it reads, so
a malformed answer is a `ProtocolError` there and never a KeyError here. Times are aware
`datetime`s in UTC. `raw` keeps the whole JSON object for fields this version does not model.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TopToken:
    """One of the likeliest next tokens (bytes): its text for display and log-probability."""

    token: int
    text: str
    logprob: float


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    variant: str | None
    latest: bool
    vocab_size: int | None
    parameters: int | None
    state_bytes: int | None
    versions: tuple[int, ...] = ()  # every version of this name (GET /v1/models/{name} only)
    raw: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Prediction:
    """Stateless next-token prediction after one input."""

    length: int  # input tokens
    top_k: tuple[TopToken, ...]
    logits: tuple[float, ...] | None  # when asked for with return_logits


@dataclass(frozen=True)
class StepResult:
    """The answer to a step: the next-token prediction after it and the session's position.

    `answer_lost` is True in one rare case: the step had been applied, its answer was lost
    on the way, and the server could no longer replay it (the session moved on in between);
    the step is still applied exactly once, and `top_k` is empty, `logits` None."""

    session_id: str
    position: int
    top_k: tuple[TopToken, ...]
    logits: tuple[float, ...] | None = None
    answer_lost: bool = False


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    model: str
    version: int
    position: int
    created_at: dt.datetime
    last_used_at: dt.datetime
    expires_at: dt.datetime
    ttl_s: float
    raw: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class GenerationEnd:
    """The end event of a streamed generation."""

    finish_reason: str  # stop | length | cancelled | shutdown | error
    position: int  # the session's position after the generated tokens
    seed: int | None


@dataclass(frozen=True)
class Generation:
    """A whole (not streamed) generation."""

    session_id: str
    text: str
    tokens: tuple[int, ...]
    finish_reason: str
    position: int
    seed: int | None
