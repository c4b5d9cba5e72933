"""Session lifecycle (create, get, fork, delete, expiry, the cap) and positions that make
retries safe, against a real server."""

from __future__ import annotations

import re
import time

import pytest

BOGUS = "AAAAAAAAAAAAAAAAAAAAAA"  # URL-safe, 128 bits long, never issued (random ids)
SESSION_FIELDS = {"session_id", "model", "version", "position", "created_at", "last_used_at",
                  "expires_at"}


def test_create_get_fork_delete(api, tiny, check):
    created = api.create_session("tinylstm", text="hello")
    sid = created["session_id"]
    # 128 random bits, URL-safe: at least 22 base64url or 32 hex characters.
    assert re.fullmatch(r"[A-Za-z0-9_-]{22,}", sid), sid
    assert (created["model"], created["version"], created["position"]) == ("tinylstm", 2, 5)
    assert "expires_at" in created
    check.top_k(created["top_k"], tiny["tinylstm"].last("hello"))

    info = api.session(sid)
    assert SESSION_FIELDS <= set(info), info
    assert (info["session_id"], info["model"], info["version"], info["position"]) == (
        sid, "tinylstm", 2, 5)
    assert check.timestamp(info["created_at"]) <= check.timestamp(info["last_used_at"])
    assert check.timestamp(info["last_used_at"]) < check.timestamp(info["expires_at"])

    fork = api.fork(sid)
    fid = fork["session_id"]
    assert fid != sid and fork["position"] == 5 and fork["model"] == "tinylstm"
    # The fork has a copy of the state: both continue alike, and apart.
    a = api.step(sid, text=" world", return_logits=True)
    b = api.step(fid, text=" world", return_logits=True)
    check.logits(a["logits"], tiny["tinylstm"].last("hello world"), "original")
    check.logits(b["logits"], tiny["tinylstm"].last("hello world"), "fork")
    api.step(fid, text="!!!")
    assert (api.position(sid), api.position(fid)) == (11, 14)
    c = api.step(sid, text="?", return_logits=True)
    check.logits(c["logits"], tiny["tinylstm"].last("hello world?"), "original after fork moved")

    assert api.http.delete(f"/v1/sessions/{sid}").status_code == 204
    api.expect_error(api.http.get(f"/v1/sessions/{sid}"), 404)
    api.expect_error(api.post(f"/v1/sessions/{sid}/step", {"text": "x"}), 404)
    api.expect_error(api.post(f"/v1/sessions/{sid}/fork"), 404)
    api.expect_error(api.http.delete(f"/v1/sessions/{sid}"), 404)
    assert api.position(fid) == 14  # deleting the original leaves its fork alone


def test_unknown_session_everywhere_is_404(api, check):
    api.expect_error(api.http.get(f"/v1/sessions/{BOGUS}"), 404)
    api.expect_error(api.http.delete(f"/v1/sessions/{BOGUS}"), 404)
    api.expect_error(api.post(f"/v1/sessions/{BOGUS}/step", {"text": "x"}), 404)
    api.expect_error(api.post(f"/v1/sessions/{BOGUS}/fork"), 404)
    api.expect_error(api.post(f"/v1/sessions/{BOGUS}/generate", check.GEN), 404)


def test_unprimed_session_starts_at_zero(api, tiny, check):
    created = api.create_session("tinygru")
    assert created["position"] == 0
    out = api.step(created["session_id"], tokens=[200, 3], return_logits=True)
    assert out["position"] == 2
    check.logits(out["logits"], tiny["tinygru"].last([200, 3]), "first step")


def test_ttl_override_sets_expiry(api, check):
    info = api.create_session("tinylstm", ttl_s=60)
    got = api.session(info["session_id"])
    lifetime = check.timestamp(got["expires_at"]) - check.timestamp(got["last_used_at"])
    assert 50 <= lifetime <= 61, got
    default = api.session(api.create_session("tinylstm")["session_id"])
    lifetime = check.timestamp(default["expires_at"]) - check.timestamp(default["last_used_at"])
    assert 3500 <= lifetime <= 3601, default  # the 1-hour default idle TTL


def test_ttl_beyond_the_maximum_is_refused_or_capped(api, check):
    """The per-session TTL may go up to the configured maximum (7200 s here), not beyond."""
    resp = api.post("/v1/sessions", {"model": "tinylstm", "ttl_s": 10**6})
    if resp.status_code == 201:
        got = api.session(resp.json()["session_id"])
        lifetime = check.timestamp(got["expires_at"]) - check.timestamp(got["last_used_at"])
        assert lifetime <= 7201, got
    else:
        api.expect_error(resp, 400, 422)


