"""Two `carousel serve` replicas sharing the machine's Redis (database 13, cleaned before and
after): any replica serves any session, a retry is answered the same way by either, racing
replicas apply each step exactly once, a stale cached row is never used, a generation's
lease keeps the other replica out until it ends, sessions expire by Redis' TTL, and a
session's state from one build of a model is refused by another. Every number is checked
against the PyTorch model the tiny exports came from."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import numpy as np
import pytest
from carousel.model.model import encode
from sse import sse_events
from storekit import machine_db

DB = 13


@pytest.fixture(scope="module")
def replicas(start_server, tiny_repo, check):
    with machine_db(DB):
        env = {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]), **check.LIMITS,
               "CAROUSEL_STORE_URL": f"redis://127.0.0.1:6379/{DB}", "CAROUSEL_LEASE_S": "1"}
        servers = [start_server(f"redis-{name}", env) for name in "ab"]
        yield servers
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def a_b(replicas, api_factory):
    return [api_factory(s) for s in replicas]


def step(api, sid: str, text: str, **fields) -> dict:
    return api.step(sid, text=text, return_logits=True, top_k=3, **fields)


def test_a_session_made_on_one_replica_is_stepped_on_the_other(a_b, tiny, check):
    a, b = a_b
    sid = a.create_session("tinylstm", text="hello")["session_id"]
    history = "hello"
    for i, chunk in enumerate([" wor", "ld", "!", " and", " more"]):
        api = (b, a)[i % 2]
        out = step(api, sid, chunk, **({"position": len(encode(history))} if i % 3 else {}))
        history += chunk
        check.logits(out["logits"], tiny["tinylstm"].last(history), f"after {history!r}")
        assert out["position"] == len(encode(history))
    assert a.position(sid) == b.position(sid) == len(encode(history))


def test_a_retry_on_another_replica_is_answered_without_applying_twice(a_b, tiny, check):
    a, b = a_b
    sid = a.create_session("tinylstm", text="abc")["session_id"]
    first = step(a, sid, "def", position=3)
    again = step(b, sid, "def", position=3)  # the answer to `first` was "lost"
    assert again["position"] == first["position"] == 6
    assert again["top_k"] == first["top_k"] and again["logits"] == first["logits"]
    err = b.expect_error(b.post(f"/v1/sessions/{sid}/step", {"text": "xyz", "position": 3}),
                         409, code="position_mismatch")
    assert err["position"] == 6
    check.logits(step(b, sid, "g", position=6)["logits"], tiny["tinylstm"].last("abcdefg"))


def test_racing_replicas_apply_every_step_exactly_once(a_b, tiny, check):
    """Both replicas get every step at once: exactly one applies it (the other answers the
    same), or, for two different steps at one position, one applies and one is refused."""
    a, b = a_b
    sids = [a.create_session("tinylstm", text="x")["session_id"] for _ in range(8)]
    texts = {sid: "x" for sid in sids}

    async def race():
        async with httpx.AsyncClient(base_url=a.server.url, trust_env=False, timeout=30) as ca, \
                httpx.AsyncClient(base_url=b.server.url, trust_env=False, timeout=30) as cb:
            for round_ in range(8):
                sends = []
                for i, sid in enumerate(sids):
                    pos = len(encode(texts[sid]))
                    same = (round_ + i) % 2 == 0
                    mine, theirs = f"{round_}{i}", (f"{round_}{i}" if same else f"q{round_}")
                    body = lambda t: {"text": t, "position": pos, "top_k": 3,  # noqa: B023
                                      "return_logits": True}
                    sends.append((sid, same, mine, theirs, pos,
                                  ca.post(f"/v1/sessions/{sid}/step", json=body(mine)),
                                  cb.post(f"/v1/sessions/{sid}/step", json=body(theirs))))
                answers = await asyncio.gather(*(x for s in sends for x in s[5:]))
                for k, (sid, same, mine, theirs, _pos, _, _) in enumerate(sends):
                    ra, rb = answers[2 * k], answers[2 * k + 1]
                    if same:
                        assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
                        assert ra.json()["logits"] == rb.json()["logits"]
                        texts[sid] += mine
                    else:
                        codes = sorted([ra.status_code, rb.status_code])
                        assert codes == [200, 409], (ra.text, rb.text)
                        won = ra if ra.status_code == 200 else rb
                        lost = rb if won is ra else ra
                        assert lost.json()["error"]["position"] == won.json()["position"]
                        texts[sid] += mine if won is ra else theirs

    asyncio.run(race())
    for sid in sids:
        assert a.position(sid) == len(encode(texts[sid])), "each step applied once"
        out = step(b, sid, "z")
        check.logits(out["logits"], tiny["tinylstm"].last(texts[sid] + "z"), texts[sid])


def test_a_stale_cached_row_is_never_used(a_b, tiny, check):
    a, b = a_b
    sid = a.create_session("tinylstm", text="one")["session_id"]
    step(a, sid, " two")  # a caches the row
    step(b, sid, " three")  # ... which is now stale
    out = step(a, sid, " four")  # without a position: runs on the current state
    check.logits(out["logits"], tiny["tinylstm"].last("one two three four"))
    out = step(b, sid, " five", position=len("one two three four"))
    check.logits(out["logits"], tiny["tinylstm"].last("one two three four five"))


def test_a_generation_holds_the_session_until_written_back(a_b, tiny, check):
    """While a generation runs on one replica a step on the other is 503 session_busy (with
    Retry-After) and changes nothing; after the end event the other continues from exactly
    the tokens generated, at the end event's position."""
    a, b = a_b
    sid = a.create_session("tinylstm", text="Once upon")["session_id"]
    tokens = []
    busy = None
    body = {"max_tokens": 3000, "temperature": 1.0, "seed": 5, "stream": True}
    with a.http.stream("POST", f"/v1/sessions/{sid}/generate", json=body) as r:
        for event, data in sse_events(r):
            if event == "end":
                end = data
                break
            tokens.append(data["token"])
            assert data["position"] == 9 + len(tokens)
            if len(tokens) == 20 and busy is None:
                busy = b.post(f"/v1/sessions/{sid}/step", {"text": "!"})
    b.expect_error(busy, 503, code="session_busy")
    assert "retry-after" in busy.headers
    assert end["finish_reason"] == "length" and end["position"] == 9 + 3000
    assert b.position(sid) == end["position"]
    out = step(b, sid, "!", position=end["position"])
    check.logits(out["logits"], tiny["tinylstm"].last(encode("Once upon") + tokens + [33]))


