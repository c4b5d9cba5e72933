"""The v1 wire format, without any I/O: request bodies, answers to dataclasses, errors,
server-sent events, WebSocket frames, and text pieces from byte tokens.

Shared by every transport (sync and async HTTP, sync and async WebSocket). Every parser
checks what it reads and turns anything unexpected into a `ProtocolError`, so callers see
the SDK's errors and never a KeyError or a JSONDecodeError.
"""

from __future__ import annotations

import codecs
import datetime as dt
import functools
import json
import struct

from .errors import (
    GATEWAY_STATUSES,
    STATUS_OF_CODE,
    ApiError,
    CarouselError,
    GatewayError,
    ProtocolError,
)
from .types import (
    Generation,
    GenerationEnd,
    ModelInfo,
    Prediction,
    SessionInfo,
    StepResult,
    TopToken,
)

# ------------------------------------------------------------------------ requests


def dumps(obj) -> str:
    """JSON for a WebSocket frame (ASCII escapes, so any Python str survives the trip)."""
    return json.dumps(obj, separators=(",", ":"))


def input_fields(text: str | None, tokens: list[int] | None) -> tuple[dict, int]:
    """The input part of a body ({"text"} or {"tokens"}) and its length in tokens (bytes),
    the amount a step moves the session's position by. Both or neither are sent as given,
    for the server to refuse with its own error."""
    fields: dict = {}
    length = 0
    if text is not None:
        fields["text"] = text
        length = len(text.encode("utf-8", errors="surrogatepass"))
    if tokens is not None:
        fields["tokens"] = list(tokens)
        length = length or len(fields["tokens"])
    return fields, length


def options(**values) -> dict:
    """Optional fields: only those given (None means the server's default)."""
    return {k: v for k, v in values.items() if v is not None}


def generation_fields(max_tokens=None, temperature=None, top_k=None, top_p=None, seed=None,
                      stop=None) -> dict:
    return options(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, stop=list(stop) if isinstance(stop, list | tuple) else stop)


# ------------------------------------------------------------------------ errors


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the delay form; an HTTP date is not used by the server)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def error_from_body(status: int | None, content: bytes | str | dict,
                    retry_after_s: float | None = None) -> CarouselError:
    """The server's error envelope as an ApiError; something else as a ProtocolError. A
    gateway's 502 or 504 is a GatewayError, whatever its body: the answer was lost."""
    obj = content
    if not isinstance(obj, dict):
        try:
            obj = json.loads(content)
        except (ValueError, UnicodeDecodeError):
            obj = None
    error = obj.get("error") if isinstance(obj, dict) else None
    if status in GATEWAY_STATUSES:
        error = error if isinstance(error, dict) else {}
        code, message = error.get("code"), error.get("message")
        return GatewayError(
            message if isinstance(message, str) and message
            else f"HTTP {status} from a gateway: the server's answer was lost",
            code=code if isinstance(code, str) else None, status=status)
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        text = content if isinstance(content, str) else repr(content)[:200]
        return ProtocolError(f"HTTP {status} without the API's error object: {text[:200]}",
                             status=status, retry_after=retry_after_s)
    message = error.get("message")
    message = message if isinstance(message, str) and message else error["code"]
    details = {k: v for k, v in error.items() if k not in ("code", "message")}
    if status is None:
        status = STATUS_OF_CODE.get(error["code"])
    return ApiError.of(error["code"], message, status, retry_after_s, details)


def json_answer(status: int, content: bytes, what: str) -> dict:
    """A 2xx answer's JSON object."""
    try:
        obj = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(f"the answer to {what} is not JSON: {content[:200]!r}",
                            status=status) from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"the answer to {what} is not a JSON object", status=status)
    return obj


# ------------------------------------------------------------------------ answers


