"""`carousel bench --scenarios v2`: the Open Inference Protocol against carousel's own v1, and
an imported float-input LSTM at 1 and 64 sequences, on one carousel server, in one run.

1. bytelm, 64 sessions, one token per request: v1 `POST /step` (JSON) against v2 binary
   sequence requests (`tokens` INT64 [1, 1] in, `logits` FP32 [1, 256] out, both binary,
   as tritonclient sends them).
2. An `nn.LSTM` forecaster (3 features -> 2 x 16 LSTM -> 1), exported with
   `torch.onnx.export` and put in the repository with `carousel import`: one step (x [1, 1, 3])
   per v2 sequence request, 1 sequence against 64: steps/s and the batching gain.

Every answer is checked: the v1 answer's top token and the v2 logits against onnxruntime
run in this process on the same graph over each session's whole history; the forecaster's
outputs likewise. The load generator is raw asyncio sockets (client.py) in this process; the
server is a separate `carousel serve`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .client import Connection
from .graph import ModelVersion
from .load import percentiles
from .servers import start

FORECASTER = "forecaster"
FEATURES, HIDDEN, LAYERS = 3, 16, 2


def build_forecaster(folder: Path) -> Path:
    """An nn.LSTM forecaster exported the way a user would (needs torch: the bench extra)."""
    import torch
    from torch import nn

    class Forecaster(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(FEATURES, HIDDEN, num_layers=LAYERS, batch_first=True)
            self.head = nn.Linear(HIDDEN, 1)

        def forward(self, x, h0, c0):
            y, (hn, cn) = self.lstm(x, (h0, c0))
            return self.head(y), hn, cn

    torch.manual_seed(0)
    path = folder / "forecaster.onnx"
    state = {1: "batch"}
    torch.onnx.export(
        Forecaster().eval(), (torch.randn(1, 4, FEATURES), torch.zeros(LAYERS, 1, HIDDEN),
                              torch.zeros(LAYERS, 1, HIDDEN)),
        str(path), dynamo=False, input_names=["x", "h0", "c0"], output_names=["y", "hn", "cn"],
        dynamic_axes={"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"},
                      "h0": state, "c0": state, "hn": state, "cn": state})
    return path


def v2_body(name: str, array: np.ndarray, datatype: str, output: str,
            parameters: dict) -> tuple[bytes, int]:
    """A binary v2 infer request (JSON header, then the tensor's bytes) and the header length."""
    header = json.dumps({
        "inputs": [{"name": name, "datatype": datatype, "shape": list(array.shape),
                    "parameters": {"binary_data_size": array.nbytes}}],
        "outputs": [{"name": output, "parameters": {"binary_data": True}}],
        "parameters": parameters}).encode()
    return header + array.tobytes(), len(header)


def v2_output(payload: bytes, header_length: int, dtype) -> np.ndarray:
    header = json.loads(payload[:header_length])
    out = header["outputs"][0]
    return np.frombuffer(payload[header_length:], dtype=dtype).reshape(out["shape"])


async def post(conn: Connection, path: str, body: bytes, header_length: int | None
               ) -> tuple[int, bytes, int | None]:
    extra = b"" if header_length is None else (
        b"Inference-Header-Content-Length: " + str(header_length).encode() + b"\r\n")
    status, payload, headers = await conn.request_with_headers("POST", path, body, extra)
    length = headers.get(b"inference-header-content-length")
    return status, payload, None if length is None else int(length)


async def drive(port: int, sessions: int, steps: int, make_request, check) -> dict:
    """`sessions` clients in parallel, each `steps` requests in turn; steps/s and latencies
    of the measured part (after one warm-up request each)."""
    latencies: list[float] = []
    errors = 0
    start_barrier = asyncio.Barrier(sessions + 1)

    async def client(s: int) -> None:
        nonlocal errors
        conn = Connection("127.0.0.1", port)
        try:
            for k in range(steps):
                if k == 1:
                    await start_barrier.wait()
                t0 = time.perf_counter()
                path, body, header = make_request(s, k)
                status, payload, out_header = await post(conn, path, body, header)
                elapsed = time.perf_counter() - t0
                if status != 200 or not check(s, k, payload, out_header):
                    errors += 1
                if k >= 1:
                    latencies.append(elapsed)
        finally:
            conn.close()

    tasks = [asyncio.create_task(client(s)) for s in range(sessions)]
    await start_barrier.wait()
    t0 = time.perf_counter()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    lat = percentiles(latencies)
    return {"sessions": sessions, "requests": len(latencies), "errors": errors,
            "steps_per_s": len(latencies) / wall, "p50_ms": lat["p50"] * 1e3,
            "p99_ms": lat["p99"] * 1e3}


def reference_logits(graph: Path, manifest: dict, history: list[int]) -> np.ndarray:
    """bytelm's logits after each token of `history`, one onnxruntime call from zero state."""
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    feeds = {"tokens": np.array([history], dtype=np.int64),
             "lengths": np.array([len(history)], dtype=np.int32)}
    for s in manifest["state"]:
        shape = [1 if d == "batch" else d for d in s["shape"]]
        feeds[s["input"]] = np.zeros(shape, dtype=np.float32)
    return session.run(["logits"], feeds)[0][0]


def run(model: ModelVersion, log_dir: Path, steps: int, reps: int, carousel_env: dict) -> dict:
    from carousel.export.importer import import_graph

    work = Path(tempfile.mkdtemp(prefix="carousel-bench-v2-"))
    try:
        repo = work / "models"
        shutil.copytree(model.folder, repo / model.name / str(model.version))
        graph = build_forecaster(work)
        import_graph(graph, name=FORECASTER, repository=repo)
        lm = ModelVersion(repo, model.name, model.version, model.manifest)
        server = start("carousel", lm, log_dir, carousel_env)
        try:
            return asyncio.run(_scenarios(server.port, lm, repo, steps, reps))
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _scenarios(port: int, lm: ModelVersion, repo: Path, steps: int, reps: int) -> dict:
    rng = np.random.default_rng(7)
    n = 64
    histories = rng.integers(32, 127, size=(n, steps)).tolist()
    graph = lm.folder / "model.onnx"
    expected = [reference_logits(graph, lm.manifest, h) for h in histories]
    created = 0

    async def new_session(conn: Connection) -> str:
        nonlocal created
        status, payload = await conn.request(
            "POST", "/v1/sessions", json.dumps({"model": lm.name}).encode())
        created += 1
        return json.loads(payload)["session_id"]

    def v1(sessions: list[str]):
        def make(s, k):
            return (f"/v1/sessions/{sessions[s]}/step",
                    json.dumps({"tokens": [histories[s][k]], "top_k": 1}).encode(), None)

        def check(s, k, payload, _):
            top = json.loads(payload)["top_k"][0]["token"]
            return top == int(np.argmax(expected[s][k]))
        return make, check

    def v2(tag: int):
        bodies = [[v2_body("tokens", np.array([[t]], dtype=np.int64), "INT64", "logits",
                           {"sequence_id": tag * 1000 + s, "sequence_start": k == 0})
                   for k, t in enumerate(h)] for s, h in enumerate(histories)]

        def make(s, k):
            body, header = bodies[s][k]
            return f"/v2/models/{lm.name}/infer", body, header

        def check(s, k, payload, header):
            got = v2_output(payload, header, np.float32)[0]
            return bool(np.abs(got - expected[s][k]).max() <= 1e-4)
        return make, check

    session_f = ort.InferenceSession(str(repo / FORECASTER / "1" / "model.onnx"),
                                     providers=["CPUExecutionProvider"])
    series = rng.standard_normal((n, steps, FEATURES)).astype(np.float32)
    zeros = np.zeros((LAYERS, 1, HIDDEN), dtype=np.float32)
    expected_y = [session_f.run(["y"], {"x": series[s:s + 1], "h0": zeros, "c0": zeros})[0][0]
                  for s in range(n)]

    def forecaster(tag: int):
        def make(s, k):
            body, header = v2_body("x", series[s:s + 1, k:k + 1], "FP32", "y",
                                   {"sequence_id": tag * 1000 + s, "sequence_start": k == 0})
            return f"/v2/models/{FORECASTER}/infer", body, header

        def check(s, k, payload, header):
            got = v2_output(payload, header, np.float32)[0, 0]
            return bool(np.abs(got - expected_y[s][k]).max() <= 1e-5)
        return make, check

    results: dict[str, list[dict]] = {"v1_step_64": [], "v2_sequence_64": [],
                                      "forecaster_1": [], "forecaster_64": []}
    for rep in range(reps):
        conn = Connection("127.0.0.1", port)
        sessions = [await new_session(conn) for _ in range(n)]
        conn.close()
        results["v1_step_64"].append(await drive(port, n, steps, *v1(sessions)))
        results["v2_sequence_64"].append(await drive(port, n, steps, *v2(rep + 1)))
        results["forecaster_1"].append(await drive(port, 1, steps, *forecaster(100 + rep)))
        results["forecaster_64"].append(await drive(port, n, steps, *forecaster(200 + rep)))
    med = {k: {f: statistics.median(r[f] for r in runs) for f in runs[0]}
           for k, runs in results.items()}
    med["ratios"] = {
        "v2_over_v1_steps": med["v2_sequence_64"]["steps_per_s"] / med["v1_step_64"]["steps_per_s"],
        "forecaster_batching_gain": (med["forecaster_64"]["steps_per_s"]
                                     / med["forecaster_1"]["steps_per_s"]),
    }
    med["runs"] = results
    return med


def markdown(result: dict) -> str:
    rows = [("bytelm, v1 `POST /step` (JSON), 64 sessions", "v1_step_64"),
            ("bytelm, v2 binary sequence infer, 64 sequences", "v2_sequence_64"),
            ("imported LSTM forecaster, v2, 1 sequence", "forecaster_1"),
            ("imported LSTM forecaster, v2, 64 sequences", "forecaster_64")]
    lines = ["| scenario | steps/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
    for label, key in rows:
        r = result[key]
        lines.append(f"| {label} | {r['steps_per_s']:,.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['errors']:.0f} |")
    ratios = result["ratios"]
    lines.append("")
    lines.append(f"v2 / v1 steps: **{ratios['v2_over_v1_steps']:.2f}x**; forecaster batching "
                 f"gain (64 sequences / 1): **{ratios['forecaster_batching_gain']:.1f}x**")
    return "\n".join(lines) + "\n"
