"""Tenant isolation, proven on a real server with two tenants' keys (CAROUSEL_API_KEYS):
every route and transport that names a session (v1 HTTP with the hot /step, SSE and plain
generation, fork, delete, GET, the WebSocket, the OpenAI routes' session extension, the
Python SDK) answers the other tenant exactly as it answers a session that never existed,
and leaves the session as it was: its record unchanged, its next step's logits equal to
PyTorch's on its own history. v2 sequence ids are each tenant's own.

The one number the issue asks for is counted, both ways: cross-tenant reads or writes
that succeeded, 0."""

from __future__ import annotations

import json
import secrets

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from carousel.model.model import encode
from carousel_client import Client, UnknownSession
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

PRIME = "tenants keep apart"
PROBE = " and stay so"


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {"alice": secrets.token_urlsafe(24), "bob": secrets.token_urlsafe(24)}


@pytest.fixture(scope="module")
def tenant_server(start_server, tiny_repo, keys, check):
    pairs = ",".join(f"{name}:{key}" for name, key in keys.items())
    return start_server("tenants", {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]),
                                    **check.LIMITS, "CAROUSEL_API_KEYS": pairs})


@pytest.fixture(scope="module")
def apis(tenant_server, keys, api_factory) -> dict:
    """An Api per tenant: the conftest helpers, every request carrying the tenant's key."""
    out = {}
    for name, key in keys.items():
        api = api_factory(tenant_server)
        api.http.headers["Authorization"] = f"Bearer {key}"
        out[name] = api
    return out


def ws_open(server, sid: str, key: str):
    return connect(f"{server.ws_url}/v1/sessions/{sid}/ws", proxy=None, open_timeout=30,
                   additional_headers={"Authorization": f"Bearer {key}"})


def v1_error(resp: httpx.Response) -> tuple[int, str, str]:
    err = resp.json()["error"]
    return resp.status_code, err["code"], err["message"]


def attempts(server, api, key: str, sid: str) -> dict:
    """Everything a caller can do to a session by its id, each as (status, code, message)."""
    gen = {"max_tokens": 4, "temperature": 0.0, "seed": 1}
    out = {
        "get": v1_error(api.http.get(f"/v1/sessions/{sid}")),
        "step (hot path)": v1_error(api.post(f"/v1/sessions/{sid}/step", {"text": "x"})),
        "step with position": v1_error(api.post(f"/v1/sessions/{sid}/step",
                                                {"text": "x", "position": len(PRIME)})),
        "generate": v1_error(api.post(f"/v1/sessions/{sid}/generate", gen)),
        "generate SSE": v1_error(api.post(f"/v1/sessions/{sid}/generate",
                                          {**gen, "stream": True})),
        "fork": v1_error(api.post(f"/v1/sessions/{sid}/fork")),
        "delete": v1_error(api.http.delete(f"/v1/sessions/{sid}")),
    }
    # The WebSocket: a session that is not the caller's is refused as a missing one (4404).
    with ws_open(server, sid, key) as ws:
        frame = json.loads(ws.recv(timeout=60))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=60)
        out["websocket"] = (closed.value.rcvd.code, frame["error"]["code"],
                            frame["error"]["message"])
    for name, extension in [("openai session", {"session_id": sid}),
                            ("openai session with position",
                             {"session_id": sid, "position": len(PRIME)})]:
        resp = api.post("/openai/v1/completions", {"model": "tinylstm", "prompt": "x",
                                                   "max_tokens": 2, "carousel": extension})
        err = resp.json()["error"]
        out[name] = (resp.status_code, err["code"], err["message"])
    with Client(server.url, api_key=key, trust_env=False) as client:
        try:
            client.attach(sid).step("x")
            out["sdk"] = (200, "", "")
        except UnknownSession as e:
            out["sdk"] = (e.status, e.code, e.message)
    return out


@pytest.mark.parametrize("owner, other", [("alice", "bob"), ("bob", "alice")])
def test_another_tenant_meets_only_a_missing_session_everywhere(tenant_server, apis, keys,
                                                                tiny, check, owner, other):
    mine, theirs = apis[owner], apis[other]
    sid = mine.create_session("tinylstm", text=PRIME)["session_id"]
    before = mine.session(sid)
    never = secrets.token_urlsafe(16)  # an id that never existed, for the expected answers
    expected = attempts(tenant_server, theirs, keys[other], never)
    seen = attempts(tenant_server, theirs, keys[other], sid)

    cross = [op for op, (status, *_rest) in seen.items() if 200 <= status < 300]
    assert cross == [], f"cross-tenant operations that succeeded: {cross}"
    for op, (status, code, message) in seen.items():
        e_status, e_code, e_message = expected[op]
        assert (status, code) == (e_status, e_code) == (
            (4404 if op == "websocket" else 404), "unknown_session"), (op, seen[op])
        assert message == e_message.replace(never, sid), op  # word for word a missing one

    # The session is exactly as it was: its record, and the state its next step runs from.
    assert mine.session(sid) == before
    out = mine.step(sid, text=PROBE, return_logits=True)
    assert out["position"] == len(encode(PRIME + PROBE))
    check.logits(out["logits"], tiny["tinylstm"].last(PRIME + PROBE))


