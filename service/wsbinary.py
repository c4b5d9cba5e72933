"""The compact binary step frame of a session's WebSocket, beside JSON.

A step sent as JSON costs the server a parse, a validation and an answer's formatting, and
costs the client the same again; a binary frame is a fixed header and the tokens' own bytes,
and its answer a fixed header and the top-k as raw numbers. Everything else on the socket
(generations, errors, the other frames' order) stays as it is: a binary frame that does not
start with the magic byte is still read as JSON, and errors are always JSON text frames.

All integers and floats little-endian. Step (client to server), a binary frame:

    offset  size  field
    0       1     magic 0x00 (no JSON text starts with NUL)
    1       1     version, 1
    2       1     flags: bit 0 a position follows, bit 1 return the logits
    3       2     top_k, uint16, 0..256
    5       8     position, uint64 (only with flag bit 0)
    5 or 13 n     the input tokens, one byte each (n >= 1)

Answer (server to client), a binary frame:

    0       1     magic 0x00
    1       1     version, 1
    2       1     flags: bit 1 the logits follow
    3       2     k, uint16: the number of top tokens
    5       8     position, uint64: the session's position after the step
    13      k     the top tokens, one byte each, likeliest first
    13+k    4k    their log-probabilities, float32
    13+5k   4V    the logits (only with flag bit 1), float32, V = the vocabulary (256)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .bytelm import Answer
from .errors import InvalidFrame, InvalidInput
from .schemas import MAX_TOP_K, check_count

MAGIC, VERSION = 0, 1
HAS_POSITION, RETURN_LOGITS = 1, 2
_HEADER = struct.Struct("<BBBH")  # magic, version, flags, top_k / k
_POSITION = struct.Struct("<Q")
_ANSWER = struct.Struct("<BBBHQ")


def is_binary_step(raw) -> bool:
    return isinstance(raw, bytes) and raw[:1] == b"\x00"


@dataclass(frozen=True)
class BinaryStep:
    tokens: np.ndarray  # int64
    position: int | None
    top_k: int
    return_logits: bool


def decode_step(raw: bytes, limit: int) -> BinaryStep:
    """A binary step frame, checked as a JSON step is (the same limits, the same errors)."""
    if len(raw) < _HEADER.size:
        raise InvalidFrame(f"a binary step frame has a {_HEADER.size}-byte header; "
                           f"this one has {len(raw)} bytes")
    _, version, flags, top_k = _HEADER.unpack_from(raw)
    if version != VERSION:
        raise InvalidFrame(f"binary frame version {version} is not known; this server "
                           f"speaks version {VERSION}")
    if flags & ~(HAS_POSITION | RETURN_LOGITS):
        raise InvalidFrame(f"binary step flags {flags:#04x}: only bits 0 and 1 are defined")
    if top_k > MAX_TOP_K:
        raise InvalidInput(f"top_k: at most {MAX_TOP_K}")
    start, position = _HEADER.size, None
    if flags & HAS_POSITION:
        if len(raw) < start + _POSITION.size:
            raise InvalidFrame("the binary step's flags say a position follows; it does not")
        (position,) = _POSITION.unpack_from(raw, start)
        start += _POSITION.size
    check_count(len(raw) - start, limit)
    tokens = np.frombuffer(raw, dtype=np.uint8, offset=start).astype(np.int64)
    return BinaryStep(tokens, position, top_k, bool(flags & RETURN_LOGITS))


def encode_answer(answer: Answer, return_logits: bool) -> bytes:
    k = len(answer.top_tokens)
    parts = [_ANSWER.pack(MAGIC, VERSION, RETURN_LOGITS if return_logits else 0, k,
                          answer.position),
             answer.top_tokens.astype(np.uint8).tobytes(),
             answer.top_logprobs.astype("<f4").tobytes()]
    if return_logits:
        parts.append(answer.logits.astype("<f4").tobytes())
    return b"".join(parts)
