"""Bytes in, bytes out: the byte tokenizer as the service needs it (no torch, no model code).

A token is one UTF-8 byte. Streams emit text in whole characters only: `Utf8Stream` holds
the bytes of a character split across tokens until it is complete, and shows bytes that can
never form a character as U+FFFD, exactly as decoding the whole output at once would.
"""

from __future__ import annotations

import codecs

import numpy as np

# The text shown for a single token in a top-k list: the character for ASCII, an escape for
# a byte that is only part of a character (or none).
TOKEN_TEXT = tuple(bytes([b]).decode("utf-8", errors="backslashreplace") for b in range(256))


def encode(text: str) -> np.ndarray:
    """Text to tokens (its UTF-8 bytes) as int64."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def decode(tokens) -> str:
    """Tokens to text; bytes that are not valid UTF-8 show as U+FFFD."""
    return bytes(tokens).decode("utf-8", errors="replace")


class Utf8Stream:
    """Turns a token stream into text pieces that are whole characters."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int, final: bool = False) -> str:
        """The text completed by this token ('' while a character is still incomplete);
        `final` flushes a dangling partial character as U+FFFD."""
        return self._decoder.decode(bytes((token,)), final)
