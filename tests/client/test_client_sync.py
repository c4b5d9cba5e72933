"""The blocking `Client` against a real server: every answer is checked against the
PyTorch model the server's graph was exported from (or Python's own UTF-8 decoder), and
sessions behave as the API says: positions tracked, forks independent, deleted on exit
unless kept, generations streamed in whole characters."""

from __future__ import annotations

import dataclasses

import pytest
from carousel_client import (
    Client,
    GenerationEnd,
    InvalidRequest,
    PositionMismatch,
    StepResult,
    UnknownModel,
    UnknownSession,
)


def as_dicts(top_k) -> list[dict]:
    return [dataclasses.asdict(t) for t in top_k]


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url, trust_env=False) as c:
        yield c


def test_models_and_one_model(client, tiny):
    models = client.models()
    assert {(m.name, m.version) for m in models} == {(n, v) for n, v in tiny}
    latest = {m.name: m.version for m in models if m.latest}
    assert latest == {"tinylstm": 2, "tinygru": 1, "utf8cycle": 1}
    one = client.model("tinylstm", version=1)
    assert (one.name, one.version, one.latest, one.versions) == ("tinylstm", 1, False, (1, 2))
    assert one.variant == tiny[("tinylstm", 1)].variant and one.vocab_size == 256


def test_predict_matches_pytorch(client, tiny, check):
    text = "def carousel(é):"
    p = client.predict("tinylstm", text, top_k=5, return_logits=True)
    ref = tiny["tinylstm"].last(text)
    assert p.length == len(text.encode())
    check.logits(p.logits, ref)
    check.top_k(as_dicts(p.top_k), ref)
    old = client.predict("tinylstm", tokens=[1, 2, 3], version=1, return_logits=True)
    check.logits(old.logits, tiny[("tinylstm", 1)].last([1, 2, 3]))


def test_predict_many_keeps_the_order(client, tiny, check):
    inputs = ["abc", [200, 201], "x" * 40]
    outs = client.predict_many("tinygru", inputs, return_logits=True)
    assert [o.length for o in outs] == [3, 2, 40]
    for x, out in zip(inputs, outs, strict=True):
        check.logits(out.logits, tiny["tinygru"].last(x))


def test_a_session_tracks_its_position_and_state(client, api, tiny, check):
    ref = tiny["tinylstm"]
    with client.session("tinylstm", "import o", return_logits=True) as s:
        assert s.position == 8 and s.model == "tinylstm"
        check.logits(s.primed.logits, ref.last("import o"))
        text = "import o"
        for piece in ["s\n", "imp", "ört ✓", "\n", "😀"]:
            r = s.step(piece, return_logits=True)
            text += piece
            assert isinstance(r, StepResult) and r.session_id == s.id
            assert r.position == s.position == len(text.encode())
            check.logits(r.logits, ref.last(text))
            check.top_k(as_dicts(r.top_k), ref.last(text))
        r = s.step(tokens=[0xF0, 0x9F], return_logits=True)  # half a character, as bytes
        check.logits(r.logits, ref.last(list(text.encode()) + [0xF0, 0x9F]))
        assert api.position(s.id) == s.position == r.position
        sid = s.id
    api.expect_error(api.http.get(f"/v1/sessions/{sid}"), 404, code="unknown_session")


def test_kept_sessions_outlive_the_block_and_can_be_attached(client, api):
    with client.session("tinygru", "abc", keep=True) as s:
        s.step("def")
    assert api.position(s.id) == 6
    with client.attach(s.id, keep=False) as again:
        assert (again.position, again.model) == (6, "tinygru")
        assert again.step("g").position == 7
    api.expect_error(api.http.get(f"/v1/sessions/{s.id}"), 404, code="unknown_session")
    s.delete()  # already gone: not an error


def test_a_fork_is_independent_of_its_parent(client, tiny, check):
    ref = tiny["tinylstm"]
    with client.session("tinylstm", "common ") as parent:
        with parent.fork() as child:
            assert child.id != parent.id and child.position == parent.position == 7
            a = parent.step("left", return_logits=True)
            b = child.step("right!", return_logits=True)
            check.logits(a.logits, ref.last("common left"))
            check.logits(b.logits, ref.last("common right!"))
            assert (parent.position, child.position) == (11, 13)
            info = child.info()
            assert (info.session_id, info.model, info.position) == (child.id, "tinylstm", 13)
            assert info.expires_at > info.created_at


