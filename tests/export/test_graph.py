"""The exported graph computes what the PyTorch model computes: every variant, batch 1 and 5,
lengths 1 and 37, random initial state, one pass and in chunks, padded batches."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from carousel.export import VerificationError, graph
from carousel.export.verify import compare_with_torch, open_session, run_graph
from carousel.model.model import VARIANTS

TOL = 1e-4


def torch_run(model, tokens, state, lengths=None):
    with torch.no_grad():
        logits, new = model(torch.from_numpy(tokens), tuple(map(torch.from_numpy, state)),
                            None if lengths is None else torch.from_numpy(lengths))
    return logits.numpy(), tuple(s.numpy() for s in new)


def random_inputs(rng, model, B, T):
    cfg = model.config
    tokens = rng.integers(0, 256, size=(B, T), dtype=np.int64)
    state = tuple(rng.standard_normal((cfg.num_layers, B, cfg.hidden_size)).astype(np.float32)
                  for _ in cfg.state_names)
    return tokens, state


def assert_close(got, want):
    logits, state = got
    np.testing.assert_allclose(logits, want[0], rtol=0, atol=TOL)
    assert len(state) == len(want[1])
    for g, w in zip(state, want[1], strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=TOL)


@pytest.fixture(scope="module", params=[(v, L) for v in VARIANTS for L in (1, 2)],
                ids=lambda p: f"{p[0]}-{p[1]}layer")
def exported(request, make_model):
    variant, layers = request.param
    model = make_model(variant, num_layers=layers)
    proto = graph.build_model(model.state_dict(), model.config)
    return model, open_session(proto.SerializeToString())


@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("T", [1, 37])
def test_one_pass_matches_torch(exported, rng, B, T):
    model, session = exported
    tokens, state = random_inputs(rng, model, B, T)
    got = run_graph(session, model.config.state_names, tokens, state)
    assert got[0].shape == (B, T, 256)
    assert_close(got, torch_run(model, tokens, state))


@pytest.mark.parametrize("B", [1, 5])
def test_chunks_through_state_match_one_pass(exported, rng, B):
    model, session = exported
    names = model.config.state_names
    tokens, state = random_inputs(rng, model, B, 37)
    pieces, carried = [], state
    for lo, hi in [(0, 1), (1, 2), (2, 20), (20, 37)]:
        logits, carried = run_graph(session, names, tokens[:, lo:hi], carried)
        pieces.append(logits)
    assert_close((np.concatenate(pieces, axis=1), carried), torch_run(model, tokens, state))


def test_padded_batch_rows_equal_each_row_alone(exported, rng):
    model, session = exported
    names = model.config.state_names
    lengths = np.array([37, 1, 0, 20, 36], np.int64)
    tokens, state = random_inputs(rng, model, 5, 37)
    logits, new = run_graph(session, names, tokens, state, lengths)
    assert_close((logits, new), torch_run(model, tokens, state, lengths))
    for b, n in enumerate(lengths):
        row_state = tuple(s[:, b : b + 1] for s in state)
        row_new = tuple(s[:, b : b + 1] for s in new)
        if n == 0:  # a row that does not advance keeps exactly its state
            for g, s in zip(row_new, row_state, strict=True):
                np.testing.assert_array_equal(g, s)
            continue
        want = torch_run(model, tokens[b : b + 1, :n], row_state)
        assert_close((logits[b : b + 1, :n], row_new), want)
        alone = run_graph(session, names, tokens[b : b + 1, :n], row_state)
        assert_close((logits[b : b + 1, :n], row_new), alone)


@pytest.mark.parametrize("variant", ["lstm", "gru"])
def test_matches_equation_level_cells(variant, rng, make_model):
    """The fused torch kernels are one reference; the cells written from the equations are
    another, independent of cuDNN/oneDNN gate conventions."""
    model = make_model(variant)
    session = open_session(graph.build_model(model.state_dict(), model.config)
                           .SerializeToString())
    model.set_fused(False)
    tokens, state = random_inputs(rng, model, 3, 11)
    assert_close(run_graph(session, model.config.state_names, tokens, state),
                 torch_run(model, tokens, state))


@pytest.mark.parametrize("variant", VARIANTS)
def test_graph_uses_standard_recurrent_operators(variant, make_model):
    model = make_model(variant, num_layers=2)
    proto = graph.build_model(model.state_dict(), model.config)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    op = "GRU" if variant == "gru" else "LSTM"
    rnn = [n for n in proto.graph.node if n.op_type == op]
    assert len(rnn) == 2 and "Loop" not in ops and "Scan" not in ops
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in rnn[0].attribute}
    assert attrs["hidden_size"] == 24
    assert attrs.get("input_forget", 0) == (1 if variant == "coupled" else 0)
    if variant == "gru":
        assert attrs["linear_before_reset"] == 1
    has_p = len(rnn[0].input) == 8 and rnn[0].input[7] != ""
    assert has_p == (variant == "peephole")
    # Inputs and outputs are declared with symbolic batch/time dims.
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*proto.graph.input, *proto.graph.output]}
    assert dims["tokens"] == ["batch", "time"]
    assert dims["lengths"] == ["batch"]
    assert dims["logits"] == ["batch", "time", 256]
    assert dims["state_h"] == dims["state_h_out"] == [2, "batch", 24]
    assert ("state_c" in dims) == (variant != "gru")


def test_onnxruntime_logs_no_warnings(tmp_path, make_model):
    """Loading and running the graph at onnxruntime's default log level prints nothing
    (no shape mismatches against declared outputs, no unused initializers)."""
    for variant, layers in [("lstm", 1), ("peephole", 2), ("gru", 2)]:
        model = make_model(variant, num_layers=layers)
        onnx.save_model(graph.build_model(model.state_dict(), model.config),
                        str(tmp_path / f"{variant}.onnx"))
    code = """
import sys, numpy as np, onnxruntime as ort
for path in sys.argv[1:]:
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for B, T in [(1, 1), (3, 7)]:
        feed = {"tokens": np.zeros((B, T), np.int64), "lengths": np.full(B, T, np.int32)}
        for i in s.get_inputs():
            if i.name.startswith("state_"):
                feed[i.name] = np.zeros((i.shape[0], B, i.shape[2]), np.float32)
        s.run(None, feed)
print("ran")
"""
    out = subprocess.run([sys.executable, "-c", code, *map(str, tmp_path.glob("*.onnx"))],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ran"
    assert out.stderr == ""


def test_verification_catches_a_wrong_gate_order(monkeypatch, make_model):
    """The verifier must fail on a plausible export bug: PyTorch's gate order left as is."""
    model = make_model("lstm", num_layers=1)
    right = graph.onnx_weights

    def unordered(variant, params, H):
        out = right(variant, params, H)
        out["W"] = params["weight_ih"].detach().numpy()[None]
        return out

    monkeypatch.setattr(graph, "onnx_weights", unordered)
    proto = graph.build_model(model.state_dict(), model.config)
    with pytest.raises(VerificationError, match="disagrees with PyTorch"):
        compare_with_torch(model, open_session(proto.SerializeToString()))


def test_verification_report_is_within_tolerance(make_model):
    model = make_model("coupled", num_layers=2)
    proto = graph.build_model(model.state_dict(), model.config)
    report = compare_with_torch(model, open_session(proto.SerializeToString()))
    assert report["cases"] >= 12
    assert set(report["max_abs_diff"]) == {"logits", "state_h_out", "state_c_out"}
    assert all(d <= TOL for d in report["max_abs_diff"].values())
