"""The benchmark's own view of a model version: find it in a repository, run its graph.

The bench reads the same contract the service reads (manifest + model.onnx) but runs the
graph with its own few lines of onnxruntime, so the in-process limit and the correctness
references never go through the code they measure."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort


@dataclass(frozen=True)
class ModelVersion:
    repository: Path
    name: str
    version: int
    manifest: dict
    random_weights: bool = False  # a stand-in exported by the bench, not the trained model

    @property
    def folder(self) -> Path:
        return self.repository / self.name / str(self.version)

    @property
    def state_bytes(self) -> int:
        """One session's own state: every state tensor with batch 1, float32."""
        total = 0
        for pair in self.manifest["state"]:
            dims = [1 if isinstance(d, str) else int(d) for d in pair["shape"]]
            total += int(np.prod(dims)) * np.dtype(pair["dtype"]).itemsize
        return total

    def describe(self) -> dict:
        arch = self.manifest.get("architecture", {})
        return {
            "repository": str(self.repository),
            "name": self.name,
            "version": self.version,
            "variant": arch.get("variant"),
            "num_layers": arch.get("num_layers"),
            "hidden_size": arch.get("hidden_size"),
            "state_bytes": self.state_bytes,
            "random_weights": self.random_weights,
        }


def find_model(repository: Path, name: str, version: int | None = None) -> ModelVersion | None:
    """The given version, or the highest one; None when the model is not there."""
    folder = Path(repository) / name
    versions = sorted(int(p.name) for p in folder.glob("*")
                      if p.name.isdigit() and (p / "manifest.json").is_file())
    if not versions or (version is not None and version not in versions):
        return None
    chosen = version if version is not None else versions[-1]
    manifest = json.loads((folder / str(chosen) / "manifest.json").read_text())
    return ModelVersion(Path(repository), name, chosen, manifest)


def export_random_model(name: str = "bytelm") -> ModelVersion:
    """The default model's shape (2 x 512 LSTM, 64-wide embedding) with random weights,
    exported through the project's exporter into a temporary repository. Speed does not
    depend on the weights; the results say when this stand-in was used."""
    from carousel.export import export_checkpoint  # needs torch: imported only here
    from carousel.model.model import LanguageModel, ModelConfig

    model = LanguageModel(ModelConfig(variant="lstm", hidden_size=512, num_layers=2, embed_dim=64))
    checkpoint = {"model": model.state_dict(), "config": model.config.to_dict(), "metrics": {}}
    repository = Path(tempfile.mkdtemp(prefix="carousel-bench-"))
    export_checkpoint(checkpoint, repository, name, version=1)
    found = find_model(repository, name, 1)
    assert found is not None, "the exporter wrote no version folder"
    return ModelVersion(found.repository, name, 1, found.manifest, random_weights=True)


def session_options(intra_op_threads: int | None, inter_op_threads: int | None,
                    spinning: bool | None = None):
    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    if inter_op_threads is not None:
        options.inter_op_num_threads = inter_op_threads
    if spinning is not None:  # carousel turns spinning off; onnxruntime's default is on
        flag = "1" if spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", flag)
        options.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return options


class GraphRunner:
    """One onnxruntime session on a model version, with state handled per the manifest."""

    def __init__(self, model: ModelVersion, intra_op_threads: int | None = None,
                 inter_op_threads: int | None = None, spinning: bool | None = None):
        self.model = model
        self.session = ort.InferenceSession(
            str(model.folder / model.manifest["graph"]["file"]),
            sess_options=session_options(intra_op_threads, inter_op_threads, spinning),
            providers=["CPUExecutionProvider"],
        )
        self.pairs = [(p["input"], p["output"], p["batch_axis"], p["shape"], p["dtype"])
                      for p in model.manifest["state"]]
        self.output_names = ["logits"] + [out for _, out, *_ in self.pairs]

    def zero_state(self, batch: int) -> dict[str, np.ndarray]:
        return {
            name: np.zeros([batch if isinstance(d, str) else d for d in shape], dtype=dtype)
            for name, _, _, shape, dtype in self.pairs
        }

    def run(self, tokens: np.ndarray, state: dict[str, np.ndarray],
            lengths: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """tokens (B, T) int64 → logits (B, T, V) and the state after each row's length."""
        if lengths is None:
            lengths = np.full(tokens.shape[0], tokens.shape[1], dtype=np.int32)
        feeds = {"tokens": tokens, "lengths": lengths.astype(np.int32), **state}
        logits, *states = self.session.run(self.output_names, feeds)
        return logits, {name: s for (name, *_), s in zip(self.pairs, states, strict=True)}

    def feeds_for_step(self, batch: int) -> dict[str, np.ndarray]:
        """A one-token decode step at a batch size, from zero state."""
        return {"tokens": np.full((batch, 1), 32, dtype=np.int64),
                "lengths": np.ones(batch, dtype=np.int32), **self.zero_state(batch)}


def padded(sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (B, T) int64 tokens and their int32 lengths."""
    width = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = seq
    return tokens, np.array([len(s) for s in sequences], dtype=np.int32)
