"""The byte LMs over the Open Inference Protocol, driven by the stock `tritonclient` (sync and
aio, JSON and binary tensors): stateless rows and sequences, checked against PyTorch; a
sequence is a session, so it batches with v1 sessions and keeps its state between requests.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

TOL = 1e-4


def tokens_input(tokens: list[int], binary: bool) -> triton.InferInput:
    x = triton.InferInput("tokens", [1, len(tokens)], "INT64")
    x.set_data_from_numpy(np.array([tokens], dtype=np.int64), binary_data=binary)
    return x


def logits_output(binary: bool) -> triton.InferRequestedOutput:
    return triton.InferRequestedOutput("logits", binary_data=binary)


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


def test_server_and_model_metadata(client, tiny):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert {"binary_tensor_data", "sequence"} <= set(meta["extensions"])
    assert client.is_model_ready("tinylstm") and client.is_model_ready("tinylstm", "1")
    m = client.get_model_metadata("tinylstm", "2")
    assert m["inputs"] == [{"name": "tokens", "datatype": "INT64", "shape": [-1, -1]}]
    assert m["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 256]}]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nosuchmodel")
    assert e.value.status() == "404"


@pytest.mark.parametrize("binary", [True, False])
def test_stateless_batch_equals_pytorch(client, tiny, binary):
    texts = [b"def f(x):", b"import os"]  # one tensor: rows of one length
    x = triton.InferInput("tokens", [2, 9], "INT64")
    x.set_data_from_numpy(np.array([list(t) for t in texts], dtype=np.int64), binary_data=binary)
    result = client.infer("tinylstm", [x], model_version="1", request_id="r-7",
                          outputs=[logits_output(binary)])
    got = result.as_numpy("logits")
    assert got.shape == (2, 256) and got.dtype == np.float32
    assert result.get_response()["id"] == "r-7"
    assert result.get_response()["model_version"] == "1"
    for row, text in zip(got, texts, strict=True):
        np.testing.assert_allclose(row, tiny[("tinylstm", 1)].last(list(text)), atol=TOL)


@pytest.mark.parametrize("binary", [True, False])
def test_sequence_carries_state_across_requests(client, tiny, binary):
    ref = tiny["tinygru"]
    chunks = [list(b"class A"), list(b":\n    "), list(b"def g(self)")]
    seen: list[int] = []
    seq_id = 1000 + binary
    for i, chunk in enumerate(chunks):
        seen += chunk
        result = client.infer("tinygru", [tokens_input(chunk, binary)], sequence_id=seq_id,
                              sequence_start=i == 0, sequence_end=i == len(chunks) - 1,
                              outputs=[logits_output(binary)])
        np.testing.assert_allclose(result.as_numpy("logits")[0], ref.last(seen), atol=TOL)
    # ended: the id is free again, so a request without start is refused
    with pytest.raises(InferenceServerException) as e:
        client.infer("tinygru", [tokens_input([1], binary)], sequence_id=seq_id)
    assert e.value.status() == "400" and "START" in e.value.message()


def test_sequence_start_on_a_live_id_restarts_it(client, tiny):
    ref = tiny["tinylstm"]
    client.infer("tinylstm", [tokens_input(list(b"abc"), True)], sequence_id="s-1",
                 sequence_start=True)
    result = client.infer("tinylstm", [tokens_input(list(b"xyz"), True)], sequence_id="s-1",
                          sequence_start=True)
    np.testing.assert_allclose(result.as_numpy("logits")[0], ref.last(list(b"xyz")), atol=TOL)
    # the string id "7" and the integer 7 are different sequences
    client.infer("tinylstm", [tokens_input([1, 2], True)], sequence_id=7, sequence_start=True)
    with pytest.raises(InferenceServerException):
        client.infer("tinylstm", [tokens_input([3], True)], sequence_id="7")
    client.infer("tinylstm", [tokens_input([3], True)], sequence_id=7, sequence_end=True)


def test_concurrent_sequences_with_aio(server, tiny):
    ref = tiny[("tinylstm", 2)]
    rng = np.random.default_rng(3)
    texts = {i: [rng.integers(0, 256, size=rng.integers(1, 6)).tolist() for _ in range(4)]
             for i in range(1, 17)}

    async def one(client, seq_id: int) -> list[np.ndarray]:
        outs = []
        for j, chunk in enumerate(texts[seq_id]):
            r = await client.infer("tinylstm", [tokens_input(chunk, seq_id % 2 == 0)],
                                   model_version="2", sequence_id=seq_id,
                                   sequence_start=j == 0, sequence_end=j == 3)
            outs.append(r.as_numpy("logits")[0])
        return outs

    async def main():
        client = triton_aio.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            return await asyncio.gather(*(one(client, i) for i in texts))
        finally:
            await client.close()

    for seq_id, outs in zip(texts, asyncio.run(main()), strict=True):
        seen: list[int] = []
        for chunk, got in zip(texts[seq_id], outs, strict=True):
            seen += chunk
            np.testing.assert_allclose(got, ref.last(seen), atol=TOL)


def test_v2_errors_leave_the_sequence_unchanged(client, tiny):
    ref = tiny["tinylstm"]
    client.infer("tinylstm", [tokens_input(list(b"hello"), False)], sequence_id=55,
                 sequence_start=True)
    bad = triton.InferInput("tokens", [1, 2], "INT32")
    bad.set_data_from_numpy(np.array([[1, 2]], dtype=np.int32))
    out_of_range = triton.InferInput("tokens", [1, 1], "INT64")
    out_of_range.set_data_from_numpy(np.array([[999]], dtype=np.int64))
    unknown = triton.InferInput("nope", [1, 1], "INT64")
    unknown.set_data_from_numpy(np.array([[1]], dtype=np.int64))
    batch2 = triton.InferInput("tokens", [2, 1], "INT64")
    batch2.set_data_from_numpy(np.array([[1], [2]], dtype=np.int64))
    for inputs in ([bad], [out_of_range], [unknown], [batch2], []):
        with pytest.raises(InferenceServerException) as e:
            client.infer("tinylstm", inputs, sequence_id=55)
        assert e.value.status() == "400", e.value
    result = client.infer("tinylstm", [tokens_input(list(b"!"), False)], sequence_id=55,
                          sequence_end=True)
    np.testing.assert_allclose(result.as_numpy("logits")[0], ref.last(list(b"hello!")),
                               atol=TOL)


def test_the_readme_example_runs(bundled_server):
    """The README's v2 example as printed, pointed at a real server on the bundled models
    (it names 127.0.0.1:8000; only the port changes). It prints the likeliest next byte
    after each chunk of one sequence: the same bytes a v1 session stepped the same way
    gives."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## The Open Inference Protocol", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    assert "127.0.0.1:8000" in code
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{bundled_server.port}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    import httpx

    with httpx.Client(base_url=bundled_server.url, trust_env=False) as http:
        sid = http.post("/v1/sessions", json={"model": "bytelm"}).json()["session_id"]
        expected = []
        for chunk in ("import o", "s\nimport s"):
            answer = http.post(f"/v1/sessions/{sid}/step", json={"text": chunk, "top_k": 1})
            expected.append(repr(bytes([answer.json()["top_k"][0]["token"]])))
    assert done.stdout.splitlines() == expected


