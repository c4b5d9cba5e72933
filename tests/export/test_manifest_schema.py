"""manifest.json against its JSON Schema: exported ones, broken ones, and every bundled one."""

from __future__ import annotations

import copy
import hashlib
import json

import jsonschema
import pytest
from carousel.export import ExportError, export_checkpoint
from carousel.export.manifest import load_schema, validate_manifest

from carousel.paths import bundled_model_repository


@pytest.fixture(scope="module")
def validator():
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_checkpoint):
    repo = tmp_path_factory.mktemp("repo")
    manifests = {}
    for variant in ("lstm", "peephole", "coupled", "gru"):
        _, ckpt = make_checkpoint(variant, num_layers=1, hidden=16, embed=8)
        folder = export_checkpoint(ckpt, repo, variant)
        manifests[variant] = json.loads((folder / "manifest.json").read_text())
    return manifests


def test_exported_manifests_are_valid(validator, exported):
    for manifest in exported.values():
        validator.validate(manifest)
        validate_manifest(manifest)  # the check `carousel import` runs before writing


def test_exported_manifests_are_version_2_byte_lm(exported):
    for variant, manifest in exported.items():
        assert manifest["manifest_version"] == 2
        assert manifest["adapter"] == {"type": "byte_lm", "tokens": "tokens", "logits": "logits"}
        assert manifest["sequence"] == {"axis": "time", "lengths": "lengths"}
        assert manifest["constants"] == []
        assert manifest["source"] == {"kind": "export"}
        assert manifest["description"].startswith("byte-level ")
        assert ("GRU" in manifest["description"]) == (variant == "gru")


def test_validate_manifest_names_the_broken_place(exported):
    broken = mutate(exported["gru"], ("state", 0, "batch_axis"), -1)
    with pytest.raises(ExportError, match="state/0/batch_axis"):
        validate_manifest(broken)


def mutate(manifest, path, value):
    broken = copy.deepcopy(manifest)
    *parents, last = path
    target = broken
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return broken


@pytest.mark.parametrize("path, value", [
    (("graph", "sha256"), "not-a-digest"),
    (("graph", "file"), "../model.onnx"),
    (("graph",), KeyError),
    (("state",), []),
    (("state", 0, "batch_axis"), -1),
    (("state", 0, "init"), "random"),
    (("state", 0, "dtype"), "float64"),
    (("inputs", 0, "dtype"), "complex64"),
    (("inputs", 0, "shape", 0), 0),
    (("inputs", 0, "unit"), "bytes"),
    (("outputs",), []),
    (("constants",), [{"name": "gain", "dtype": "float32", "shape": [], "value": "high"}]),
    (("constants",), [{"name": "gain", "dtype": "float32", "shape": ["batch"], "value": 1}]),
    (("sequence",), KeyError),  # a byte_lm model must say where its time axis is
    (("sequence", "axis"), ""),
    (("adapter",), KeyError),
    (("adapter", "type"), "chat"),
    (("adapter", "logits"), KeyError),
    (("tokenizer",), KeyError),
    (("tokenizer", "type"), "bpe"),
    (("source", "kind"), "download"),
    (("variant",), "transformer"),
    (("version",), 0),
    (("version",), "1"),
    (("name",), "../escape"),
    (("manifest_version",), 1),
    (("quantization",), {"mode": "int8"}),
    (("exported_at",), "yesterday"),
    (("training", "corpus"), KeyError),
    (("training", "steps"), -1),
])
def test_schema_rejects_broken_manifests(validator, exported, path, value):
    broken = mutate(exported["lstm"], path, value)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


def test_every_bundled_manifest_is_valid(validator):
    """Whatever the bundled repository holds must be loadable by the service: every version
    folder has a manifest that validates and a graph whose sha256 matches it."""
    root = bundled_model_repository()
    checked = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            assert not version_dir.name.startswith("."), f"leftover staging folder {version_dir}"
            assert version_dir.name.isdigit(), f"{version_dir} is not an integer version"
            manifest_path = version_dir / "manifest.json"
            assert manifest_path.is_file(), f"{version_dir} has no manifest.json"
            manifest = json.loads(manifest_path.read_text())
            validator.validate(manifest)
            assert manifest["name"] == model_dir.name
            assert manifest["version"] == int(version_dir.name)
            graph = version_dir / manifest["graph"]["file"]
            assert hashlib.sha256(graph.read_bytes()).hexdigest() == manifest["graph"]["sha256"]
            checked.append(f"{model_dir.name}/{version_dir.name}")
    # Reported with -rA; the bundled set grows as models are exported.
    print("bundled manifests checked:", checked)
