"""int8 versions: onnxruntime dynamic quantization, and the trade measured at export.

What `onnxruntime.quantization.quantize_dynamic` does to these graphs (onnxruntime 1.31):
- `LSTM` nodes (plain, peephole `P` and `input_forget=1` alike) become the contrib op
  `com.microsoft.DynamicQuantizeLSTM`: W and R stored int8 per tensor, the input and hidden
  state quantized on the fly at every step.
- The head `MatMul` (constant B) becomes DynamicQuantizeLinear + MatMulInteger.
- `GRU` has no quantized kernel and no quantizer entry: GRU layers stay fp32, only the head
  is int8. The manifest says which ops were quantized and which were left.
- The embedding `Gather` is left fp32 on purpose (it is a lookup, not arithmetic; quantizing
  it only saves bytes).

Dynamic quantization picks activation scales from the whole tensor it sees, i.e. from the
whole batch: an int8 session's results depend slightly on which other sessions share its
batch, and step-by-step decoding differs slightly from one pass. Both are measured here and
reported in the manifest's `warning`; fp32 is measured alongside to show it is unaffected.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from pathlib import Path

import numpy as np

from .errors import ExportError
from .verify import open_session, run_graph

OPS_TO_QUANTIZE = ["LSTM", "MatMul"]
QUANTIZED_AS = {"DynamicQuantizeLSTM": "LSTM", "MatMulInteger": "MatMul"}
STEP_BATCHES = (1, 64)  # decode-step latency measured at these batch sizes
BPB_ROWS, BPB_CHUNK = 8, 256


@contextlib.contextmanager
def _quiet_root_logger():
    """quantize_dynamic logs a pre-processing hint to the root logger on every call; that
    advice is for static quantization of vision models and only alarms a CLI user."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def validation_text(ckpt: dict, corpus: list[str] | None, max_bytes: int) -> tuple[bytes, str]:
    """Up to max_bytes of validation text and its description: the given corpus, else the
    checkpoint's training corpus (its validation split; the stdlib when it trained on that)."""
    from carousel.model.data import load_corpus

    if corpus is None:
        corpus = (ckpt.get("train_config") or {}).get("corpus") or None
    try:
        loaded = load_corpus(corpus)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"validation corpus: {e}") from e
    text = bytes(loaded.val[:max_bytes])
    if len(text) < 2 * BPB_ROWS:
        raise ExportError(f"validation text of {len(text)} bytes is too short to score")
    return text, loaded.description


def bits_per_byte(session, state_names, num_layers, hidden, text: bytes) -> float:
    """Next-byte cross entropy in bits over `text`, cut into BPB_ROWS equal contiguous shards
    run as one batch from zero state, BPB_CHUNK steps per call with the state carried."""
    data = np.frombuffer(text, np.uint8).astype(np.int64)
    shard = len(data) // BPB_ROWS
    rows = data[: shard * BPB_ROWS].reshape(BPB_ROWS, shard)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    state = tuple(np.zeros((num_layers, BPB_ROWS, hidden), np.float32) for _ in state_names)
    total = 0.0
    for lo in range(0, inputs.shape[1], BPB_CHUNK):
        logits, state = run_graph(session, state_names, inputs[:, lo : lo + BPB_CHUNK], state)
        logits = logits.astype(np.float64)
        peak = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
        picked = np.take_along_axis(logits, targets[:, lo : lo + BPB_CHUNK, None], -1)[..., 0]
        total += float((log_z - picked).sum())
    return total / targets.size / math.log(2)


def step_seconds(sessions: dict, state_names, num_layers, hidden, batch: int,
                 rounds: int = 7, steps: int = 40) -> dict[str, float]:
    """Seconds per single-token decode step at `batch`, for each session (one intra-op
    thread). The sessions are timed in alternating rounds and each keeps its fastest round's
    median, so a busy machine (a training run, other tests) slows both alike instead of
    skewing the ratio."""
    tokens = np.full((batch, 1), 101, np.int64)
    zeros = tuple(np.zeros((num_layers, batch, hidden), np.float32) for _ in state_names)
    best = dict.fromkeys(sessions, math.inf)
    for k in sessions:  # warm-up: the first runs allocate
        state = zeros
        for _ in range(5):
            _, state = run_graph(sessions[k], state_names, tokens, state)
    for _ in range(rounds):
        for k, session in sessions.items():
            state, times = zeros, []
            for _ in range(steps):
                t0 = time.perf_counter()
                _, state = run_graph(session, state_names, tokens, state)
                times.append(time.perf_counter() - t0)
            best[k] = min(best[k], float(np.median(times)))
    return best


