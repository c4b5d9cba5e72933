"""The onnxruntime sessions of one model version (batches; wide prefills), and the call that
runs a batch of named tensors.

`Engine.run` is synchronous and called from the scheduler's inference threads, so the event
loop never waits on onnxruntime. It knows tensors only by the manifest's names; constants the
caller does not feed are fed from the manifest. No model architecture is known here.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from .manifest import Manifest, ManifestError
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
                 inter_op_threads: int = 1, wide_threads: int = 0,
                 extra_size: int = 0) -> None:
        self.manifest = manifest
        self.layout = StateLayout(manifest.states, extra_size)
        self.session = self._open(intra_op_threads, inter_op_threads)
        self.wide = self._open(wide_threads, inter_op_threads) if wide_threads > 1 else None
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        declared_in = {t["name"] for t in manifest.raw["inputs"]}
        wanted_out = {t.name for t in manifest.outputs} | {s.output for s in manifest.states}
        if graph_inputs != declared_in or not wanted_out <= graph_outputs:
            raise ManifestError(
                f"{manifest.graph_file}: the graph's inputs {sorted(graph_inputs)} and outputs "
                f"{sorted(graph_outputs)} do not match the manifest's inputs "
                f"{sorted(declared_in)} and outputs {sorted(wanted_out)}"
            )
        self.constants = {c.name: c.value for c in manifest.constants}
        self.output_names = [t.name for t in manifest.outputs] + [s.output for s in manifest.states]

    def _open(self, intra_op_threads: int, inter_op_threads: int) -> ort.InferenceSession:
        graph = self.manifest.graph_file
        try:
            return ort.InferenceSession(
                str(graph), sess_options=session_options(intra_op_threads, inter_op_threads),
                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for a broken graph
            raise ManifestError(f"{graph}: onnxruntime cannot load it: {e}") from e

    def run(self, feeds: dict[str, np.ndarray], wide: bool = False) -> dict[str, np.ndarray]:
        """One call: per-step inputs, state and (optionally) constants by name, batched as
        the graph takes them; `wide` runs it on the wide session, if there is one. Returns
        every result and state output by name."""
        if self.constants:
            feeds = {**self.constants, **feeds}
        session = self.wide if wide and self.wide is not None else self.session
        values = session.run(self.output_names, feeds)
        return dict(zip(self.output_names, values, strict=True))

    def warm_up(self) -> None:
        """One small run on each session, so the first client does not pay for
        onnxruntime's allocations (and a graph that cannot run fails at start-up)."""
        m = self.manifest
        feeds = {t.name: np.zeros([1 if d < 0 else d for d in t.dims(1)], dtype=t.dtype)
                 for t in m.inputs}
        if m.lengths is not None:
            feeds[m.lengths.name] = np.ones(1, dtype=m.lengths.dtype)
        feeds.update(self.layout.stack([None]))
        for wide in (False, True):
            try:
                self.run(feeds, wide)
            except Exception as e:  # onnxruntime's own error types
                raise ManifestError(f"{m.graph_file}: a one-step run fails: {e}") from e
