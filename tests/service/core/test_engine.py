"""The engine on real exported graphs: named tensors in, every result and state output out by
name; a padded batch with lengths gives each row exactly what it gets alone, state splits
back per row, the wide session agrees bit for bit, and all of it agrees with PyTorch. A
graph that does not match its manifest is refused, naming the file."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from carousel.model.model import LanguageModel, ModelConfig
from carousel.service.engine import Engine
from carousel.service.manifest import ManifestError, read_manifest
from carousel.service.registry import Registry


@pytest.fixture(scope="module", params=["lstm", "gru"])
def exported(request, tmp_path_factory):
    from carousel.export import export_checkpoint

    torch.manual_seed(3)
    model = LanguageModel(ModelConfig(variant=request.param, embed_dim=8, hidden_size=16,
                                      num_layers=2)).eval()
    repo = tmp_path_factory.mktemp(f"repo-{request.param}")
    ckpt = {"model": model.state_dict(), "config": model.config.to_dict(), "metrics": {}}
    export_checkpoint(ckpt, repo, "m", version=1)
    return model, Registry.load(repo).get("m")


def feeds_for(engine, inputs: list[list[int]], rows=None) -> tuple[dict, np.ndarray]:
    rows = rows or [None] * len(inputs)
    lengths = np.array([len(x) for x in inputs], dtype=engine.manifest.lengths.dtype)
    tokens = np.zeros((len(inputs), lengths.max()), dtype=np.int64)
    for i, x in enumerate(inputs):
        tokens[i, : len(x)] = x
    feeds = {"tokens": tokens, engine.manifest.lengths.name: lengths,
             **engine.layout.stack(rows)}
    return feeds, lengths


def run_rows(mv, inputs: list[list[int]], rows=None, engine=None, wide=False):
    engine = engine or mv.engine
    feeds, lengths = feeds_for(engine, inputs, rows)
    outputs = engine.run(feeds, wide)
    last, _ = mv.adapter.finish(outputs, lengths, [])
    return engine.layout.unstack(outputs, last, len(inputs))


def test_run_returns_every_result_and_state_output_by_name(exported):
    _, mv = exported
    feeds, _ = feeds_for(mv.engine, [[1, 2, 3], [4]])
    outputs = mv.engine.run(feeds)
    names = {"logits"} | {s.output for s in mv.manifest.states}
    assert set(outputs) == names
    assert outputs["logits"].shape == (2, 3, 256) and outputs["logits"].dtype == np.float32
    for s in mv.manifest.states:
        shape = list(s.shape)
        shape.insert(s.batch_axis, 2)
        assert outputs[s.output].shape == tuple(shape)
    assert mv.layout.extra_size == 256 == mv.adapter.extra_size


def test_padded_batch_rows_equal_rows_run_alone(exported):
    _, mv = exported
    inputs = [[1, 2, 3, 4, 5], [6], [7, 8, 9], [10, 11]]
    together = run_rows(mv, inputs)
    for x, row in zip(inputs, together, strict=True):
        np.testing.assert_array_equal(row, run_rows(mv, [x])[0])


def test_step_by_step_equals_one_pass_and_pytorch(exported):
    model, mv = exported
    text = list(b"stateful serving")
    row = None
    for i in range(0, len(text), 3):
        row = run_rows(mv, [text[i:i + 3]], [row])[0]
    one_pass = run_rows(mv, [text])[0]
    np.testing.assert_allclose(row, one_pass, atol=1e-5)
    with torch.no_grad():
        logits, state = model(torch.tensor([text]))
    layout = mv.layout
    np.testing.assert_allclose(layout.extra(row), logits[0, -1].numpy(), atol=1e-4)
    tensors = layout.tensors(row)
    for spec, torch_state in zip(layout.states, state, strict=True):
        np.testing.assert_allclose(tensors[spec.input], torch_state.numpy(), atol=1e-4)


def test_the_wide_session_gives_bit_identical_results(exported):
    _, mv = exported
    wide = Engine(mv.manifest, wide_threads=2, extra_size=mv.adapter.extra_size)
    wide.warm_up()
    inputs = [list(range(1, 40)), [5, 6]]
    narrow = run_rows(mv, inputs)
    for a, b in zip(narrow, run_rows(mv, inputs, engine=wide, wide=True), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_graph_that_does_not_match_its_manifest_is_refused(exported, tmp_path):
    _, mv = exported
    m = mv.manifest
    raw = {**m.raw, "inputs": [t for t in m.raw["inputs"] if t["name"] != "lengths"]}
    with pytest.raises(ManifestError) as e:
        Engine(dataclasses.replace(m, raw=raw))
    assert str(m.graph_file) in str(e.value) and "do not match the manifest" in str(e.value)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    with pytest.raises(ManifestError) as e:
        Engine(dataclasses.replace(m, graph_file=broken))
    assert str(broken) in str(e.value) and "onnxruntime cannot load it" in str(e.value)


def tensor_graph(folder) -> None:
    """A tiny tensor model, by hand: y = x * scale, s_out = s + sum over time of y."""
    import onnx
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["y"]),
         helper.make_node("ReduceSum", ["y", "axis"], ["total"], keepdims=1),
         helper.make_node("Add", ["s", "total"], ["s_out"])],
        "tiny",
        [helper.make_tensor_value_info("x", f, ["batch", "time"]),
         helper.make_tensor_value_info("s", f, ["batch", 1]),
         helper.make_tensor_value_info("scale", f, [])],
        [helper.make_tensor_value_info("y", f, ["batch", "time"]),
         helper.make_tensor_value_info("s_out", f, ["batch", 1])],
        initializer=[helper.make_tensor("axis", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")


def test_constants_are_fed_from_the_manifest_unless_a_request_overrides_them(tmp_path):
    folder = tmp_path / "tiny" / "1"
    folder.mkdir(parents=True)
    tensor_graph(folder)
    def t(name, shape):
        return {"name": name, "dtype": "float32", "shape": shape}

    manifest = {
        "manifest_version": 2, "name": "tiny", "version": 1,
        "graph": {"file": "model.onnx",
                  "sha256": hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()},
        "inputs": [t("x", ["batch", "time"]), t("s", ["batch", 1]), t("scale", [])],
        "outputs": [t("y", ["batch", "time"]), t("s_out", ["batch", 1])],
        "state": [{"input": "s", "output": "s_out", "dtype": "float32", "shape": ["batch", 1],
                   "batch_axis": 0, "init": "zeros"}],
        "constants": [{"name": "scale", "dtype": "float32", "shape": [], "value": 2.0,
                       "overridable": True}],
        "sequence": {"axis": "time", "lengths": None},
        "adapter": {"type": "tensor"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    engine = Engine(read_manifest(folder))
    engine.warm_up()
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
    feeds = {"x": x, **engine.layout.stack([None, np.array([10.0], dtype=np.float32)])}
    out = engine.run(feeds)
    assert set(out) == {"y", "s_out"}
    np.testing.assert_array_equal(out["y"], 2 * x)
    np.testing.assert_array_equal(out["s_out"], [[12.0], [40.0]])
    out = engine.run({**feeds, "scale": np.array(-1.0, dtype=np.float32)})
    np.testing.assert_array_equal(out["y"], -x)
    np.testing.assert_array_equal(out["s_out"], [[-6.0], [-5.0]])
