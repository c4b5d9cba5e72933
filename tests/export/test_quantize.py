"""--quantize int8: a separate version with the trade measured, checked against torch."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from carousel.export import export_checkpoint
from carousel.export.manifest import load_schema
from carousel.export.verify import open_session, run_graph
from carousel.model.data import load_corpus

VALIDATION_BYTES = 3000


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """A small text file; its last 10% is the validation split (load_corpus's rule)."""
    path = tmp_path_factory.mktemp("corpus") / "text.py"
    lines = [f"def f{i}(x, y):\n    return x * {i} + y  # line {i}\n" for i in range(1200)]
    path.write_text("".join(lines))
    return path


def torch_bpb(model, text: bytes, rows: int = 8) -> float:
    """Bits per byte the way the manifest documents it, computed with torch: the text cut
    into `rows` equal contiguous shards, each scored from zero state."""
    data = torch.tensor(list(text), dtype=torch.int64)
    shard = len(data) // rows
    x = data[: shard * rows].reshape(rows, shard)
    with torch.no_grad():
        logits, _ = model(x[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
    return float(loss) / math.log(2)


@pytest.mark.parametrize("variant", ["lstm", "peephole", "coupled", "gru"])
def test_int8_version(tmp_path, make_checkpoint, corpus_file, variant):
    model, ckpt = make_checkpoint(variant, num_layers=2)
    export_checkpoint(ckpt, tmp_path, "m")  # fp32 is version 1
    folder = export_checkpoint(ckpt, tmp_path, "m", quantize="int8",
                               validation_corpus=[str(corpus_file)],
                               validation_bytes=VALIDATION_BYTES)
    assert folder.name == "2"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx"]
    manifest = json.loads((folder / "manifest.json").read_text())
    q = manifest["quantization"]
    validator = jsonschema.Draft202012Validator(load_schema())
    validator.validate(manifest)

    graph = onnx.load(str(folder / "model.onnx"))
    ops = [(n.domain, n.op_type) for n in graph.graph.node]
    if variant == "gru":
        assert q["quantized_ops"] == {"MatMul": 1} and q["fp32_ops"] == {"GRU": 2}
        assert "GRU" in q["note"]
        assert ops.count(("", "GRU")) == 2
    else:
        assert q["quantized_ops"] == {"LSTM": 2, "MatMul": 1} and q["fp32_ops"] == {}
        assert ops.count(("com.microsoft", "DynamicQuantizeLSTM")) == 2
        assert ("", "LSTM") not in ops
    assert ops.count(("", "MatMulInteger")) == 1
    assert ("", "MatMul") not in ops

    # Bits per byte before and after, against torch on the same validation text.
    text = bytes(load_corpus([corpus_file]).val[:VALIDATION_BYTES])
    # The file's name only: manifests are served, the build machine's folders are not.
    assert q["validation"] == {"corpus": f"files: {corpus_file.name}", "bytes": len(text)}
    assert str(corpus_file.parent) not in (folder / "manifest.json").read_text()
    want = torch_bpb(model, text)
    assert q["bpb_fp32"] == pytest.approx(want, abs=1e-3)
    assert q["bpb_int8"] == pytest.approx(want, abs=0.05)
    assert q["bpb_int8"] != q["bpb_fp32"]

    # The int8 graph still computes the model: close to torch, with state, padded rows too.
    names = model.config.state_names
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 256, size=(3, 30), dtype=np.int64)
    state = tuple(rng.standard_normal((2, 3, 24)).astype(np.float32) * 0.5 for _ in names)
    lengths = np.array([30, 9, 0], np.int64)
    got = run_graph(open_session(folder / "model.onnx"), names, tokens, state, lengths)
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens), tuple(map(torch.from_numpy, state)),
                    torch.from_numpy(lengths))
    # int8 moves results by a few percent of their scale; a wrong graph moves them by tens.
    for g, w in zip((got[0], *got[1]), (ref[0], *ref[1]), strict=True):
        w = w.numpy()
        assert 0 < float(np.abs(g - w).max()) < 0.08 * float(np.abs(w).max())
    np.testing.assert_array_equal(got[1][0][:, 2], state[0][:, 2])  # length 0 keeps state

    # The measured trade and the warning.
    assert set(q["step_us"]) == {"fp32", "int8"}
    assert all(v > 0 for times in q["step_us"].values() for v in times.values())
    assert q["speedup_per_step"] == pytest.approx(
        q["step_us"]["fp32"]["1"] / q["step_us"]["int8"]["1"], rel=1e-2)
    assert q["max_abs_logit_shift"]["fp32"] == {"batch_vs_alone": 0.0, "steps_vs_one_pass": 0.0}
    assert q["max_abs_logit_shift"]["int8"]["batch_vs_alone"] > 0
    assert "batch" in q["warning"] and "fp32" in q["warning"]
    # The fp32 version beside it is untouched and unquantized.
    assert json.loads((tmp_path / "m" / "1" / "manifest.json").read_text())["quantization"] is None


def test_coupled_int8_honours_input_forget(make_model):
    """DynamicQuantizeLSTM must keep input_forget=1 (f = 1 - i): with it dropped, the graph
    would be far further from torch than quantization alone moves it."""
    from carousel.export.graph import build_model
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = make_model("coupled", num_layers=1)
    proto = build_model(model.state_dict(), model.config)
    tokens = np.random.default_rng(3).integers(0, 256, size=(2, 40), dtype=np.int64)
    with torch.no_grad():
        want = model(torch.from_numpy(tokens))[0].numpy()

    def int8_error(proto) -> float:
        with tempfile.TemporaryDirectory() as d:
            src, dst = Path(d) / "f.onnx", Path(d) / "q.onnx"
            onnx.save_model(proto, str(src))
            quantize_dynamic(src, dst, op_types_to_quantize=["LSTM", "MatMul"],
                             weight_type=QuantType.QInt8)
            zeros = (np.zeros((1, 2, 24), np.float32),) * 2
            got, _ = run_graph(open_session(dst), ("h", "c"), tokens, zeros)
        return float(np.abs(got - want).max())

    right = int8_error(proto)
    lstm = next(n for n in proto.graph.node if n.op_type == "LSTM")
    kept = [a for a in lstm.attribute if a.name != "input_forget"]
    del lstm.attribute[:]
    lstm.attribute.extend(kept)
    wrong = int8_error(proto)
    assert right < 0.1 < wrong
