"""What goes over the wire besides the API calls themselves: the API key on every request
and WebSocket handshake (seen by a proxy that records request headers), one pool of reused
connections, and the SDK's errors for a server that is down or answers what the API does
not say (a small broken HTTP server, never carousel), never a bare KeyError or
JSONDecodeError."""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading

import pytest
from carousel_client import (
    ApiError,
    AsyncClient,
    CarouselError,
    Client,
    ConnectionFailed,
    GatewayError,
    ProtocolError,
    Retry,
    ServerError,
    TransportError,
)


def test_the_api_key_goes_on_every_request_and_handshake(server, proxy):
    with Client(proxy.url, api_key="sk-test-1", trust_env=False) as client:
        client.models()
        client.predict("tinylstm", "abc")
        with client.session("utf8cycle", "x") as s:
            s.step("y")
            list(s.stream(max_tokens=3, temperature=0))
            with s.websocket() as ws:
                ws.step("z")
            s.fork().delete()

    async def main() -> None:
        async with AsyncClient(proxy.url, api_key="sk-test-2", trust_env=False) as client:
            async with client.session("tinygru", "a") as s, s.websocket() as ws:
                await ws.step("b")
                await s.step("c")

    asyncio.run(main())
    seen = {(r.method, r.path.split("/")[-1], r.headers.get("authorization"))
            for r in proxy.requests}
    assert {auth for *_, auth in seen} == {"Bearer sk-test-1", "Bearer sk-test-2"}, seen
    kinds = {(method, last) for method, last, _ in seen}
    assert {("GET", "models"), ("POST", "predict"), ("POST", "sessions"), ("POST", "step"),
            ("POST", "generate"), ("GET", "ws"), ("POST", "fork"), ("DELETE", s.id)} <= kinds


def test_requests_share_connections(server, proxy):
    with Client(proxy.url, trust_env=False) as client:
        for _ in range(10):
            client.models()
    assert proxy.stats["requests"] == 10 and proxy.stats["connections"] == 1, proxy.stats


def test_no_api_key_sends_no_authorization(server, proxy):
    with Client(proxy.url, trust_env=False) as client:
        client.models()
    assert all("authorization" not in r.headers for r in proxy.requests)


def test_a_server_that_is_down_is_a_connection_error():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", retry=Retry(attempts=3, backoff_s=0.01),
                trust_env=False) as client:
        with pytest.raises(ConnectionFailed) as e:
            client.models()
    assert e.value.code == "connection_error" and e.value.status is None
    assert not e.value.may_have_applied


class BrokenServer(http.server.ThreadingHTTPServer):
    """Answers every request with the canned (status, headers, body) for its path."""

    def __init__(self, answers: dict[str, tuple[int, dict, bytes]]) -> None:
        answers_ = answers

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the stdlib's spelling)
                self.answer()

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("content-length", 0))
                self.rfile.read(length)
                self.answer()

            def answer(self):
                status, headers, body = answers_.get(self.path, (404, {}, b"nothing here"))
                self.send_response(status)
                for k, v in {"content-length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


SESSION = {"session_id": "s1", "model": "m", "version": 1, "position": 0,
           "created_at": "2026-01-01T00:00:00.000Z", "last_used_at": "2026-01-01T00:00:00.000Z",
           "expires_at": "2026-01-01T01:00:00.000Z", "ttl_s": 3600}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def broken():
    server = BrokenServer({
        "/v1/models": (200, JSON, b"<html>not json</html>"),
        "/v1/models/half": (200, JSON, json.dumps({"name": "half"}).encode()),
        "/v1/models/list/predict": (200, JSON, b"[1, 2]"),
        "/v1/models/teapot/predict": (418, JSON, json.dumps(
            {"error": {"code": "i_am_a_teapot", "message": "short and stout"}}).encode()),
        "/v1/models/html/predict": (500, {"content-type": "text/html"}, b"<h1>oops</h1>"),
        "/v1/models/crash/predict": (500, JSON, json.dumps(
            {"error": {"code": "internal_error", "message": "a bug"}}).encode()),
        "/v1/models/gone/predict": (502, {"content-type": "text/html"}, b"<h1>Bad Gateway</h1>"),
        "/v1/models/slow/predict": (504, JSON, json.dumps(
            {"error": {"code": "gateway_timeout", "message": "no answer in time"}}).encode()),
        "/v1/sessions": (201, JSON, json.dumps(SESSION).encode()),
        "/v1/sessions/s1/step": (200, JSON, json.dumps({"session_id": "s1", "position": "3",
                                                        "top_k": []}).encode()),
        "/v1/sessions/s1/generate": (200, {"content-type": "text/event-stream"},
                                     b'data: {"token": 65, "position": 1}\n\ndata: {oops\n\n'),
    })
    yield server
    server.shutdown()


def test_answers_the_api_does_not_promise_raise_protocol_errors(broken):
    with Client(broken.url, retry=Retry(attempts=1), trust_env=False) as client:
        with pytest.raises(ProtocolError) as e:
            client.models()
        assert (e.value.code, e.value.status) == ("bad_response", 200)
        with pytest.raises(ProtocolError, match="name"):
            client.model("half")
        with pytest.raises(ProtocolError):
            client.predict("list", "a")
        with pytest.raises(ProtocolError) as e:
            client.predict("html", "a")
        assert e.value.status == 500
        session = client.session("m")
        with pytest.raises(ProtocolError):
            session.step("abc")  # position "3" is not an integer
        with pytest.raises(CarouselError) as e:
            list(client.session("m").stream(max_tokens=2))  # a token, then bad JSON
        assert e.value.code == "interrupted" and e.value.cause.code == "bad_response"


def test_error_envelopes_keep_the_servers_code_and_status(broken):
    with Client(broken.url, retry=Retry(attempts=1), trust_env=False) as client:
        with pytest.raises(ApiError) as e:
            client.predict("teapot", "a")
        assert (e.value.code, e.value.status, e.value.message) == (
            "i_am_a_teapot", 418, "short and stout")
        with pytest.raises(ServerError) as e:
            client.predict("crash", "a")
        assert (e.value.code, e.value.status) == ("internal_error", 500)


def test_a_gateways_502_or_504_is_a_lost_answer_and_retried(broken):
    """A load balancer's 502/504 (its body in the API's shape or not) says the server's
    answer was lost: a GatewayError that may have applied, retried like a dropped
    connection for what is safe to resend."""
    seen = []
    retry = Retry(attempts=3, backoff_s=0.01, on_retry=lambda e, n, w: seen.append(e.code))
    with Client(broken.url, retry=retry, trust_env=False) as client:
        with pytest.raises(GatewayError) as e:
            client.predict("gone", "a")
        assert (e.value.code, e.value.status, e.value.may_have_applied) == (
            "bad_gateway", 502, True)
        assert isinstance(e.value, TransportError)
        with pytest.raises(GatewayError) as e:
            client.predict("slow", "a")
        assert (e.value.code, e.value.status, e.value.message) == (
            "gateway_timeout", 504, "no answer in time")
    assert seen == ["bad_gateway"] * 2 + ["gateway_timeout"] * 2  # 3 tries each
