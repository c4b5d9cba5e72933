"""SIGTERM drains: /readyz turns 503 and new work is refused, while a stream in flight
finishes with its end event; then the process exits 0."""

from __future__ import annotations

import signal
import time

import httpx
from carousel.model.model import encode

TOKENS = 10000  # long enough that the stream is still running when the signal lands


def test_sigterm_drains_an_inflight_stream(start_server, tiny_repo, api_factory, check):
    server = start_server("sigterm", {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]),
                                      **check.LIMITS})
    api = api_factory(server)
    sid = api.create_session("tinylstm", text="drain")["session_id"]
    other = api.create_session("tinygru", text="idle")["session_id"]

    received, end = [], None
    with api.stream(sid, max_tokens=TOKENS, seed=9) as events:
        for _, data in events:
            received.append(data)
            if len(received) == 5:
                break
        server.signal(signal.SIGTERM)

        # While the stream is in flight: not ready, and new work is refused.
        with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as fresh:
            for _ in range(200):
                ready = fresh.get("/readyz")
                if ready.status_code == 503:
                    break
                time.sleep(0.01)
            assert ready.status_code == 503, ready.text
            api.expect_error(fresh.post("/v1/sessions", json={"model": "tinylstm"}), 503)
            api.expect_error(fresh.post(f"/v1/sessions/{other}/step", json={"text": "x"}), 503)

        # The stream goes on to its end.
        for event, data in events:
            if event == "end":
                end = data
                break
            received.append(data)

    assert end is not None, "the stream was cut without its end event"
    assert len(received) == TOKENS, len(received)
    assert [d["position"] for d in received] == list(
        range(len(encode("drain")) + 1, len(encode("drain")) + TOKENS + 1))
    assert end["position"] == len(encode("drain")) + TOKENS
    assert server.proc.wait(timeout=90) == 0, server.log()