def test_streamed_pieces_are_whole_characters(client):
    """utf8cycle greedily emits é, €, 😀 (2, 3, 4 bytes) forever; 10 tokens end inside
    the fourth character, which comes out as U+FFFD, as Python decodes the bytes."""
    with client.session("utf8cycle", "x") as s:
        stream = s.stream(max_tokens=10, temperature=0)
        pieces = list(stream)
        assert pieces == ["é", "€", "😀", "\ufffd"]
        assert stream.text == bytes(stream.tokens).decode("utf-8", errors="replace")
        assert isinstance(stream.end, GenerationEnd)
        assert (stream.finish_reason, stream.position, len(stream.tokens)) == ("length", 11, 10)
        assert s.position == 11


def test_stream_and_whole_generation_agree_and_continue_the_session(client, api, tiny, check):
    ref = tiny["tinygru"]
    with client.session("tinygru", "seeded: ") as a, a.fork() as b:
        streamed = a.stream(max_tokens=30, temperature=0.9, top_p=0.95, seed=42)
        text = "".join(streamed)
        whole = b.generate(max_tokens=30, temperature=0.9, top_p=0.95, seed=42)
        assert whole.tokens == tuple(streamed.tokens) and len(whole.tokens) == 30
        assert text == whole.text == bytes(whole.tokens).decode("utf-8", errors="replace")
        assert a.position == b.position == whole.position == 8 + 30 == api.position(a.id)
        after = a.step("!", return_logits=True)  # the generated bytes are in the state
        check.logits(after.logits, ref.last(list(b"seeded: ") + list(whole.tokens) + [33]))


def test_leaving_a_stream_early_keeps_the_session_consistent(client, api):
    with client.session("utf8cycle", "x") as s:
        with s.stream(max_tokens=5000, temperature=0) as stream:
            for n, _ in enumerate(stream):
                if n == 3:
                    break
        assert stream.end is None
        assert s.position == api.position(s.id) > 1 + 3  # what the server consumed
        assert s.step("y").position == s.position


def test_server_errors_raise_the_sdks_exceptions(client, api):
    with pytest.raises(UnknownModel) as e:
        client.session("nosuch")
    assert (e.value.code, e.value.status) == ("unknown_model", 404)
    assert "nosuch" in e.value.message
    with pytest.raises(UnknownSession) as e:
        client.attach("no-such-session")
    assert (e.value.code, e.value.status) == ("unknown_session", 404)
    with client.session("tinylstm", "abc") as s:
        for bad, code in [({"text": ""}, "empty_input"), ({"tokens": [256]}, "token_out_of_range"),
                          ({"text": "a", "top_k": 999}, "invalid_input"),
                          ({"text": "a", "tokens": [1]}, "invalid_input")]:
            with pytest.raises(InvalidRequest) as e:
                s.step(**bad)
            assert (e.value.code, e.value.status) == (code, 422), bad
            assert s.position == api.position(s.id) == 3  # refused: nothing changed
        with pytest.raises(InvalidRequest) as e:
            s.generate(max_tokens=10**9)
        assert e.value.code == "invalid_input" and s.position == 3
    with client.session("tinylstm") as empty, pytest.raises(InvalidRequest) as e:
        list(empty.stream(max_tokens=3))
    assert e.value.code == "empty_input"


def test_a_stale_position_is_refused_with_the_real_one(client, api):
    with client.session("tinylstm", "abc") as s:
        other = client.attach(s.id)  # a second client of the same session
        other.step("defg")
        with pytest.raises(PositionMismatch) as e:
            s.step("h")  # s still believes position 3
        assert (e.value.code, e.value.status, e.value.position) == ("position_mismatch", 409, 7)
        assert api.position(s.id) == 7
        assert s.sync_position() == 7 and s.step("h").position == 8


def test_export_and_import_move_a_session(client, api):
    """A portable session's real round trip: the exported blob restores as a new session at
    the same position whose steps answer exactly what the original's do; a blob that is not
    one is refused with the server's 400 and creates nothing."""
    with client.session("tinylstm", "abc") as s:
        s.step("def")
        blob = s.export_state()
        assert isinstance(blob, bytes) and blob[:2] == b"PK"  # an npz (zip) file
        with client.import_session(blob) as moved:
            assert moved.id != s.id and moved.position == s.position == 6
            a, b = s.step("g"), moved.step("g")
            assert (a.position, [t.token for t in a.top_k]) == (
                b.position, [t.token for t in b.top_k])
            assert [t.logprob for t in a.top_k] == [t.logprob for t in b.top_k]
            assert api.position(moved.id) == 7
        with pytest.raises(InvalidRequest) as e:
            client.import_session(b"\x00state")
        assert (e.value.code, e.value.status) == ("invalid_state", 400)
        assert api.position(s.id) == 7
