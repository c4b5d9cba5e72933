"""Portable sessions: `GET /v1/sessions/{id}/state` is an npz file whose documented arrays
are the model's own state (checked against PyTorch's), and `POST /v1/sessions` restores it
on another carousel (here one on the Redis store), raw or as {"state": base64}, continuing
exactly where it was. Another build of the model is 409, a malformed blob 400. The same for
a v2 sequence (GET / PUT /v2/models/{m}/sequences/{id}/state)."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from carousel.model.model import encode
from storekit import machine_db

MEDIA = "application/x-carousel-session+npz"
DB = 13


@pytest.fixture(scope="module")
def elsewhere(start_server, tiny_repo, check, api_factory):
    """Another carousel, on the Redis store: a session moves between stores too."""
    with machine_db(DB):
        server = start_server("portable-redis", {
            "CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]), **check.LIMITS,
            "CAROUSEL_STORE_URL": f"redis://127.0.0.1:6379/{DB}"})
        yield api_factory(server)
        server.stop()


def export(api, sid: str) -> bytes:
    r = api.http.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == MEDIA
    return r.content


def torch_state(ref, text: str):
    with torch.no_grad():
        _, state = ref.model(torch.tensor([encode(text)], dtype=torch.long))
    return [s.double().numpy() for s in state]  # (L, 1, H) each


@pytest.mark.parametrize("model,names", [("tinylstm", ["state_h", "state_c"]),
                                         ("tinygru", ["state_h"])])
def test_the_blob_is_the_models_own_state(api, tiny, tiny_repo, check, model, names):
    sid = api.create_session(model, text="portable state")["session_id"]
    api.step(sid, text="!", position=14)
    with np.load(io.BytesIO(export(api, sid)), allow_pickle=False) as npz:
        files = sorted(npz.files)
        meta = json.loads(str(npz["meta"][()]))
        arrays = {n: npz[n] for n in files}
    assert files == sorted(["meta", "last_logits", *(f"state/{n}" for n in names)])
    assert meta["format"] == "carousel-session" and meta["format_version"] == 1
    version = tiny[model].version
    assert (meta["model"], meta["version"], meta["position"], meta["session_id"]) == (
        model, version, 15, sid)
    manifest = tiny_repo[0] / model / str(version) / "manifest.json"
    assert meta["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    for name, expected in zip(names, torch_state(tiny[model], "portable state!"), strict=True):
        got = arrays[f"state/{name}"]
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert float(np.abs(got - expected).max()) <= 1e-4, name
    check.logits(arrays["last_logits"], tiny[model].last("portable state!"))


def test_a_session_moves_to_another_server_and_carries_on(api, elsewhere, tiny, check):
    sid = api.create_session("tinylstm", text="move me")["session_id"]
    blob = export(api, sid)
    raw = elsewhere.http.post("/v1/sessions", content=blob, headers={"content-type": MEDIA})
    as_json = elsewhere.post("/v1/sessions", {"state": base64.b64encode(blob).decode(),
                                              "ttl_s": 60})
    for r, ttl in ((raw, 3600.0), (as_json, 60.0)):
        moved = elsewhere.ok(r, 201)
        assert moved["session_id"] != sid and moved["position"] == 7 and moved["ttl_s"] == ttl
        assert (moved["model"], moved["version"]) == ("tinylstm", 2)
        out = elsewhere.step(moved["session_id"], text=" please", position=7,
                             return_logits=True)
        check.logits(out["logits"], tiny["tinylstm"].last("move me please"))
        gen = elsewhere.generate(moved["session_id"], max_tokens=5, temperature=0.0)
        assert gen["position"] == 14 + 5
    here = api.generate(sid, max_tokens=5, temperature=0.0)  # the original is untouched
    assert here["position"] == 12


def test_another_build_of_the_model_is_409(api, start_server, tiny_repo, check, tmp_path,
                                           api_factory):
    src = tiny_repo[0] / "tinylstm" / "2"
    dst = tmp_path / "other" / "tinylstm" / "2"
    dst.mkdir(parents=True)
    (dst / "model.onnx").write_bytes((src / "model.onnx").read_bytes())
    manifest = json.loads((src / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=3))  # another sha256
    other = api_factory(start_server("portable-other", {
        "CAROUSEL_MODEL_REPOSITORY": str(tmp_path / "other"), **check.LIMITS}))
    sid = api.create_session("tinylstm", text="mine")["session_id"]
    r = other.http.post("/v1/sessions", content=export(api, sid),
                        headers={"content-type": MEDIA})
    other.expect_error(r, 409, code="model_mismatch")
    other.server.stop()


def npz(**arrays) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def test_a_malformed_blob_is_400_and_creates_nothing(api, tiny):
    sid = api.create_session("tinylstm", text="ok")["session_id"]
    good = export(api, sid)
    with np.load(io.BytesIO(good)) as z:
        arrays = {n: z[n] for n in z.files}
    meta = json.loads(str(arrays["meta"][()]))

    def with_(**changes):
        return npz(**{**arrays, **changes})

    cases = {
        "garbage": b"\x00not a zip",
        "cut": good[: len(good) // 2],
        "no meta": npz(**{k: v for k, v in arrays.items() if k != "meta"}),
        "meta not json": with_(meta=np.array("{")),
        "other format": with_(meta=np.array(json.dumps({**meta, "format": "x"}))),
        "future version": with_(meta=np.array(json.dumps({**meta, "format_version": 2}))),
        "negative position": with_(meta=np.array(json.dumps({**meta, "position": -1}))),
        "missing tensor": npz(**{k: v for k, v in arrays.items() if k != "state/state_c"}),
        "wrong shape": with_(**{"state/state_h": np.zeros((2, 1, 3), np.float32)}),
        "wrong dtype": with_(**{"state/state_h": arrays["state/state_h"].astype(np.float64)}),
        "nan": with_(last_logits=np.full_like(arrays["last_logits"], np.nan)),
        "extra array": with_(extra=np.zeros(1)),
        "pickled object": with_(last_logits=np.array([{"x": 1}], dtype=object)),
    }
    count = api.metrics().total("sessions_created")
    for name, blob in cases.items():
        r = api.http.post("/v1/sessions", content=blob, headers={"content-type": MEDIA})
        api.expect_error(r, 400, code="invalid_state")
        r = api.post("/v1/sessions", {"state": base64.b64encode(blob).decode()})
        assert api.expect_error(r, 400, code="invalid_state")["message"], name
    api.expect_error(api.post("/v1/sessions", {"state": "%%%"}), 400, code="invalid_state")
    api.expect_error(api.post("/v1/sessions", {"state": "", "model": "x"}), 422,
                     code="invalid_input")
    unknown = with_(meta=np.array(json.dumps({**meta, "model": "nope"})))
    r = api.http.post("/v1/sessions", content=unknown, headers={"content-type": MEDIA})
    api.expect_error(r, 404, code="unknown_model")
    assert api.metrics().total("sessions_created") == count, "nothing was created"
    api.expect_error(api.http.get("/v1/sessions/nope/state"), 404, code="unknown_session")


def test_a_v2_sequence_moves_too(api, elsewhere, tiny, check):
    def infer(api_, seq, chunk: str, start: bool) -> np.ndarray:
        client = triton.InferenceServerClient(api_.server.url.removeprefix("http://"))
        try:
            x = triton.InferInput("tokens", [1, len(encode(chunk))], "INT64")
            x.set_data_from_numpy(np.array([encode(chunk)], dtype=np.int64))
            result = client.infer("tinylstm", [x], sequence_id=seq, sequence_start=start,
                                  outputs=[triton.InferRequestedOutput("logits")])
            return result.as_numpy("logits")[0]
        finally:
            client.close()

    for seq in (77, "seventy-seven"):
        infer(api, seq, "sequence ", True)
        r = api.http.get(f"/v2/models/tinylstm/sequences/{seq}/state")
        assert r.status_code == 200 and r.headers["content-type"] == MEDIA
        put = elsewhere.http.put(f"/v2/models/tinylstm/sequences/{seq}/state", content=r.content)
        assert put.status_code == 200, put.text
        assert put.json()["position"] == 9 and put.json()["sequence_id"] == seq
        check.logits(infer(elsewhere, seq, "moved", False), tiny["tinylstm"].last(
            "sequence moved"))
    r = api.http.get("/v2/models/tinylstm/sequences/404/state")
    assert r.status_code == 404 and "error" in r.json()
