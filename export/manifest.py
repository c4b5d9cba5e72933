"""manifest.json: the one description of a model version the service reads besides the graph.

The schema is service/manifest.schema.json; the tests validate every bundled manifest with it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("carousel", *TOOLS):
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


def training_provenance(metrics: dict) -> dict:
    """What the checkpoint says about its training (None where a checkpoint has no record)."""
    keys = ("corpus", "steps", "tokens_seen", "val_bpb", "parameters")
    return {k: metrics.get(k) for k in keys}


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
    return {
        "manifest_version": MANIFEST_VERSION,
        "name": name,
        "version": version,
        "variant": config.variant,
        "architecture": {
            "variant": config.variant,
            "num_layers": config.num_layers,
            "hidden_size": config.hidden_size,
            "embed_dim": config.embed_dim,
            "vocab_size": config.vocab_size,
            "parameters": parameters,
        },
        "description": f"byte-level {config.variant} language model",
        "tokenizer": {"type": "bytes", "encoding": "utf-8", "vocab_size": config.vocab_size},
        "inputs": inputs,
        "outputs": outputs,
        "state": state,
        "constants": [],
        "sequence": {"axis": TIME, "lengths": LENGTHS},
        "adapter": {"type": "byte_lm", "tokens": TOKENS, "logits": LOGITS},
        "source": {"kind": "export"},
        "opset": OPSET,
        "graph": {"file": graph_path.name, "sha256": sha256_file(graph_path),
                  "bytes": graph_path.stat().st_size},
        "training": training_provenance(metrics),
        "quantization": quantization,
        "verification": verification,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "tools": tool_versions(),
    }


def write_manifest(manifest: dict, path: Path) -> None:
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def load_schema() -> dict:
    """The one manifest schema, beside its reader (the service): export writes what it reads."""
    from carousel.service.manifest import load_schema as service_schema

    return service_schema()
