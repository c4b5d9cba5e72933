"""UTF-8 holding: streamed text is whole characters and adds up to decoding at once."""

from __future__ import annotations

import numpy as np
from carousel.service.text import TOKEN_TEXT, Utf8Stream, decode, encode


def stream(tokens: list[int]) -> list[str]:
    s = Utf8Stream()
    return [s.feed(t, final=i == len(tokens) - 1) for i, t in enumerate(tokens)]


def test_a_character_split_across_tokens_is_held_until_complete():
    pieces = stream(list("a€😀".encode()))
    assert pieces == ["a", "", "", "€", "", "", "", "😀"]


def test_pieces_add_up_to_decoding_the_whole_output_even_for_invalid_bytes():
    rng = np.random.default_rng(1)
    for _ in range(200):
        tokens = rng.integers(0, 256, size=rng.integers(1, 40)).tolist()
        pieces = stream(tokens)
        assert "".join(pieces) == bytes(tokens).decode("utf-8", errors="replace")
        for p in pieces:
            p.encode("utf-8")  # strict: every piece is whole, valid characters


def test_a_dangling_partial_character_is_flushed_at_the_end():
    assert stream([0xE2, 0x82]) == ["", "\ufffd"]


def test_encode_decode_and_token_texts():
    assert encode("hé").tolist() == [104, 195, 169]
    assert decode([104, 195, 169]) == "hé"
    assert TOKEN_TEXT[104] == "h" and TOKEN_TEXT[0xC3] == "\\xc3"