def test_sessions_expire_by_the_stores_ttl_on_every_replica(a_b):
    a, b = a_b
    sid = a.create_session("tinylstm", text="brief", ttl_s=1)["session_id"]
    step(b, sid, " life")  # a write sets the TTL again
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and b.http.get(f"/v1/sessions/{sid}").status_code == 200:
        time.sleep(0.2)
    for api in (a, b):
        api.expect_error(api.http.get(f"/v1/sessions/{sid}"), 404, code="unknown_session")
        api.expect_error(api.post(f"/v1/sessions/{sid}/step", {"text": "x"}), 404,
                         code="unknown_session")


def other_build(tiny_repo, tmp_path, name: str = "tinylstm", version: int = 2):
    """A repository whose `name` `version` is another build: the same graph, but its
    manifest.json re-written (so its sha256, the build's identity, differs)."""
    src = tiny_repo[0] / name / str(version)
    dst = tmp_path / "other" / name / str(version)
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return tmp_path / "other"


def test_a_session_of_another_model_build_is_refused(a_b, start_server, tiny_repo, tmp_path,
                                                     check):
    """A replica serving another build of tinylstm version 2 refuses the stored session
    with 409 model_mismatch instead of continuing it on what may be other weights."""
    a, _ = a_b
    repo = other_build(tiny_repo, tmp_path)
    other = start_server("redis-other-build", {
        "CAROUSEL_MODEL_REPOSITORY": str(repo), **check.LIMITS,
        "CAROUSEL_STORE_URL": f"redis://127.0.0.1:6379/{DB}"})
    try:
        sid = a.create_session("tinylstm", text="mine")["session_id"]
        with httpx.Client(base_url=other.url, trust_env=False, timeout=30) as c:
            for r in (c.post(f"/v1/sessions/{sid}/step", json={"text": "x"}),
                      c.get(f"/v1/sessions/{sid}")):
                a.expect_error(r, 409, code="model_mismatch")
        assert a.position(sid) == 4
    finally:
        other.stop()


def test_numbers_agree_with_numpy_after_many_hops(a_b, tiny):
    """The state that travels through Redis is bit-exact: one replica alone and two taking
    turns give identical logits."""
    a, b = a_b
    alone = a.create_session("tinylstm", text="seed")["session_id"]
    hopping = a.create_session("tinylstm", text="seed")["session_id"]
    for i, chunk in enumerate(["a", "bc", "def", "g", "hij"]):
        x = np.array(step(a, alone, chunk)["logits"])
        y = np.array(step((a, b)[i % 2], hopping, chunk)["logits"])
        np.testing.assert_array_equal(x, y)
