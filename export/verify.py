"""Proof that an exported graph computes what the PyTorch model computes.

Three checks, run on every export before the version is published:
- `check_graph`: onnx.checker with full_check (types and shapes inferred end to end).
- `compare_with_torch`: onnxruntime against the PyTorch model on random tokens and random
  initial state, batch 1 and 5, lengths 1 and 37; in one pass, in chunks fed through the
  state, and as a padded batch with per-row lengths (each row must equal that row run alone).
- `service_view`: the version folder read the way the service reads it (manifest.json and
  model.onnx, numpy and onnxruntime only, no torch) predicts the PyTorch model's next byte.

onnx.reference is not used as a second opinion: it ignores `input_forget` and `sequence_lens`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import VerificationError
from .names import LENGTHS, LOGITS, TOKENS, state_input, state_output

TOLERANCE = 1e-4  # max abs difference, logits and every state tensor
BATCH_SIZES, LENGTHS_T = (1, 5), (1, 37)
CHUNKS = (1, 16, 20)  # 37 steps fed as three chunks carried through the state
PADDED_LENGTHS = (37, 1, 20, 0, 36)  # includes a row that does not advance at all
SAMPLE_TEXT = "def __init__(self, name, value=None):\n        self.name = name\n        self."


def check_graph(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise VerificationError(f"onnx.checker rejected {path.name}: {e}") from e


def open_session(graph: Path | bytes, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = str(graph) if isinstance(graph, Path) else graph
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_graph(session, state_names, tokens, state, lengths=None):
    """One onnxruntime call: tokens (B, T), state tuple of (L, B, H) -> logits, state."""
    B, T = tokens.shape
    feed = {TOKENS: tokens.astype(np.int64),
            LENGTHS: np.full(B, T, np.int32) if lengths is None else lengths.astype(np.int32)}
    feed.update({state_input(s): x for s, x in zip(state_names, state, strict=True)})
    out = session.run([LOGITS, *(state_output(s) for s in state_names)], feed)
    return out[0], tuple(out[1:])


class Diffs:
    """Largest difference seen per tensor, and the first case that broke the tolerance
    (import's checks use it too)."""

    def __init__(self, tolerance: float):
        self.tolerance, self.max, self.cases, self.failure = tolerance, {}, 0, None

    def add(self, case: str, name: str, got: np.ndarray, want: np.ndarray) -> None:
        if got.shape != want.shape:
            raise VerificationError(f"{case}: {name} has shape {got.shape}, want {want.shape}")
        diff = float(np.max(np.abs(got - want))) if got.size else 0.0
        if not np.isfinite(diff):
            diff = float("inf")
        self.max[name] = max(self.max.get(name, 0.0), diff)
        if diff > self.tolerance and self.failure is None:
            self.failure = f"{case}: {name} differs by {diff:.3g} (tolerance {self.tolerance:g})"

    def compare(self, case, names, got, want) -> None:
        self.cases += 1
        logits, state = got
        self.add(case, LOGITS, logits, want[0])
        for s, g, w in zip(names, state, want[1], strict=True):
            self.add(case, state_output(s), g, w)


def compare_with_torch(model, session, seed: int = 0, tolerance: float = TOLERANCE) -> dict:
    """Run the verification matrix; raise VerificationError past `tolerance`, else return
    {"tolerance", "cases", "max_abs_diff": {tensor: diff}}."""
    import torch

    model.eval()
    cfg = model.config
    names, L, H, V = cfg.state_names, cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    rng = np.random.default_rng(seed)
    diffs = Diffs(tolerance)

    def torch_run(tokens, state, lengths=None):
        with torch.no_grad():
            logits, new = model(
                torch.from_numpy(tokens), tuple(torch.from_numpy(s) for s in state),
                None if lengths is None else torch.from_numpy(lengths.astype(np.int64)),
            )
        return logits.numpy(), tuple(s.numpy() for s in new)

    def random_case(B, T):
        tokens = rng.integers(0, V, size=(B, T), dtype=np.int64)
        state = tuple((rng.standard_normal((L, B, H)) * 0.5).astype(np.float32) for _ in names)
        return tokens, state

    for B in BATCH_SIZES:
        for T in LENGTHS_T:
            tokens, state = random_case(B, T)
            want = torch_run(tokens, state)
            diffs.compare(f"batch {B} length {T} one pass", names,
                          run_graph(session, names, tokens, state), want)
            if T < sum(CHUNKS):
                continue
            carried, pieces, at = state, [], 0
            for n in CHUNKS:
                logits, carried = run_graph(session, names, tokens[:, at : at + n], carried)
                pieces.append(logits)
                at += n
            diffs.compare(f"batch {B} length {T} in chunks {CHUNKS}", names,
                          (np.concatenate(pieces, axis=1), carried), want)

    # A padded batch: every row must equal that row run alone, and PyTorch's padded run.
    T = max(PADDED_LENGTHS)
    lengths = np.array(PADDED_LENGTHS, np.int64)
    tokens, state = random_case(len(lengths), T)
    got = run_graph(session, names, tokens, state, lengths)
    diffs.compare(f"padded batch lengths {PADDED_LENGTHS}", names, got,
                  torch_run(tokens, state, lengths))
    for b, n in enumerate(PADDED_LENGTHS):
        row_state = tuple(s[:, b : b + 1] for s in state)
        if n == 0:  # a row that does not advance keeps its state
            alone = (np.zeros((1, 0, V), np.float32), row_state)
        else:
            alone = run_graph(session, names, tokens[b : b + 1, :n], row_state)
        diffs.compare(f"padded batch row {b} (length {n}) vs alone", names,
                      (got[0][b : b + 1, :n], tuple(s[:, b : b + 1] for s in got[1])), alone)

    if diffs.failure:
        raise VerificationError(f"onnxruntime disagrees with PyTorch: {diffs.failure}")
    return {"tolerance": tolerance, "cases": diffs.cases, "max_abs_diff": diffs.max}


def service_view(version_dir: Path, text: str = SAMPLE_TEXT) -> np.ndarray:
    """The last position's logits (V,) for `text`, computed from the version folder the way
    the service does: manifest + graph, zero initial state built from the manifest's state
    pairs, numpy and onnxruntime only."""
    from .manifest import sha256_file

    manifest = json.loads((version_dir / "manifest.json").read_text())
    graph = version_dir / manifest["graph"]["file"]
    if sha256_file(graph) != manifest["graph"]["sha256"]:
        raise VerificationError(f"{graph} does not match the sha256 in its manifest")
    tokens = np.array([list(text.encode("utf-8"))], np.int64)
    feed = {TOKENS: tokens, LENGTHS: np.array([tokens.shape[1]], np.int32)}
    for pair in manifest["state"]:
        shape = [1 if d == "batch" else d for d in pair["shape"]]
        feed[pair["input"]] = np.zeros(shape, np.dtype(pair["dtype"]))
    session = open_session(graph)
    declared = {i["name"] for i in manifest["inputs"]}
    if declared != set(feed) or {i.name for i in session.get_inputs()} != declared:
        raise VerificationError("the manifest's inputs do not match the graph's")
    (logits,) = session.run([LOGITS], feed)
    return logits[0, -1]


def check_service_view(version_dir: Path, model, text: str = SAMPLE_TEXT,
                       tolerance: float = TOLERANCE) -> dict:
    """service_view against the PyTorch model on the same text: same next byte, logits
    within tolerance (pass tolerance=None to compare only the predicted byte)."""
    import torch

    got = service_view(version_dir, text)
    with torch.no_grad():
        logits, _ = model.eval()(torch.tensor([list(text.encode("utf-8"))]))
    want = logits[0, -1].numpy()
    diff = float(np.max(np.abs(got - want)))
    result = {"text": text, "next_byte": int(got.argmax()), "torch_next_byte": int(want.argmax()),
              "max_abs_diff": diff}
    if result["next_byte"] != result["torch_next_byte"] and tolerance is not None:
        raise VerificationError(
            f"the service's view predicts byte {result['next_byte']} after the sample text, "
            f"PyTorch predicts {result['torch_next_byte']}"
        )
    if tolerance is not None and diff > tolerance:
        raise VerificationError(f"the service's view differs from PyTorch by {diff:.3g}")
    return result
