"""API keys on a real server: a keys file of tenants (SHA-256 digests, an admin, limits) and a
development key from CAROUSEL_API_KEYS. Every /v1, /v2 and /openai route refuses a request
without a valid key with 401 and WWW-Authenticate, in its protocol's error shape; health,
readiness, the docs and the page stay open; /metrics needs the admin key. Keys travel in
both headers, and to a WebSocket also as a subprotocol or a query parameter; the SDK, the
openai package and tritonclient work with them. Each tenant's buckets answer 429 with
Retry-After, and its caps on sessions and generations 429 tenant_limit. SIGHUP reloads the
file without dropping sessions. The start-up refusal on a non-loopback address. And no key,
right or wrong, ever reaches the server's log, which runs with the access log on, at debug.

Rates in the keys file are tiny (0.01/s) so that a bucket, once spent, stays empty for the
whole test: nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton
from carousel.model.model import encode
from carousel_client import Client, RateLimited, Unauthorized
from tritonclient.utils import InferenceServerException
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

CAROUSEL = Path(sys.executable).with_name("carousel")
WRONG = "not-a-key-anyone-has-0123456789"
LONG_GENERATION = 10_000_000  # tokens: runs until it is stopped, whatever the machine
TENANTS = {  # the keys file's limits, per tenant
    "alice": "", "ops": "admin = true",
    "slow": "requests_per_s = 0.01\nburst_requests = 2",
    "chatty": "requests_per_s = 0.01\nburst_requests = 4",
    "thrifty": "tokens_per_s = 0.01\nburst_tokens = 10",
    "capped": "max_sessions = 2",
    "onegen": "max_generations = 1",
}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_toml(keys: dict[str, list[str]], extra: dict[str, str] | None = None) -> str:
    parts = []
    for name, tenant_keys in keys.items():
        digests = ", ".join(f'"{sha(k)}"' for k in tenant_keys)
        parts.append(f"[tenants.{name}]\nsha256 = [{digests}]\n{(extra or {}).get(name, '')}\n")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    out = {name: secrets.token_urlsafe(24) for name in TENANTS}
    out["alice2"] = secrets.token_urlsafe(24)  # alice's second key
    out["dev"] = secrets.token_urlsafe(24)  # from CAROUSEL_API_KEYS
    return out


@pytest.fixture(scope="module")
def auth_server(start_server, tiny_repo, keys, check, tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    file_keys = {name: [keys[name]] for name in TENANTS}
    file_keys["alice"].append(keys["alice2"])
    path.write_text(keys_toml(file_keys, TENANTS))
    return start_server("auth", {
        "CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]), **check.LIMITS,
        "CAROUSEL_MAX_GENERATE_TOKENS": str(LONG_GENERATION),
        "CAROUSEL_API_KEYS_FILE": str(path), "CAROUSEL_API_KEYS": f"dev:{keys['dev']}",
        "CAROUSEL_ACCESS_LOG": "true", "CAROUSEL_LOG_LEVEL": "debug"})


def client_for(server, key: str | None = None, header: str = "Authorization") -> httpx.Client:
    headers = {} if key is None else {
        header: f"Bearer {key}" if header == "Authorization" else key}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60, trust_env=False)


@pytest.fixture(scope="module")
def http(auth_server, keys):
    """name -> an httpx client carrying that tenant's key (None: no key, "wrong": a wrong one)."""
    clients = {name: client_for(auth_server, key) for name, key in keys.items()}
    clients[None] = client_for(auth_server)
    clients["wrong"] = client_for(auth_server, WRONG)
    yield clients
    for c in clients.values():
        c.close()


def ws_url(server, sid: str, query: str = "") -> str:
    return f"{server.ws_url}/v1/sessions/{sid}/ws{query}"


def create(c: httpx.Client, model: str = "tinylstm", **fields) -> str:
    resp = c.post("/v1/sessions", json={"model": model, **fields})
    assert resp.status_code == 201, resp.text
    return resp.json()["session_id"]


def v1_code(resp: httpx.Response) -> str:
    return resp.json()["error"]["code"]


# ----------------------------------------------------------------------- every route


