"""The OpenAI-compatible routes, driven by the stock `openai` package against a real server.

Completions must be v1 generations under another name: the same seed on the same prompt
gives the text carousel's own /v1/sessions/{id}/generate gives, streamed or not; greedy
decoding is PyTorch's argmax chain; continuing a session with the `carousel` extension
ends in the state of one v1 session stepped through the same turns (checked against
PyTorch's logits for the whole history). Bad input answers 4xx in OpenAI's error shape and
changes nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from carousel.model.model import encode

PROMPT = "Once upon a tíme ✓ "  # non-ASCII: usage counts bytes, not characters
PROMPT_BYTES = len(PROMPT.encode())
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def oai(server):
    client = openai.OpenAI(base_url=server.url + "/openai/v1", api_key="unused",
                           max_retries=0, timeout=60)
    yield client
    client.close()


def active_sessions(api) -> float:
    return api.metrics().total("session", "active", kind="gauge")


def v1_generation(api, model: str, prompt: str, version: int | None = None, **sampling):
    """The same generation through carousel's own API: a session primed with the prompt."""
    fields = {"version": version} if version is not None else {}
    sid = api.create_session(model, text=prompt, **fields)["session_id"]
    return api.generate(sid, top_k=0, **sampling)


def streamed(chunks) -> tuple[str, str | None, list]:
    """The text, the finish reason and every chunk of an openai completion stream."""
    seen = list(chunks)
    text = "".join(c.choices[0].text for c in seen if c.choices)
    reasons = [c.choices[0].finish_reason for c in seen if c.choices]
    assert all(r is None for r in reasons[:-1]), reasons
    return text, reasons[-1] if reasons else None, seen


# ------------------------------------------------------------------------------ models


def test_models_lists_every_model_and_version(oai, api):
    v1 = api.ok(api.http.get("/v1/models"))["models"]
    expected = {m["name"] for m in v1} | {f"{m['name']}:{m['version']}" for m in v1}
    listed = oai.models.list().data
    assert {m.id for m in listed} == expected
    assert {"tinylstm", "tinylstm:1", "tinylstm:2"} <= expected
    assert all(m.object == "model" and m.owned_by == "carousel" and m.created > 0
               for m in listed)
    assert oai.models.retrieve("tinylstm:1").id == "tinylstm:1"
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("tinylstm:9")
    assert e.value.code == "model_not_found"


# -------------------------------------------------------------------------- completions


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("model", ["tinylstm", "tinygru"])
def test_seeded_completion_equals_v1_generate(oai, api, model, stream):
    sampling = {"max_tokens": 48, "temperature": 0.9, "top_p": 0.95, "seed": 4242}
    expected = v1_generation(api, model, PROMPT, **sampling)
    before = time.time()
    result = oai.completions.create(model=model, prompt=PROMPT, stream=stream, **sampling)
    if stream:
        text, reason, chunks = streamed(result)
        assert len(chunks) > 1
        first = chunks[0]
    else:
        text, reason, first = result.choices[0].text, result.choices[0].finish_reason, result
        assert result.usage.prompt_tokens == PROMPT_BYTES
        assert result.usage.completion_tokens == 48 == len(expected["tokens"])
        assert result.usage.total_tokens == PROMPT_BYTES + 48
        assert result.choices[0].index == 0 and result.choices[0].logprobs is None
    assert text == expected["text"]
    assert reason == "length" and expected["finish_reason"] == "length"
    assert first.object == "text_completion" and re.fullmatch(r"cmpl-\w+", first.id)
    assert first.model == f"{model}:{ {'tinylstm': 2, 'tinygru': 1}[model] }"
    assert int(before) <= first.created <= time.time()


def test_a_version_id_completes_with_that_version(oai, api):
    sampling = {"max_tokens": 32, "temperature": 1.0, "seed": 9}
    v1 = v1_generation(api, "tinylstm", PROMPT, version=1, **sampling)
    v2 = v1_generation(api, "tinylstm", PROMPT, version=2, **sampling)
    assert v1["text"] != v2["text"]  # other weights: another text
    got = oai.completions.create(model="tinylstm:1", prompt=PROMPT, **sampling)
    assert got.model == "tinylstm:1" and got.choices[0].text == v1["text"]
    latest = oai.completions.create(model="tinylstm", prompt=PROMPT, **sampling)
    assert latest.model == "tinylstm:2" and latest.choices[0].text == v2["text"]


@pytest.mark.parametrize("prompt", [PROMPT, [PROMPT], list(PROMPT.encode()),
                                    [list(PROMPT.encode())]],
                         ids=["string", "list-of-string", "tokens", "list-of-tokens"])
