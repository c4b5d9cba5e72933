"""Reading manifests: what the service relies on is checked, with the file named."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
from carousel.service.manifest import ManifestError, read_manifest

GOOD = {
    "manifest_version": 1, "name": "m", "version": 3, "variant": "gru",
    "architecture": {"variant": "gru", "num_layers": 2, "hidden_size": 8, "embed_dim": 4,
                     "vocab_size": 256, "parameters": 1},
    "tokenizer": {"type": "bytes", "encoding": "utf-8", "vocab_size": 256},
    "inputs": [{"name": "tokens", "dtype": "int64", "shape": ["batch", "time"]},
               {"name": "state_h", "dtype": "float32", "shape": [2, "batch", 8]},
               {"name": "lengths", "dtype": "int32", "shape": ["batch"]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "time", 256]},
                {"name": "state_h_out", "dtype": "float32", "shape": [2, "batch", 8]}],
    "state": [{"input": "state_h", "output": "state_h_out", "dtype": "float32",
               "shape": [2, "batch", 8], "batch_axis": 1, "init": "zeros"}],
    "graph": {"file": "model.onnx", "sha256": None},
}


def write(tmp_path: Path, manifest: dict, graph: bytes = b"graph") -> Path:
    folder = tmp_path / "m" / "3"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(graph)
    manifest = copy.deepcopy(manifest)
    if manifest.get("graph", {}).get("sha256", "") is None:
        manifest["graph"]["sha256"] = hashlib.sha256(graph).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_good_manifest_gives_the_state_without_its_batch_axis(tmp_path):
    m = read_manifest(write(tmp_path, GOOD))
    assert (m.name, m.version, m.vocab_size, m.lengths_dtype) == ("m", 3, 256, "int32")
    assert [(s.input, s.output, s.shape, s.batch_axis) for s in m.states] == [
        ("state_h", "state_h_out", (2, 8), 1)]
    assert m.essentials()["state_names"] == ["state_h"] and m.essentials()["num_layers"] == 2


def broken(**changes):
    m = copy.deepcopy(GOOD)
    for path, value in changes.items():
        target = m
        keys = path.split("__")
        for k in keys[:-1]:
            target = target[int(k)] if k.isdigit() else target[k]
        target[keys[-1]] = value
    return m


@pytest.mark.parametrize("manifest, words", [
    (broken(manifest_version=2), "manifest_version"),
    (broken(name="other"), "does not match its folder"),
    (broken(version=4), "does not match its folder"),
    (broken(tokenizer__type="bpe"), "tokenizer"),
    (broken(inputs__0__dtype="int32"), "tokens"),
    (broken(state__0__batch_axis=0), "bad state entry"),
    (broken(state__0__output="nope"), "bad state entry"),
    (broken(state=[]), "no state pairs"),
    (broken(graph__file="missing.onnx"), "missing"),
    (broken(graph__sha256="0" * 64), "sha256"),
])
def test_broken_manifests_are_refused_naming_the_file(tmp_path, manifest, words):
    folder = write(tmp_path, manifest)
    with pytest.raises(ManifestError) as e:
        read_manifest(folder)
    assert str(folder / "manifest.json") in str(e.value) and words in str(e.value)


def test_unreadable_json_is_refused(tmp_path):
    folder = write(tmp_path, GOOD)
    (folder / "manifest.json").write_text("{nope")
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(folder)