def every_route() -> list[tuple[str, str, str]]:
    """(protocol, method, path) for every route under /v1, /v2 and /openai, from the
    service's own route tables, path parameters filled in."""
    from carousel.service import api, openai_api, v2

    values = {"session_id": secrets.token_urlsafe(16), "name": "tinylstm", "version": "1",
              "model": "tinylstm", "rest": "anything", "sequence_id": "7"}

    def fill(path: str) -> str:
        return re.sub(r"{(\w+)(:\w+)?}", lambda m: values[m[1]], path)

    routes = [("v1", r.method, fill(r.path)) for r in api.ROUTES]
    routes += [("v2", m, fill(r.path)) for r in v2.ROUTES for m in sorted(r.methods) if m != "HEAD"]
    routes += [("openai", m, fill(r.path)) for r in openai_api.ROUTES
               for m in sorted(r.methods) if m != "HEAD"]
    routes += [("v1", "GET", "/v1/no/such/route"), ("openai", "GET", "/openai/v1/nothing")]
    return routes


def assert_401(resp: httpx.Response, protocol: str, wrong_key: bool) -> None:
    assert resp.status_code == 401, (resp.request.method, resp.request.url, resp.text)
    challenge = resp.headers["www-authenticate"]
    assert challenge == 'Bearer realm="carousel"' + (', error="invalid_token"' if wrong_key
                                                     else "")
    body = resp.json()
    if protocol == "v2":  # the protocol's own shape
        assert isinstance(body["error"], str) and "API key" in body["error"]
    else:
        assert body["error"]["code"] == "unauthorized", body
        if protocol == "openai":
            assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("protocol, method, path", every_route())
def test_every_route_needs_a_valid_key(http, protocol, method, path):
    assert_401(http[None].request(method, path, json={}), protocol, wrong_key=False)
    assert_401(http["wrong"].request(method, path, json={}), protocol, wrong_key=True)


def test_the_websocket_handshake_needs_a_valid_key(auth_server, http, keys):
    sid = create(http["alice"])
    for headers, challenge in [({}, 'Bearer realm="carousel"'),
                               ({"Authorization": f"Bearer {WRONG}"},
                                'Bearer realm="carousel", error="invalid_token"'),
                               ({"X-API-Key": WRONG}, None)]:
        with pytest.raises(InvalidStatus) as e:
            connect(ws_url(auth_server, sid), proxy=None, additional_headers=headers)
        assert e.value.response.status_code == 401
        assert json.loads(e.value.response.body)["error"]["code"] == "unauthorized"
        if challenge:
            assert e.value.response.headers["WWW-Authenticate"] == challenge
    for bad in ([f"carousel.key.{WRONG}", "carousel"], ["carousel"]):
        with pytest.raises(InvalidStatus) as e:
            connect(ws_url(auth_server, sid), proxy=None, subprotocols=bad)
        assert e.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as e:
        connect(ws_url(auth_server, sid, f"?api_key={WRONG}"), proxy=None)
    assert e.value.response.status_code == 401


def test_health_readiness_docs_and_the_page_need_no_key(http):
    anyone = http[None]
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json", "/playground",
                 "/playground/app.js", "/favicon.ico"):
        assert anyone.get(path).status_code == 200, path
    assert anyone.get("/", follow_redirects=False).status_code == 307


def test_metrics_need_the_admin_key(http):
    assert_401(http[None].get("/metrics"), "v1", wrong_key=False)
    forbidden = http["alice"].get("/metrics")
    assert forbidden.status_code == 403 and v1_code(forbidden) == "forbidden"
    page = http["ops"].get("/metrics")
    assert page.status_code == 200 and "carousel_requests_total" in page.text
    refused = [line for line in page.text.splitlines()
               if line.startswith("carousel_requests_total") and 'status="401"' in line]
    assert refused and sum(float(line.rsplit(" ", 1)[1]) for line in refused) >= 2


# ----------------------------------------------------------------------- where keys travel


