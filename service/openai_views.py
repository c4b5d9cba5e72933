"""Shaping the OpenAI-compatible answers: completions, stream chunks, models and errors.

`error_response` is the one place an error becomes OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`: the status is carousel's, except that
carousel's 422s (a well-formed body with a bad value) are 400s as OpenAI answers them; the
code is carousel's, except that an unknown model or version is OpenAI's `model_not_found`.
Fields an error carries beyond those (a position mismatch's real position) go in the
error's `carousel` object, as the request's extension field does.

`StopTrimmer` keeps OpenAI's stop contract: the returned text never contains the stop
sequence. Carousel's generation ends *with* the stop bytes (the session has consumed them),
so the trimmer holds back any tail that may yet become a stop sequence while streaming,
and drops the stop sequence at the end.
"""

from __future__ import annotations

import secrets
from datetime import datetime

from fastapi import Response

from . import views
from .errors import ServiceError, UnknownModel, UnknownVersion

STATUS_OF = {422: 400}  # OpenAI answers every invalid value with 400
RETRY_IS_FUTILE = {409}  # a position mismatch answers the same however often it is sent


def error_response(error: ServiceError) -> Response:
    status = STATUS_OF.get(error.status, error.status)
    code = "model_not_found" if isinstance(error, UnknownModel | UnknownVersion) else error.code
    extra = {k: v for k, v in error.extra.items() if k != "param"}
    body = {"error": {
        "message": error.message,
        "type": "invalid_request_error" if status < 500 else "server_error",
        "param": error.extra.get("param"),
        "code": code,
    }}
    if extra:
        body["error"]["carousel"] = extra
    headers = dict(error.headers() or {})
    if status in RETRY_IS_FUTILE:
        headers["x-should-retry"] = "false"  # the openai package would otherwise retry
    return Response(views.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


def stream_error(error: ServiceError) -> bytes:
    """An error after a stream started: a `data:` event with the error, as OpenAI sends."""
    body = error_response(error).body
    return b"data: " + body + b"\n\n"


DONE = b"data: [DONE]\n\n"


def completion_id() -> str:
    return "cmpl-" + secrets.token_hex(12)


def model_object(model_id: str, exported_at: str | None) -> dict:
    return {"id": model_id, "object": "model", "created": _epoch(exported_at),
            "owned_by": "carousel"}


def _epoch(iso: str | None) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except (TypeError, ValueError):
        return 0


def choice(text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, created: int, model: str, choices: list[dict], *,
               usage_counts: dict | None = None, extension: dict | None = None) -> dict:
    body = {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": choices}
    if usage_counts is not None:
        body["usage"] = usage_counts
    if extension is not None:
        body["carousel"] = extension
    return body


def chunk(body: dict) -> bytes:
    return b"data: " + views.dumps(body) + b"\n\n"


class StopTrimmer:
    """The text a client may see so far, given the stop sequences (see the module doc)."""

    def __init__(self, stops: list[str] | None) -> None:
        self.stops = stops or []
        self.keep = max(map(len, self.stops), default=0)
        self.held = ""

    def feed(self, text: str) -> str:
        """New text in; what can be shown now out (the rest is held back)."""
        if not self.stops:
            return text
        buffer = self.held + text
        hold = self._tail_that_may_become_a_stop(buffer)
        self.held = buffer[len(buffer) - hold:]
        return buffer[: len(buffer) - hold]

    def finish(self, finish_reason: str) -> str:
        """What is left to show once the generation ended for `finish_reason`."""
        rest, self.held = self.held, ""
        if finish_reason == "stop":
            ends = [s for s in self.stops if rest.endswith(s)]
            if ends:
                rest = rest[: len(rest) - max(map(len, ends))]
        return rest

    def _tail_that_may_become_a_stop(self, buffer: str) -> int:
        """The longest suffix of `buffer` that is the start of a stop sequence (or is one:
        the generation ends there, and finish drops it)."""
        for n in range(min(len(buffer), self.keep), 0, -1):
            tail = buffer[len(buffer) - n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
