"""Reading a model version's manifest.json: the only thing the service knows about a model.

The service checks what it relies on (tensor names, dtypes, state pairs, tokenizer) and keeps
the rest for display. It never learns the architecture: state is whatever pairs are listed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

TOKENS = "tokens"
LENGTHS = "lengths"
LOGITS = "logits"
SUPPORTED_MANIFEST_VERSION = 1


class ManifestError(Exception):
    """A model version in the repository cannot be served; the message names the file."""


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: fed as `input`, returned as `output`, batched along `batch_axis`."""

    input: str
    output: str
    shape: tuple[int, ...]  # per session: the manifest's shape without the batch axis
    batch_axis: int

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    vocab_size: int
    states: tuple[StateSpec, ...]
    lengths_dtype: str  # numpy dtype name of the lengths input
    graph_file: Path
    graph_sha256: str | None
    raw: dict  # the whole manifest, for GET /v1/models

    def essentials(self) -> dict:
        """What GET /v1/models shows for this version."""
        arch = self.raw.get("architecture", {})
        return {
            "name": self.name,
            "version": self.version,
            "variant": self.raw.get("variant", arch.get("variant")),
            "num_layers": arch.get("num_layers"),
            "hidden_size": arch.get("hidden_size"),
            "embed_dim": arch.get("embed_dim"),
            "parameters": arch.get("parameters"),
            "vocab_size": self.vocab_size,
            "tokenizer": self.raw.get("tokenizer"),
            "state": [
                {"name": s.input, "shape": self.raw_state_shape(s), "batch_axis": s.batch_axis}
                for s in self.states
            ],
            "state_names": [s.input for s in self.states],
            "state_bytes": 4 * sum(s.size for s in self.states),
            "training": self.raw.get("training"),
            "quantization": self.raw.get("quantization"),
            "exported_at": self.raw.get("exported_at"),
        }

    def raw_state_shape(self, spec: StateSpec) -> list:
        shape: list = list(spec.shape)
        shape.insert(spec.batch_axis, "batch")
        return shape


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise ManifestError(f"{path}: {what}")


def read_manifest(version_dir: Path, *, check_sha256: bool = True) -> Manifest:
    """Read and check `<version_dir>/manifest.json`; raise ManifestError naming what is wrong."""
    path = version_dir / "manifest.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: cannot read manifest: {e}") from e
    _require(isinstance(raw, dict), path, "manifest is not a JSON object")
    _require(raw.get("manifest_version") == SUPPORTED_MANIFEST_VERSION, path,
             f"manifest_version must be {SUPPORTED_MANIFEST_VERSION}")
    name, version = raw.get("name"), raw.get("version")
    _require(isinstance(name, str) and name == version_dir.parent.name, path,
             f"name {name!r} does not match its folder {version_dir.parent.name!r}")
    _require(isinstance(version, int) and str(version) == version_dir.name, path,
             f"version {version!r} does not match its folder {version_dir.name!r}")

    tokenizer = raw.get("tokenizer") or {}
    _require(tokenizer.get("type") == "bytes" and tokenizer.get("encoding") == "utf-8", path,
             "only the bytes/utf-8 tokenizer is supported")
    vocab = tokenizer.get("vocab_size")
    _require(isinstance(vocab, int) and 1 <= vocab <= 256, path, "tokenizer.vocab_size")

    inputs = {t.get("name"): t for t in raw.get("inputs", [])}
    outputs = {t.get("name"): t for t in raw.get("outputs", [])}
    _require(inputs.get(TOKENS, {}).get("dtype") == "int64", path, "input 'tokens' int64")
    _require(outputs.get(LOGITS, {}).get("dtype") == "float32", path, "output 'logits' float32")
    lengths_dtype = inputs.get(LENGTHS, {}).get("dtype")
    _require(lengths_dtype in ("int32", "int64"), path, "input 'lengths' int32/int64")

    states = []
    for s in raw.get("state") or []:
        shape, axis = s.get("shape"), s.get("batch_axis")
        ok = (
            isinstance(shape, list) and isinstance(axis, int) and 0 <= axis < len(shape)
            and shape[axis] == "batch"
            and all(isinstance(d, int) and d > 0 for i, d in enumerate(shape) if i != axis)
            and s.get("dtype") == "float32" and s.get("init", "zeros") == "zeros"
            and s.get("input") in inputs and s.get("output") in outputs
        )
        _require(ok, path, f"bad state entry {s!r}")
        states.append(StateSpec(
            input=s["input"], output=s["output"], batch_axis=axis,
            shape=tuple(d for i, d in enumerate(shape) if i != axis),
        ))
    _require(bool(states), path, "no state pairs listed")

    graph = raw.get("graph") or {}
    graph_file = version_dir / graph.get("file", "model.onnx")
    _require(graph_file.is_file(), path, f"graph file {graph_file.name} is missing")
    sha = graph.get("sha256")
    if check_sha256 and sha:
        digest = hashlib.sha256(graph_file.read_bytes()).hexdigest()
        _require(digest == sha, path, f"{graph_file.name} does not match its sha256")

    return Manifest(
        name=name, version=version, vocab_size=vocab, states=tuple(states),
        lengths_dtype=lengths_dtype, graph_file=graph_file, graph_sha256=sha, raw=raw,
    )
