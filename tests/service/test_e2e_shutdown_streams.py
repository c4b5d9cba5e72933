"""SIGTERM with streams that outlive the grace period: every one of them ends with its final
event, finish reason `shutdown` (SSE `event: end`, the WebSocket end frame, the OpenAI
stream's last chunk then `[DONE]`) at the position of the last token its client was sent, and the
process exits 0 with no traceback in its log."""

from __future__ import annotations

import json
import signal
import threading

import httpx
from websockets.sync.client import connect

STREAMS_EACH = 6  # of each kind: 18 streams in all
GRACE_S = 1.0


def test_streams_still_running_at_the_end_of_the_grace_period_end_with_shutdown(
        start_server, tiny_repo, api_factory, check):
    server = start_server("shutdown-streams", {
        "CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]), **check.LIMITS,
        "CAROUSEL_MAX_GENERATE_TOKENS": "10000000", "CAROUSEL_SHUTDOWN_GRACE_S": str(GRACE_S)})
    api = api_factory(server)
    started = threading.Barrier(3 * STREAMS_EACH + 1, timeout=120)
    results: dict[str, list] = {"sse": [], "ws": [], "openai": []}
    lock = threading.Lock()

    def sse() -> None:
        sid = api.create_session("utf8cycle", text="go")["session_id"]
        last, end = None, None
        with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as c:
            body = {"max_tokens": 10_000_000, "seed": 1, "stream": True}
            with c.stream("POST", f"/v1/sessions/{sid}/generate", json=body) as r:
                lines = r.iter_lines()
                event = None
                for line in lines:
                    if line.startswith("data:") and last is None:
                        started.wait()
                    if line.startswith("event:"):
                        event = line.split(":", 1)[1].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line[5:])
                        if event == "end":
                            end = data
                        else:
                            last = data
        with lock:
            results["sse"].append((sid, last, end))

    def ws() -> None:
        sid = api.create_session("utf8cycle", text="go")["session_id"]
        last = end = None
        with connect(f"{server.ws_url}/v1/sessions/{sid}/ws", proxy=None) as sock:
            sock.send(json.dumps({"generate": {"max_tokens": 10_000_000, "seed": 1}}))
            while True:
                frame = json.loads(sock.recv(timeout=120))
                if last is None:
                    started.wait()
                if frame.get("event") == "end":
                    end = frame
                    break
                last = frame
        with lock:
            results["ws"].append((sid, last, end))

    def openai() -> None:
        chunks, done = [], False
        with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as c:
            body = {"model": "utf8cycle", "prompt": "go", "max_tokens": 10_000_000,
                    "seed": 1, "stream": True}
            with c.stream("POST", "/openai/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    if not chunks:
                        started.wait()
                    if line == "data: [DONE]":
                        done = True
                        continue
                    assert not done, "a chunk after [DONE]"
                    chunks.append(json.loads(line[5:]))
        with lock:
            results["openai"].append((chunks, done))

    threads = [threading.Thread(target=f) for f in (sse, ws, openai) for _ in range(STREAMS_EACH)]
    for t in threads:
        t.start()
    started.wait()  # every stream is under way
    server.signal(signal.SIGTERM)
    for t in threads:
        t.join(180)
    assert server.proc.wait(timeout=120) == 0, server.log()

    for kind in ("sse", "ws"):
        assert len(results[kind]) == STREAMS_EACH, results[kind]
        for _sid, last, end in results[kind]:
            assert end is not None, f"a {kind} stream was cut without its end"
            assert end["finish_reason"] == "shutdown", end
            assert end["position"] == last["position"], (end, last)  # nothing unseen fed
    assert len(results["openai"]) == STREAMS_EACH
    for chunks, done in results["openai"]:
        assert done, "an OpenAI stream ended without [DONE]"
        assert chunks[-1]["choices"][0]["finish_reason"] == "shutdown", chunks[-1]
    log = server.log_path.read_text()
    assert "Traceback" not in log, server.log(200)
    assert "ERROR" not in log, server.log(200)