def test_keys_travel_in_either_header_and_either_key_of_a_tenant_works(auth_server, keys,
                                                                       tiny, check):
    sids = []
    for key, header in [(keys["alice"], "Authorization"), (keys["alice2"], "X-API-Key"),
                        (keys["dev"], "Authorization")]:
        with client_for(auth_server, key, header) as c:
            sid = create(c, text="keys")
            out = c.post(f"/v1/sessions/{sid}/step", json={"text": "!", "return_logits": True})
            assert out.status_code == 200, out.text
            check.logits(out.json()["logits"], tiny["tinylstm"].last("keys!"))
            sids.append(sid)
    with client_for(auth_server, keys["alice2"]) as other_key:  # one tenant, two keys
        assert other_key.get(f"/v1/sessions/{sids[0]}").status_code == 200
    with client_for(auth_server, keys["alice"]) as alice:  # dev is another tenant
        assert v1_code(alice.get(f"/v1/sessions/{sids[2]}")) == "unknown_session"


def test_a_websocket_takes_the_key_four_ways(auth_server, http, keys, tiny, check):
    key = keys["alice"]
    sid = create(http["alice"], text="ws")
    history = "ws"
    ways = [
        dict(additional_headers={"Authorization": f"Bearer {key}"}),
        dict(additional_headers={"X-API-Key": key}),
        dict(subprotocols=["carousel", f"carousel.key.{key}"]),
        dict(query=f"?api_key={key}"),
    ]
    for way in ways:
        query = way.pop("query", "")
        with connect(ws_url(auth_server, sid, query), proxy=None, **way) as ws:
            if "subprotocols" in way:  # the non-secret one comes back, never the key's
                assert ws.subprotocol == "carousel"
                assert key not in str(ws.response.headers)
            ws.send(json.dumps({"text": "+", "return_logits": True}))
            history += "+"
            answer = json.loads(ws.recv(timeout=60))
            assert answer["position"] == len(history), answer
            check.logits(answer["logits"], tiny["tinylstm"].last(history))


def test_the_sdk_sends_its_key_on_requests_and_the_websocket(auth_server, keys, tiny, check):
    with Client(auth_server.url, api_key=keys["alice"], trust_env=False) as client:
        with client.session("tinylstm", "sdk") as session:
            session.step(" http")
            with session.websocket() as ws:
                answer = ws.step(" ws")
                pieces = list(ws.stream(max_tokens=5, temperature=0, seed=1))
            assert answer.position == len(encode("sdk http ws"))
            assert session.sync_position() == answer.position + 5 and pieces
    for key in (None, WRONG):
        with Client(auth_server.url, api_key=key, trust_env=False) as client:
            with pytest.raises(Unauthorized) as e:
                client.models()
            assert e.value.status == 401 and e.value.code == "unauthorized"


