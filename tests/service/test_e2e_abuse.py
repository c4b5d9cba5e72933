"""The security issue's findings, each as a regression test against a real server: the
status, the JSON error, and that a victim session's state is exactly what it was (its
position, and its next step equal to PyTorch's)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

PRIME, PROBE = "victim", " probe"
CORS_ORIGIN = "https://app.example"
MAX_QUEUE = 4
METHODS = {"GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "WS", "other"}


@pytest.fixture(scope="module")
def abused(start_server, tiny_repo, check):
    return start_server("abused", {
        "CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]), **check.LIMITS,
        "CAROUSEL_MAX_GENERATE_TOKENS": "1000000",
        "CAROUSEL_MAX_QUEUE": str(MAX_QUEUE),
        "CAROUSEL_CORS_ORIGINS": CORS_ORIGIN,
    })


@pytest.fixture(scope="module")
def aapi(abused, api_factory):
    return api_factory(abused)


@pytest.fixture
def victim(aapi, tiny, check):
    sid = aapi.create_session("tinylstm", text=PRIME)["session_id"]
    yield sid
    assert aapi.position(sid) == len(PRIME)
    out = aapi.step(sid, text=PROBE, return_logits=True)
    check.logits(out["logits"], tiny["tinylstm"].last(PRIME + PROBE), "victim's next step")


def sessions(aapi) -> float:
    return aapi.metrics().total("session", "active", kind="gauge")


# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("path", [
    "/v1/models/tinylstm?version=²", "/v1/models/tinylstm?version=١",
    "/v1/models/tinylstm?version=-1", "/v1/models/tinylstm?version=9999999999999999999999",
])
def test_version_that_is_not_ascii_digits_is_a_4xx(aapi, victim, path):
    aapi.expect_error(aapi.http.get(path), 400, 422, code="invalid_input")


def test_other_version_parsers_refuse_unicode_digits(aapi, victim):
    r = aapi.http.get("/v2/models/tinylstm/versions/²")
    assert r.status_code == 400 and isinstance(r.json()["error"], str), r.text
    r = aapi.http.get("/openai/v1/models/tinylstm:²")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    r = aapi.post("/v1/models/tinylstm/predict?version=²", {"text": "a"})
    aapi.expect_error(r, 422, code="invalid_input")


def open_ws(server, sid: str, **kw):
    return ws_connect(f"{server.ws_url}/v1/sessions/{sid}/ws", proxy=None, open_timeout=30, **kw)


def ws_error(ws, frame) -> dict:
    ws.send(frame)
    reply = json.loads(ws.recv(timeout=60))
    assert set(reply) == {"error"}, reply
    assert reply["error"]["code"] and reply["error"]["message"], reply
    return reply["error"]


def test_websocket_frame_nested_1000_deep_is_an_error_frame(abused, victim):
    with open_ws(abused, victim) as ws:
        assert ws_error(ws, "[" * 1000 + "]" * 1000)["code"] == "invalid_json"
        assert ws_error(ws, '{"text": ' + "[" * 5000 + "]" * 5000 + "}")["code"] == \
            "invalid_json"
        # The socket still works (a step on it would move the victim: ask a bad one).
        assert ws_error(ws, json.dumps({"text": ""}))["code"] == "empty_input"


def test_websocket_limit_counts_bytes_not_characters(aapi, abused, victim, check):
    limit = int(check.LIMITS["CAROUSEL_MAX_BODY_BYTES"])
    text = "€" * (limit // 3 + 10)  # under the limit in characters, over it in bytes
    assert len(json.dumps({"text": text}, ensure_ascii=False)) < limit
    with open_ws(abused, victim) as ws:
        assert ws_error(ws, json.dumps({"text": text}, ensure_ascii=False))["code"] == \
            "request_too_large"
    # Over HTTP the same body is refused the same way.
    r = aapi.post(f"/v1/sessions/{victim}/step",
                  json.dumps({"text": text}, ensure_ascii=False).encode())
    aapi.expect_error(r, 413, code="request_too_large")


def test_lone_surrogate_is_refused_on_http_and_websocket_alike(aapi, abused, victim):
    frame = '{"text": "a\\ud800b"}'
    r = aapi.post(f"/v1/sessions/{victim}/step", frame)
    assert aapi.expect_error(r, 400)["code"] == "invalid_json"
    with open_ws(abused, victim) as ws:
        assert ws_error(ws, frame)["code"] == "invalid_json"


def test_served_manifests_hold_no_absolute_path(aapi, bundled_server, api_factory):
    for client in (aapi, api_factory(bundled_server)):
        listing = client.ok(client.http.get("/v1/models"))
        bodies = [listing] + [client.ok(client.http.get(f"/v1/models/{m['name']}"))
                              for m in listing["models"]]

        def strings(value):
            if isinstance(value, dict):
                for v in value.values():
                    yield from strings(v)
            elif isinstance(value, list):
                for v in value:
                    yield from strings(v)
            elif isinstance(value, str):
                yield value

        found = [s for b in bodies for s in strings(b)
                 if re.match(r"^(/|~|[A-Za-z]:[\\/]|\\\\)", s) or "/home/" in s or "/tmp/" in s]
        assert not found, found


# ------------------------------------------------------------------------------ browsers


def test_cross_origin_simple_request_creates_nothing(aapi, victim):
    before = sessions(aapi)
    # A web page's "simple" request: text/plain, no preflight.
    r = aapi.http.post("/v1/sessions", content=json.dumps({"model": "tinylstm"}),
                       headers={"content-type": "text/plain;charset=UTF-8",
                                "origin": "https://evil.example"})
    aapi.expect_error(r, 403, code="origin_not_allowed")
    # Even without an Origin (a form a browser posted by a redirect), text is not JSON.
    r = aapi.http.post("/v1/sessions", content=json.dumps({"model": "tinylstm"}),
                       headers={"content-type": "text/plain"})
    aapi.expect_error(r, 415, code="unsupported_media_type")
    r = aapi.http.post(f"/v1/sessions/{victim}/step", content=b'{"text": "x"}',
                       headers={"content-type": "application/x-www-form-urlencoded"})
    aapi.expect_error(r, 415, code="unsupported_media_type")
    r = aapi.http.post(f"/v1/sessions/{victim}/step", content=b'{"text": "x"}')
    aapi.expect_error(r, 415, code="unsupported_media_type")
    # JSON from a foreign page: refused too, on every route, the hot /step included.
    for method, path in [("POST", f"/v1/sessions/{victim}/step"), ("DELETE",
                         f"/v1/sessions/{victim}"), ("GET", f"/v1/sessions/{victim}")]:
        r = aapi.http.request(method, path, json={"text": "x"},
                              headers={"origin": "https://evil.example"})
        aapi.expect_error(r, 403, code="origin_not_allowed")
    r = aapi.http.post("/openai/v1/completions", json={"model": "tinylstm", "prompt": "a"},
                       headers={"origin": "null"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    r = aapi.http.post("/v2/models/tinylstm/infer", content=b'{"inputs": []}',
                       headers={"content-type": "text/plain"})
    assert r.status_code == 415 and isinstance(r.json()["error"], str), r.text
    assert sessions(aapi) == before


def test_dns_rebinding_host_is_refused(aapi, abused, victim):
    rebound = {"host": f"evil.example:{abused.port}", "origin": f"http://evil.example:{abused.port}"}
    r = aapi.http.post("/v1/sessions", json={"model": "tinylstm"}, headers=rebound)
    aapi.expect_error(r, 400, code="host_not_allowed")
    r = aapi.http.post(f"/v1/sessions/{victim}/step", json={"text": "x"}, headers=rebound)
    aapi.expect_error(r, 400, code="host_not_allowed")
    r = aapi.http.get("/v1/models", headers={"host": "evil.example"})
    aapi.expect_error(r, 400, code="host_not_allowed")
    with pytest.raises(InvalidStatus) as refused:
        with open_ws(abused, victim, additional_headers={"Host": "evil.example"}):
            pass
    assert refused.value.response.status_code == 403


def test_same_origin_pages_and_listed_origins_are_served(aapi, abused, victim):
    own = {"origin": abused.url}  # the playground and /docs are served from here
    aapi.ok(aapi.http.get("/v1/models", headers=own))
    r = aapi.http.get("/v1/models", headers={"origin": CORS_ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == CORS_ORIGIN
    pre = aapi.http.options(f"/v1/sessions/{victim}/step", headers={
        "origin": CORS_ORIGIN, "access-control-request-method": "POST",
        "access-control-request-headers": "content-type"})
    assert pre.status_code == 200, pre.text
    assert pre.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "POST" in pre.headers["access-control-allow-methods"]
    # A foreign origin's WebSocket handshake is refused; a listed one's works.
    with pytest.raises(InvalidStatus) as refused:
        with open_ws(abused, victim, origin="https://evil.example"):
            pass
    assert refused.value.response.status_code == 403
    with open_ws(abused, victim, origin=CORS_ORIGIN) as ws:
        assert ws_error(ws, "{}")["code"] == "invalid_input"


def test_pages_carry_security_headers_and_docs_load_nothing_from_elsewhere(aapi):
    for path in ("/playground", "/docs", "/docs/docs.js", "/docs/swagger-ui-bundle.js",
                 "/docs/swagger-ui.css"):
        r = aapi.http.get(path)
        assert r.status_code == 200, (path, r.status_code)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'self'" in csp, csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
    page = aapi.http.get("/docs").text
    assert not re.search(r"(src|href)=\"(https?:)?//", page), page
    assert "<script>" not in page  # nothing inline: the CSP forbids it
    assert aapi.http.get("/redoc").status_code == 404  # FastAPI's CDN page is off


# ------------------------------------------------------------------------------ protocol


def test_405_names_every_allowed_method(aapi, victim):
    r = aapi.http.put(f"/v1/sessions/{victim}")
    aapi.expect_error(r, 405, code="method_not_allowed")
    assert set(r.headers["allow"].split(", ")) == {"GET", "HEAD", "DELETE"}, r.headers
    r = aapi.http.delete("/v1/models")
    aapi.expect_error(r, 405)
    assert set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    r = aapi.http.get(f"/v1/sessions/{victim}/step")
    aapi.expect_error(r, 405)
    assert r.headers["allow"] == "POST"


# Methods the HTTP parser knows (an unknown token is refused before the app: 400)
ODD_METHODS = ["TRACE", "QUERY", "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK",
               "UNLOCK", "SEARCH", "REPORT", "MKACTIVITY", "CHECKOUT", "MERGE", "NOTIFY",
               "SUBSCRIBE", "UNSUBSCRIBE", "PURGE", "MKCALENDAR", "LINK", "UNLINK", "ACL"]


def test_arbitrary_methods_add_no_metric_labels(aapi, victim):
    for method in ODD_METHODS:
        aapi.expect_error(aapi.http.request(method, f"/v1/sessions/{victim}/step"), 405)
        aapi.expect_error(aapi.http.request(method, "/v1/models"), 405)
    r = aapi.http.request("X-ANY-TOKEN", "/v1/models")
    aapi.expect_error(r, 400, code="invalid_http")
    fam = aapi.metrics().family("request", kind="counter")
    labels = {s.labels["method"] for s in fam.samples}
    assert labels <= METHODS, labels
    assert "other" in labels


def test_predict_that_can_never_fit_the_queue_is_413(aapi, victim):
    r = aapi.post("/v1/models/tinylstm/predict", {"inputs": [{"text": "a"}] * (MAX_QUEUE + 1)})
    err = aapi.expect_error(r, 413, code="request_too_large")
    assert "queue" in err["message"]
    assert "retry-after" not in r.headers  # it could never succeed: not worth retrying


# ------------------------------------------------------------------------------ time


def test_a_generation_longer_than_the_ttl_leaves_a_live_session(aapi, victim):
    ttl = 1.0
    # utf8cycle generates é€😀 over and over: whole characters, nothing odd in the events
    sid = aapi.create_session("utf8cycle", text="ttl", ttl_s=ttl)["session_id"]
    with aapi.stream(sid, max_tokens=1_000_000, seed=3) as events:
        started = time.monotonic()
        for _ in events:  # it generates for three TTLs; meanwhile the session is there
            if time.monotonic() - started > 3 * ttl:
                break
        assert aapi.http.get(f"/v1/sessions/{sid}").status_code == 200
    # Leaving the stream ended the generation; the session was in use until then, so a step
    # right after it (which waits for the generation to be written back) finds it.
    out = aapi.step(sid, text="!")
    assert out["position"] > len("ttl") + 1
    # Reading it does not keep it alive: left alone, it expires.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = aapi.http.get(f"/v1/sessions/{sid}")
        if r.status_code == 404:
            break
        time.sleep(0.05)
    aapi.expect_error(r, 404, code="unknown_session")


# ------------------------------------------------------------------------------ abandoned


def disconnected(aapi) -> float:
    return aapi.metrics().total("request", kind="counter", status="499")


def raw_request(server, method: str, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def wait_for(predicate, what: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def consumed(aapi) -> float:
    return aapi.metrics().total("token", "consum", kind="counter", model="tinylstm")


def test_a_queued_step_whose_client_left_is_never_applied(aapi, abused, victim):
    sid = aapi.create_session("tinylstm", text=PRIME)["session_id"]
    before, tokens = disconnected(aapi), consumed(aapi)
    with aapi.stream(sid, max_tokens=1_000_000, seed=5) as events:
        next(events)  # the generation holds the session
        sock = raw_request(abused, "POST", f"/v1/sessions/{sid}/step", {"text": "left"})
        sock.close()  # the client gives up while its step waits
        wait_for(lambda: disconnected(aapi) == before + 1, "the step to be abandoned")
    # The generation ended when its stream was left; the abandoned step never ran: the
    # next step (which waits for the generation's end) is the only input consumed.
    out = aapi.step(sid, text="!")
    assert consumed(aapi) == tokens + 1
    assert out["position"] > len(PRIME) + 1


def test_a_plain_generation_whose_client_left_is_cancelled(aapi, abused, victim):
    sid = aapi.create_session("tinylstm", text=PRIME)["session_id"]
    before = disconnected(aapi)
    sock = raw_request(abused, "POST", f"/v1/sessions/{sid}/generate",
                       {"max_tokens": 1_000_000, "seed": 2})
    wait_for(lambda: aapi.metrics().total("generations", "active") >= 1,
             "the generation to start")
    sock.close()
    wait_for(lambda: disconnected(aapi) == before + 1, "the generation to be abandoned")
    out = aapi.step(sid, text="!")  # waits for the generation to end, if it had not
    generated = out["position"] - len(PRIME) - 1
    assert 0 < generated < 1_000_000, generated


def test_a_step_applied_before_its_client_left_stays_applied(aapi, abused):
    """The lost-answer case: a step whose answer never reached its client is recorded, and
    its retry (same position, same input) is answered again without applying twice."""
    sid = aapi.create_session("tinylstm", text=PRIME)["session_id"]
    answers = []

    def hang_up_after_sending() -> None:
        sock = raw_request(abused, "POST", f"/v1/sessions/{sid}/step",
                           {"text": "once", "position": len(PRIME)})
        answers.append(sock.recv(65536))  # the answer arrives; then the client is gone
        sock.close()

    t = threading.Thread(target=hang_up_after_sending)
    t.start()
    t.join(60)
    assert answers and answers[0].startswith(b"HTTP/1.1 200")
    again = aapi.step(sid, text="once", position=len(PRIME))
    assert again["position"] == len(PRIME + "once")
    assert aapi.position(sid) == len(PRIME + "once")
    r = aapi.post(f"/v1/sessions/{sid}/step", {"text": "other", "position": len(PRIME)})
    aapi.expect_error(r, 409, code="position_mismatch")


def test_no_server_errors_were_counted(aapi):
    fam = aapi.metrics().family("request", kind="counter")
    statuses = {s.labels["status"] for s in fam.samples if s.value > 0}
    assert not any(s.startswith("5") and s != "503" for s in statuses), statuses


def test_http_client_still_works(abused):
    assert httpx.get(abused.url + "/healthz", trust_env=False).status_code == 200
