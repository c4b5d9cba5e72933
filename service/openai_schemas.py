"""What the OpenAI-compatible routes accept: the completion request, model ids, prompts.

OpenAI's legacy completions body is validated here in one pass, as carousel's own bodies are
(schemas.py: strict types, unknown fields refused). Every error names the request field it
is about in `param` (OpenAI's error shape has one), which the v1 errors do not carry: a
`ServiceError` raised inside `about(field)` gets `param` added to its `extra`, and
openai_views.error_response renders it.

The sampling options are not range-checked here: they become a v1 `GenerateRequest`
(`generate_request`), so temperature, top_p, seed and stop have exactly the limits they have
on /v1/sessions/{id}/generate. Options carousel cannot honour (n > 1, best_of, echo,
logprobs, suffix, penalties, logit_bias) are refused with a 400 rather than ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InvalidInput, InvalidJson, ServiceError, TokenOutOfRange
from .schemas import GenerateRequest, to_tokens

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CarouselExtension(_Body):
    """`carousel` in a completion body: continue this session instead of a fresh one."""

    session_id: str = Field(description="the session to continue (POST /v1/sessions)")
    position: int | None = Field(
        None, ge=0, description="where the client believes the session is; makes retries safe")


class StreamOptions(_Body):
    include_usage: bool = False


class CompletionRequest(_Body):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and unused, as OpenAI's own servers log it
    # Accepted only at the values that change nothing (checked by `refuse_unsupported`).
    n: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    carousel: CarouselExtension | None = None


@contextmanager
def about(param: str) -> Iterator[None]:
    """Errors raised inside are about request field `param` (unless they already name one)."""
    try:
        yield
    except ServiceError as e:
        e.extra.setdefault("param", param)
        raise


def parse_completion(body: bytes) -> CompletionRequest:
    return _validate(CompletionRequest, body, json=True)


def _validate(model: type[BaseModel], data, *, json: bool = False):
    try:
        if json:
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as e:
        raise _invalid(e) from None


def _invalid(e: ValidationError) -> ServiceError:
    first = e.errors(include_url=False)[0]
    kind, loc = first["type"], first["loc"]
    if kind == "json_invalid":
        return InvalidJson(f"the body is not valid JSON ({first['msg']}); send a JSON object")
    if kind in ("model_type", "model_attributes_type") and not loc:
        return InvalidInput("the body must be a JSON object")
    # A union's errors are located by the member type tried (prompt.str, prompt.list[int].0):
    # the field path is the string parts that name fields.
    path = [str(p) for p in loc if isinstance(p, str) and not _is_type_name(p)]
    param = ".".join(path) or None
    if kind == "extra_forbidden":
        return InvalidInput(f"unrecognized request argument supplied: {param}", param=param)
    if kind == "missing":
        return InvalidInput(f"you must provide {param}", param=param)
    if path and path[0] == "prompt":
        return InvalidInput("prompt: send a string, a list of one string, a list of tokens "
                            "(bytes, 0..255) or a list of one list of tokens", param="prompt")
    return InvalidInput(f"{param}: {first['msg']}", param=param)


def _is_type_name(part: str) -> bool:
    return part in ("str", "int", "float", "bool") or "[" in part


def refuse_unsupported(req: CompletionRequest) -> None:
    """400 for an option carousel cannot honour; the values that change nothing pass."""
    unsupported = {
        "n": req.n not in (None, 1),
        "best_of": req.best_of not in (None, 1),
        "echo": bool(req.echo),
        "logprobs": req.logprobs is not None,
        "suffix": req.suffix not in (None, ""),
        "presence_penalty": req.presence_penalty not in (None, 0),
        "frequency_penalty": req.frequency_penalty not in (None, 0),
        "logit_bias": bool(req.logit_bias),
    }
    for param, refused in unsupported.items():
        if refused:
            raise InvalidInput(f"{param}: not supported by carousel (one completion per "
                               "request, no log probabilities, no echo, suffix or penalties); "
                               "leave it out", param=param)


def split_model_id(model: str) -> tuple[str, int | None]:
    """`bytelm` -> ("bytelm", None): the latest version; `bytelm:2` -> ("bytelm", 2). An id
    that is neither is returned whole, so the registry answers that no such model exists."""
    name, colon, version = model.partition(":")
    if colon and version.isdigit() and version.isascii():
        return name, int(version)
    return model, None


def model_id(name: str, version: int) -> str:
    return f"{name}:{version}"


def prompt_tokens(prompt: str | list, limit: int, vocab_size: int) -> np.ndarray:
    """The prompt as tokens (bytes). Empty is allowed here: continuing a session needs no new
    text; a fresh completion refuses an empty prompt itself."""
    with about("prompt"):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise InvalidInput(f"prompt: {len(prompt)} prompts; carousel completes one "
                                   "prompt per request")
            prompt = prompt[0]
        if len(prompt) == 0:
            return np.zeros(0, dtype=np.int64)
        if isinstance(prompt, str):
            return to_tokens(prompt, None, required=True, limit=limit)
        tokens = to_tokens(None, prompt, required=True, limit=limit)
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise TokenOutOfRange(f"prompt: tokens are 0..{vocab_size - 1} (bytes)")
        return tokens


def generate_request(req: CompletionRequest, max_generate_tokens: int) -> GenerateRequest:
    """The completion's sampling options as the v1 generate body (its limits, one place)."""
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    if stop is not None and any(s == "" for s in stop):
        raise InvalidInput("stop: stop sequences must not be empty", param="stop")
    fields = {
        "max_tokens": DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "stop": stop or None,
        "stream": bool(req.stream),
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    gen = _validate(GenerateRequest, fields)
    if gen.max_tokens > max_generate_tokens:
        raise InvalidInput(f"max_tokens: at most {max_generate_tokens} per completion",
                           param="max_tokens")
    return gen
