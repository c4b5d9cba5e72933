"""Binary step frames on a session's WebSocket (the layout in service/wsbinary.py, decoded
here by hand): answers equal PyTorch's and the JSON frame's answer for the same step, retries
with a position are answered again, and every malformed frame gets a JSON error frame and
changes nothing."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from carousel.model.model import encode
from websockets.sync.client import connect

PRIME = "hello"


def open_ws(server, sid: str):
    return connect(f"{server.ws_url}/v1/sessions/{sid}/ws", proxy=None, open_timeout=30)


def binary_step(tokens: bytes, *, top_k: int = 5, position: int | None = None,
                logits: bool = False) -> bytes:
    flags = (1 if position is not None else 0) | (2 if logits else 0)
    head = struct.pack("<BBBH", 0, 1, flags, top_k)
    return head + (struct.pack("<Q", position) if position is not None else b"") + tokens


def read_answer(raw) -> dict:
    assert isinstance(raw, bytes), raw  # a binary step is answered by a binary frame
    magic, version, flags, k, position = struct.unpack_from("<BBBHQ", raw)
    assert (magic, version) == (0, 1)
    tokens = list(raw[13:13 + k])
    logprobs = struct.unpack_from(f"<{k}f", raw, 13 + k)
    rest = raw[13 + 5 * k:]
    out = {"position": position,
           "top_k": [{"token": t, "logprob": lp} for t, lp in zip(tokens, logprobs, strict=True)]}
    if flags & 2:
        out["logits"] = np.frombuffer(rest, dtype="<f4")
    else:
        assert rest == b""
    return out


def assert_top(top_k: list[dict], expected_logits, check, k: int = 5) -> None:
    """The k likeliest tokens, likeliest first, with PyTorch's log-probabilities."""
    ref = check.log_softmax(np.asarray(expected_logits, dtype=np.float64))
    assert len(top_k) == k, top_k
    logprobs = [t["logprob"] for t in top_k]
    assert logprobs == sorted(logprobs, reverse=True), top_k
    for entry in top_k:
        assert abs(entry["logprob"] - ref[entry["token"]]) <= 1e-4, (entry, ref[entry["token"]])
    kth = np.sort(ref)[::-1][k - 1]  # none left out is likelier (within the tolerance)
    assert min(ref[t["token"]] for t in top_k) >= kth - 1e-4, top_k


def ask(ws, frame: bytes | dict):
    ws.send(frame if isinstance(frame, bytes) else json.dumps(frame))
    raw = ws.recv(timeout=60)
    return read_answer(raw) if isinstance(frame, bytes) else json.loads(raw)


def test_binary_steps_match_pytorch_and_the_json_answer(api, server, tiny, check):
    ref = tiny["tinylstm"]
    sid = api.create_session("tinylstm", text=PRIME)["session_id"]
    twin = api.fork(sid)["session_id"]
    history = encode(PRIME)
    with open_ws(server, sid) as ws, open_ws(server, twin) as js:
        for chunk in (" wo", "r", "ld ✓", "!"):
            data = chunk.encode()
            answer = ask(ws, binary_step(data))
            json_answer = ask(js, {"text": chunk})
            history += list(data)
            assert answer["position"] == json_answer["position"] == len(history)
            assert_top(answer["top_k"], ref.last(history), check)
            # The same numbers as JSON's, as float32 (what the model computes in).
            assert [t["token"] for t in answer["top_k"]] == \
                [t["token"] for t in json_answer["top_k"]]
            assert [t["logprob"] for t in answer["top_k"]] == \
                [float(np.float32(t["logprob"])) for t in json_answer["top_k"]]
        answer = ask(ws, binary_step(bytes([10, 200]), top_k=3, position=len(history),
                                     logits=True))
        history += [10, 200]
        assert answer["position"] == len(history)
        assert_top(answer["top_k"], ref.last(history), check, k=3)
        check.logits(answer["logits"], ref.last(history))
        # A retry of that step (same position, same tokens) is answered again, not re-applied.
        again = ask(ws, binary_step(bytes([10, 200]), top_k=3, position=len(history) - 2,
                                    logits=True))
        assert again["position"] == len(history)
        assert again["top_k"] == answer["top_k"]
        np.testing.assert_array_equal(again["logits"], answer["logits"])
        # JSON frames still work on the same socket, and continue from the binary ones.
        mixed = ask(ws, {"text": "?"})
        history += list(b"?")
        assert mixed["position"] == len(history)
        check.top_k(mixed["top_k"], ref.last(history))
        none = ask(ws, binary_step(b"x", top_k=0))
        history += list(b"x")
        assert none == {"position": len(history), "top_k": []}
    assert api.position(sid) == len(history)


LIMIT = 2048  # conftest's CAROUSEL_MAX_TOKENS_PER_REQUEST
BAD_BINARY = [
    ("short-header", b"\x00\x01\x00", "invalid_frame"),
    ("unknown-version", b"\x00\x02\x00\x05\x00a", "invalid_frame"),
    ("unknown-flags", b"\x00\x01\x04\x05\x00a", "invalid_frame"),
    ("position-missing", b"\x00\x01\x01\x05\x00abc", "invalid_frame"),
    ("top-k-over-vocabulary", binary_step(b"a", top_k=257), "invalid_input"),
    ("no-tokens", binary_step(b""), "empty_input"),
    ("no-tokens-after-position", binary_step(b"", position=5), "empty_input"),
    ("too-many-tokens", binary_step(b"a" * (LIMIT + 1)), "too_many_tokens"),
    ("over-the-frame-limit", binary_step(b"a" * 70_000), "request_too_large"),
    ("wrong-position", binary_step(b"a", position=99), "position_mismatch"),
]


@pytest.mark.parametrize(("frame", "code"), [f[1:] for f in BAD_BINARY],
                         ids=[f[0] for f in BAD_BINARY])
def test_bad_binary_frame_gets_json_error_and_changes_nothing(api, server, tiny, check,
                                                              frame, code):
    sid = api.create_session("tinylstm", text=PRIME)["session_id"]
    with open_ws(server, sid) as ws:
        ws.send(frame)
        reply = json.loads(ws.recv(timeout=60))
        assert reply["error"]["code"] == code, reply
        assert reply["error"]["message"], reply
        answer = ask(ws, binary_step(b" world"))
        assert answer["position"] == len(PRIME + " world")
        assert_top(answer["top_k"], tiny["tinylstm"].last(PRIME + " world"), check)
    assert api.position(sid) == len(PRIME + " world")