def test_raw_bodies_whatever_their_content_type(server, tiny):
    """The body is read raw: no Content-Type, application/json or application/octet-stream
    all work; malformed bodies are the protocol's 400 `{"error": ...}` (413 past the limit)."""
    import httpx

    tokens = np.array([list(b"raw")], dtype=np.int64)
    header = (b'{"inputs":[{"name":"tokens","datatype":"INT64","shape":[1,3],'
              b'"parameters":{"binary_data_size":24}}],'
              b'"outputs":[{"name":"logits","parameters":{"binary_data":true}}]}')
    body = header + tokens.tobytes()
    expected = tiny[("tinylstm", 2)].last(list(b"raw"))
    with httpx.Client(base_url=server.url, trust_env=False) as http:
        for content_type in (None, "application/json", "application/octet-stream"):
            headers = {"Inference-Header-Content-Length": str(len(header))}
            if content_type:
                headers["Content-Type"] = content_type
            r = http.post("/v2/models/tinylstm/infer", content=body, headers=headers)
            assert r.status_code == 200, r.text
            json_len = int(r.headers["inference-header-content-length"])
            got = np.frombuffer(r.content[json_len:], dtype=np.float32)
            np.testing.assert_allclose(got, expected, atol=TOL)
        bad = [
            ({"Inference-Header-Content-Length": str(len(body) + 1)}, body, 400),
            ({"Inference-Header-Content-Length": "12x"}, body, 400),
            ({"Inference-Header-Content-Length": str(len(header))}, body[:-1], 400),
            ({}, b"\xff\xfe", 400),
            ({}, b"[]", 400),
            ({}, b"x" * 70_000, 413),  # the tiny server's body limit is 65536
        ]
        for headers, payload, status in bad:
            r = http.post("/v2/models/tinylstm/infer", content=payload, headers=headers)
            assert r.status_code == status, (headers, r.text)
            assert isinstance(r.json()["error"], str) and r.json()["error"]
        r = http.post("/v2/models/nosuch/infer", content=body,
                      headers={"Inference-Header-Content-Length": str(len(header))})
        assert r.status_code == 404 and "nosuch" in r.json()["error"]
