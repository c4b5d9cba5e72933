"""Health, the model registry over HTTP, and stateless prediction, against a real server."""

from __future__ import annotations

import numpy as np
from carousel.model.model import encode


def records(obj):
    """Every dict inside a JSON value, depth first."""
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from records(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from records(v)


def under(obj, word: str, inside: bool = False):
    """Every scalar nested (at any depth) under a key that contains `word`."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from under(v, word, inside or word in str(k).lower())
    elif isinstance(obj, list):
        for v in obj:
            yield from under(v, word, inside)
    elif inside:
        yield obj


def versions_listed(body) -> dict[str, set[int]]:
    """model name -> versions, however /v1/models nests them (flat rows or grouped)."""
    found: dict[str, set[int]] = {}
    for r in records(body):
        name = r.get("name", r.get("model"))
        if not isinstance(name, str):
            continue
        vs = set()
        if isinstance(r.get("version"), int):
            vs.add(r["version"])
        for v in r.get("versions", []) or []:
            vs.add(v["version"] if isinstance(v, dict) else v)
        found.setdefault(name, set()).update(vs)
    return found


def essentials(body) -> dict[str, list]:
    """What the model's description says, by the words its keys use."""
    out = {word: list(under(body, word)) for word in ("variant", "layer", "hidden", "vocab")}
    # State names however they are spelled: "h", "state_h" or "state_h_out".
    out["state"] = {str(v).removeprefix("state_").removesuffix("_out")
                    for v in under(body, "state") if isinstance(v, str)}
    return out


def test_health_ready_docs(api):
    assert api.http.get("/healthz").status_code == 200
    assert api.http.get("/readyz").status_code == 200
    docs = api.http.get("/docs")
    assert docs.status_code == 200 and "html" in docs.headers["content-type"]
    paths = api.http.get("/openapi.json").json()["paths"]
    for fragment in ("/v1/models", "/predict", "/v1/sessions", "/step", "/generate", "/fork"):
        assert any(fragment in p for p in paths), (fragment, sorted(paths))


def test_list_models_has_every_model_and_version(api):
    body = api.ok(api.http.get("/v1/models"))
    listed = versions_listed(body)
    assert listed.get("tinylstm", set()) >= {1, 2}, listed
    assert listed.get("tinygru", set()) >= {1}, listed
    assert listed.get("utf8cycle", set()) >= {1}, listed


def test_one_model_latest_and_pinned_version(api):
    latest = api.ok(api.http.get("/v1/models/tinylstm"))
    assert latest["version"] == 2, latest
    info = essentials(latest)
    assert "lstm" in info["variant"], latest
    assert 2 in info["layer"] and 32 in info["hidden"] and 256 in info["vocab"], latest
    assert {"h", "c"} <= info["state"], latest

    pinned = api.ok(api.http.get("/v1/models/tinylstm", params={"version": 1}))
    assert pinned["version"] == 1, pinned

    gru = api.ok(api.http.get("/v1/models/tinygru"))
    info = essentials(gru)
    assert "gru" in info["variant"], gru
    assert "h" in info["state"] and "c" not in info["state"], gru


def test_unknown_model_and_version_are_404(api):
    api.expect_error(api.http.get("/v1/models/nosuchmodel"), 404)
    api.expect_error(api.http.get("/v1/models/tinylstm", params={"version": 99}), 404)
    api.expect_error(api.http.get("/v1/models/tinylstm", params={"version": "two"}), 400, 422)


def test_predict_text_equals_pytorch(api, tiny, check):
    text = "The quick brown fox — jumps! ünïcode ✓"
    for name in ("tinylstm", "tinygru"):
        out = api.predict(name, text=text, return_logits=True)
        assert out["model"] == name and out["version"] == tiny[name].version, out
        [row] = out["outputs"]
        assert row["length"] == len(encode(text))
        expected = tiny[name].last(text)
        check.logits(row["logits"], expected, f"{name} predict")
        check.top_k(row["top_k"], expected)


def test_predict_tokens_and_top_k_option(api, tiny, check):
    tokens = [0, 255, 10, 200, 65, 66, 67]
    out = api.predict("tinylstm", tokens=tokens, top_k=3)
    [row] = out["outputs"]
    assert row["length"] == len(tokens)
    assert "logits" not in row or row["logits"] is None  # only when asked for
    check.top_k(row["top_k"], tiny["tinylstm"].last(tokens), k=3)


def test_predict_pinned_version_uses_that_version(api, tiny, check):
    text = "version pinning"
    v1 = api.predict("tinylstm", text=text, version=1, return_logits=True)
    v2 = api.predict("tinylstm", text=text, return_logits=True)
    assert (v1["version"], v2["version"]) == (1, 2)
    check.logits(v1["outputs"][0]["logits"], tiny[("tinylstm", 1)].last(text), "v1")
    check.logits(v2["outputs"][0]["logits"], tiny[("tinylstm", 2)].last(text), "v2")
    # The two versions really are different models (else the check above proves nothing).
    assert np.abs(np.subtract(v1["outputs"][0]["logits"], v2["outputs"][0]["logits"])).max() > 0.1
    # ?version= on the URL means the same as the body field.
    q = api.ok(api.post("/v1/models/tinylstm/predict", {"text": text, "return_logits": True},
                        params={"version": 1}))
    assert q["version"] == 1
    check.logits(q["outputs"][0]["logits"], tiny[("tinylstm", 1)].last(text), "v1 query")


def test_predict_batch_rows_equal_each_alone(api, tiny, check):
    """A batch of inputs of different lengths: each row equals PyTorch on that row alone
    (padding never leaks into a row), in the order given."""
    inputs = [
        {"text": "a"},
        {"tokens": [1, 2, 3, 250, 251]},
        {"text": "a much longer input, so the batch is padded to its length ✓✓✓"},
        {"text": "b"},
        {"tokens": list(range(0, 256, 9))},
    ]
    out = api.predict("tinygru", inputs=inputs, return_logits=True)
    assert len(out["outputs"]) == len(inputs)
    for item, row in zip(inputs, out["outputs"], strict=True):
        tokens = item.get("tokens") or encode(item["text"])
        assert row["length"] == len(tokens)
        expected = tiny["tinygru"].last(tokens)
        check.logits(row["logits"], expected, f"batch row {item}")
        check.top_k(row["top_k"], expected)
