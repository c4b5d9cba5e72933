"""Connection-level limits and the per-session waiting bound, against a real server with small
limits, through raw sockets: each limit refuses with its JSON error (or closes an idle
connection), the server stays healthy, and a victim session's state is what it was.

Nothing here asserts how fast anything happened: a slow connection is sent bytes until the
server closes it, within a generous bound, and the test checks that it was closed and why.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

HEADER_TIMEOUT, BODY_TIMEOUT, KEEP_ALIVE = 1.0, 1.0, 2.0
MAX_CONNECTIONS, MAX_HEADER_BYTES, MAX_HEADERS, MAX_WAITING = 64, 8192, 32, 2
PRIME, PROBE = "victim", " probe"


@pytest.fixture(scope="module")
def limited(start_server, tiny_repo, check):
    return start_server("limited", {
        "CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]), **check.LIMITS,
        "CAROUSEL_MAX_GENERATE_TOKENS": "1000000",
        "CAROUSEL_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT),
        "CAROUSEL_BODY_TIMEOUT_S": str(BODY_TIMEOUT),
        "CAROUSEL_KEEP_ALIVE_TIMEOUT_S": str(KEEP_ALIVE),
        "CAROUSEL_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "CAROUSEL_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
        "CAROUSEL_MAX_HEADERS": str(MAX_HEADERS),
        "CAROUSEL_MAX_WAITING_PER_SESSION": str(MAX_WAITING),
    })


@pytest.fixture(scope="module")
def lapi(limited, api_factory):
    return api_factory(limited)


@pytest.fixture
def victim(lapi, tiny, check):
    """A session the attacks must leave exactly as it was."""
    sid = lapi.create_session("tinylstm", text=PRIME)["session_id"]
    yield sid
    assert lapi.position(sid) == len(PRIME)
    out = lapi.step(sid, text=PROBE, return_logits=True)
    check.logits(out["logits"], tiny["tinylstm"].last(PRIME + PROBE), "victim's next step")


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    return sock


def read_all(sock: socket.socket, limit_s: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(limit_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_answer(sock: socket.socket) -> bytes:
    """One whole answer on a connection left open: its headers and Content-Length bytes of
    body (which may come in a later segment than the headers)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
            next((line.split(b":", 1)[1] for line in data.split(b"\r\n")
                  if line.lower().startswith(b"content-length:")), b"0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def parse(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body[: int(headers["content-length"])])


def expect_refusal(raw: bytes, status: int, code: str) -> dict:
    got, headers, body = parse(raw)
    assert got == status, raw[:300]
    assert headers["content-type"] == "application/json", headers
    assert headers["connection"] == "close", headers
    assert body["error"]["code"] == code and body["error"]["message"], body
    return headers


def healthy(server) -> None:
    assert httpx.get(server.url + "/healthz", timeout=30, trust_env=False).status_code == 200


def refusals(lapi, reason: str) -> float:
    return lapi.metrics().total("connections", "refused", reason=reason)


# ------------------------------------------------------------------------------ slow clients


def test_slowloris_headers_get_408_and_the_connection_is_closed(limited, lapi, victim):
    before = refusals(lapi, "request_timeout")
    sock = connect(limited)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    sent, deadline = 0, time.monotonic() + 30 * HEADER_TIMEOUT
    try:  # one header byte at a time, never the end of the headers
        while time.monotonic() < deadline:
            sock.sendall(b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"[sent % 49:][:1])
            sent += 1
            time.sleep(0.05)
    except OSError:
        pass  # the server stopped reading
    expect_refusal(read_all(sock), 408, "request_timeout")
    assert sent < 49 * 30, "the slow headers were never refused"
    assert refusals(lapi, "request_timeout") == before + 1
    healthy(limited)


def test_slow_body_gets_408(limited, lapi, victim):
    sock = connect(limited)
    body = json.dumps({"text": "x" * 40}).encode()
    sock.sendall(f"POST /v1/sessions/{victim}/step HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                 .encode())
    try:
        for byte in body[:-1]:  # never the last byte
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
    except OSError:
        pass
    expect_refusal(read_all(sock), 408, "request_timeout")
    healthy(limited)


def test_a_connection_that_sends_nothing_is_closed(limited):
    sock = connect(limited)
    assert read_all(sock) == b""  # closed by the server, with nothing to say


def test_an_idle_keep_alive_connection_is_closed(limited):
    sock = connect(limited)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    raw = read_all(sock)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    assert raw.endswith(b'{"status":"ok"}'), raw[-200:]


# ------------------------------------------------------------------------------ big headers


def send_and_read(server, request: bytes) -> bytes:
    """Send `request` while reading the answer (the server answers before reading it all)."""
    sock = connect(server)
    answer: list[bytes] = []
    reader = threading.Thread(target=lambda: answer.append(read_all(sock)))
    reader.start()
    try:
        sock.sendall(request)
    except OSError:
        pass  # refused mid-send: the answer is what matters
    reader.join(60)
    sock.close()
    return answer[0]


def rss_bytes(server) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def test_a_10mb_header_gets_431_and_costs_no_memory(limited, lapi, victim):
    before = refusals(lapi, "headers_too_large")
    rss = rss_bytes(limited)
    request = (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 10_000_000
               + b"\r\n\r\n")
    answers: list[bytes] = []
    threads = [threading.Thread(target=lambda: answers.append(send_and_read(limited, request)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(answers) == 8
    for raw in answers:
        expect_refusal(raw, 431, "headers_too_large")
    # Eight 10 MB headers held would be 80 MB; read up to the limit and dropped, they cost
    # what a few read buffers do.
    assert rss_bytes(limited) - rss < 30_000_000, (rss, rss_bytes(limited))
    assert refusals(lapi, "headers_too_large") == before + 8
    healthy(limited)


def test_too_many_headers_get_431(limited, victim):
    headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(100_000))
    raw = send_and_read(limited, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers
                        + b"\r\n")
    expect_refusal(raw, 431, "headers_too_large")
    # Under the byte limit but over the count: refused by the count.
    few = b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS + 1))
    assert len(few) < MAX_HEADER_BYTES
    raw = send_and_read(limited, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + few + b"\r\n")
    expect_refusal(raw, 431, "headers_too_large")
    healthy(limited)


def test_garbage_bytes_get_a_json_400(limited):
    raw = send_and_read(limited, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
    expect_refusal(raw, 400, "invalid_http")


# ------------------------------------------------------------------------------ many clients


def test_2000_idle_connections_are_bounded(limited, lapi, victim):
    before = refusals(lapi, "too_many_connections")
    socks = [connect(limited) for _ in range(2000)]
    try:
        answers = [None] * len(socks)

        def read(i: int) -> None:
            answers[i] = read_all(socks[i], 60)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(len(socks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for s in socks:
            s.close()
    refused = [a for a in answers if a]
    held = [a for a in answers if a == b""]  # accepted, then closed as idle
    assert len(refused) + len(held) == 2000
    assert len(held) <= MAX_CONNECTIONS, len(held)
    assert len(refused) >= 2000 - MAX_CONNECTIONS * 2, len(refused)
    for raw in refused[:20]:
        headers = expect_refusal(raw, 503, "too_many_connections")
        assert headers["retry-after"] == "1"
    assert refusals(lapi, "too_many_connections") == before + len(refused)
    healthy(limited)


# ------------------------------------------------------------------------------ one session


def test_requests_waiting_on_one_session_are_bounded(limited, lapi, check):
    """A generation holds the session; MAX_WAITING steps may wait behind it, the rest are
    429 session_busy at once (before their body is read), and change nothing."""
    sid = lapi.create_session("tinylstm", text=PRIME)["session_id"]
    extra = 3
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def step() -> None:
        with httpx.Client(base_url=limited.url, timeout=120, trust_env=False) as c:
            r = c.post(f"/v1/sessions/{sid}/step", json={"text": "!"})
        with lock:
            results.append(r)

    with lapi.stream(sid, max_tokens=1_000_000, seed=5) as events:
        next(events)  # the generation runs: it holds the session until it ends
        threads = [threading.Thread(target=step) for _ in range(MAX_WAITING + extra)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if len(results) >= extra:
                    break
            time.sleep(0.02)
        with lock:
            busy = list(results)
        assert len(busy) == extra, [r.status_code for r in busy]
        for r in busy:
            err = lapi.expect_error(r, 429, code="session_busy")
            assert "wait" in err["message"]
            assert r.headers["retry-after"] == "1"
        # A request over the bound is refused before its body is read: it never sends one.
        sock = connect(limited)
        sock.sendall(f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
                     .encode())
        sock.settimeout(30)
        status, _, body = parse(read_answer(sock))
        assert (status, body["error"]["code"]) == (429, "session_busy")
        sock.close()
    # Leaving the stream cancels the generation; the waiting steps then apply, in turn.
    for t in threads:
        t.join(120)
    ok = [r for r in results if r.status_code == 200]
    assert len(ok) == MAX_WAITING, [r.status_code for r in results]
    generated = lapi.position(sid) - len(PRIME) - MAX_WAITING
    assert generated >= 1
    assert sorted(r.json()["position"] for r in ok) == [
        len(PRIME) + generated + i + 1 for i in range(MAX_WAITING)]