def test_idle_session_expires(api):
    """A session idle past its TTL is swept: 404 everywhere, counted as expired."""
    expired_before = api.metrics().total("expired")
    short = api.create_session("tinylstm", ttl_s=1, text="short-lived")["session_id"]
    kept = api.create_session("tinylstm", text="kept")["session_id"]
    # Wait on the expired counter (it does not touch the session), not on the clock.
    deadline = time.monotonic() + 30
    while api.metrics().total("expired") <= expired_before:
        assert time.monotonic() < deadline, "the sweeper never expired the 1 s session"
        time.sleep(0.2)
    api.expect_error(api.http.get(f"/v1/sessions/{short}"), 404)
    api.expect_error(api.post(f"/v1/sessions/{short}/step", {"text": "x"}), 404)
    assert api.position(kept) == 4


# --------------------------------------------------------------------------- positions


def test_retry_with_position_returns_same_answer_and_applies_once(api, tiny, check):
    sid = api.create_session("tinylstm", text="hello")["session_id"]
    first = api.step(sid, text=" wor", position=5, return_logits=True)
    assert first["position"] == 9
    again = api.step(sid, text=" wor", position=5, return_logits=True)
    assert again == first  # the same answer, byte for byte
    assert api.position(sid) == 9  # ... and nothing applied twice
    third = api.step(sid, text="ld", position=9, return_logits=True)
    assert third["position"] == 11
    check.logits(third["logits"], tiny["tinylstm"].last("hello world"), "after a retry")


def real_position_in(err: dict, position: int) -> bool:
    """The 409 reports the session's real position (in a field or in the message)."""
    numbers = [v for v in err.values() if isinstance(v, int) and not isinstance(v, bool)]
    details = err.get("details") or err.get("detail") or {}
    if isinstance(details, dict):
        numbers += [v for v in details.values() if isinstance(v, int)]
    return position in numbers or re.search(rf"\b{position}\b", err["message"]) is not None


def test_wrong_position_is_409_with_real_position(api, tiny, check):
    sid = api.create_session("tinylstm", text="hello")["session_id"]
    api.step(sid, text=" wor", position=5)
    api.step(sid, text="ld", position=9)  # the last applied step is now "ld" at 9
    cases = [
        {"text": "x", "position": 3},  # behind
        {"text": "x", "position": 40},  # ahead
        {"text": " wor", "position": 5},  # a real step, but not the last one applied
        {"text": "LD", "position": 9},  # the last position, different input
        {"text": "x", "position": 0},
    ]
    for body in cases:
        err = api.expect_error(api.post(f"/v1/sessions/{sid}/step", body), 409,
                               code="position_mismatch")
        assert real_position_in(err, 11), (body, err)
    assert api.position(sid) == 11
    out = api.step(sid, text="!", position=11, return_logits=True)
    check.logits(out["logits"], tiny["tinylstm"].last("hello world!"), "after 409s")


# --------------------------------------------------------------------------------- cap


@pytest.fixture(scope="module")
def capped(start_server, tiny_repo, api_factory):
    server = start_server("capped", {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]),
                                     "CAROUSEL_MAX_SESSIONS": "3"})
    return api_factory(server)


def test_cap_answers_503_with_retry_after(capped, tiny, check):
    api = capped
    sids = [api.create_session("tinylstm", text="s")["session_id"] for _ in range(3)]
    for attempt in (lambda: api.post("/v1/sessions", {"model": "tinylstm", "text": "more"}),
                    lambda: api.post(f"/v1/sessions/{sids[0]}/fork")):
        resp = attempt()
        api.expect_error(resp, 503, code="at_capacity")
        retry_after = resp.headers.get("retry-after")
        assert retry_after is not None and retry_after.strip(), resp.headers
    # Sessions that exist keep working at the cap.
    out = api.step(sids[1], text="tep", return_logits=True)
    check.logits(out["logits"], tiny["tinylstm"].last("step"), "at capacity")
    # Freeing one makes room for exactly one.
    assert api.http.delete(f"/v1/sessions/{sids[2]}").status_code == 204
    api.create_session("tinylstm")
    api.expect_error(api.post("/v1/sessions", {"model": "tinylstm"}), 503, code="at_capacity")
