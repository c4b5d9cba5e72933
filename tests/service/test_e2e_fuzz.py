"""Property-based fuzzing (Hypothesis, bounded) of everything that parses a client's bytes,
through a real server: the v1 JSON bodies, WebSocket frames, the OpenAI completions body and
v2 infer bodies (the v2 codec alone is fuzzed in tests/service/core/test_v2codec_fuzz.py).

Bodies are arbitrary bytes, arbitrary JSON, near-valid bodies (the right fields with values
of any type and range, unknown fields) and valid bodies with a byte flipped or cut. For each:
the answer is never a 5xx; an error is the protocol's JSON error shape; a rejected request
leaves the session it named exactly where it was; and a victim session nobody names is,
at the end, exactly what it was (its position and its next step equal PyTorch's).
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

PRIME, PROBE = "victim", " probe"
CODE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=10)
tokens = st.lists(st.integers(-300, 600), max_size=12) | json_values
texts = st.text(max_size=24) | json_values


def near(fields: dict) -> st.SearchStrategy[dict]:
    """The right field names with values of any type, some left out, unknown ones added."""
    return st.fixed_dictionaries({}, optional=fields).flatmap(
        lambda d: st.dictionaries(st.text(max_size=6), json_values, max_size=2).map(
            lambda extra: {**extra, **d}))


STEP = {"text": texts, "tokens": tokens, "position": st.integers(-3, 64) | json_values,
        "top_k": st.integers(-3, 300) | json_values, "return_logits": st.booleans() | scalars}
GENERATE = {"max_tokens": st.integers(-3, 40) | json_values,
            "temperature": st.floats(-2, 200) | json_values,
            "top_k": st.integers(-3, 300) | json_values, "top_p": st.floats(-1, 2) | json_values,
            "seed": st.integers(-3, 2**65) | json_values,
            "stop": st.lists(st.text(max_size=3), max_size=3) | json_values,
            "stream": st.booleans() | scalars}
CREATE = {"model": st.sampled_from(["tinylstm", "tinygru", "nope"]) | json_values,
          "version": st.integers(-2, 4) | json_values, "ttl_s": st.floats(-5, 1e6) | json_values,
          "text": texts, "tokens": tokens, "top_k": st.integers(-3, 300) | json_values}
PREDICT = {"text": texts, "tokens": tokens, "version": st.integers(-2, 4) | json_values,
           "inputs": st.lists(near({"text": texts, "tokens": tokens}), max_size=10)
           | json_values, "top_k": st.integers(-3, 300) | json_values}
COMPLETION = {"model": st.sampled_from(["tinylstm", "tinylstm:1", "nope:x"]) | json_values,
              "prompt": texts | tokens | st.lists(texts, max_size=2),
              "max_tokens": st.integers(-3, 40) | json_values,
              "temperature": st.floats(-2, 3) | json_values, "stop": texts,
              "stream": st.booleans() | scalars, "n": st.integers(0, 3) | json_values,
              "carousel": near({"session_id": texts, "position": st.integers(-2, 50)})
              | json_values}


@st.composite
def bodies(draw, fields: dict) -> bytes:
    kind = draw(st.sampled_from(["near", "near", "json", "bytes", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=120))
    value = draw(json_values) if kind == "json" else draw(near(fields))
    data = json.dumps(value).encode()
    if kind == "mutated" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
        data = data[: draw(st.integers(0, len(data)))]
    return data


@pytest.fixture(scope="module")
def fuzzed(start_server, tiny_repo, check):
    return start_server("fuzzed", {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]),
                                   **check.LIMITS, "CAROUSEL_MAX_GENERATE_TOKENS": "32"})


@pytest.fixture(scope="module")
def fapi(fuzzed, api_factory):
    return api_factory(fuzzed)


@pytest.fixture(scope="module")
def victim(fapi, tiny, check):
    sid = fapi.create_session("tinylstm", text=PRIME)["session_id"]
    yield sid
    assert fapi.position(sid) == len(PRIME)
    out = fapi.step(sid, text=PROBE, return_logits=True)
    check.logits(out["logits"], tiny["tinylstm"].last(PRIME + PROBE), "victim's next step")


@pytest.fixture(scope="module")
def target(fapi):
    return fapi.create_session("tinylstm", text="target")["session_id"]


def v1_error(r: httpx.Response) -> None:
    assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/json"), r.headers
        err = r.json()["error"]
        assert CODE.match(err["code"]) and err["message"], err


def post(fapi, path: str, body: bytes) -> httpx.Response:
    return fapi.http.post(path, content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize(("route", "fields"), [
    ("step", STEP), ("generate", GENERATE), ("fork", {"ttl_s": st.floats(-5, 1e6)
                                                       | json_values})])
def test_session_bodies(fapi, victim, target, route, fields):
    @given(body=bodies(fields))
    @fuzz(60)
    def one(body: bytes) -> None:
        before = fapi.position(target)
        r = post(fapi, f"/v1/sessions/{target}/{route}", body)
        v1_error(r)
        if r.status_code >= 400:
            assert fapi.position(target) == before, (body, r.text)

    one()


@pytest.mark.parametrize(("path", "fields"), [("/v1/sessions", CREATE),
                                              ("/v1/models/tinylstm/predict", PREDICT)])
def test_stateless_bodies(fapi, victim, path, fields):
    @given(body=bodies(fields))
    @fuzz(60)
    def one(body: bytes) -> None:
        sessions = fapi.metrics().total("session", "active", kind="gauge")
        r = post(fapi, path, body)
        v1_error(r)
        if r.status_code >= 400:  # a refused create made no session
            assert fapi.metrics().total("session", "active", kind="gauge") == sessions

    one()


def test_websocket_frames(fuzzed, fapi, victim, target):
    with connect(f"{fuzzed.ws_url}/v1/sessions/{target}/ws", proxy=None) as ws:
        @given(body=bodies({**STEP, "generate": near(GENERATE) | json_values}),
               binary=st.booleans())
        @fuzz(80)
        def one(body: bytes, binary: bool) -> None:
            before = fapi.position(target)
            text = body.decode("utf-8", errors="replace")
            ws.send(body if binary else text)
            reply = json.loads(ws.recv(timeout=60))
            if "error" in reply:
                assert set(reply) == {"error"} and CODE.match(reply["error"]["code"]), reply
                assert fapi.position(target) == before, (body, reply)
                return
            while "event" in reply and reply["event"] != "end":  # a stream: to its end
                reply = json.loads(ws.recv(timeout=60))

        one()
        # After all that, the socket still answers.
        ws.send(json.dumps({"text": "!"}))
        assert "position" in json.loads(ws.recv(timeout=60))


@st.composite
def binary_steps(draw) -> bytes:
    """Binary step frames (service/wsbinary.py): valid ones with any field value, and valid
    ones cut short, with a byte flipped or with bytes appended; all start with the magic 0."""
    flags = draw(st.integers(0, 255) | st.sampled_from([0, 1, 2, 3]))
    head = bytes([0, draw(st.sampled_from([1, 1, 1, 0, 2, 255])), flags])
    head += draw(st.integers(0, 2**16 - 1) | st.integers(0, 300)).to_bytes(2, "little")
    if flags & 1:
        head += draw(st.integers(0, 2**64 - 1) | st.integers(0, 40)).to_bytes(8, "little")
    frame = head + draw(st.binary(max_size=40))
    mutation = draw(st.sampled_from(["none", "cut", "flip"]))
    if mutation == "cut" and len(frame) > 1:
        frame = frame[: draw(st.integers(1, len(frame) - 1))]
    elif mutation == "flip" and len(frame) > 1:
        i = draw(st.integers(1, len(frame) - 1))
        frame = frame[:i] + bytes([frame[i] ^ draw(st.integers(1, 255))]) + frame[i + 1:]
    return frame


def test_websocket_binary_step_frames(fuzzed, fapi, victim, target):
    """A binary frame is answered by a binary answer or a JSON error, never a closed socket;
    an error leaves the session where it was, an answer says where the session now is."""
    with connect(f"{fuzzed.ws_url}/v1/sessions/{target}/ws", proxy=None) as ws:
        @given(frame=binary_steps())
        @fuzz(120)
        def one(frame: bytes) -> None:
            before = fapi.position(target)
            ws.send(frame)
            reply = ws.recv(timeout=60)
            if isinstance(reply, str):
                obj = json.loads(reply)
                assert set(obj) == {"error"} and CODE.match(obj["error"]["code"]), obj
                assert fapi.position(target) == before, (frame, obj)
                return
            assert reply[:2] == b"\x00\x01", reply[:16]
            position = int.from_bytes(reply[5:13], "little")
            # Applied (the position moved), or a retry of the last step answered again.
            assert position == fapi.position(target) >= before, (frame, reply[:16])

        one()
        ws.send(json.dumps({"text": "!"}))
        assert "position" in json.loads(ws.recv(timeout=60))


def test_openai_completion_bodies(fapi, victim):
    @given(body=bodies(COMPLETION))
    @fuzz(60)
    def one(body: bytes) -> None:
        r = post(fapi, "/openai/v1/completions", body)
        assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text[:300])
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) >= {"message", "type", "param", "code"} and err["message"], err

    one()


V2_INPUT = {"name": st.sampled_from(["tokens", "x"]) | st.text(max_size=4),
            "datatype": st.sampled_from(["INT64", "INT32", "FP32", "BYTES"]) | scalars,
            "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
            "data": st.lists(st.integers(-5, 300), max_size=8) | json_values,
            "parameters": near({"binary_data_size": st.integers(-2, 64)}) | json_values}
V2 = {"inputs": st.lists(near(V2_INPUT), max_size=2) | json_values, "id": scalars,
      "parameters": near({"sequence_id": st.integers(-2, 9) | st.text(max_size=3) | scalars,
                          "sequence_start": st.booleans() | scalars,
                          "sequence_end": st.booleans() | scalars}) | json_values,
      "outputs": st.lists(near({"name": st.text(max_size=6)}), max_size=2) | json_values}


def test_v2_infer_bodies(fapi, victim):
    # A live sequence the fuzzed requests may name (id 7): a rejection must leave it as it was.
    seq = "/v1/sessions/~seq~tinylstm~i~7"
    start = {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 2],
                         "data": [104, 105]}],
             "parameters": {"sequence_id": 7, "sequence_start": True}}
    assert fapi.http.post("/v2/models/tinylstm/infer", json=start).status_code == 200

    @given(body=bodies(V2), header=st.none() | st.integers(-2, 200).map(str)
           # spaces inside only: a client's HTTP library refuses to send one at either end
           | st.text(alphabet="0123456789-x ", max_size=4).map(str.strip).filter(bool),
           media=st.sampled_from([None, "application/octet-stream", "application/json"]))
    @fuzz(80)
    def one(body: bytes, header, media) -> None:
        before = fapi.http.get(seq)
        headers = {} if media is None else {"content-type": media}
        if header is not None:
            headers["inference-header-content-length"] = header
        r = fapi.http.post("/v2/models/tinylstm/infer", content=body, headers=headers)
        assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert isinstance(r.json()["error"], str) and r.json()["error"], r.text
            after = fapi.http.get(seq)
            assert after.status_code == before.status_code, (body, r.text)
            if after.status_code == 200:
                assert after.json()["position"] == before.json()["position"], (body, r.text)

    one()