def parser(what: str):
    """Turn any KeyError / TypeError / ValueError of a parser into a ProtocolError."""

    def wrap(fn):
        @functools.wraps(fn)
        def parse(obj, *args):
            try:
                return fn(obj, *args)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise ProtocolError(
                    f"the answer to {what} is not what the API says ({type(e).__name__}: {e}): "
                    f"{str(obj)[:200]}") from None

        return parse

    return wrap


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _str(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _opt_int(value) -> int | None:
    return None if value is None else _int(value)


def _time(value) -> dt.datetime:
    return dt.datetime.fromisoformat(_str(value).replace("Z", "+00:00"))


def _top_k(items) -> tuple[TopToken, ...]:
    return tuple(TopToken(_int(t["token"]), _str(t["text"]), float(t["logprob"]))
                 for t in items)


def _logits(obj: dict) -> tuple[float, ...] | None:
    logits = obj.get("logits")
    return None if logits is None else tuple(float(x) for x in logits)


@parser("a step")
def step_result(obj: dict) -> StepResult:
    return StepResult(_str(obj["session_id"]), _int(obj["position"]), _top_k(obj["top_k"]),
                      _logits(obj))


@parser("a session request")
def session_info(obj: dict) -> SessionInfo:
    return SessionInfo(_str(obj["session_id"]), _str(obj["model"]), _int(obj["version"]),
                       _int(obj["position"]), _time(obj["created_at"]),
                       _time(obj["last_used_at"]), _time(obj["expires_at"]),
                       float(obj["ttl_s"]), raw=obj)


@parser("a session request")
def priming(obj: dict) -> StepResult | None:
    """The answer to the text a session was created with (None when created empty)."""
    if "top_k" not in obj:
        return None
    return step_result(obj)


@parser("a model request")
def model_info(obj: dict) -> ModelInfo:
    return ModelInfo(_str(obj["name"]), _int(obj["version"]), obj.get("variant"),
                     bool(obj.get("latest", False)), _opt_int(obj.get("vocab_size")),
                     _opt_int(obj.get("parameters")), _opt_int(obj.get("state_bytes")),
                     tuple(_int(v) for v in obj.get("versions", ())), raw=obj)


@parser("GET /v1/models")
def model_list(obj: dict) -> list[ModelInfo]:
    return [model_info(m) for m in obj["models"]]


@parser("a prediction")
def predictions(obj: dict) -> list[Prediction]:
    return [Prediction(_int(o["length"]), _top_k(o["top_k"]), _logits(o))
            for o in obj["outputs"]]


@parser("a generation")
def generation(obj: dict) -> Generation:
    return Generation(_str(obj["session_id"]), _str(obj["text"]),
                      tuple(_int(t) for t in obj["tokens"]), _str(obj["finish_reason"]),
                      _int(obj["position"]), _opt_int(obj.get("seed")))


@parser("a generation's end event")
def generation_end(obj: dict) -> GenerationEnd:
    return GenerationEnd(_str(obj["finish_reason"]), _int(obj["position"]),
                         _opt_int(obj.get("seed")))


@parser("a generation's token event")
def token_of(obj: dict) -> tuple[int, int]:
    """(token, position) of a token event."""
    token = _int(obj["token"])
    if not 0 <= token <= 255:
        raise ValueError(f"token {token} is not a byte")
    return token, _int(obj["position"])


# ------------------------------------------------------------------------ streams


class SseParser:
    """Server-sent events from lines: `feed` returns a complete event's data (with its name
    under "event": "token" for the default event) or None while an event is incomplete."""

    __slots__ = ("_event", "_data")

    def __init__(self) -> None:
        self._event, self._data = "token", []

    def feed(self, line: str) -> dict | None:
        if line == "":
            if not self._data:
                return None
            event, data = self._event, "\n".join(self._data)
            self._event, self._data = "token", []
            try:
                obj = json.loads(data)
            except ValueError:
                raise ProtocolError(f"an event's data is not JSON: {data[:200]!r}") from None
            if not isinstance(obj, dict):
                raise ProtocolError(f"an event's data is not a JSON object: {data[:200]!r}")
            if event == "error" or "error" in obj:
                raise error_from_body(None, obj)
            return {**obj, "event": "token" if event == "message" else event}
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


# The compact binary step frame (the server's service/wsbinary.py has the layout): a fixed
# header, then the tokens one byte each; its answer the top-k as raw little-endian numbers.
_BINARY_STEP = struct.Struct("<BBBH")  # magic 0, version 1, flags, top_k
_BINARY_ANSWER = struct.Struct("<BBBHQ")  # magic 0, version 1, flags, k, position
_HAS_POSITION, _RETURN_LOGITS = 1, 2
DEFAULT_TOP_K = 5  # the server's, for a JSON step that leaves top_k out


def binary_step(body: dict) -> bytes | None:
    """A step's body as a binary frame; None if it has no binary form (a token outside a
    byte, which the JSON step sends on for the server to refuse)."""
    if body.get("text") is not None:
        data = body["text"].encode("utf-8", errors="surrogatepass")
    elif all(isinstance(t, int) and 0 <= t < 256 for t in body["tokens"]):
        data = bytes(body["tokens"])
    else:
        return None
    top_k = body.get("top_k", DEFAULT_TOP_K)
    if not 0 <= top_k < 2**16:
        return None
    position = body.get("position")
    flags = (_HAS_POSITION if position is not None else 0) | (
        _RETURN_LOGITS if body.get("return_logits") else 0)
    header = _BINARY_STEP.pack(0, 1, flags, top_k)
    return header + (struct.pack("<Q", position) if position is not None else b"") + data


def binary_answer(raw: bytes, session_id: str) -> dict:
    """A binary step answer as the JSON answer's object (the rest of the client reads that)."""
    try:
        _, version, flags, k, position = _BINARY_ANSWER.unpack_from(raw)
        start = _BINARY_ANSWER.size
        tokens = raw[start:start + k]
        logprobs = struct.unpack_from(f"<{k}f", raw, start + k)
        rest = raw[start + 5 * k:]
        logits = struct.unpack(f"<{len(rest) // 4}f", rest) if flags & _RETURN_LOGITS else None
    except struct.error:
        raise ProtocolError(f"a binary WebSocket frame is too short: {raw[:40]!r}") from None
    if version != 1 or len(tokens) != k:
        raise ProtocolError(f"a binary WebSocket frame of an unknown layout: {raw[:40]!r}")
    obj = {"session_id": session_id, "position": position,
           "top_k": [{"token": t, "text": bytes((t,)).decode("utf-8", "backslashreplace"),
                      "logprob": lp} for t, lp in zip(tokens, logprobs, strict=True)]}
    if logits is not None:
        obj["logits"] = list(logits)
    return obj


def ws_frame(raw: str | bytes, session_id: str = "") -> dict:
    """A WebSocket frame from the server: a JSON object (or a binary step answer, as one);
    an error frame raises its error."""
    if isinstance(raw, bytes) and raw[:1] == b"\x00":
        return binary_answer(raw, session_id)
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(f"a WebSocket frame is not JSON: {raw[:200]!r}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"a WebSocket frame is not a JSON object: {str(obj)[:200]}")
    if "error" in obj:
        raise error_from_body(None, obj)
    return obj


class Utf8Pieces:
    """Text pieces from byte tokens, whole characters only: a character split across tokens
    comes out when its last byte does; bytes that can never be a character come out as
    U+FFFD, as decoding the whole output at once would show them."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._decoder.decode(bytes((token,)))

    def flush(self) -> str:
        return self._decoder.decode(b"", True)
