"""A fake engine for unit tests of the service core: a tiny deterministic "model" whose state
is two tensors with different batch axes, so stacking and splitting are tested generically.

`reference` runs one sequence token by token in plain numpy loops; `FakeEngine.infer` runs a
padded batch vectorised (as onnxruntime would), honouring each row's length. Tests compare
what the scheduler and sessions return with `reference` on each session's own history.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from carousel.service.manifest import Manifest, StateSpec
from carousel.service.state import StateLayout

V = 256
A_SHAPE = (2, 3)  # state_a: (2, batch, 3), batch axis 1
B_SHAPE = (4,)  # state_b: (batch, 4), batch axis 0
A_MIX = np.arange(1, 7, dtype=np.float64).reshape(A_SHAPE) / 10.0
B_MIX = np.array([1.0, 2.0, 3.0, 4.0])
VOCAB = np.arange(V, dtype=np.float64)

STATES = (
    StateSpec(input="state_a", output="state_a_out", shape=A_SHAPE, batch_axis=1),
    StateSpec(input="state_b", output="state_b_out", shape=B_SHAPE, batch_axis=0),
)


def fake_manifest(name: str = "fake", version: int = 1) -> Manifest:
    return Manifest(
        name=name, version=version, vocab_size=V, states=STATES, lengths_dtype="int32",
        graph_file=Path("fake.onnx"), graph_sha256=None,
        raw={"variant": "fake", "architecture": {"num_layers": 2, "hidden_size": 3}},
    )


def _logits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 3.0 * np.sin(VOCAB * (a.sum() + 1.0) + b @ B_MIX)


def reference(tokens, a=None, b=None):
    """One sequence, one token at a time: (a, b, logits after the last token)."""
    a = np.zeros(A_SHAPE) if a is None else np.array(a, dtype=np.float64)
    b = np.zeros(B_SHAPE) if b is None else np.array(b, dtype=np.float64)
    logits = None
    for t in tokens:
        x = t / V
        a = 0.5 * a + x * A_MIX
        b = np.roll(b, 1)
        b[0] += x + 0.1
        logits = _logits(a, b)
    return a, b, logits


def reference_row(tokens, row=None) -> np.ndarray:
    """The row (state + logits) a session holds after `tokens` from `row` (or zero)."""
    layout = StateLayout(STATES, V)
    if row is None:
        a = b = None
    else:
        t = layout.tensors(row)
        a, b = t["state_a"][:, 0], t["state_b"][0]
    a, b, logits = reference(tokens, a, b)
    return np.concatenate([a.ravel(), b.ravel(), logits]).astype(np.float32)


def greedy(tokens, n: int) -> list[int]:
    """n tokens of greedy decoding after `tokens`, computed independently."""
    a, b, logits = reference(tokens)
    out = []
    for _ in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        a, b, logits = reference([t], a, b)
    return out


class FakeEngine:
    """Implements the Engine interface the scheduler uses: layout, vocab_size, infer."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False,
                 fail_after: int | None = None) -> None:
        self.manifest = fake_manifest()
        self.layout = StateLayout(STATES, V)
        self.vocab_size = V
        self.delay_s = delay_s
        self.fail = fail
        self.fail_after = fail_after  # calls that succeed before every later one fails
        self.calls: list[list[int]] = []  # the lengths of each call's rows
        self.wide: list[bool] = []  # whether each call asked for the wide session
        self.gate: threading.Event | None = None  # when set, infer waits for it

    def infer(self, tokens, lengths, state, wide=False):
        self.calls.append([int(n) for n in lengths])
        self.wide.append(wide)
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail or (self.fail_after is not None and len(self.calls) > self.fail_after):
            raise RuntimeError("fake engine failure")
        assert tokens.dtype == np.int64 and lengths.min() >= 1, "no empty rows, int64 tokens"
        a = np.moveaxis(state["state_a"], 1, 0).astype(np.float64)  # (B, 2, 3)
        b = state["state_b"].astype(np.float64).copy()  # (B, 4)
        logits = np.zeros((tokens.shape[0], V))
        for step in range(tokens.shape[1]):
            live = step < lengths
            x = (tokens[:, step] / V)[:, None]
            new_a = 0.5 * a + x[:, :, None] * A_MIX
            new_b = np.roll(b, 1, axis=1)
            new_b[:, 0] += x[:, 0] + 0.1
            a = np.where(live[:, None, None], new_a, a)
            b = np.where(live[:, None], new_b, b)
            for i in np.flatnonzero(live):
                logits[i] = _logits(a[i], b[i])
        out = {"state_a_out": np.ascontiguousarray(np.moveaxis(a, 0, 1)).astype(np.float32),
               "state_b_out": b.astype(np.float32)}
        return logits.astype(np.float32), out
