"""The onnxruntime sessions of one model version (batches; wide prefills), and the call that
runs a padded batch.

`Engine.infer` is synchronous and called from the scheduler's inference threads, so the event
loop never waits on onnxruntime. It knows tensors only by the manifest's names: tokens,
lengths, logits and the listed state pairs. No model architecture is known here.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from .manifest import LENGTHS, LOGITS, TOKENS, Manifest, ManifestError
from .state import StateLayout

log = logging.getLogger("carousel.service")


def session_options(intra_op_threads: int, inter_op_threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # One intra-op thread by default: the scheduler runs batches on several threads instead,
    # one core each; splitting one call across cores costs ~25% more CPU per step in
    # thread hand-offs (measured; see bench/README.md).
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Threads that spin while idle would steal the core the event loop runs on.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


class Engine:
    """Runs batches of one model version; safe to call from several threads at once.

    Two onnxruntime sessions on the same graph: `session` (intra_op_threads, one by
    default) for batches, which the scheduler spreads over its threads by rows, and, when
    wide_threads > 1, `wide` with that many intra-op threads for calls that rows cannot
    split: long inputs' prefills (measured on bytelm: 256 tokens at batch 1, 80 -> 38 ms;
    at batch 8, 145 -> 97 ms). Both give bit-identical results (onnxruntime splits the
    work, not the sums); the cost is a second copy of the weights."""

    def __init__(self, manifest: Manifest, *, intra_op_threads: int = 1,
                 inter_op_threads: int = 1, wide_threads: int = 0) -> None:
        self.manifest = manifest
        self.layout = StateLayout(manifest.states, manifest.vocab_size)
        self.vocab_size = manifest.vocab_size
        self._lengths_dtype = np.dtype(manifest.lengths_dtype)
        self.session = self._open(intra_op_threads, inter_op_threads)
        self.wide = self._open(wide_threads, inter_op_threads) if wide_threads > 1 else None
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        wanted_in = {TOKENS, LENGTHS, *(s.input for s in manifest.states)}
        wanted_out = {LOGITS, *(s.output for s in manifest.states)}
        if not wanted_in <= graph_inputs or not wanted_out <= graph_outputs:
            raise ManifestError(
                f"{manifest.graph_file}: graph tensors {sorted(graph_inputs | graph_outputs)} "
                f"do not include the manifest's {sorted(wanted_in | wanted_out)}"
            )
        self._output_names = [LOGITS, *(s.output for s in manifest.states)]

    def _open(self, intra_op_threads: int, inter_op_threads: int) -> ort.InferenceSession:
        graph = self.manifest.graph_file
        try:
            return ort.InferenceSession(
                str(graph), sess_options=session_options(intra_op_threads, inter_op_threads),
                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for a broken graph
            raise ManifestError(f"{graph}: onnxruntime cannot load it: {e}") from e

    def infer(self, tokens: np.ndarray, lengths: np.ndarray, state: dict[str, np.ndarray],
              wide: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run a padded batch. tokens (B, T) int64, lengths (B,) >= 1, state as the graph's
        inputs; `wide` runs it on the wide session, if there is one. Returns the logits at
        each row's last real position (B, V) and the state outputs by name."""
        feeds = {TOKENS: tokens, LENGTHS: lengths.astype(self._lengths_dtype, copy=False), **state}
        session = self.wide if wide and self.wide is not None else self.session
        logits, *states = session.run(self._output_names, feeds)
        if tokens.shape[1] == 1:  # decode steps: every row's last position is its only one
            last = logits[:, 0]
        else:
            last = logits[np.arange(tokens.shape[0]), lengths.astype(np.intp) - 1]
        return last, dict(zip(self._output_names[1:], states, strict=True))

    def warm_up(self) -> None:
        """One small run, so the first client does not pay for onnxruntime's allocations."""
        tokens = np.zeros((1, 1), dtype=np.int64)
        for wide in (False, True):
            self.infer(tokens, np.ones(1, dtype=np.int32), self.layout.stack([None]), wide)
