"""Graphs users bring: `torch.onnx.export`ed modules (tests/graphs.py), put in a repository
with the real `carousel import`, served by a real `carousel serve`, streamed through the
stock `tritonclient` (aio, 32 concurrent sequences of each model, binary and JSON tensors).
Every output is checked against onnxruntime running the same graph alone in the test,
carrying the state by hand: batching across sequences changes nothing beyond 1e-5.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import graphs
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

CAROUSEL = Path(sys.executable).with_name("carousel")
TOL = 1e-5
SEQUENCES, REQUESTS = 32, 3

# name -> (builder, kwargs, extra `carousel import` flags)
MODELS = {
    "forecaster": (graphs.lstm_forecaster, {"batch_first": True}, []),
    "forecaster_tf": (graphs.lstm_forecaster, {"batch_first": False}, []),
    "gru": (graphs.gru_single_state, {}, []),
    "stacked": (graphs.stacked_state_with_constant, {}, ["--constant", "gain=0.5"]),
    "batchmajor": (graphs.batch_axis_zero_state, {}, ["--state", "h_in:0=h_out"]),
}


@pytest.fixture(scope="module")
def imported(tmp_path_factory, start_server):
    folder = tmp_path_factory.mktemp("graphs")
    repo = tmp_path_factory.mktemp("imported-repo")
    built = {}
    for name, (builder, kwargs, flags) in MODELS.items():
        b = builder(folder, **kwargs)
        done = subprocess.run([str(CAROUSEL), "import", str(b.path), "--name", name,
                               "--repository", str(repo), *flags],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        built[name] = b
    server = start_server("imported", {"CAROUSEL_MODEL_REPOSITORY": str(repo)})
    return server, built


class Alone:
    """The graph run alone with onnxruntime, one sequence, state carried by hand."""

    def __init__(self, built):
        self.built = built
        self.session = ort.InferenceSession(str(built.path), providers=["CPUExecutionProvider"])
        self.state = None

    def step(self, feed: dict) -> dict:
        full = dict(feed)
        for name, value in self.built.constants.items():
            full[name] = np.asarray(value, np.float32)
        for s_in, shape in ((k, self.built.inputs[k]) for k in self.built.state):
            if self.state is None:
                full[s_in] = np.zeros([1 if d == "batch" else d for d in shape], np.float32)
            else:
                full[s_in] = self.state[s_in]
        names = [o.name for o in self.session.get_outputs()]
        out = dict(zip(names, self.session.run(names, full), strict=True))
        self.state = {s_in: out[s_out] for s_in, s_out in self.built.state.items()}
        return out


def per_step_inputs(built) -> list[str]:
    return [n for n in built.inputs if n not in built.state and n not in built.constants]


def test_metadata_shows_per_step_inputs_and_results(imported):
    server, built = imported
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        meta = client.get_model_metadata("forecaster")
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, -1, 3]}]
        assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, -1, 1]}]
        tf = client.get_model_metadata("forecaster_tf")
        assert tf["inputs"][0]["shape"] == [-1, -1, 3]
    finally:
        client.close()


@pytest.mark.parametrize("name", list(MODELS))
def test_32_concurrent_sequences_equal_the_graph_alone(imported, name):
    server, built = imported
    b = built[name]
    rng = np.random.default_rng(len(name))
    inputs = per_step_inputs(b)
    (result_name,) = [o for o in b.outputs if o not in b.state.values()]
    # each sequence: REQUESTS requests of 1..4 steps each, so lengths differ across rows
    plans = {i: [b.random_feed(rng, 1, int(rng.integers(1, 5))) for _ in range(REQUESTS)]
             for i in range(1, SEQUENCES + 1)}

    async def one(client, seq_id: int) -> list[np.ndarray]:
        got = []
        for j, feed in enumerate(plans[seq_id]):
            tensors = []
            for n in inputs:
                x = triton.InferInput(n, list(feed[n].shape), "FP32")
                x.set_data_from_numpy(feed[n], binary_data=seq_id % 2 == 0)
                tensors.append(x)
            out = [triton.InferRequestedOutput(result_name, binary_data=seq_id % 3 != 0)]
            r = await client.infer(name, tensors, outputs=out, sequence_id=seq_id,
                                   sequence_start=j == 0, sequence_end=j == REQUESTS - 1)
            got.append(r.as_numpy(result_name))
        return got

    async def main():
        client = triton_aio.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            return await asyncio.gather(*(one(client, i) for i in plans))
        finally:
            await client.close()

    results = asyncio.run(main())
    for seq_id, got in zip(plans, results, strict=True):
        alone = Alone(b)
        for feed, answer in zip(plans[seq_id], got, strict=True):
            expected = alone.step({n: feed[n] for n in inputs})[result_name]
            np.testing.assert_allclose(answer, expected, atol=TOL, rtol=0)
        # and the module itself agrees with its graph on the first request
    first = plans[1][0]
    torch_out = b.torch_outputs({**first, **{s: np.zeros(
        [1 if d == "batch" else d for d in b.inputs[s]], np.float32) for s in b.state}})
    np.testing.assert_allclose(results[0][0], torch_out[result_name], atol=1e-4)


def test_stateless_batch_and_bad_requests(imported):
    server, built = imported
    b = built["forecaster"]
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        x = np.random.default_rng(0).standard_normal((3, 4, 3)).astype(np.float32)
        t = triton.InferInput("x", [3, 4, 3], "FP32")
        t.set_data_from_numpy(x)
        got = client.infer("forecaster", [t]).as_numpy("y")
        for i in range(3):
            np.testing.assert_allclose(got[i:i + 1], Alone(b).step({"x": x[i:i + 1]})["y"],
                                       atol=TOL, rtol=0)
        client.infer("forecaster", [t], sequence_id=900, sequence_start=True) \
            if False else None  # batch 3 in a sequence is refused below
        bad_shape = triton.InferInput("x", [1, 2, 4], "FP32")
        bad_shape.set_data_from_numpy(np.zeros((1, 2, 4), np.float32))
        wrong_type = triton.InferInput("x", [1, 2, 3], "FP64")
        wrong_type.set_data_from_numpy(np.zeros((1, 2, 3), np.float64))
        for tensors, kw in (([t], {"sequence_id": 901, "sequence_start": True}),
                            ([bad_shape], {}), ([wrong_type], {}),
                            ([t], {"sequence_id": 902})):
            with pytest.raises(InferenceServerException) as e:
                client.infer("forecaster", tensors, **kw)
            assert e.value.status() == "400", e.value
    finally:
        client.close()
