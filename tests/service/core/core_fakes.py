"""Fake engines for unit tests of the service core, and the independent references they are
checked against.

Two tiny deterministic "graphs" stand in for onnxruntime behind the Engine interface
(`manifest`, `layout`, `run(feeds, wide)`); their manifests are real manifest.json v2 files
read by the real `read_manifest`:

- a byte LM (`FakeEngine`, served with the real `ByteLM` adapter): tokens [batch, time],
  lengths [batch], logits at every position [batch, time, 256], and a state of two tensors
  with different batch axes (state_a [2, batch, 3], state_b [batch, 4]);
- a tensor model (`FakeTensorEngine`, served with the real `TensorModel` adapter): two
  per-step float inputs with a time axis (x [time, batch, 3], u [batch, time]), no lengths
  input (rows can never be padded), an overridable constant `scale`, two state tensors with
  different batch axes (h [batch, 2], c [2, 3, batch]) and two results (y [time, batch, 2],
  energy [batch]); and the same graph with a lengths input n [batch] (PADDED_MANIFEST).

Each fake computes a batch vectorised (as onnxruntime would), honouring each row's length,
and checks its feeds as strictly as a graph does (exact names, dtypes, shapes). The
references below run one sequence at a time in plain float64 loops and read and write rows
by hand (state tensors in manifest order, each C-ordered without its batch axis, then the
adapter's extras), so they share no code with what is tested. Like the service they keep a
row in float32 between calls, so greedy and seeded tokens (argmax ties included) are exactly
the service's.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from carousel.service.manifest import Manifest, read_manifest
from carousel.service.registry import ModelVersion, adapter_for
from carousel.service.state import StateLayout

V = 256
A_SHAPE = (2, 3)  # state_a: (2, batch, 3), batch axis 1
B_SHAPE = (4,)  # state_b: (batch, 4), batch axis 0
A_MIX = np.arange(1, 7, dtype=np.float64).reshape(A_SHAPE) / 10.0
B_MIX = np.array([1.0, 2.0, 3.0, 4.0])
VOCAB = np.arange(V, dtype=np.float64)
LM_STATE = 6 + 4  # floats of state in a byte LM row; the logits follow


def _tensor(name: str, dtype: str, shape: list) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape}


def _state(name: str, shape: list, batch_axis: int) -> dict:
    return {"input": name, "output": f"{name}_out", "dtype": "float32", "shape": shape,
            "batch_axis": batch_axis, "init": "zeros"}


GRAPH = b"a fake graph: the fake engines compute instead of onnxruntime"

LM_MANIFEST = {
    "manifest_version": 2, "name": "fake", "version": 1,
    "description": "a fake byte LM for unit tests",
    "graph": {"file": "model.onnx", "sha256": hashlib.sha256(GRAPH).hexdigest()},
    "inputs": [_tensor("tokens", "int64", ["batch", "time"]),
               _tensor("state_a", "float32", [2, "batch", 3]),
               _tensor("state_b", "float32", ["batch", 4]),
               _tensor("lengths", "int32", ["batch"])],
    "outputs": [_tensor("logits", "float32", ["batch", "time", V]),
                _tensor("state_a_out", "float32", [2, "batch", 3]),
                _tensor("state_b_out", "float32", ["batch", 4])],
    "state": [_state("state_a", [2, "batch", 3], 1), _state("state_b", ["batch", 4], 0)],
    "constants": [],
    "sequence": {"axis": "time", "lengths": "lengths"},
    "adapter": {"type": "byte_lm", "tokens": "tokens", "logits": "logits"},
    "tokenizer": {"type": "bytes", "encoding": "utf-8", "vocab_size": V},
}

TENSOR_MANIFEST = {
    "manifest_version": 2, "name": "fakets", "version": 1,
    "description": "a fake tensor model (a forecaster) for unit tests",
    "graph": {"file": "model.onnx", "sha256": hashlib.sha256(GRAPH).hexdigest()},
    "inputs": [_tensor("x", "float32", ["time", "batch", 3]),
               _tensor("u", "float32", ["batch", "time"]),
               _tensor("h", "float32", ["batch", 2]),
               _tensor("c", "float32", [2, 3, "batch"]),
               _tensor("scale", "float32", [])],
    "outputs": [_tensor("y", "float32", ["time", "batch", 2]),
                _tensor("energy", "float32", ["batch"]),
                _tensor("h_out", "float32", ["batch", 2]),
                _tensor("c_out", "float32", [2, 3, "batch"])],
    "state": [_state("h", ["batch", 2], 0), _state("c", [2, 3, "batch"], 2)],
    "constants": [{"name": "scale", "dtype": "float32", "shape": [], "value": 1.0,
                   "overridable": True}],
    "sequence": {"axis": "time", "lengths": None},
    "adapter": {"type": "tensor"},
}

# The same graph taking each row's length: rows may then be padded and long inputs chunked.
PADDED_MANIFEST = copy.deepcopy(TENSOR_MANIFEST)
PADDED_MANIFEST["name"] = "fakepad"
PADDED_MANIFEST["inputs"].append(_tensor("n", "int32", ["batch"]))
PADDED_MANIFEST["sequence"] = {"axis": "time", "lengths": "n"}


def write_manifest(root: Path, raw: dict, graph: bytes = GRAPH) -> Path:
    """<root>/<name>/<version>/{manifest.json, model.onnx}; returns the version folder."""
    folder = Path(root) / raw["name"] / str(raw["version"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / raw["graph"]["file"]).write_bytes(graph)
    (folder / "manifest.json").write_text(json.dumps(raw))
    return folder


def load_manifest(raw: dict, name: str | None = None, version: int | None = None) -> Manifest:
    """`raw` (renamed if asked) through the real read_manifest, sha256 checked, from a
    temporary folder that is gone again afterwards."""
    raw = copy.deepcopy(raw)
    raw["name"] = name or raw["name"]
    raw["version"] = version or raw["version"]
    with tempfile.TemporaryDirectory() as root:
        return read_manifest(write_manifest(Path(root), raw))


def fake_manifest(name: str = "fake", version: int = 1) -> Manifest:
    return load_manifest(LM_MANIFEST, name, version)


def tensor_manifest(name: str | None = None, version: int = 1,
                    padded: bool = False) -> Manifest:
    return load_manifest(PADDED_MANIFEST if padded else TENSOR_MANIFEST, name, version)


# ------------------------------------------------------------------- the byte LM reference


def _logits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Both state tensors reach every logit; the state is contractive, so the float32 state
    # between calls stays within ~1e-6 of a float64 computation however long a sequence is.
    return 3.0 * np.sin(VOCAB * (0.1 * a.sum() + 0.37) + b @ B_MIX)


def reference(tokens, a=None, b=None):
    """One sequence, one token at a time in float64: (a, b, logits after the last token)."""
    a = np.zeros(A_SHAPE) if a is None else np.array(a, dtype=np.float64)
    b = np.zeros(B_SHAPE) if b is None else np.array(b, dtype=np.float64)
    logits = None
    for t in tokens:
        x = t / V
        a = 0.5 * a + x * A_MIX
        b = np.roll(b, 1)
        b[0] = 0.5 * b[0] + x + 0.1
        logits = _logits(a, b)
    return a, b, logits


def reference_row(tokens, row=None, chunk: int | None = None) -> np.ndarray:
    """The row (state_a, state_b, then the last logits) a session holds after `tokens`,
    from `row` (or the zero state). A session's state is float32 between calls: with
    `chunk`, the tokens are consumed in calls of that many (a long input's prefill chunks),
    the state rounded to float32 after each."""
    a = b = None
    if row is not None:
        a, b = row[:6].reshape(A_SHAPE), row[6:LM_STATE]
    tokens = list(tokens)
    chunk = chunk or len(tokens)
    for i in range(0, len(tokens), chunk):
        a, b, logits = reference(tokens[i:i + chunk], a, b)
        a, b = a.astype(np.float32), b.astype(np.float32)
    return np.concatenate([a.ravel(), b.ravel(), logits.astype(np.float32)])


def row_after(*calls, row=None) -> np.ndarray:
    """The row after several calls, each consuming its tokens in one go."""
    for tokens in calls:
        row = reference_row(tokens, row)
    return row


def greedy(tokens, n: int, row=None) -> list[int]:
    """n tokens of greedy decoding after `tokens` (fed from `row`, or from zero in one
    call): each token the argmax of the float32 logits the row holds (ties to the lower
    id), then fed in a call of its own."""
    row = reference_row(tokens, row)
    out = []
    for _ in range(n):
        t = int(np.argmax(row[LM_STATE:]))
        out.append(t)
        row = reference_row([t], row)
    return out


def sampled(tokens, n: int, temperature: float, seed: int) -> list[int]:
    """n tokens sampled at `temperature` (no top-k or top-p) after `tokens`: one uniform draw
    per token from PCG64(seed), inverse CDF over the softmax of the row's float32 logits in
    token order; each token then fed in a call of its own. Independent of the service's
    sampler."""
    rng = np.random.Generator(np.random.PCG64(seed))
    row = reference_row(tokens)
    out = []
    for _ in range(n):
        z = row[LM_STATE:].astype(np.float64) / temperature
        p = np.exp(z - z.max())
        cdf = np.cumsum(p)
        t = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        out.append(t)
        row = reference_row([t], row)
    return out


def top(logits: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    """The k likeliest tokens (ties to the lower id) and their log-probabilities."""
    x = np.asarray(logits, dtype=np.float64)
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))[:k]
    logprobs = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    return order, logprobs[order]


# ------------------------------------------------------------------ the tensor reference

W = np.array([[0.5, -0.3, 0.2], [0.1, 0.4, -0.6]])


def tensor_reference(x, u, h=None, c=None, scale: float = 1.0):
    """One row of the tensor model, step by step: x (T, 3), u (T,) -> (y (T, 2), energy,
    h (2,), c (2, 3))."""
    h = np.zeros(2) if h is None else np.array(h, dtype=np.float64)
    c = np.zeros((2, 3)) if c is None else np.array(c, dtype=np.float64)
    ys = []
    for xt, ut in zip(np.asarray(x, dtype=np.float64), np.asarray(u, dtype=np.float64),
                      strict=True):
        h = np.tanh(0.6 * h + scale * (W @ xt) + 0.1 * ut)
        c = 0.5 * c + 0.3 * np.outer(h, xt)
        ys.append([h.sum() + c.sum(), ut * h[0]])
    energy = float((h ** 2).sum() + (c ** 2).sum())
    return np.array(ys), energy, h, c


def tensor_row(h, c) -> np.ndarray:
    """A tensor model's row, by hand: h (2 floats), then c (2 x 3, C order); no extras."""
    return np.concatenate([np.ravel(h), np.ravel(c)]).astype(np.float32)


def tensor_state(row) -> tuple[np.ndarray, np.ndarray]:
    return row[:2], row[2:8].reshape(2, 3)


# --------------------------------------------------------------------------- the engines


@dataclass(frozen=True)
class Call:
    """One run of a fake engine, as it saw it."""

    lengths: list[int]  # each row's real length
    wide: bool
    thread: str  # the name of the thread that called
    feeds: dict  # copies of what was fed, constants included


class _FakeGraph:
    """What both fakes share: Engine's interface and bookkeeping, failures, gates."""

    def __init__(self, manifest: Manifest, *, extra_size: int = 0, delay_s: float = 0.0,
                 fail: bool = False, fail_after: int | None = None) -> None:
        self.manifest = manifest
        self.layout = StateLayout(manifest.states, extra_size)
        self.constants = {c.name: c.value for c in manifest.constants}
        self.graph_inputs = {t["name"]: t for t in manifest.raw["inputs"]}
        self.delay_s = delay_s
        self.fail = fail
        self.fail_after = fail_after  # calls that succeed before every later one fails
        self.log: list[Call] = []
        self.gate: threading.Event | None = None  # when set, every run waits for it
        self.hold: tuple | None = None  # (predicate on a Call, Event): such runs wait
        self._lock = threading.Lock()
        self._count = 0

    @property
    def calls(self) -> list[list[int]]:
        """Each run's row lengths, in the order the runs began."""
        return [c.lengths for c in self.log]

    @property
    def wide(self) -> list[bool]:
        return [c.wide for c in self.log]

    def run(self, feeds: dict[str, np.ndarray], wide: bool = False) -> dict[str, np.ndarray]:
        feeds = {**self.constants, **feeds}  # as Engine.run: constants not fed are the manifest's
        self._check(feeds)
        call = Call(self._lengths(feeds), wide, threading.current_thread().name,
                    {k: np.array(v, copy=True) for k, v in feeds.items()})
        with self._lock:
            self.log.append(call)
            self._count += 1
            failing = self.fail or (self.fail_after is not None and self._count > self.fail_after)
        if self.hold is not None and self.hold[0](call):
            assert self.hold[1].wait(10), "a held run was never released"
        if self.gate is not None:
            assert self.gate.wait(10), "the gate was never opened"
        if self.delay_s:
            time.sleep(self.delay_s)
        if failing:
            raise RuntimeError("fake engine failure")
        return self.compute(feeds)

    def warm_up(self) -> None: ...

    def _check(self, feeds: dict[str, np.ndarray]) -> None:
        """Fed exactly the graph's inputs, with their dtypes and fixed dimensions, and one
        batch size for every batched input."""
        assert set(feeds) == set(self.graph_inputs), (sorted(feeds), sorted(self.graph_inputs))
        batch = set()
        for name, spec in self.graph_inputs.items():
            x = feeds[name]
            assert isinstance(x, np.ndarray) and x.dtype == np.dtype(spec["dtype"]), (name, x)
            assert x.ndim == len(spec["shape"]), (name, x.shape, spec["shape"])
            for d, n in zip(spec["shape"], x.shape, strict=True):
                if isinstance(d, int):
                    assert d == n, (name, x.shape, spec["shape"])
                elif d == "batch":
                    batch.add(n)
        assert len(batch) == 1, f"batched inputs disagree on the batch size: {batch}"


class FakeEngine(_FakeGraph):
    """The byte LM. Logits at padded positions are NaN: no answer may ever read them."""

    def __init__(self, manifest: Manifest | None = None, **kw) -> None:
        kw.setdefault("extra_size", V)
        super().__init__(manifest or fake_manifest(), **kw)

    def _lengths(self, feeds) -> list[int]:
        return [int(n) for n in feeds["lengths"]]

    def compute(self, feeds) -> dict[str, np.ndarray]:
        tokens, lengths = feeds["tokens"], feeds["lengths"].astype(np.int64)
        assert lengths.min() >= 1 and lengths.max() == tokens.shape[1], "no empty rows"
        a = np.moveaxis(feeds["state_a"], 1, 0).astype(np.float64)  # (B, 2, 3)
        b = feeds["state_b"].astype(np.float64).copy()  # (B, 4)
        logits = np.full((tokens.shape[0], tokens.shape[1], V), np.nan)
        for step in range(tokens.shape[1]):
            live = step < lengths
            x = (tokens[:, step] / V)[:, None]
            new_a = 0.5 * a + x[:, :, None] * A_MIX
            new_b = np.roll(b, 1, axis=1)
            new_b[:, 0] = 0.5 * new_b[:, 0] + x[:, 0] + 0.1
            a = np.where(live[:, None, None], new_a, a)
            b = np.where(live[:, None], new_b, b)
            for i in np.flatnonzero(live):
                logits[i, step] = _logits(a[i], b[i])
        return {"logits": logits.astype(np.float32),
                "state_a_out": np.ascontiguousarray(np.moveaxis(a, 0, 1)).astype(np.float32),
                "state_b_out": b.astype(np.float32)}


class FakeTensorEngine(_FakeGraph):
    """The tensor model. Without a lengths input every row of a run has the same length;
    with one (PADDED_MANIFEST), a row's state stops at its length and its per-step results
    past it are NaN: no answer may ever include them."""

    def __init__(self, manifest: Manifest | None = None, **kw) -> None:
        super().__init__(manifest or tensor_manifest(), **kw)

    def _lengths(self, feeds) -> list[int]:
        if "n" in feeds:
            return [int(n) for n in feeds["n"]]
        return [feeds["x"].shape[0]] * feeds["x"].shape[1]

    def compute(self, feeds) -> dict[str, np.ndarray]:
        x = np.moveaxis(feeds["x"], 1, 0).astype(np.float64)  # (B, T, 3)
        u = feeds["u"].astype(np.float64)  # (B, T)
        assert u.shape == x.shape[:2], "x and u hold different numbers of steps"
        lengths = np.array(self._lengths(feeds))
        assert lengths.min() >= 1 and lengths.max() == x.shape[1], "no empty rows"
        h = feeds["h"].astype(np.float64)  # (B, 2)
        c = np.moveaxis(feeds["c"], 2, 0).astype(np.float64)  # (B, 2, 3)
        scale = float(feeds["scale"])
        ys = []
        for t in range(x.shape[1]):
            live = t < lengths
            xt, ut = x[:, t], u[:, t]
            new_h = np.tanh(0.6 * h + scale * xt @ W.T + 0.1 * ut[:, None])
            new_c = 0.5 * c + 0.3 * new_h[:, :, None] * xt[:, None, :]
            h = np.where(live[:, None], new_h, h)
            c = np.where(live[:, None, None], new_c, c)
            y = np.stack([h.sum(1) + c.sum((1, 2)), ut * h[:, 0]], axis=1)
            ys.append(np.where(live[:, None], y, np.nan))
        y = np.stack(ys)  # (T, B, 2)
        energy = (h ** 2).sum(1) + (c ** 2).sum((1, 2))
        return {"y": y.astype(np.float32), "energy": energy.astype(np.float32),
                "h_out": h.astype(np.float32),
                "c_out": np.ascontiguousarray(np.moveaxis(c, 0, 2)).astype(np.float32)}


def fake_lm(name: str = "fake", version: int = 1, **kw) -> ModelVersion:
    """A byte LM model version: the fake engine with the real adapter for its manifest."""
    manifest = fake_manifest(name, version)
    adapter = adapter_for(manifest)
    return ModelVersion(manifest, FakeEngine(manifest, extra_size=adapter.extra_size, **kw),
                        adapter)


def fake_tensor(name: str | None = None, version: int = 1, padded: bool = False,
                **kw) -> ModelVersion:
    manifest = tensor_manifest(name, version, padded)
    adapter = adapter_for(manifest)
    return ModelVersion(manifest,
                        FakeTensorEngine(manifest, extra_size=adapter.extra_size, **kw), adapter)


async def until(condition, what: str = "the condition") -> None:
    """Let the event loop run until `condition()` holds (bounded, so a bug fails the test
    instead of hanging it)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{what} never happened")
