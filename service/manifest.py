"""Reading a model version's manifest.json: the only thing the service knows about a model.

One JSON Schema (manifest.schema.json, beside this file) says what a manifest may hold; this
module validates against it, then checks what the schema cannot (names that must exist, one
batch axis per batched tensor) and turns it into the specs the core works with:

- per-step inputs: what a client sends each step (tokens, audio frames, feature vectors);
- state pairs: an input fed from the session and the output that replaces it, each with its
  own batch axis;
- constants: inputs without a batch axis, the manifest's value unless a request overrides it;
- the sequence axis (a named dimension of the per-step inputs) and, if the graph takes one,
  the lengths input that lets rows of different lengths share a padded batch;
- results: the outputs that are not state;
- the adapter: `byte_lm` (text, tokens, top-k, sampling) or `tensor` (named tensors in, named
  tensors out).

The service never learns the architecture: state is whatever pairs are listed.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BATCH = "batch"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
SUPPORTED_MANIFEST_VERSION = 2
BYTE_LM, TENSOR = "byte_lm", "tensor"


class ManifestError(Exception):
    """A model version in the repository cannot be served; the message names the file."""


@functools.cache
def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


@functools.cache
def _validator():
    import jsonschema  # only at load time: a few ms, once

    return jsonschema.Draft202012Validator(load_schema())


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the manifest declares it.

    `shape` is the manifest's: ints, "batch", or names of dynamic dimensions. Inside the core
    a session's tensors have no batch axis ("row form"): `row_shape`, with `row_seq_axis` the
    sequence axis there."""

    name: str
    dtype: np.dtype
    shape: tuple
    batch_axis: int | None
    seq_axis: int | None

    @property
    def row_shape(self) -> tuple:
        return tuple(d for i, d in enumerate(self.shape) if i != self.batch_axis)

    @property
    def row_seq_axis(self) -> int | None:
        if self.seq_axis is None:
            return None
        return self.seq_axis - (self.batch_axis is not None and self.batch_axis < self.seq_axis)

    def dims(self, batch: int = -1) -> list[int]:
        """The shape with every dynamic dimension as -1 (and the batch axis as `batch`)."""
        return [d if isinstance(d, int) else (batch if d == BATCH else -1) for d in self.shape]


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
class ConstantSpec:
    name: str
    value: np.ndarray  # fed as it is, without a batch axis
    overridable: bool


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    adapter: str  # BYTE_LM or TENSOR
    inputs: tuple[TensorSpec, ...]  # per-step inputs
    outputs: tuple[TensorSpec, ...]  # results (outputs that are not state)
    states: tuple[StateSpec, ...]
    constants: tuple[ConstantSpec, ...]
    sequence_axis: str | None  # the dimension name steps run along, if any
    lengths: TensorSpec | None  # rows may be padded along the sequence axis when set
    graph_file: Path
    graph_sha256: str | None
    sha256: str  # of manifest.json itself: a session's state is only valid for this
    raw: dict  # the whole manifest, for GET /v1/models

    @property
    def vocab_size(self) -> int | None:
        tokenizer = self.raw.get("tokenizer") or {}
        return tokenizer.get("vocab_size") if self.adapter == BYTE_LM else None

    @property
    def tokens(self) -> str | None:
        return self.raw["adapter"].get("tokens")

    @property
    def logits(self) -> str | None:
        return self.raw["adapter"].get("logits")

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    def essentials(self) -> dict:
        """What GET /v1/models shows for this version."""
        arch = self.raw.get("architecture", {})
        out = {
            "name": self.name,
            "version": self.version,
            "adapter": self.adapter,
            "description": self.raw.get("description"),
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
        if self.adapter == TENSOR:
            out["inputs"] = [{"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape)}
                             for t in self.inputs]
            out["outputs"] = [{"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape)}
                              for t in self.outputs]
        return out

    def raw_state_shape(self, spec: StateSpec) -> list:
        shape: list = list(spec.shape)
        shape.insert(spec.batch_axis, BATCH)
        return shape


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise ManifestError(f"{path}: {what}")


def _tensor(t: dict, sequence_axis: str | None) -> TensorSpec:
    shape = tuple(t["shape"])
    batch = shape.index(BATCH) if BATCH in shape else None
    seq = shape.index(sequence_axis) if sequence_axis in shape else None
    return TensorSpec(t["name"], np.dtype(t["dtype"]), shape, batch, seq)


def read_manifest(version_dir: Path, *, check_sha256: bool = True) -> Manifest:
    """Read and check `<version_dir>/manifest.json`; raise ManifestError naming what is wrong."""
    path = version_dir / "manifest.json"
    try:
        text = path.read_bytes()
        raw = json.loads(text)
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: cannot read manifest: {e}") from e
    _require(isinstance(raw, dict), path, "manifest is not a JSON object")
    _require(raw.get("manifest_version") == SUPPORTED_MANIFEST_VERSION, path,
             f"manifest_version must be {SUPPORTED_MANIFEST_VERSION} (re-export or re-import "
             "the model with this carousel)")
    error = next(iter(sorted(_validator().iter_errors(raw), key=lambda e: e.path)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ManifestError(f"{path}: {where}: {error.message}")
    name, version = raw["name"], raw["version"]
    _require(name == version_dir.parent.name, path,
             f"name {name!r} does not match its folder {version_dir.parent.name!r}")
    _require(str(version) == version_dir.name, path,
             f"version {version!r} does not match its folder {version_dir.name!r}")

    sequence = raw.get("sequence") or {}
    axis = sequence.get("axis")
    inputs = {t["name"]: _tensor(t, axis) for t in raw["inputs"]}
    outputs = {t["name"]: _tensor(t, axis) for t in raw["outputs"]}
    _require(len(inputs) == len(raw["inputs"]) and len(outputs) == len(raw["outputs"]), path,
             "tensor names must be unique")

    states = []
    for s in raw["state"]:
        shape, batch_axis = s["shape"], s["batch_axis"]
        ok = (batch_axis < len(shape) and shape[batch_axis] == BATCH
              and all(isinstance(d, int) for i, d in enumerate(shape) if i != batch_axis))
        _require(ok, path, f"state {s['input']!r}: shape {shape} needs 'batch' at batch_axis "
                           f"{batch_axis} and fixed sizes elsewhere")
        for tensor, table in ((s["input"], inputs), (s["output"], outputs)):
            _require(tensor in table and list(table[tensor].shape) == shape, path,
                     f"state tensor {tensor!r} must be listed with shape {shape}")
        states.append(StateSpec(s["input"], s["output"], batch_axis=batch_axis,
                                shape=tuple(d for i, d in enumerate(shape) if i != batch_axis)))

    constants = []
    for c in raw.get("constants") or []:
        _require(c["name"] in inputs and inputs[c["name"]].batch_axis is None, path,
                 f"constant {c['name']!r} must be an input without a batch axis")
        spec = inputs[c["name"]]
        try:
            value = np.array(c["value"], dtype=spec.dtype).reshape(c["shape"])
        except (ValueError, TypeError) as e:
            raise ManifestError(f"{path}: constant {c['name']!r}: {e}") from e
        _require(list(value.shape) == list(spec.shape), path,
                 f"constant {c['name']!r} has shape {list(value.shape)}, the input {spec.shape}")
        constants.append(ConstantSpec(c["name"], value, bool(c.get("overridable", False))))

    lengths = None
    if sequence.get("lengths"):
        lengths = inputs.get(sequence["lengths"])
        _require(lengths is not None and lengths.shape == (BATCH,)
                 and lengths.dtype in (np.int32, np.int64), path,
                 f"sequence.lengths {sequence['lengths']!r} must be an int32/int64 input [batch]")

    taken = {s.input for s in states} | {c.name for c in constants}
    taken |= {lengths.name} if lengths is not None else set()
    per_step = tuple(t for n, t in inputs.items() if n not in taken)
    results = tuple(t for n, t in outputs.items() if n not in {s.output for s in states})
    for t in (*per_step, *results):
        _require(t.batch_axis is not None and t.shape.count(BATCH) == 1, path,
                 f"{t.name!r} needs exactly one 'batch' dimension (or list it as a constant)")
    _require(bool(per_step), path, "the graph has no per-step input")
    for t in per_step:
        _require(axis is None or t.seq_axis is not None, path,
                 f"per-step input {t.name!r} has no {axis!r} dimension")

    adapter = raw["adapter"]["type"]
    if adapter == BYTE_LM:
        tokens, logits = raw["adapter"]["tokens"], raw["adapter"]["logits"]
        vocab = raw["tokenizer"]["vocab_size"]
        _require([t.name for t in per_step] == [tokens], path,
                 f"a byte_lm takes one per-step input, {tokens!r}")
        _require(inputs[tokens].dtype == np.int64 and len(inputs[tokens].shape) == 2, path,
                 f"{tokens!r} must be int64 [batch, {axis}]")
        _require(logits in outputs and outputs[logits].dtype == np.float32
                 and outputs[logits].shape[-1] == vocab and len(outputs[logits].shape) == 3,
                 path, f"{logits!r} must be float32 [batch, {axis}, {vocab}]")
        _require(lengths is not None, path, "a byte_lm needs sequence.lengths")

    graph = raw["graph"]
    graph_file = version_dir / graph["file"]
    _require(graph_file.is_file(), path, f"graph file {graph_file.name} is missing")
    sha = graph.get("sha256")
    if check_sha256 and sha:
        digest = hashlib.sha256(graph_file.read_bytes()).hexdigest()
        _require(digest == sha, path, f"{graph_file.name} does not match its sha256")

    return Manifest(
        name=name, version=version, adapter=adapter, inputs=per_step, outputs=results,
        states=tuple(states), constants=tuple(constants), sequence_axis=axis, lengths=lengths,
        graph_file=graph_file, graph_sha256=sha, sha256=hashlib.sha256(text).hexdigest(),
        raw=raw,
    )