def test_the_openai_package_and_tritonclient_use_the_key(auth_server, keys, tiny):
    with openai.OpenAI(base_url=auth_server.url + "/openai/v1", api_key=keys["alice"],
                       max_retries=0) as client:
        done = client.completions.create(model="tinylstm", prompt="abc", max_tokens=3,
                                         temperature=0)
        assert done.usage.completion_tokens == 3
    with openai.OpenAI(base_url=auth_server.url + "/openai/v1", api_key=WRONG,
                       max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    c = triton.InferenceServerClient(auth_server.url.removeprefix("http://"))
    try:
        x = triton.InferInput("tokens", [1, 3], "INT64")
        x.set_data_from_numpy(np.array([encode("abc")], dtype=np.int64))
        out = c.infer("tinylstm", [x], headers={"X-API-Key": keys["alice"]})
        np.testing.assert_allclose(out.as_numpy("logits")[0], tiny["tinylstm"].last("abc"),
                                   atol=1e-4)
        with pytest.raises(InferenceServerException) as e:
            c.infer("tinylstm", [x])
        assert e.value.status() == "401"
    finally:
        c.close()


# ----------------------------------------------------------------------- limits


def test_the_request_bucket_answers_429_with_retry_after_in_every_protocol(auth_server, http):
    slow = http["slow"]
    assert slow.get("/v1/models").status_code == 200
    assert slow.get("/v2/models/tinylstm").status_code == 200  # the burst of 2 is spent
    for path, protocol in [("/v1/models", "v1"), ("/v2/models/tinylstm", "v2"),
                           ("/openai/v1/models", "openai")]:
        resp = slow.get(path)
        assert resp.status_code == 429, resp.text
        assert int(resp.headers["retry-after"]) >= 50  # 0.01 per second: ~100 s for one
        error = resp.json()["error"]
        assert ("tenant 'slow'" in error) if protocol == "v2" else (
            error["code"] == "rate_limited"), error
    with pytest.raises(InvalidStatus) as e:
        connect(ws_url(auth_server, "any"), proxy=None,
                additional_headers={"Authorization": f"Bearer {auth_server_key(http, 'slow')}"})
    assert e.value.response.status_code == 429
    assert http["alice"].get("/v1/models").status_code == 200  # other tenants unaffected


def auth_server_key(http, name: str) -> str:
    return http[name].headers["Authorization"].removeprefix("Bearer ")


def test_each_websocket_frame_is_a_request(auth_server, http):
    chatty = http["chatty"]
    sid = create(chatty)  # 1 of 4
    key = auth_server_key(http, "chatty")
    with connect(ws_url(auth_server, sid), proxy=None,
                 additional_headers={"Authorization": f"Bearer {key}"}) as ws:  # 2
        answers = []
        for text in "abcd":  # 3, 4, then refused, refused: the socket stays open
            ws.send(json.dumps({"text": text}))
            answers.append(json.loads(ws.recv(timeout=60)))
    assert [a.get("position") for a in answers[:2]] == [1, 2]
    assert [a["error"]["code"] for a in answers[2:]] == ["rate_limited"] * 2


def test_the_token_bucket_refuses_work_it_cannot_pay_for_and_changes_nothing(http, tiny,
                                                                           check):
    thrifty = http["thrifty"]
    sid = create(thrifty, text="sixsix")  # 6 of 10 tokens
    resp = thrifty.post(f"/v1/sessions/{sid}/step", json={"text": "fives"})
    assert resp.status_code == 429 and v1_code(resp) == "rate_limited"
    assert int(resp.headers["retry-after"]) >= 1
    assert thrifty.get(f"/v1/sessions/{sid}").json()["position"] == 6  # nothing applied
    out = thrifty.post(f"/v1/sessions/{sid}/step", json={"text": "four", "return_logits": True})
    assert out.status_code == 200  # exactly what was left
    check.logits(out.json()["logits"], tiny["tinylstm"].last("sixsixfour"))
    for resp in [thrifty.post("/v1/models/tinylstm/predict", json={"text": "a"}),
                 thrifty.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 1}),
                 thrifty.post("/openai/v1/completions",
                              json={"model": "tinylstm", "prompt": "a", "max_tokens": 1})]:
        assert resp.status_code == 429, resp.text
    v2 = thrifty.post("/v2/models/tinylstm/infer", json={"inputs": [
        {"name": "tokens", "datatype": "INT64", "shape": [1, 1], "data": [97]}]})
    assert v2.status_code == 429 and "tokens/s" in v2.json()["error"]
    assert thrifty.get(f"/v1/sessions/{sid}").json()["position"] == 10


def test_the_session_cap_is_429_tenant_limit_and_frees_up_as_sessions_go(auth_server, http):
    capped = http["capped"]
    first, second = create(capped), create(capped)
    refused = [
        ("v1", capped.post("/v1/sessions", json={"model": "tinylstm"})),
        ("v1", capped.post(f"/v1/sessions/{first}/fork")),
        ("openai", capped.post("/openai/v1/completions",
                               json={"model": "tinylstm", "prompt": "a", "max_tokens": 1})),
        ("v2", capped.post("/v2/models/tinylstm/infer", json={
            "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 1], "data": [97]}],
            "parameters": {"sequence_id": 5, "sequence_start": True}})),
    ]
    for protocol, resp in refused:
        assert resp.status_code == 429 and int(resp.headers["retry-after"]) >= 1, resp.text
        error = resp.json()["error"]
        assert "maximum of 2 sessions" in (error if protocol == "v2" else error["message"])
        if protocol != "v2":
            assert error["code"] == "tenant_limit"
    assert http["alice"].post("/v1/sessions", json={"model": "tinylstm"}).status_code == 201
    assert capped.delete(f"/v1/sessions/{second}").status_code == 204
    create(capped)
    assert capped.post("/v1/sessions", json={"model": "tinylstm"}).status_code == 429
    with Client(auth_server.url, api_key=auth_server_key(http, "capped"),
                trust_env=False) as client:
        with pytest.raises(RateLimited) as e:
            client.session("tinylstm")
        assert (e.value.status, e.value.code) == (429, "tenant_limit") and e.value.retry_after


