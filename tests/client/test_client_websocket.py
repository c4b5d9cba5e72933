"""A session's WebSocket through the SDK, sync and async: steps match PyTorch and share the
session's position with its HTTP steps, generations stream as (async) iterators of whole
characters, and error frames raise the SDK's exceptions with the code and its status."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from carousel_client import AsyncClient, Client, InvalidRequest, PositionMismatch, UnknownSession


def test_sync_socket_steps_and_streams(server, api, tiny, check):
    ref = tiny["tinygru"]
    with Client(server.url, trust_env=False) as client, client.session("tinygru", "ws: ") as s:
        with s.websocket() as ws:
            r = ws.step("hello", return_logits=True)
            check.logits(r.logits, ref.last("ws: hello"))
            assert r.position == ws.position == s.position == 9
            s.step(" there")  # HTTP and the socket share the position
            r = ws.step("!", return_logits=True)
            check.logits(r.logits, ref.last("ws: hello there!"))
            with ws.stream(max_tokens=12, seed=5) as stream:
                text = "".join(stream)
            assert text == bytes(stream.tokens).decode("utf-8", errors="replace")
            assert stream.position == s.position == 16 + 12 == api.position(s.id)
            with pytest.raises(InvalidRequest) as e:
                ws.step("")
            assert (e.value.code, e.value.status) == ("empty_input", 422)
            whole = ws.generate(max_tokens=3, seed=1)  # the socket stayed open
            assert whole.position == s.position == 31


def test_sync_socket_generation_of_the_utf8_model(server):
    with Client(server.url, trust_env=False) as client, client.session("utf8cycle", "x") as s:
        with s.websocket() as ws:
            stream = ws.stream(max_tokens=10, temperature=0)
            assert list(stream) == ["é", "€", "😀", "\ufffd"]
            assert stream.finish_reason == "length" and ws.position == 11


def test_async_socket(server, api, tiny, check):
    ref = tiny["tinylstm"]

    async def main() -> None:
        async with AsyncClient(server.url, trust_env=False) as client:
            async with client.session("tinylstm", "async ") as s, s.websocket() as ws:
                text = "async "
                for piece in ["web", "sockét", "\n"]:
                    r = await ws.step(piece, return_logits=True)
                    text += piece
                    check.logits(r.logits, ref.last(text))
                    assert r.position == s.position == len(text.encode())
                stream = ws.stream(max_tokens=20, temperature=0.8, seed=3)
                pieces = [p async for p in stream]
                assert "".join(pieces) == bytes(stream.tokens).decode("utf-8", errors="replace")
                assert stream.position == s.position == api.position(s.id)
                other = await client.attach(s.id)
                await other.step("moved")
                with pytest.raises(PositionMismatch) as e:
                    await ws.step("stale")
                assert e.value.position == s.position + 5
                assert await ws.sync_position() == api.position(s.id)

    asyncio.run(main())


def test_a_socket_on_a_deleted_session(server, api):
    with Client(server.url, trust_env=False) as client, client.session("tinylstm", "a") as s:
        assert api.http.delete(f"/v1/sessions/{s.id}").status_code == 204  # behind its back
        with pytest.raises(UnknownSession) as e, s.websocket() as ws:
            ws.step("b")
        assert (e.value.code, e.value.status) == ("unknown_session", 404)


def test_binary_socket_answers_as_the_json_one(server, api, tiny, check):
    """websocket(binary=True): the same StepResults as JSON frames (float32 log-probabilities
    and logits), PyTorch's numbers, the same errors, and generations still work on it."""
    ref = tiny["tinylstm"]
    with Client(server.url, trust_env=False) as client, \
            client.session("tinylstm", "bin: ") as s, s.fork() as twin:
        with s.websocket(binary=True) as ws, twin.websocket() as js:
            text = "bin: "
            for piece, k in (("héllo", None), ("\n", 2), ("x", 0)):
                r = ws.step(piece, top_k=k, return_logits=True)
                j = js.step(piece, top_k=k, return_logits=True)
                text += piece
                check.logits(r.logits, ref.last(text))
                assert r.position == j.position == s.position == len(text.encode())
                assert [(t.token, t.text) for t in r.top_k] == [(t.token, t.text) for t in j.top_k]
                assert [t.logprob for t in r.top_k] == \
                    [float(np.float32(t.logprob)) for t in j.top_k]
                assert r.logits == tuple(float(np.float32(x)) for x in j.logits)
            r = ws.step(tokens=[0, 255])
            assert r.position == len(text.encode()) + 2 and len(r.top_k) == 5
            with pytest.raises(InvalidRequest) as e:
                ws.step(tokens=[256])  # no binary form: sent as JSON, refused as JSON is
            assert (e.value.code, e.value.status) == ("token_out_of_range", 422)
            with pytest.raises(InvalidRequest) as e:
                ws.step("")
            assert (e.value.code, e.value.status) == ("empty_input", 422)
            whole = ws.generate(max_tokens=3, seed=1)
            assert whole.position == s.position == api.position(s.id)


def test_async_binary_socket(server, api, tiny, check):
    ref = tiny["tinygru"]

    async def main() -> None:
        async with AsyncClient(server.url, trust_env=False) as client:
            async with client.session("tinygru", "a") as s, s.websocket(binary=True) as ws:
                text = "a"
                for piece in ["sync", " bin", "ary ✓"]:
                    r = await ws.step(piece, return_logits=True)
                    text += piece
                    check.logits(r.logits, ref.last(text))
                    check.top_k([{"token": t.token, "text": t.text, "logprob": t.logprob}
                                 for t in r.top_k], ref.last(text))
                    assert r.position == s.position == len(text.encode())
                await s.step("moved")  # HTTP moves it; the socket's next step retries
                other = await client.attach(s.id)
                await other.step("!")
                with pytest.raises(PositionMismatch):
                    await ws.step("stale")
                assert await ws.sync_position() == api.position(s.id)

    asyncio.run(main())