def batch_dependence(session, state_names, num_layers, hidden, seed: int = 0) -> dict:
    """How much one row's logits move (max abs) when run alone vs in a batch of 8 random
    others, and step by step vs in one pass. Zero for fp32; small, nonzero for int8."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, size=(8, 24), dtype=np.int64)
    zeros = lambda B: tuple(np.zeros((num_layers, B, hidden), np.float32) for _ in state_names)
    batched, _ = run_graph(session, state_names, tokens, zeros(8))
    alone, _ = run_graph(session, state_names, tokens[:1], zeros(1))
    state, steps = zeros(1), []
    for t in range(tokens.shape[1]):
        logits, state = run_graph(session, state_names, tokens[:1, t : t + 1], state)
        steps.append(logits)
    return {
        "batch_vs_alone": float(np.abs(batched[:1] - alone).max()),
        "steps_vs_one_pass": float(np.abs(np.concatenate(steps, axis=1) - alone).max()),
    }


def quantize_int8(graph_path: Path, model, ckpt: dict, corpus: list[str] | None,
                  max_bytes: int) -> dict:
    """Replace the fp32 graph at graph_path by its int8 version; return the manifest's
    `quantization` record."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    cfg = model.config
    dims = (cfg.state_names, cfg.num_layers, cfg.hidden_size)
    text, description = validation_text(ckpt, corpus, max_bytes)
    fp32_path = graph_path.with_name("fp32.onnx")
    graph_path.rename(fp32_path)
    try:
        with _quiet_root_logger():
            quantize_dynamic(fp32_path, graph_path, op_types_to_quantize=OPS_TO_QUANTIZE,
                             weight_type=QuantType.QInt8)
        ops = collections.Counter(n.op_type for n in onnx.load(str(graph_path)).graph.node)
        sessions = {"fp32": open_session(fp32_path), "int8": open_session(graph_path)}
        bpb = {k: bits_per_byte(s, *dims, text) for k, s in sessions.items()}
        by_batch = {b: step_seconds(sessions, *dims, b) for b in STEP_BATCHES}
        step_us = {k: {str(b): round(by_batch[b][k] * 1e6, 1) for b in STEP_BATCHES}
                   for k in sessions}
        dependence = {k: batch_dependence(s, *dims) for k, s in sessions.items()}
    finally:
        fp32_path.unlink(missing_ok=True)
    quantized = {orig: ops[new] for new, orig in QUANTIZED_AS.items() if ops[new]}
    left = {op: ops[op] for op in ("LSTM", "GRU", "MatMul") if ops[op]}
    b1 = str(STEP_BATCHES[0])
    record = {
        "mode": "int8",
        "method": "onnxruntime.quantization.quantize_dynamic (QInt8 weights, per tensor; "
                  "uint8 activations quantized at run time)",
        "quantized_ops": quantized,
        "fp32_ops": left,
        "bpb_fp32": round(bpb["fp32"], 5),
        "bpb_int8": round(bpb["int8"], 5),
        "validation": {"corpus": description, "bytes": len(text)},
        "step_us": step_us,
        "speedup_per_step": round(step_us["fp32"][b1] / step_us["int8"][b1], 3),
        "speedup_by_batch": {b: round(step_us["fp32"][b] / step_us["int8"][b], 3)
                             for b in step_us["fp32"]},
        "max_abs_logit_shift": dependence,
        "warning": "int8 results for one session change slightly with the other sessions in "
                   "its batch and between step-by-step and one-shot decoding (activation "
                   "scales are computed per batch at run time; see max_abs_logit_shift); "
                   "fp32 results are bit-identical in both.",
    }
    if "GRU" in left:
        record["note"] = ("onnxruntime has no int8 GRU kernel: the GRU layers stay fp32, "
                          "only the output head is int8")
    return record
