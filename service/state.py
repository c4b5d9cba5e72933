"""A session's state as one compact float32 row, and how rows join and leave a batch.

Each session keeps one contiguous float32 array ("row"): every state tensor the manifest
lists (batch axis removed), then `extra_size` floats its model's adapter keeps beside the
state. The byte LM keeps the logits after the last consumed token there: the next generated
token is sampled from them and a retried step is answered from them; storing them costs one
vocabulary of floats, far less than re-running the model. A tensor model keeps none.

`stack` builds the graph's state inputs from the rows of a batch (sessions join a batch);
`unstack` turns the graph's outputs back into one fresh row per session (they leave it).
Rows are always copies, so a session never pins a whole batch's arrays in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .manifest import StateSpec


class StateLayout:
    def __init__(self, states: Sequence[StateSpec], extra_size: int = 0) -> None:
        self.states = tuple(states)
        self.extra_size = extra_size
        offsets, at = [], 0
        for s in self.states:
            offsets.append((at, at + s.size))
            at += s.size
        self.offsets = tuple(offsets)
        # Each state in the graph's layout, shape[:axis] + (batch,) + shape[axis:], is `outer`
        # blocks of `inner` floats per row: (2, B, 512) is two blocks of 512 from each row.
        self.blocks = tuple((math.prod(s.shape[:s.batch_axis]), math.prod(s.shape[s.batch_axis:]))
                            for s in self.states)
        self.state_size = at  # floats of state proper
        self.size = at + extra_size  # floats in a row

    @property
    def state_bytes(self) -> int:
        return 4 * self.state_size

    def initial_row(self) -> np.ndarray:
        """A fresh session: zero state, zero extras."""
        return np.zeros(self.size, dtype=np.float32)

    def extra(self, row: np.ndarray) -> np.ndarray:
        return row[self.state_size:]

    def extras(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """The rows' extras as one (B, extra_size) array."""
        return np.stack([row[self.state_size:] for row in rows])

    def stack(self, rows: Sequence[np.ndarray | None]) -> dict[str, np.ndarray]:
        """Graph state inputs for a batch; a None row is a stateless item (zero state)."""
        n = len(rows)
        if all(row is not None for row in rows):
            # Each state tensor is joined from the rows' blocks straight into the graph's
            # layout: one copy, made by bytes.join, which holds the GIL throughout. numpy's
            # copies of this size release it and must take it back from the event loop, which
            # is the inference thread's longest wait (see unstack).
            views = [memoryview(row) for row in rows]
            feeds = {}
            for spec, (lo, _), (outer, inner) in zip(self.states, self.offsets, self.blocks,
                                                     strict=True):
                joined = b"".join([v[lo + o * inner: lo + (o + 1) * inner]
                                   for o in range(outer) for v in views])
                shape = (*spec.shape[:spec.batch_axis], n, *spec.shape[spec.batch_axis:])
                feeds[spec.input] = np.frombuffer(joined, dtype=np.float32).reshape(shape)
            return feeds
        batch = np.zeros((n, self.state_size), dtype=np.float32)
        for i, row in enumerate(rows):
            if row is not None:
                batch[i] = row[: self.state_size]
        feeds = {}
        for spec, (lo, hi) in zip(self.states, self.offsets, strict=True):
            part = batch[:, lo:hi].reshape((len(rows), *spec.shape))
            feeds[spec.input] = np.ascontiguousarray(np.moveaxis(part, 0, spec.batch_axis))
        return feeds

    def feeds_from(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's state outputs as the next call's state inputs (same batch, no copy)."""
        return {spec.input: outputs[spec.output] for spec in self.states}

    def unstack(self, outputs: dict[str, np.ndarray], extras: np.ndarray | None,
                n: int) -> list[np.ndarray]:
        """One new row per batch row (n rows) from the graph's state outputs and the rows'
        extras (B, extra_size), if the adapter keeps any."""
        # One read-only array per row over its own bytes, joined from the outputs' blocks:
        # bytes.join and `tobytes` copy while holding the GIL, where numpy's own copies of
        # this size would release and re-take it, and each re-take can wait for the event
        # loop (measured: the inference thread spent longer waiting for the GIL than in numpy).
        flats = [memoryview(np.ascontiguousarray(outputs[spec.output]).reshape(-1))
                 for spec in self.states]
        if self.extra_size:
            extras = np.asarray(extras, dtype=np.float32)
        rows = []
        for b in range(n):
            parts = [flat[(o * n + b) * inner: (o * n + b + 1) * inner]
                     for flat, (outer, inner) in zip(flats, self.blocks, strict=True)
                     for o in range(outer)]
            if self.extra_size:
                parts.append(extras[b].tobytes())
            rows.append(np.frombuffer(b"".join(parts), dtype=np.float32))
        return rows

    def tensors(self, row: np.ndarray) -> dict[str, np.ndarray]:
        """A row's state tensors with their batch axis (size 1), for inspection and tests."""
        out = {}
        for spec, (lo, hi) in zip(self.states, self.offsets, strict=True):
            out[spec.input] = np.expand_dims(row[lo:hi].reshape(spec.shape), spec.batch_axis)
        return out
