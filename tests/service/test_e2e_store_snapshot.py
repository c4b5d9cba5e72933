"""The memory store's snapshot at process level: a server stopped with SIGTERM writes every
live session to CAROUSEL_SNAPSHOT_PATH and the next one, started on it, carries on from
exactly where each session was (a rolling restart of a single node loses nothing);
sessions that expired meanwhile are gone; a corrupt snapshot is set aside with a warning
and the server starts empty, never crashes."""

from __future__ import annotations

import signal
import time

from carousel.model.model import encode


def start(start_server, tiny_repo, check, path, name: str):
    return start_server(name, {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]), **check.LIMITS,
                               "CAROUSEL_SNAPSHOT_PATH": str(path)})


def stop(server) -> None:
    server.signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, server.log()


def test_a_restart_keeps_every_session(start_server, api_factory, tiny_repo, tiny, check,
                                       tmp_path):
    path = tmp_path / "state" / "sessions.snap"
    first = api_factory(start(start_server, tiny_repo, check, path, "snap-1"))
    texts = {}
    for i, model in enumerate(["tinylstm", "tinygru", "tinylstm"]):
        sid = first.create_session(model, text=f"session {i}")["session_id"]
        first.step(sid, text=" was here", position=len(f"session {i}"))
        texts[sid] = (model, f"session {i} was here")
    generated = first.create_session("tinylstm", text="gen")["session_id"]
    out = first.generate(generated, max_tokens=12, temperature=0.0)
    texts[generated] = ("tinylstm", encode("gen") + out["tokens"])
    brief = first.create_session("tinylstm", text="brief", ttl_s=1)["session_id"]
    before = {sid: first.session(sid) for sid in texts}
    stop(first.server)
    assert path.exists() and "sessions written" in first.server.log()

    time.sleep(1.2)  # `brief` expires while no server runs
    second = api_factory(start(start_server, tiny_repo, check, path, "snap-2"))
    assert not path.exists(), "a loaded snapshot is removed"
    second.expect_error(second.http.get(f"/v1/sessions/{brief}"), 404, code="unknown_session")
    for sid, (model, text) in texts.items():
        now = second.session(sid)
        assert {k: now[k] for k in ("position", "created_at", "ttl_s", "model", "version")} == \
            {k: before[sid][k] for k in ("position", "created_at", "ttl_s", "model", "version")}
        tokens = encode(text) if isinstance(text, str) else text
        if isinstance(text, str):  # the last step before the restart, retried: recognised
            again = second.step(sid, text=" was here", position=len(tokens) - 9)
            assert again["position"] == len(tokens) == second.position(sid)
        out = second.step(sid, text="!", position=len(tokens), return_logits=True)
        check.logits(out["logits"], tiny[model].last(tokens + [33]), f"{sid} after restart")
    stop(second.server)


def test_a_corrupt_snapshot_is_set_aside_and_the_server_starts_empty(
        start_server, api_factory, tiny_repo, check, tmp_path):
    path = tmp_path / "sessions.snap"
    path.write_bytes(b"carousel-snapshot 1\n" + b"\x07" * 100)
    server = start(start_server, tiny_repo, check, path, "snap-corrupt")
    api = api_factory(server)
    assert api.http.get("/readyz").status_code == 200
    assert "set aside" in server.log()
    aside = list(tmp_path.glob("sessions.snap.bad-*"))
    assert len(aside) == 1 and not path.exists()
    assert api.create_session("tinylstm", text="fresh")["position"] == 5
    stop(server)
    assert path.exists(), "the next shutdown writes a good one"