def test_greedy_completion_is_pytorchs_argmax_chain(oai, tiny, prompt):
    """Temperature 0 leaves one choice: each byte is PyTorch's argmax after the prompt and
    the bytes before it. Every prompt form OpenAI allows is the same bytes."""
    out = oai.completions.create(model="tinygru", prompt=prompt, max_tokens=24, temperature=0)
    history = encode(PROMPT)
    for _ in range(24):
        history.append(int(np.argmax(tiny["tinygru"].last(history))))
    assert out.choices[0].text == bytes(history[PROMPT_BYTES:]).decode("utf-8", "replace")
    assert out.usage.prompt_tokens == PROMPT_BYTES


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_the_stop_sequence_ends_the_text_and_is_left_out(oai, api, check, stream):
    """utf8cycle emits é€😀 forever (2, 3 and 4 bytes). OpenAI's text never contains the stop
    sequence; carousel's /generate ends with it (the session consumed it)."""
    def complete(stop, max_tokens=18):
        out = oai.completions.create(model="utf8cycle", prompt="x", max_tokens=max_tokens,
                                     temperature=0, stop=stop, stream=stream)
        if stream:
            text, reason, _ = streamed(out)
            return text, reason
        return out.choices[0].text, out.choices[0].finish_reason

    assert complete("😀") == ("é€", "stop")
    assert complete(["€😀é", "zz"]) == ("é", "stop")
    # A stop's start (€) seen again and again but never the whole stop: all of it shows.
    assert complete(["€X"]) == (check.CYCLE_TEXT * 2, "length")
    v1 = v1_generation(api, "utf8cycle", "x", max_tokens=18, temperature=0, stop=["😀"])
    assert v1["text"] == "é€😀" and v1["finish_reason"] == "stop"


