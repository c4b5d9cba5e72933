"""The WebSocket endpoint: steps answered like /step, generation streamed as token frames
then an end frame, and bad frames answered by an error frame on a socket that stays open."""

from __future__ import annotations

import json

import pytest
from carousel.model.model import encode
from websockets.sync.client import connect

PRIME = "hello"


def open_ws(server, sid: str):
    return connect(f"{server.ws_url}/v1/sessions/{sid}/ws", proxy=None, open_timeout=30)


def ask(ws, frame) -> dict:
    ws.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))
    return json.loads(ws.recv(timeout=60))


def is_end(frame: dict) -> bool:
    return "finish_reason" in frame or frame.get("event") == "end" or "end" in frame


def end_data(frame: dict) -> dict:
    return frame["end"] if isinstance(frame.get("end"), dict) else frame


def generate(ws, **options) -> tuple[list[dict], dict]:
    ws.send(json.dumps({"generate": options}))
    tokens = []
    while True:
        frame = json.loads(ws.recv(timeout=60))
        assert "error" not in frame, frame
        if is_end(frame):
            return tokens, end_data(frame)
        tokens.append(frame)


def test_ws_steps_match_pytorch(api, server, tiny, check):
    sid = api.create_session("tinylstm", text=PRIME)["session_id"]
    history = PRIME
    with open_ws(server, sid) as ws:
        for chunk in (" wo", "r", "ld ✓", "!"):
            answer = ask(ws, {"text": chunk})
            history += chunk
            assert answer["session_id"] == sid
            assert answer["position"] == len(encode(history))
            check.top_k(answer["top_k"], tiny["tinylstm"].last(history))
        answer = ask(ws, {"tokens": [10, 200], "position": len(encode(history))})
        history_tokens = encode(history) + [10, 200]
        assert answer["position"] == len(history_tokens)
        check.top_k(answer["top_k"], tiny["tinylstm"].last(history_tokens))
    # The socket's steps are the session's: HTTP sees them.
    assert api.position(sid) == len(history_tokens)


def test_ws_generate_streams_the_same_tokens_as_http(api, server, check):
    sid = api.create_session("tinygru", text=PRIME)["session_id"]
    fork = api.fork(sid)["session_id"]
    options = {**check.GEN, "max_tokens": 20, "seed": 31}
    plain = api.generate(fork, **options)
    with open_ws(server, sid) as ws:
        frames, end = generate(ws, **options)
        assert [f["token"] for f in frames] == plain["tokens"]
        assert [f["position"] for f in frames] == list(range(6, 26))
        assert end["position"] == plain["position"] == 25
        assert end["finish_reason"] == plain["finish_reason"]
        # The socket stays usable after a generation, and continues from it.
        answer = ask(ws, {"text": "?"})
        assert answer["position"] == 26


def test_ws_generate_text_in_whole_characters(api, server, check):
    sid = api.create_session("utf8cycle", text="go")["session_id"]
    with open_ws(server, sid) as ws:
        frames, _ = generate(ws, **{**check.GEN, "max_tokens": 9, "top_k": 1})
    assert [f["token"] for f in frames] == check.CYCLE
    assert [f["text"] for f in frames] == ["", "é", "", "", "€", "", "", "", "😀"]


BAD_FRAMES = [
    ("not-json", "hello there", None),
    ("json-list", "[1, 2, 3]", None),
    ("json-number", "42", None),
    ("empty-object", "{}", None),
    ("text-number", {"text": 5}, None),
    ("empty-text", {"text": ""}, None),
    ("token-out-of-range", {"tokens": [65, 256]}, None),
    ("token-negative", {"tokens": [-4]}, None),
    ("tokens-string", {"tokens": "abc"}, None),
    ("too-many-tokens", {"tokens": [65] * 2049}, None),
    ("wrong-position", {"text": "x", "position": 999}, "position_mismatch"),
    ("generate-not-object", {"generate": "fast"}, None),
    ("generate-negative-max-tokens", {"generate": {"max_tokens": -1}}, None),
    ("generate-bad-temperature", {"generate": {"max_tokens": 3, "temperature": -2}}, None),
    ("generate-bad-top-p", {"generate": {"max_tokens": 3, "top_p": 7}}, None),
    ("binary-frame", b"\xff\x00\x01", None),
]


@pytest.mark.parametrize(("frame", "code"), [f[1:] for f in BAD_FRAMES],
                         ids=[f[0] for f in BAD_FRAMES])
def test_ws_bad_frame_gets_error_frame_and_socket_stays_open(api, server, tiny, check,
                                                             frame, code):
    sid = api.create_session("tinylstm", text=PRIME)["session_id"]
    with open_ws(server, sid) as ws:
        reply = ask(ws, frame)
        err = reply.get("error")
        assert isinstance(err, dict), reply
        assert isinstance(err.get("code"), str) and err["code"], reply
        assert isinstance(err.get("message"), str) and err["message"], reply
        if code:
            assert err["code"] == code, reply
        # Nothing changed, and the same socket answers the next frame.
        answer = ask(ws, {"text": " world"})
        assert answer["position"] == len(PRIME + " world")
        check.top_k(answer["top_k"], tiny["tinylstm"].last(PRIME + " world"))
    assert api.position(sid) == len(PRIME + " world")


def test_ws_unknown_session_is_refused(server):
    """Either the handshake is refused, or an error frame says so before the close."""
    try:
        with open_ws(server, "AAAAAAAAAAAAAAAAAAAAAA") as ws:
            frame = json.loads(ws.recv(timeout=30))
            assert "error" in frame, frame
    except Exception as exc:  # the handshake was refused (HTTP 403/404) or closed at once
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        assert isinstance(exc, InvalidStatus | ConnectionClosed), repr(exc)