def test_the_generation_cap_counts_generations_while_they_run(auth_server, http):
    onegen = http["onegen"]
    running_on, other = create(onegen, "utf8cycle", text="x"), create(onegen, "utf8cycle",
                                                                      text="y")
    body = {"max_tokens": LONG_GENERATION, "temperature": 0, "stream": True}
    with onegen.stream("POST", f"/v1/sessions/{running_on}/generate", json=body) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        next(lines)  # it runs; a reader keeps up with it until the stream is closed below
        reader = threading.Thread(target=drain, args=(lines,), daemon=True)
        reader.start()
        resp = onegen.post(f"/v1/sessions/{other}/generate", json={"max_tokens": 2})
        assert resp.status_code == 429 and v1_code(resp) == "tenant_limit", resp.text
        assert resp.headers["retry-after"] == "1"
        completion = onegen.post("/openai/v1/completions", json={
            "model": "utf8cycle", "prompt": "", "max_tokens": 2,
            "carousel": {"session_id": other}})
        assert completion.status_code == 429
        key = auth_server_key(http, "onegen")
        with connect(ws_url(auth_server, other), proxy=None,
                     additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            ws.send(json.dumps({"generate": {"max_tokens": 2}}))
            assert json.loads(ws.recv(timeout=60))["error"]["code"] == "tenant_limit"
        # another tenant generates meanwhile
        alice_sid = create(http["alice"], "utf8cycle", text="z")
        assert http["alice"].post(f"/v1/sessions/{alice_sid}/generate",
                                  json={"max_tokens": 2}).status_code == 200
    reader.join(timeout=60)
    # the stream is closed: its generation stops, and the tenant may start another
    deadline = time.monotonic() + 60
    while (resp := onegen.post(f"/v1/sessions/{other}/generate",
                               json={"max_tokens": 2})).status_code == 429:
        assert time.monotonic() < deadline, "the closed stream's generation never ended"
        time.sleep(0.1)
    assert resp.status_code == 200 and resp.json()["position"] == 3


def drain(lines) -> None:
    with contextlib.suppress(httpx.HTTPError, RuntimeError):
        for _ in lines:
            pass


# ----------------------------------------------------------------------- SIGHUP


@pytest.fixture(scope="module")
def reload_setup(start_server, tiny_repo, check, tmp_path_factory):
    keys = {name: secrets.token_urlsafe(24) for name in ("old", "new", "bob", "carol")}
    path = tmp_path_factory.mktemp("reload") / "keys.toml"
    path.write_text(keys_toml({"alice": [keys["old"]], "bob": [keys["bob"]]}))
    server = start_server("reload", {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]),
                                     **check.LIMITS, "CAROUSEL_API_KEYS_FILE": str(path),
                                     "CAROUSEL_ACCESS_LOG": "true"})
    return server, keys, path


