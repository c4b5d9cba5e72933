"""For any split of a text into steps, a session's answers equal stateless predict on the
whole text and PyTorch's forward pass (≤ 1e-4): the state the service keeps between steps is
exactly the model's state. Tiny models here; the bundled ones in test_e2e_bundled.py."""

from __future__ import annotations

import random

import pytest
from carousel.model.model import encode

TEXT = "Stateful streams: héllo wörld — ünïcode ✓ 🚀, then plain ASCII again.\n"


def splits(n: int) -> dict[str, list[int]]:
    """Chunk lengths that cover n tokens: whole, byte by byte, random (cutting through
    multi-byte characters), and a long tail after a one-byte head."""
    rng = random.Random(7)
    out = {"whole": [n], "bytes": [1] * n, "head": [1, n - 1]}
    for k in range(2):
        cuts = sorted(rng.sample(range(1, n), 8))
        out[f"random{k}"] = [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    return out


def run_steps(api, sid: str, tokens: list[int], lengths: list[int], start: int = 0):
    """Step the chunks in order, alternating text and tokens (text only where the chunk is
    whole UTF-8). Yields (end offset, step answer)."""
    at = 0
    for i, length in enumerate(lengths):
        chunk = tokens[at : at + length]
        at += length
        body = {"tokens": chunk, "return_logits": True}
        if i % 2:
            try:
                body = {"text": bytes(chunk).decode("utf-8"), "return_logits": True}
            except UnicodeDecodeError:
                pass
        out = api.step(sid, **body)
        assert out["session_id"] == sid
        assert out["position"] == start + at, (out["position"], start + at)
        yield at, out


@pytest.mark.parametrize("name", ["tinylstm", "tinygru"])
@pytest.mark.parametrize("split", list(splits(len(encode(TEXT)))))
def test_any_split_equals_predict_and_pytorch(api, tiny, check, name, split):
    tokens = encode(TEXT)
    lengths = splits(len(tokens))[split]
    ref = tiny[name].logits(tokens)  # (T, V): PyTorch at every position, one pass
    predict = api.predict(name, tokens=tokens, return_logits=True)["outputs"][0]["logits"]
    check.logits(predict, ref[-1], "predict vs PyTorch")

    sid = api.create_session(name)["session_id"]
    last = None
    for end, out in run_steps(api, sid, tokens, lengths):
        check.logits(out["logits"], ref[end - 1], f"step ending at {end}")
        check.top_k(out["top_k"], ref[end - 1])
        last = out
    check.logits(last["logits"], ref[-1], "final step vs PyTorch")
    check.logits(last["logits"], predict, "final step vs stateless predict")
    assert api.position(sid) == len(tokens)


def test_primed_session_continues_like_one_pass(api, tiny, check):
    """Priming at creation is the first step: its answer and the steps after it match."""
    tokens = encode(TEXT)
    prime, rest = tokens[:20], tokens[20:]
    created = api.create_session("tinylstm", tokens=prime)
    assert created["position"] == 20
    ref = tiny["tinylstm"].logits(tokens)
    check.top_k(created["top_k"], ref[19])
    for end, out in run_steps(api, created["session_id"], rest, [5, 1, len(rest) - 6], start=20):
        check.logits(out["logits"], ref[20 + end - 1], f"after priming, at {end}")


def test_pinned_version_session(api, tiny, check):
    """A session on version 1 keeps running version 1, not the latest."""
    created = api.create_session("tinylstm", version=1, text="old")
    assert created["version"] == 1
    out = api.step(created["session_id"], text=" version", return_logits=True)
    check.logits(out["logits"], tiny[("tinylstm", 1)].last("old version"), "v1 session")


def test_sessions_on_two_models_are_independent(api, tiny, check):
    a = api.create_session("tinylstm", text="same words")["session_id"]
    b = api.create_session("tinygru", text="same words")["session_id"]
    for _ in range(3):
        out_a = api.step(a, text=" again", return_logits=True)
        out_b = api.step(b, text=" again", return_logits=True)
    text = "same words" + " again" * 3
    check.logits(out_a["logits"], tiny["tinylstm"].last(text), "lstm")
    check.logits(out_b["logits"], tiny["tinygru"].last(text), "gru")
