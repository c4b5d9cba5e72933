"""What the bundled byte LM should answer, computed here with onnxruntime alone.

Independent of the service: the graph and the manifest's tensor names are read from the
model repository, every state starts at zeros, and a whole byte string runs as one call
(a padded batch with each row's length, so rows never affect each other). Logits are the
graph's own, log-probabilities a float64 log-softmax of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


class Reference:
    def __init__(self, model_dir: Path) -> None:
        manifest = json.loads((model_dir / "manifest.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.graph = ort.InferenceSession(str(model_dir / manifest["graph"]["file"]),
                                          options, providers=["CPUExecutionProvider"])
        self.tokens = manifest["adapter"]["tokens"]
        self.logits_name = manifest["adapter"]["logits"]
        self.lengths = manifest["sequence"]["lengths"]
        self.states = manifest["state"]  # input, output, shape with "batch", batch_axis

    def _zero_state(self, batch: int) -> dict[str, np.ndarray]:
        return {s["input"]: np.zeros([batch if d == "batch" else d for d in s["shape"]],
                                     dtype=np.float32) for s in self.states}

    def _run(self, tokens: np.ndarray, lengths: np.ndarray, state: dict) -> tuple:
        feeds = {self.tokens: tokens, self.lengths: lengths.astype(np.int32), **state}
        names = [self.logits_name] + [s["output"] for s in self.states]
        logits, *outs = self.graph.run(names, feeds)
        return logits, {s["input"]: o for s, o in zip(self.states, outs, strict=True)}

    def logits(self, texts: list[bytes]) -> list[np.ndarray]:
        """For each byte string, the logits after each of its bytes: (len, vocab)."""
        longest = max(len(t) for t in texts)
        tokens = np.zeros((len(texts), longest), dtype=np.int64)
        for i, t in enumerate(texts):
            tokens[i, : len(t)] = np.frombuffer(t, dtype=np.uint8)
        lengths = np.array([len(t) for t in texts])
        logits, _ = self._run(tokens, lengths, self._zero_state(len(texts)))
        return [logits[i, : len(t)].copy() for i, t in enumerate(texts)]

    def greedy(self, prompt: bytes, count: int) -> list[int]:
        """The `count` tokens a greedy (temperature 0) generation after `prompt` samples:
        the likeliest next byte each time, fed back one step at a time."""
        tokens = np.frombuffer(prompt, dtype=np.uint8).astype(np.int64)[None]
        logits, state = self._run(tokens, np.array([len(prompt)]), self._zero_state(1))
        last, out = logits[0, -1], []
        for _ in range(count):
            out.append(int(np.argmax(last)))
            logits, state = self._run(np.array([[out[-1]]], dtype=np.int64), np.array([1]),
                                      state)
            last = logits[0, -1]
        return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
