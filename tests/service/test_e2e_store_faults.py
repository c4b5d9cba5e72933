"""Store faults, on a `redis-server` this test starts on a free port and stops (the
machine's Redis on 6379 is never touched): while Redis is down `/readyz` is 503 and every
request that needs the store answers 503 store_unavailable with Retry-After, never a 500;
a generation running when it goes ends with a clear final event; the service recovers by
itself when Redis returns. A Redis that hangs (SIGSTOP) makes steps time out with 503, and
the client's retry with its position applies the step exactly once. The session cap is
counted across replicas."""

from __future__ import annotations

import time

import httpx
import pytest
from carousel.model.model import encode
from sse import sse_events
from storekit import RedisServer

ROUTES_NEEDING_THE_STORE = [
    ("POST", "/v1/sessions", {"model": "tinylstm", "text": "new"}),
    ("POST", "/v1/sessions/{sid}/step", {"text": "x", "position": 5}),
    ("GET", "/v1/sessions/{sid}", None),
    ("GET", "/v1/sessions/{sid}/state", None),
    ("POST", "/v1/sessions/{sid}/fork", None),
    ("POST", "/v1/sessions/{sid}/generate", {"max_tokens": 5}),
    ("POST", "/v1/sessions/{sid}/generate", {"max_tokens": 5, "stream": True}),
    ("DELETE", "/v1/sessions/{sid}", None),
    ("POST", "/openai/v1/completions", {"model": "tinylstm", "prompt": "hi", "max_tokens": 3}),
]

LONG_GENERATION = 10_000_000


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.resume() if server.proc.poll() is None else None
    server.kill()


@pytest.fixture
def pair(start_server, tiny_repo, check, redis_server):
    env = {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]), **check.LIMITS,
           "CAROUSEL_STORE_URL": redis_server.url, "CAROUSEL_MAX_SESSIONS": "4",
           "CAROUSEL_STORE_TIMEOUT_S": "0.5", "CAROUSEL_LEASE_S": "1",
           # a generation that cannot end before Redis is killed under it, however fast
           "CAROUSEL_MAX_GENERATE_TOKENS": str(LONG_GENERATION)}
    servers = [start_server(f"faults-{name}", env) for name in "ab"]
    yield servers
    for s in servers:
        s.stop()


def wait_ready(api, ready: bool, deadline_s: float = 30) -> httpx.Response:
    end = time.monotonic() + deadline_s
    while True:
        r = api.http.get("/readyz")
        if (r.status_code == 200) == ready or time.monotonic() > end:
            return r
        time.sleep(0.1)


def test_the_cap_is_counted_across_replicas(pair, api_factory):
    a, b = (api_factory(s) for s in pair)
    sids = [(a, b)[i % 2].create_session("tinylstm")["session_id"] for i in range(4)]
    for api in (a, b):
        err = api.expect_error(api.post("/v1/sessions", {"model": "tinylstm"}), 503,
                               code="at_capacity")
        assert err["message"]
    a.http.delete(f"/v1/sessions/{sids[0]}")
    assert b.create_session("tinylstm")["session_id"]


def test_redis_down_is_503_store_unavailable_and_the_service_recovers(
        pair, api_factory, redis_server, tiny, check):
    a, b = (api_factory(s) for s in pair)
    sid = a.create_session("tinylstm", text="alive")["session_id"]
    streamed = a.create_session("tinylstm", text="going")["session_id"]
    body = {"max_tokens": LONG_GENERATION, "seed": 2, "stream": True}
    with a.http.stream("POST", f"/v1/sessions/{streamed}/generate", json=body) as r:
        for i, (_event, data) in enumerate(sse_events(r)):
            if i == 300:
                redis_server.kill()
            last = data
            if "finish_reason" in data:
                break
    # The generation could not keep what followed: a clear final event says so, and where
    # the session was last written.
    assert last["finish_reason"] in ("lease_lost", "store_unavailable"), last
    assert 5 <= last["position"] < 5 + LONG_GENERATION

    for api in (a, b):
        r = wait_ready(api, ready=False)
        assert r.status_code == 503 and r.json()["status"] == "store_unreachable", r.text
        assert api.http.get("/v2/health/ready").status_code == 503
        for method, path, body in ROUTES_NEEDING_THE_STORE:
            r = api.http.request(method, path.format(sid=sid), json=body)
            api.expect_error(r, 503, code="store_unavailable")
            assert int(r.headers["retry-after"]) >= 1, (path, r.headers)
        # Stateless work needs no store.
        assert api.predict("tinylstm", text="still")["outputs"]

    redis_server.start()  # on the same port, empty: it kept nothing on disk
    for api in (a, b):
        assert wait_ready(api, ready=True).status_code == 200
    # The sessions went with Redis' memory, whole: gone, never half there.
    a.expect_error(a.http.get(f"/v1/sessions/{sid}"), 404, code="unknown_session")
    new = b.create_session("tinylstm", text="again")["session_id"]
    out = a.step(new, text="!", position=5, return_logits=True)
    check.logits(out["logits"], tiny["tinylstm"].last("again!"))


def test_a_hanging_redis_times_out_and_a_retry_applies_once(pair, api_factory, redis_server,
                                                           tiny, check):
    a, b = (api_factory(s) for s in pair)
    sid = a.create_session("tinylstm", text="patience")["session_id"]
    redis_server.pause()
    try:
        r = a.post(f"/v1/sessions/{sid}/step", {"text": " is", "position": 8})
        a.expect_error(r, 503, code="store_unavailable")
        assert "retry-after" in r.headers
    finally:
        redis_server.resume()
    assert wait_ready(a, ready=True).status_code == 200
    # The timed-out write may or may not have reached Redis; either way the same step,
    # retried at its position, applies exactly once (here on the other replica).
    body = {"text": " is", "position": 8, "return_logits": True}
    out = b.ok(b.post(f"/v1/sessions/{sid}/step", body))
    assert out["position"] == 11
    check.logits(out["logits"], tiny["tinylstm"].last("patience is"))
    out = a.step(sid, text=" good", position=11, return_logits=True)
    check.logits(out["logits"], tiny["tinylstm"].last(encode("patience is good")))
