"""The tensor adapter: any stateful graph, named tensors in and named tensors out.

A step of a tensor model is the per-step inputs the manifest lists (e.g. a `(time, 3)` block
of features for an LSTM forecaster, a frame of audio), each without its batch axis; the
answer is every result output for that row. Nothing is kept beside the state (no extras):
a retried step is answered from the record's copy of its last result.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidInput
from .manifest import Manifest


class TensorModel:
    """The adapter of one tensor model version (`manifest.adapter == "tensor"`)."""

    extra_size = 0

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.outputs = manifest.outputs
        self.paddable = manifest.lengths is not None
        self.constants = {c.name: c for c in manifest.constants}

    def inputs(self, tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """One row's per-step inputs (no batch axis), checked against the manifest, and the
        steps they hold along the sequence axis (1 without one)."""
        m = self.manifest
        unknown = set(tensors) - {t.name for t in m.inputs} - set(self.constants)
        if unknown:
            raise InvalidInput(f"unknown input {sorted(unknown)[0]!r}; the inputs are "
                               f"{[t.name for t in m.inputs]}")
        out: dict[str, np.ndarray] = {}
        length = None
        for spec in m.inputs:
            x = tensors.get(spec.name)
            if x is None:
                raise InvalidInput(f"missing input {spec.name!r}")
            want = spec.row_shape
            if x.dtype != spec.dtype or x.ndim != len(want) or any(
                    isinstance(d, int) and d != n for d, n in zip(want, x.shape, strict=True)):
                raise InvalidInput(f"input {spec.name!r} must be {spec.dtype.name} "
                                   f"{list(want)} per row; got {x.dtype.name} {list(x.shape)}")
            if spec.row_seq_axis is not None:
                n = x.shape[spec.row_seq_axis]
                if n == 0:
                    raise InvalidInput(f"input {spec.name!r} has no steps")
                if length is not None and n != length:
                    raise InvalidInput(f"the inputs hold different numbers of steps "
                                       f"({length} and {n} for {spec.name!r})")
                length = n
            out[spec.name] = np.ascontiguousarray(x)
        for name, x in tensors.items():
            if name in self.constants:
                c = self.constants[name]
                if not c.overridable:
                    raise InvalidInput(f"input {name!r} is a constant of this model; it "
                                       "cannot be sent")
                if x.dtype != c.value.dtype or x.shape != c.value.shape:
                    raise InvalidInput(f"constant {name!r} must be {c.value.dtype.name} "
                                       f"{list(c.value.shape)}")
                out[name] = x
        return out, 1 if length is None else length

    def finish(self, outputs: dict[str, np.ndarray], lengths: np.ndarray,
               works: list) -> tuple[None, list]:
        """Each row's results: every result output with its batch axis removed (and, where
        rows were padded, cut to the row's own length). Copies, so an answer never pins the
        batch's arrays."""
        per_output = []
        for spec in self.outputs:
            batch = np.moveaxis(outputs[spec.name], spec.batch_axis, 0)
            per_output.append((spec, batch))
        results = []
        for i in range(len(works)):
            row = {}
            for spec, batch in per_output:
                x = batch[i]
                if self.paddable and spec.row_seq_axis is not None:
                    index = [slice(None)] * x.ndim
                    index[spec.row_seq_axis] = slice(0, int(lengths[i]))
                    x = x[tuple(index)]
                row[spec.name] = np.array(x)
            results.append(row)
        return None, results


    def merge(self, results: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """A long input ran in chunks (a graph with a lengths input): outputs along the
        sequence axis are joined in order; any other output is the last chunk's."""
        merged = {}
        for spec in self.outputs:
            parts = [r[spec.name] for r in results]
            axis = spec.row_seq_axis
            merged[spec.name] = parts[-1] if axis is None else np.concatenate(parts, axis=axis)
        return merged