def test_a_fork_belongs_to_the_tenant_that_forked(apis, tiny, check):
    alice, bob = apis["alice"], apis["bob"]
    parent = alice.create_session("tinygru", text=PRIME)["session_id"]
    child = alice.fork(parent)["session_id"]
    bob.expect_error(bob.http.get(f"/v1/sessions/{child}"), 404, code="unknown_session")
    bob.expect_error(bob.post(f"/v1/sessions/{child}/fork"), 404, code="unknown_session")
    out = alice.step(child, text=PROBE, return_logits=True)
    check.logits(out["logits"], tiny["tinygru"].last(PRIME + PROBE))
    assert alice.position(parent) == len(encode(PRIME))


def test_sessions_made_by_a_completion_or_continued_by_one_stay_the_tenants(apis):
    alice, bob = apis["alice"], apis["bob"]
    sid = alice.create_session("tinylstm", text=PRIME)["session_id"]
    done = alice.ok(alice.post("/openai/v1/completions", {
        "model": "tinylstm", "prompt": PROBE, "max_tokens": 3, "temperature": 0,
        "carousel": {"session_id": sid, "position": len(PRIME)}}))
    assert done["carousel"]["position"] == len(encode(PRIME + PROBE)) + 3
    # a stateless completion makes its own session in the tenant's name, and deletes it
    plain = bob.ok(bob.post("/openai/v1/completions", {"model": "tinylstm", "prompt": PRIME,
                                                       "max_tokens": 3, "temperature": 0}))
    assert plain["usage"] == {"prompt_tokens": len(encode(PRIME)), "completion_tokens": 3,
                              "total_tokens": len(encode(PRIME)) + 3}
    assert alice.position(sid) == done["carousel"]["position"]


def infer(http: httpx.Client, tokens: str, sequence_id, *, start=False, end=False):
    body = {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, len(tokens)],
                        "data": encode(tokens)}],
            "parameters": {"sequence_id": sequence_id, "sequence_start": start,
                           "sequence_end": end}}
    return http.post("/v2/models/tinylstm/infer", json=body)


def logits_of(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    (out,) = resp.json()["outputs"]
    return np.array(out["data"], dtype=np.float64)


def test_v2_sequence_ids_are_each_tenants_own(tenant_server, apis, keys, tiny, check):
    a, b = apis["alice"].http, apis["bob"].http
    ref = tiny["tinylstm"]
    # Both tenants use sequence 1 (and the string "1"), interleaved: four sequences.
    check.logits(logits_of(infer(a, "hello", 1, start=True)), ref.last("hello"))
    check.logits(logits_of(infer(b, "world", 1, start=True)), ref.last("world"))
    check.logits(logits_of(infer(b, "abc", "1", start=True)), ref.last("abc"))
    check.logits(logits_of(infer(a, " there", 1)), ref.last("hello there"))
    check.logits(logits_of(infer(b, " peace", 1)), ref.last("world peace"))
    # A sequence only alice started does not exist for bob; his attempt changes nothing.
    check.logits(logits_of(infer(a, "seven", 7, start=True)), ref.last("seven"))
    refused = infer(b, "x", 7)
    assert refused.status_code == 400 and "START" in refused.json()["error"]
    infer(b, "y", 1, end=True)  # bob ends his sequence 1...
    check.logits(logits_of(infer(a, "!", 1)), ref.last("hello there!"))  # ...not alice's
    check.logits(logits_of(infer(a, " up", 7, end=True)), ref.last("seven up"))
    # The stock client, the key in its headers.
    client = triton.InferenceServerClient(tenant_server.url.removeprefix("http://"))
    try:
        x = triton.InferInput("tokens", [1, 3], "INT64")
        x.set_data_from_numpy(np.array([encode("xyz")], dtype=np.int64))
        result = client.infer("tinylstm", [x], sequence_id=1, sequence_start=True,
                              headers={"Authorization": f"Bearer {keys['bob']}"})
        check.logits(result.as_numpy("logits")[0], ref.last("xyz"))
    finally:
        client.close()
    check.logits(logits_of(infer(a, "?", 1)), ref.last("hello there!?"))