def wait_for(condition, what: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def test_sighup_adds_and_revokes_keys_without_dropping_sessions(reload_setup, tiny, check):
    server, keys, path = reload_setup
    old, new, bob = (client_for(server, keys[k]) for k in ("old", "new", "bob"))
    carol = client_for(server, keys["carol"])
    with old, new, bob, carol:
        alice_sid, bob_sid = create(old, text="before"), create(bob, "tinygru", text="bob")
        ws = connect(ws_url(server, alice_sid), proxy=None,
                     additional_headers={"Authorization": f"Bearer {keys['old']}"})
        ws.send(json.dumps({"text": " the"}))
        assert json.loads(ws.recv(timeout=60))["position"] == len("before the")
        sdk = Client(server.url, api_key=keys["old"], trust_env=False)
        sdk_session = sdk.attach(create(old, text="sdk"))
        sdk_socket = sdk_session.websocket().__enter__()
        assert sdk_socket.step("!").position == len("sdk!")

        # rotate alice's key, add carol
        path.write_text(keys_toml({"alice": [keys["new"]], "bob": [keys["bob"]],
                                   "carol": [keys["carol"]]}))
        server.signal(signal.SIGHUP)
        wait_for(lambda: carol.get("/v1/models").status_code == 200, "carol's key works")
        assert old.get("/v1/models").status_code == 401
        assert server.proc.poll() is None  # SIGHUP did not end the process
        out = new.post(f"/v1/sessions/{alice_sid}/step", json={"text": " reload",
                                                                "return_logits": True})
        assert out.status_code == 200, out.text  # the session outlived its key
        check.logits(out.json()["logits"], tiny["tinylstm"].last("before the reload"))
        # the sockets opened with the revoked key are refused at their next frame
        ws.send(json.dumps({"text": "!"}))
        assert json.loads(ws.recv(timeout=60))["error"]["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=60)
        assert closed.value.rcvd.code == 4401
        with pytest.raises(Unauthorized):
            sdk_socket.step("?")
        sdk_socket.close()
        sdk.close()
        assert new.get(f"/v1/sessions/{alice_sid}").json()["position"] == len("before the reload")

        # a tenant removed and brought back finds its sessions where they were
        path.write_text(keys_toml({"alice": [keys["new"]]}))
        server.signal(signal.SIGHUP)
        wait_for(lambda: bob.get("/v1/models").status_code == 401, "bob's key is revoked")
        path.write_text(keys_toml({"alice": [keys["new"]], "bob": [keys["bob"]]}))
        server.signal(signal.SIGHUP)
        wait_for(lambda: bob.get("/v1/models").status_code == 200, "bob's key is back")
        out = bob.post(f"/v1/sessions/{bob_sid}/step", json={"text": "!", "return_logits": True})
        check.logits(out.json()["logits"], tiny["tinygru"].last("bob!"))

        # a broken file keeps the keys in force, and the log says why
        path.write_text(keys_toml({"alice": [keys["old"]]}) + "\n[tenants.bob\n")
        server.signal(signal.SIGHUP)
        wait_for(lambda: "keys file not reloaded" in server.log(400), "the warning")
        assert new.get("/v1/models").status_code == 200
        assert old.get("/v1/models").status_code == 401


# ----------------------------------------------------------------------- start-up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(host: str, port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CAROUSEL_")}
    full.update(env)
    with open(log, "wb") as out:
        return subprocess.Popen([str(CAROUSEL), "serve", "--host", host, "--port", str(port)],
                                env=full, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_no_keys_on_a_non_loopback_address_refuses_to_start(tiny_repo, tmp_path, host):
    log = tmp_path / "refused.log"
    proc = serve(host, free_port(), {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0])}, log)
    assert proc.wait(timeout=120) == 2
    text = log.read_text()
    assert f"refusing to serve on {host}, a non-loopback address, without API keys" in text
    assert "CAROUSEL_API_KEYS_FILE=" in text and "CAROUSEL_API_KEYS=tenant:KEY" in text
    assert "CAROUSEL_ALLOW_UNAUTHENTICATED=true" in text
    assert "Uvicorn running" not in text and "loaded" not in text  # refused before anything


def test_the_explicit_opt_out_starts_unauthenticated_and_says_so(tiny_repo, tmp_path):
    port = free_port()
    log = tmp_path / "open.log"
    proc = serve("0.0.0.0", port, {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]),
                                   "CAROUSEL_ALLOW_UNAUTHENTICATED": "true"}, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: proc.poll() is not None or _status(url + "/readyz") == 200,
                 "the server is ready", limit_s=120)
        assert proc.poll() is None, log.read_text()
        assert _status(url + "/v1/models") == 200  # no key needed
        assert "WITHOUT authentication (CAROUSEL_ALLOW_UNAUTHENTICATED)" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5, trust_env=False).status_code
    except httpx.TransportError:
        return None


# ----------------------------------------------------------------------- logs (last)


def test_no_key_ever_reaches_the_log(auth_server, reload_setup, keys):
    """Last: after every test above sent its keys every way a key can travel."""
    _, reload_keys, _ = reload_setup
    logs = {"auth": auth_server.log_path.read_text(errors="replace"),
            "reload": reload_setup[0].log_path.read_text(errors="replace")}
    assert '"WebSocket /v1/sessions/' in logs["auth"]  # the access log was on
    assert re.search(r'"(GET|POST) /v1/', logs["auth"])
    for name, text in logs.items():
        for key in [*keys.values(), *reload_keys.values(), WRONG]:
            assert key not in text, f"a key in the {name} server's log"
        assert "ASGI callable returned without completing handshake" not in text
