"""Request bodies: pydantic models that validate JSON in one pass (a few µs) and document the
API at /docs. Strict types (no "5" for 5, no 5.0 for a token) and unknown fields rejected,
so a typo is an error, not an ignored option.

Limits that come from settings (tokens per request, max_tokens, ttl) are checked by the
callers; token ranges need the model's vocabulary and are checked by the session manager.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import EmptyInput, InvalidInput, InvalidJson, TokenOutOfRange, TooManyTokens

MAX_TOP_K = 256


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Input(_Body):
    text: str | None = Field(None, description="input text; its UTF-8 bytes are the tokens")
    tokens: list[int] | None = Field(None, description="input tokens (bytes, 0..255)")


class _Answer(_Body):
    top_k: int = Field(5, ge=0, le=MAX_TOP_K, description="how many likeliest next tokens")
    return_logits: bool = Field(False, description="also return the last position's logits")


class PredictInput(_Input):
    pass


class PredictRequest(_Input, _Answer):
    inputs: list[PredictInput] | None = Field(
        None, description="a batch: each item has text or tokens (instead of text/tokens)")
    version: int | None = Field(None, ge=0, description="model version (default: latest)")


class CreateSessionRequest(_Input, _Answer):
    model: str = Field(description="model name (GET /v1/models)")
    version: int | None = Field(None, ge=0, description="model version (default: latest)")
    ttl_s: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="idle time to live in seconds (default and maximum from settings)")


class ImportSessionRequest(_Body):
    state: str = Field(description="a portable session (GET /v1/sessions/{id}/state), base64")
    ttl_s: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="idle time to live in seconds (default and maximum from settings)")


class StepRequest(_Input, _Answer):
    position: int | None = Field(
        None, ge=0, description="where the client believes the session is; makes retries safe")


class GenerateRequest(_Body):
    max_tokens: int = Field(64, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0, le=100, allow_inf_nan=False,
                               description="0 is greedy; higher is more random")
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="sample from the k likeliest (0: all)")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False,
                         description="sample from the smallest set with this probability mass")
    seed: int | None = Field(None, ge=0, lt=2**64,
                             description="same seed, state and options give the same tokens")
    stop: list[str] | None = Field(None, max_length=16,
                                   description="stop after generating any of these strings")
    stream: bool = Field(False, description="stream tokens as server-sent events")


class ForkRequest(_Body):
    ttl_s: float | None = Field(None, gt=0, allow_inf_nan=False,
                                description="idle time to live of the copy (default: the parent's)")


class WsGenerateFrame(_Body):
    generate: GenerateRequest


def parse(model: type[BaseModel], body: bytes | str | dict):
    """Validate a JSON body (or an object already decoded from one, as a WebSocket frame
    is); map pydantic's errors to the service's."""
    try:
        if isinstance(body, dict):
            return model.model_validate(body)
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _error(e) from None


def _error(e: ValidationError) -> InvalidJson | InvalidInput:
    first = e.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return InvalidJson(f"the body is not valid JSON ({first['msg']}); send a JSON object")
    if first["type"] in ("model_type", "model_attributes_type"):
        return InvalidInput("the body must be a JSON object")
    where = ".".join(str(p) for p in first["loc"])
    extra = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return InvalidInput(f"unknown field {where!r}{extra}")
    return InvalidInput(f"{where}: {first['msg']}{extra}")


def to_tokens(text: str | None, tokens: list[int] | None, *, required: bool,
              limit: int) -> np.ndarray | None:
    """The input as int64 tokens: exactly one of text / tokens (or neither if not required)."""
    if text is not None and tokens is not None:
        raise InvalidInput("send either text or tokens, not both")
    if text is None and tokens is None:
        if required:
            raise InvalidInput("send the input as text or tokens")
        return None
    if text is not None:
        data = text.encode("utf-8", errors="surrogatepass")
        check_count(len(data), limit)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    check_count(len(tokens), limit)
    try:
        return np.array(tokens, dtype=np.int64)
    except OverflowError:
        raise TokenOutOfRange("a token is outside the vocabulary: tokens are 0..255") from None


def check_count(n: int, limit: int) -> None:
    """An input of n tokens is refused if it is empty or over the limit per request (however
    it came: text, a token list, a binary WebSocket frame)."""
    if n > limit:
        raise TooManyTokens(f"the input is {n} tokens; the limit is {limit} per request")
    if n == 0:
        raise EmptyInput("the input is empty: send at least one token or character")
