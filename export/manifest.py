"""manifest.json: the one description of a model version the service reads besides the graph.

The schema is service/manifest.schema.json (version 2), kept beside its reader; both
`carousel export` (a byte-level language model, `byte_lm` adapter) and `carousel import` (any
stateful graph, `tensor` adapter) write it, from the helpers here. The tests validate every
bundled manifest with it.

Manifests are served to clients (GET /v1/models), so nothing in one may name a path of the
machine that built it: corpus descriptions keep file and folder names only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import re
from importlib import metadata
from pathlib import Path

from .errors import ExportError
from .names import (
    BATCH,
    BATCH_AXIS,
    LENGTHS,
    LOGITS,
    OPSET,
    TIME,
    TOKENS,
    state_input,
    state_output,
)

MANIFEST_VERSION = 2
TOOLS = ("onnx", "onnxruntime", "torch", "numpy")
SCHEMA_FILE = "manifest.schema.json"  # in the carousel.service package


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tool_versions(tools: tuple[str, ...] = TOOLS) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("carousel", *tools):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # a source checkout without the dist installed
            versions[dist] = "unknown"
    return versions


def io_spec(config) -> tuple[list[dict], list[dict], list[dict]]:
    """The graph's inputs, outputs and state pairs as the manifest lists them."""
    L, H, V = config.num_layers, config.hidden_size, config.vocab_size
    state_shape = [L, BATCH, H]
    inputs = [{"name": TOKENS, "dtype": "int64", "shape": [BATCH, TIME]}]
    inputs += [{"name": state_input(s), "dtype": "float32", "shape": state_shape}
               for s in config.state_names]
    inputs.append({"name": LENGTHS, "dtype": "int32", "shape": [BATCH]})
    outputs = [{"name": LOGITS, "dtype": "float32", "shape": [BATCH, TIME, V]}]
    outputs += [{"name": state_output(s), "dtype": "float32", "shape": state_shape}
                for s in config.state_names]
    state = [
        {"input": state_input(s), "output": state_output(s), "dtype": "float32",
         "shape": state_shape, "batch_axis": BATCH_AXIS, "init": "zeros"}
        for s in config.state_names
    ]
    return inputs, outputs, state


def timestamp() -> str:
    """When a version was written (the manifest's `exported_at`), UTC, to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def graph_record(graph_path: Path) -> dict:
    """The manifest's `graph` block: the file beside the manifest, its digest and size."""
    return {"file": graph_path.name, "sha256": sha256_file(graph_path),
            "bytes": graph_path.stat().st_size}


_STDLIB = re.compile(r"python stdlib \.py files under (?P<root>.+)")
_PYTHON_VERSION = re.compile(r"python(\d+\.\d+)")
_FILES = "files: "
_ABSOLUTE_PATH = re.compile(r"(?:[A-Za-z]:)?[\\/][^\s,;]*")


def _basename(path: str) -> str:
    # Either separator: a description written on Windows is scrubbed here too.
    return re.split(r"[\\/]", path.rstrip("/\\"))[-1] or path


def public_corpus(description: str | None) -> str | None:
    """A corpus description without the build machine's directories.

    The trainer describes the stdlib corpus by its folder and a given corpus by the paths it
    was handed; the manifest keeps the Python version of the one and the file or folder names
    of the other. Any other text keeps its words, with each absolute path cut to its last
    segment."""
    if description is None:
        return None
    stdlib = _STDLIB.fullmatch(description)
    if stdlib:
        version = _PYTHON_VERSION.search(stdlib["root"])
        return "python stdlib .py files" + (f" (Python {version[1]})" if version else "")
    if description.startswith(_FILES):
        paths = description.removeprefix(_FILES).split(", ")
        return _FILES + ", ".join(_basename(p) for p in paths)
    return _ABSOLUTE_PATH.sub(lambda m: _basename(m[0]), description)


def training_provenance(metrics: dict) -> dict:
    """What the checkpoint says about its training (None where a checkpoint has no record)."""
    keys = ("corpus", "steps", "tokens_seen", "val_bpb", "parameters")
    record = {k: metrics.get(k) for k in keys}
    record["corpus"] = public_corpus(record["corpus"])
    return record


VARIANT_WORDS = {"lstm": "LSTM", "peephole": "peephole LSTM", "coupled": "coupled-gate LSTM",
                 "gru": "GRU"}


def describe_export(config, corpus: str | None) -> str:
    """'byte-level LSTM language model trained on <corpus>', the bundled manifests' wording."""
    what = f"byte-level {VARIANT_WORDS.get(config.variant, config.variant)} language model"
    return f"{what} trained on {corpus}" if corpus else what


def build_manifest(
    *,
    name: str,
    version: int,
    config,
    parameters: int,
    metrics: dict,
    graph_path: Path,
    verification: dict | None,
    quantization: dict | None = None,
) -> dict:
    inputs, outputs, state = io_spec(config)
    training = training_provenance(metrics)
    if quantization:  # its validation text is described like the training corpus
        validation = quantization["validation"]
        quantization = {**quantization,
                        "validation": {**validation, "corpus": public_corpus(validation["corpus"])}}
    return {
        "manifest_version": MANIFEST_VERSION,
        "name": name,
        "version": version,
        "description": describe_export(config, training["corpus"]),
        "graph": graph_record(graph_path),
        "inputs": inputs,
        "outputs": outputs,
        "state": state,
        "constants": [],
        "sequence": {"axis": TIME, "lengths": LENGTHS},
        "adapter": {"type": "byte_lm", "tokens": TOKENS, "logits": LOGITS},
        "tokenizer": {"type": "bytes", "encoding": "utf-8", "vocab_size": config.vocab_size},
        "source": {"kind": "export"},
        "variant": config.variant,
        "architecture": {
            "variant": config.variant,
            "num_layers": config.num_layers,
            "hidden_size": config.hidden_size,
            "embed_dim": config.embed_dim,
            "vocab_size": config.vocab_size,
            "parameters": parameters,
        },
        "opset": OPSET,
        "training": training,
        "quantization": quantization,
        "verification": verification,
        "exported_at": timestamp(),
        "tools": tool_versions(),
    }


def write_manifest(manifest: dict, path: Path) -> None:
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def load_schema() -> dict:
    """The one manifest schema, kept beside its reader (the service): export writes what it reads.

    Read as package data, so neither the service's modules nor anything they import load."""
    from importlib import resources

    return json.loads(resources.files("carousel.service").joinpath(SCHEMA_FILE).read_text())


def validate_manifest(manifest: dict) -> None:
    """Raise ExportError naming the first place `manifest` breaks the schema.

    jsonschema is needed only here, so it is imported here (the service validates at load
    with the same schema)."""
    try:
        import jsonschema
    except ImportError as e:
        raise ExportError("checking the manifest needs jsonschema: pip install jsonschema") from e
    validator = jsonschema.Draft202012Validator(
        load_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "(top level)"
        raise ExportError(f"the manifest does not follow the schema at {where}: {error.message}")
