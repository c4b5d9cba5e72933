"""Reading manifests (version 2): the schema, then what it cannot say; every refusal names
the file and the problem."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from carousel.service.manifest import ManifestError, read_manifest
from core_fakes import GRAPH, LM_MANIFEST, TENSOR_MANIFEST, write_manifest

REPO = Path(__file__).resolve().parents[3]


def lm(**top) -> dict:
    return {**copy.deepcopy(LM_MANIFEST), "name": "m", "version": 3, **top}


def tensor(**top) -> dict:
    return {**copy.deepcopy(TENSOR_MANIFEST), "name": "m", "version": 3, **top}


def test_a_byte_lm_manifest_gives_its_tensors_state_and_adapter(tmp_path):
    folder = write_manifest(tmp_path, lm())
    m = read_manifest(folder)
    assert (m.name, m.version, m.adapter, m.vocab_size) == ("m", 3, "byte_lm", 256)
    assert (m.tokens, m.logits, m.sequence_axis) == ("tokens", "logits", "time")
    # Per-step inputs and results only: state, constants and lengths are not among them.
    assert [(t.name, t.dtype, t.shape, t.batch_axis, t.seq_axis) for t in m.inputs] == [
        ("tokens", np.dtype("int64"), ("batch", "time"), 0, 1)]
    assert [(t.name, t.shape) for t in m.outputs] == [("logits", ("batch", "time", 256))]
    assert [(s.input, s.output, s.shape, s.batch_axis, s.size) for s in m.states] == [
        ("state_a", "state_a_out", (2, 3), 1, 6), ("state_b", "state_b_out", (4,), 0, 4)]
    assert (m.lengths.name, m.lengths.dtype, m.constants) == ("lengths", np.dtype("int32"), ())
    assert m.graph_file == folder / "model.onnx"
    assert m.graph_sha256 == hashlib.sha256(GRAPH).hexdigest()
    assert m.sha256 == hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    e = m.essentials()
    assert e["state_names"] == ["state_a", "state_b"] and e["state_bytes"] == 40
    assert e["state"] == [{"name": "state_a", "shape": [2, "batch", 3], "batch_axis": 1},
                          {"name": "state_b", "shape": ["batch", 4], "batch_axis": 0}]
    assert e["adapter"] == "byte_lm" and "inputs" not in e


def test_a_tensor_manifest_gives_inputs_in_row_form_and_its_constants(tmp_path):
    m = read_manifest(write_manifest(tmp_path, tensor()))
    assert (m.adapter, m.vocab_size, m.lengths, m.sequence_axis) == ("tensor", None, None, "time")
    x, u = m.inputs
    assert (x.name, x.batch_axis, x.seq_axis, x.row_shape, x.row_seq_axis) == (
        "x", 1, 0, ("time", 3), 0)
    assert (u.name, u.batch_axis, u.seq_axis, u.row_shape, u.row_seq_axis) == (
        "u", 0, 1, ("time",), 0)
    assert x.dims(5) == [-1, 5, 3]
    assert [(t.name, t.batch_axis) for t in m.outputs] == [("y", 1), ("energy", 0)]
    assert [(s.input, s.shape, s.batch_axis) for s in m.states] == [
        ("h", (2,), 0), ("c", (2, 3), 2)]
    (scale,) = m.constants
    assert (scale.name, scale.overridable, scale.value.dtype, scale.value.shape) == (
        "scale", True, np.dtype("float32"), ())
    assert float(scale.value) == 1.0
    e = m.essentials()
    assert [t["name"] for t in e["inputs"]] == ["x", "u"] and e["state_bytes"] == 32
    assert e["outputs"][0] == {"name": "y", "dtype": "float32", "shape": ["time", "batch", 2]}


def test_the_bundled_manifests_are_valid_examples():
    folders = sorted(REPO.glob("models/*/1"))
    assert folders
    for folder in folders:
        m = read_manifest(folder, check_sha256=False)
        assert m.adapter == "byte_lm" and m.lengths is not None and m.vocab_size == 256


def edit(base: dict, change) -> dict:
    change(base)
    return base


def drop_input(m: dict, name: str) -> None:
    m["inputs"] = [t for t in m["inputs"] if t["name"] != name]


def set_input(m: dict, name: str, **fields) -> None:
    next(t for t in m["inputs"] if t["name"] == name).update(fields)


BROKEN = {
    # what the schema says
    "old version": (lm(manifest_version=1), "manifest_version must be 2"),
    "schema: tokenizer": (edit(lm(), lambda m: m["tokenizer"].update(type="bpe")),
                          "tokenizer/type: 'bytes' was expected"),
    "schema: no state": (lm(state=[]), "state: [] should be non-empty"),
    "schema: sha256": (edit(lm(), lambda m: m["graph"].update(sha256="abc")),
                       "graph/sha256: 'abc' does not match"),
    "schema: unknown tensor field": (edit(lm(), lambda m: m["inputs"][0].update(foo=1)),
                                     "inputs/0: Additional properties are not allowed ('foo'"),
    "schema: dtype": (edit(lm(), lambda m: m["inputs"][0].update(dtype="float8")),
                      "inputs/0/dtype: 'float8' is not one of"),
    "schema: adapter": (edit(lm(), lambda m: m["adapter"].update(type="tensorflow")),
                        "adapter: "),
    "schema: byte_lm without sequence": (edit(lm(), lambda m: m.pop("sequence")),
                                         "(top level): 'sequence' is a required property"),
    "schema: state init": (edit(lm(), lambda m: m["state"][0].update(init="random")),
                           "state/0/init: 'zeros' was expected"),
    # what the service checks after the schema
    "name": (lm(name="other"), "name 'other' does not match its folder 'm'"),
    "version": (lm(version=4), "version 4 does not match its folder '3'"),
    "duplicate names": (edit(tensor(), lambda m: m["inputs"].append(m["inputs"][0])),
                        "tensor names must be unique"),
    "state batch axis": (edit(lm(), lambda m: m["state"][0].update(batch_axis=0)),
                         "state 'state_a': shape [2, 'batch', 3] needs 'batch' at batch_axis 0"),
    "state not listed": (edit(lm(), lambda m: m["state"][0].update(output="nope")),
                         "state tensor 'nope' must be listed with shape [2, 'batch', 3]"),
    "missing batch axis": (edit(tensor(), lambda m: set_input(m, "x", shape=["time", 3])),
                           "'x' needs exactly one 'batch' dimension"),
    "result without batch axis": (
        edit(tensor(), lambda m: m["outputs"][1].update(shape=[1])),
        "'energy' needs exactly one 'batch' dimension"),
    "constant with a batch axis": (
        edit(tensor(), lambda m: (set_input(m, "scale", shape=["batch"]),
                                  m["constants"][0].update(shape=[2], value=[1.0, 1.0]))),
        "constant 'scale' must be an input without a batch axis"),
    "constant not an input": (edit(tensor(), lambda m: m["constants"][0].update(name="nope")),
                              "constant 'nope' must be an input without a batch axis"),
    "constant value": (edit(tensor(), lambda m: m["constants"][0].update(value=[1.0, 2.0])),
                       "constant 'scale': cannot reshape"),
    "no time axis": (edit(tensor(), lambda m: set_input(m, "u", shape=["batch", 1])),
                     "per-step input 'u' has no 'time' dimension"),
    "no per-step input": (edit(tensor(), lambda m: (drop_input(m, "x"), drop_input(m, "u"))),
                          "the graph has no per-step input"),
    "lengths dtype": (edit(lm(), lambda m: set_input(m, "lengths", dtype="float32")),
                      "sequence.lengths 'lengths' must be an int32/int64 input [batch]"),
    "byte_lm without lengths": (
        edit(lm(), lambda m: (m["sequence"].update(lengths=None), drop_input(m, "lengths"))),
        "a byte_lm needs sequence.lengths"),
    "byte_lm tokens dtype": (edit(lm(), lambda m: set_input(m, "tokens", dtype="int32")),
                             "'tokens' must be int64 [batch, time]"),
    "byte_lm logits": (edit(lm(), lambda m: m["outputs"][0].update(shape=["batch", "time", 9])),
                       "'logits' must be float32 [batch, time, 256]"),
    "byte_lm two inputs": (
        edit(lm(), lambda m: m["inputs"].append(
            {"name": "extra", "dtype": "float32", "shape": ["batch", "time"]})),
        "a byte_lm takes one per-step input, 'tokens'"),
    "graph file": (edit(lm(), lambda m: m["graph"].update(file="missing.onnx")),
                   "graph file missing.onnx is missing"),
    "graph sha256": (edit(lm(), lambda m: m["graph"].update(sha256="0" * 64)),
                     "model.onnx does not match its sha256"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_manifests_are_refused_naming_the_file_and_the_problem(tmp_path, case):
    manifest, words = BROKEN[case]
    folder = tmp_path / "m" / "3"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(GRAPH)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError) as e:
        read_manifest(folder)
    assert str(e.value).startswith(f"{folder / 'manifest.json'}: ") and words in str(e.value), \
        str(e.value)


def test_a_wrong_sha256_is_accepted_when_not_checked(tmp_path):
    folder = write_manifest(tmp_path, edit(lm(), lambda m: m["graph"].update(sha256="0" * 64)))
    assert read_manifest(folder, check_sha256=False).graph_sha256 == "0" * 64


def test_unreadable_json_is_refused(tmp_path):
    folder = write_manifest(tmp_path, lm())
    (folder / "manifest.json").write_text("{nope")
    with pytest.raises(ManifestError, match="cannot read manifest") as e:
        read_manifest(folder)
    assert str(folder / "manifest.json") in str(e.value)
    (folder / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ManifestError, match="manifest is not a JSON object"):
        read_manifest(folder)
