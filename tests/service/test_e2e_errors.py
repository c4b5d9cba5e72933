"""Every bad input gets a 4xx JSON error in the issue's envelope, and changes nothing: the
session's position and next prediction are what they were, and no session is created.

Each case runs against a fresh session primed with PRIME; afterwards the session must be at
len(PRIME) and stepping PROBE must give PyTorch's logits for PRIME + PROBE."""

from __future__ import annotations

import json

import pytest

PRIME, PROBE = "hello", " world"
BOGUS = "AAAAAAAAAAAAAAAAAAAAAA"
LIMITS = {"body": 65536, "tokens": 2048, "generate": 20000, "inputs": 8}  # conftest LIMITS
BAD = (400, 422)
GEN = {"max_tokens": 5, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "seed": 3}


def gen(**change):
    return {**GEN, **change}


def chunked(data: bytes, size: int = 4096):
    """A body sent with chunked transfer encoding: no Content-Length to check up front."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


STEP, GENERATE = "/v1/sessions/{sid}/step", "/v1/sessions/{sid}/generate"
PREDICT, CREATE = "/v1/models/tinylstm/predict", "/v1/sessions"

# (id, path, body, allowed statuses). A str/bytes body is sent raw as application/json.
CASES = [
    # --- /step
    ("step-malformed-json", STEP, '{"text": "ab"', BAD),
    ("step-not-utf8", STEP, b'{"text": "\xff\xfe"}', BAD),
    ("step-lone-surrogate", STEP, '{"text": "\\ud800"}', BAD),
    ("step-body-is-list", STEP, "[1, 2, 3]", BAD),
    ("step-deeply-nested", STEP, "[" * 20000 + "]" * 20000, BAD),
    ("step-body-is-string", STEP, '"hello"', BAD),
    ("step-empty-object", STEP, {}, BAD),
    ("step-text-number", STEP, {"text": 123}, BAD),
    ("step-text-null", STEP, {"text": None}, BAD),
    ("step-tokens-string", STEP, {"tokens": "abc"}, BAD),
    ("step-tokens-mixed", STEP, {"tokens": [1, "a"]}, BAD),
    ("step-tokens-float", STEP, {"tokens": [1.5]}, BAD),
    ("step-tokens-nested", STEP, {"tokens": [[1, 2]]}, BAD),
    ("step-token-256", STEP, {"tokens": [104, 256]}, BAD),
    ("step-token-negative", STEP, {"tokens": [-1]}, BAD),
    ("step-token-huge", STEP, {"tokens": [2**70]}, BAD),
    ("step-empty-text", STEP, {"text": ""}, BAD),
    ("step-empty-tokens", STEP, {"tokens": []}, BAD),
    ("step-position-string", STEP, {"text": "x", "position": "five"}, BAD),
    ("step-position-negative", STEP, {"text": "x", "position": -1}, (*BAD, 409)),
    ("step-top-k-negative", STEP, {"text": "x", "top_k": -1}, BAD),
    ("step-top-k-string", STEP, {"text": "x", "top_k": "many"}, BAD),
    ("step-return-logits-junk", STEP, {"text": "x", "return_logits": "maybe"}, BAD),
    ("step-too-many-tokens", STEP, {"tokens": [97] * (LIMITS["tokens"] + 1)}, (413, 422)),
    ("step-too-long-text", STEP, {"text": "a" * (LIMITS["tokens"] + 1)}, (413, 422)),
    ("step-body-too-large", STEP, {"text": "a" * (LIMITS["body"] + 10)}, (413,)),
    ("step-chunked-too-large", STEP,
     chunked(json.dumps({"text": "a" * (LIMITS["body"] * 2)}).encode()), (413,)),
    ("step-unknown-session", "/v1/sessions/" + BOGUS + "/step", {"text": "x"}, (404,)),
    # --- /generate
    ("gen-malformed-json", GENERATE, '{"max_tokens": 5,', BAD),
    ("gen-max-tokens-negative", GENERATE, gen(max_tokens=-1), BAD),
    ("gen-max-tokens-huge", GENERATE, gen(max_tokens=10**9), (413, 422)),
    ("gen-max-tokens-over-limit", GENERATE, gen(max_tokens=LIMITS["generate"] + 1), (413, 422)),
    ("gen-max-tokens-string", GENERATE, gen(max_tokens="ten"), BAD),
    ("gen-temperature-negative", GENERATE, gen(temperature=-1.0), BAD),
    ("gen-temperature-string", GENERATE, gen(temperature="hot"), BAD),
    ("gen-temperature-nan", GENERATE, json.dumps(gen(temperature=float("nan"))), BAD),
    ("gen-temperature-overflow", GENERATE, json.dumps(gen()).replace("1.0", "1e400", 1), BAD),
    ("gen-top-p-nan", GENERATE, json.dumps(gen(top_p=float("nan"))), BAD),
    ("gen-top-p-above-one", GENERATE, gen(top_p=1.5), BAD),
    ("gen-top-p-negative", GENERATE, gen(top_p=-0.5), BAD),
    ("gen-top-k-negative", GENERATE, gen(top_k=-3), BAD),
    ("gen-seed-string", GENERATE, gen(seed="abc"), BAD),
    ("gen-stop-not-list", GENERATE, gen(stop=5), BAD),
    ("gen-stop-numbers", GENERATE, gen(stop=[1, 2]), BAD),
    ("gen-stream-junk", GENERATE, gen(stream="sometimes"), BAD),
    ("gen-stream-junk-max-tokens", GENERATE, gen(stream=True, max_tokens=-5), BAD),
    ("gen-unknown-session", "/v1/sessions/" + BOGUS + "/generate", gen(), (404,)),
    # --- /predict (stateless; the session must not notice either)
    ("predict-malformed-json", PREDICT, "{", BAD),
    ("predict-empty-object", PREDICT, {}, BAD),
    ("predict-empty-text", PREDICT, {"text": ""}, BAD),
    ("predict-token-out-of-range", PREDICT, {"tokens": [300]}, BAD),
    ("predict-inputs-empty", PREDICT, {"inputs": []}, BAD),
    ("predict-inputs-not-list", PREDICT, {"inputs": {"text": "a"}}, BAD),
    ("predict-inputs-bad-row", PREDICT, {"inputs": [{"text": "a"}, {"tokens": [999]}]}, BAD),
    ("predict-inputs-empty-row", PREDICT, {"inputs": [{"text": "a"}, {"text": ""}]}, BAD),
    ("predict-too-many-inputs", PREDICT,
     {"inputs": [{"text": "a"}] * (LIMITS["inputs"] + 1)}, (413, 422)),
    ("predict-top-k-string", PREDICT, {"text": "a", "top_k": "five"}, BAD),
    ("predict-unknown-model", "/v1/models/nosuchmodel/predict", {"text": "a"}, (404,)),
    ("predict-unknown-version", PREDICT, {"text": "a", "version": 99}, (404,)),
    ("predict-unknown-version-query", PREDICT + "?version=99", {"text": "a"}, (404,)),
    ("predict-too-many-tokens", PREDICT, {"tokens": [1] * (LIMITS["tokens"] + 1)}, (413, 422)),
    # --- POST /v1/sessions (must not create a session either)
    ("create-malformed-json", CREATE, '{"model": ', BAD),
    ("create-missing-model", CREATE, {}, BAD),
    ("create-model-number", CREATE, {"model": 5}, BAD),
    ("create-unknown-model", CREATE, {"model": "nosuchmodel"}, (404,)),
    ("create-unknown-version", CREATE, {"model": "tinylstm", "version": 99}, (404,)),
    ("create-version-string", CREATE, {"model": "tinylstm", "version": "latest!"}, BAD),
    ("create-ttl-negative", CREATE, {"model": "tinylstm", "ttl_s": -5}, BAD),
    ("create-ttl-nan", CREATE, '{"model": "tinylstm", "ttl_s": NaN}', BAD),
    ("create-prime-out-of-range", CREATE, {"model": "tinylstm", "tokens": [65, 999]}, BAD),
    ("create-prime-wrong-type", CREATE, {"model": "tinylstm", "text": ["a"]}, BAD),
    ("create-prime-too-long", CREATE,
     {"model": "tinylstm", "tokens": [65] * (LIMITS["tokens"] + 1)}, (413, 422)),
    # --- other routes
    ("fork-unknown-session", "/v1/sessions/" + BOGUS + "/fork", None, (404,)),
]


def active_sessions(api) -> float:
    return api.metrics().total("session", "active", kind="gauge")


@pytest.mark.parametrize(("path", "body", "statuses"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_a_4xx_and_changes_nothing(api, tiny, check, path, body, statuses):
    sid = api.create_session("tinylstm", text=PRIME)["session_id"]
    sessions_before = active_sessions(api)

    if body is None:
        resp = api.post(path.format(sid=sid))
    elif isinstance(body, dict | str | bytes):
        resp = api.post(path.format(sid=sid), body)
    else:  # a generator: chunked upload
        resp = api.http.post(path.format(sid=sid), content=body,
                             headers={"content-type": "application/json"})
    api.expect_error(resp, *statuses)

    assert active_sessions(api) == sessions_before, "a rejected request created a session"
    assert api.position(sid) == len(PRIME)
    out = api.step(sid, text=PROBE, return_logits=True)
    assert out["position"] == len(PRIME + PROBE)
    check.logits(out["logits"], tiny["tinylstm"].last(PRIME + PROBE), "next prediction")


def test_errors_are_counted_but_never_500(api):
    """The request counter labels errors by status: a 4xx appears and no 5xx ever does."""
    api.expect_error(api.post(f"/v1/sessions/{BOGUS}/step", {"text": "x"}), 404)
    fam = api.metrics().family("request", kind="counter")
    statuses = {v for s in fam.samples for k, v in s.labels.items() if "status" in k or k == "code"}
    assert any(str(s).startswith("4") for s in statuses), statuses
    assert not any(str(s).startswith("5") for s in statuses), statuses