def test_stream_options_include_usage(oai):
    chunks = list(oai.completions.create(model="tinylstm", prompt=PROMPT, max_tokens=10,
                                         seed=1, stream=True,
                                         stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (PROMPT_BYTES, 10)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_stream_is_data_chunks_then_done(api):
    body = {"model": "tinylstm", "prompt": PROMPT, "max_tokens": 12, "seed": 3, "stream": True}
    with api.http.stream("POST", "/openai/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stateless_completions_leave_no_session_behind(oai, api):
    before = active_sessions(api)
    oai.completions.create(model="tinylstm", prompt=PROMPT, max_tokens=8, seed=1)
    list(oai.completions.create(model="tinylstm", prompt=PROMPT, max_tokens=8, seed=1,
                                stream=True))
    assert active_sessions(api) == before
    # A client that leaves mid-stream: its session goes too, once the server notices (or
    # once the generation ends, if it ends first).
    body = {"model": "tinylstm", "prompt": PROMPT, "max_tokens": 20000, "stream": True}
    with api.http.stream("POST", "/openai/v1/completions", json=body) as resp:
        next(resp.iter_lines())
    deadline = time.monotonic() + 60
    while active_sessions(api) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert active_sessions(api) == before, "the abandoned completion's session was kept"


# ---------------------------------------------------------- continuing a carousel session


TURNS = [("The first turn. ", 11, False), ("A second turn, ünïcode ✓. ", 12, True),
         ("", 13, False), ("Last.", 14, True)]


def test_continuation_equals_one_v1_session(oai, api, tiny, check):
    """Turn by turn, the extension's completions are one v1 session's steps and generations;
    an empty prompt just continues. The session ends holding the whole conversation."""
    ref = api.create_session("tinylstm")["session_id"]
    sid = api.create_session("tinylstm")["session_id"]
    history = []
    for prompt, seed, stream in TURNS:
        sampling = {"max_tokens": 20, "temperature": 0.8, "seed": seed}
        if prompt:
            api.step(ref, text=prompt)
        expected = api.generate(ref, top_k=0, **sampling)
        result = oai.completions.create(model="tinylstm", prompt=prompt, stream=stream,
                                        extra_body={"carousel": {"session_id": sid}}, **sampling)
        if stream:
            text, _, chunks = streamed(result)
            extension = chunks[-1].model_extra["carousel"]
        else:
            text, extension = result.choices[0].text, result.model_extra["carousel"]
            assert result.usage.prompt_tokens == len(prompt.encode())
        assert text == expected["text"]
        assert extension == {"session_id": sid, "position": expected["position"]}
        history += encode(prompt) + expected["tokens"]
    assert api.position(sid) == api.position(ref) == len(history)
    probe = api.step(sid, text="?", return_logits=True)
    check.logits(probe["logits"], tiny["tinylstm"].last(history + encode("?")), "continued")


def test_continuation_position_makes_a_retry_safe(oai, api):
    sid = api.create_session("tinylstm", text="hello")["session_id"]
    body = {"model": "tinylstm", "prompt": " world", "max_tokens": 5, "seed": 1,
            "carousel": {"session_id": sid, "position": 5}}
    first = api.ok(api.post("/openai/v1/completions", body))
    assert first["carousel"] == {"session_id": sid, "position": 5 + 6 + 5}
    again = api.post("/openai/v1/completions", body)  # a retry after a lost answer
    err = expect_openai_error(again, 409, code="position_mismatch", param="carousel.position")
    assert err["carousel"] == {"position": 16}
    assert again.headers["x-should-retry"] == "false"
    assert api.position(sid) == 16
    # The package retries a 409 unless told not to: with its default retries, one request.
    conflicts = conflicts_answered(api)
    retrying = openai.OpenAI(base_url=api.server.url + "/openai/v1", api_key="unused")
    with pytest.raises(openai.ConflictError):
        retrying.completions.create(model="tinylstm", prompt="", max_tokens=1,
                                    extra_body={"carousel": {"session_id": sid, "position": 5}})
    retrying.close()
    assert conflicts_answered(api) == conflicts + 1
    assert api.position(sid) == 16


def conflicts_answered(api) -> float:
    return api.metrics().total("requests", kind="counter", route="/openai/v1/completions",
                               status="409")


# ------------------------------------------------------------------------------ errors


def expect_openai_error(resp: httpx.Response, status: int, *, code: str | None = None,
                        param: str | None = None) -> dict:
    """OpenAI's error shape with this status; returns the error object."""
    assert resp.status_code == status, f"{resp.status_code} {resp.text[:500]}"
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error"), err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


COMPLETIONS = "/openai/v1/completions"
OK = {"model": "tinylstm", "prompt": "hi", "max_tokens": 4}
BOGUS = "AAAAAAAAAAAAAAAAAAAAAA"


def body(**change):
    fields = {**OK, **change}
    return {k: v for k, v in fields.items() if v is not ...}


# (id, body, status, code, param). A str/bytes body is sent raw as application/json.
CASES = [
    ("not-json", '{"model": "tinylstm", "prompt":', 400, "invalid_json", None),
    ("not-utf8", b'{"model": "tinylstm", "prompt": "\xff"}', 400, None, None),
    ("empty-body", "", 400, "invalid_json", None),
    ("body-is-list", "[1, 2]", 400, None, None),
    ("no-model", body(model=...), 400, None, "model"),
    ("no-prompt", body(prompt=...), 400, None, "prompt"),
    ("model-number", body(model=5), 400, None, "model"),
    ("unknown-model", body(model="gpt-4"), 404, "model_not_found", "model"),
    ("unknown-version", body(model="tinylstm:9"), 404, "model_not_found", "model"),
    ("bad-version", body(model="tinylstm:x"), 404, "model_not_found", "model"),
    ("prompt-number", body(prompt=5), 400, None, "prompt"),
    ("prompt-mixed-list", body(prompt=[1, "a"]), 400, None, "prompt"),
    ("prompt-two-strings", body(prompt=["a", "b"]), 400, None, "prompt"),
    ("prompt-two-token-lists", body(prompt=[[1], [2]]), 400, None, "prompt"),
    ("prompt-token-256", body(prompt=[104, 256]), 400, None, "prompt"),
    ("prompt-token-negative", body(prompt=[-1]), 400, None, "prompt"),
    ("prompt-token-huge", body(prompt=[2**70]), 400, None, "prompt"),
    ("prompt-empty", body(prompt=""), 400, None, "prompt"),
    ("prompt-too-long", body(prompt="a" * 2049), 413, None, "prompt"),
    ("body-too-large", body(prompt="a" * 70000), 413, "request_too_large", None),
    ("max-tokens-string", body(max_tokens="5"), 400, None, "max_tokens"),
    ("max-tokens-zero", body(max_tokens=0), 400, None, "max_tokens"),
    ("max-tokens-over-limit", body(max_tokens=20001), 400, None, "max_tokens"),
    ("temperature-negative", body(temperature=-1), 400, None, "temperature"),
    ("temperature-string", body(temperature="hot"), 400, None, "temperature"),
    ("temperature-nan", json.dumps(body(temperature=float("nan"))), 400, None, "temperature"),
    ("top-p-zero", body(top_p=0), 400, None, "top_p"),
    ("top-p-above-one", body(top_p=1.5), 400, None, "top_p"),
    ("seed-negative", body(seed=-1), 400, None, "seed"),
    ("seed-float", body(seed=1.5), 400, None, "seed"),
    ("stop-number", body(stop=5), 400, None, "stop"),
    ("stop-empty", body(stop=[""]), 400, None, "stop"),
    ("stream-junk", body(stream="yes"), 400, None, "stream"),
    ("stream-options-junk", body(stream_options={"include_usage": "yes"}), 400, None,
     "stream_options.include_usage"),
    ("n-2", body(n=2), 400, None, "n"),
    ("best-of-3", body(best_of=3), 400, None, "best_of"),
    ("echo", body(echo=True), 400, None, "echo"),
    ("logprobs", body(logprobs=2), 400, None, "logprobs"),
    ("suffix", body(suffix="}"), 400, None, "suffix"),
    ("presence-penalty", body(presence_penalty=0.5), 400, None, "presence_penalty"),
    ("logit-bias", body(logit_bias={"65": 10}), 400, None, "logit_bias"),
    ("unknown-field", body(top_k=5), 400, None, "top_k"),
    ("carousel-not-object", body(carousel="abc"), 400, None, "carousel"),
    ("carousel-no-session", body(carousel={}), 400, None, "carousel.session_id"),
    ("carousel-unknown-field", body(carousel={"session_id": "x", "ttl": 1}), 400, None,
     "carousel.ttl"),
    ("carousel-unknown-session", body(carousel={"session_id": BOGUS}), 404, "unknown_session",
     "carousel.session_id"),
    ("carousel-position-negative", body(carousel={"session_id": "{sid}", "position": -1}), 400,
     None, "carousel.position"),
    ("carousel-position-wrong", body(carousel={"session_id": "{sid}", "position": 4}), 409,
     "position_mismatch", "carousel.position"),
    ("carousel-other-model", body(model="tinygru", carousel={"session_id": "{sid}"}), 400,
     None, "model"),
    ("carousel-other-version", body(model="tinylstm:1", carousel={"session_id": "{sid}"}), 400,
     None, "model"),
    ("carousel-bad-prompt-token", body(prompt=[999], carousel={"session_id": "{sid}"}), 400,
     None, "prompt"),
    ("carousel-bad-max-tokens", body(max_tokens=-1, carousel={"session_id": "{sid}"}), 400,
     None, "max_tokens"),
]


def with_session(raw, sid: str):
    if isinstance(raw, dict) and isinstance(raw.get("carousel"), dict):
        ext = {k: (v.format(sid=sid) if isinstance(v, str) else v)
               for k, v in raw["carousel"].items()}
        return {**raw, "carousel": ext}
    return raw


@pytest.mark.parametrize(("raw", "status", "code", "param"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_request_is_a_4xx_in_openais_shape_and_changes_nothing(api, tiny, check, raw,
                                                                    status, code, param):
    sid = api.create_session("tinylstm", text="hello")["session_id"]
    sessions = active_sessions(api)
    expect_openai_error(api.post(COMPLETIONS, with_session(raw, sid)), status, code=code,
                        param=param)
    assert active_sessions(api) == sessions, "a rejected completion left a session"
    assert api.position(sid) == 5
    probe = api.step(sid, text=" world", return_logits=True)
    check.logits(probe["logits"], tiny["tinylstm"].last("hello world"), "after the rejection")


def test_the_package_raises_the_matching_errors(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="nosuchmodel", prompt="hi")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tinylstm", prompt="hi", n=2)
    assert e.value.param == "n" and e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        list(oai.completions.create(model="tinylstm", prompt="hi", stream=True, logprobs=1))
    assert e.value.param == "logprobs"


def test_unknown_paths_and_methods_under_openai_answer_in_its_shape(api):
    expect_openai_error(api.http.get("/openai/v1/chat/completions"), 404, code="not_found")
    expect_openai_error(api.http.get("/openai/v2/models"), 404, code="not_found")
    resp = api.http.get(COMPLETIONS)
    expect_openai_error(resp, 405, code="method_not_allowed")
    assert resp.headers["allow"] == "POST"
    expect_openai_error(api.http.delete("/openai/v1/models"), 405)


# ------------------------------------------------------------------------ the README


def readme_example() -> str:
    """The Python block of the README's "OpenAI-compatible API" section."""
    section = README.read_text().split("## OpenAI-compatible API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section should hold one Python example"
    return blocks[0]


def test_the_readme_example_runs(bundled_server):
    """The example as printed, pointed at a real server on the bundled models (it names
    127.0.0.1:8000; only the port changes)."""
    code = readme_example()
    assert "127.0.0.1:8000" in code
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{bundled_server.port}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == str(["bytegru", "bytegru:1", "bytelm", "bytelm:1"]), lines
    positions = [int(m) for m in re.findall(r"position (\d+)", done.stdout)]
    assert len(positions) == 2 and positions[0] < positions[1], done.stdout
