"""Proof, before anything is written, that an imported graph can be served as carousel serves.

The service relies on properties of a stateful graph that its file does not state, so each
is run with onnxruntime on random inputs and random state (a seeded generator):
- rows are independent: a batch of 3 computes, for every output, what each row computes
  alone (the service stacks the rows of different sessions into one batch);
- with a time axis, steps compose through the state: 6 steps in one call compute what 3 + 3
  steps compute with the state outputs fed back in (the service runs a session's input as it
  arrives, in pieces). Outputs with the time axis are joined along it; an output without
  one is read as the value after the last step;
- with a lengths input, padding is harmless: a batch of rows 6, 4 and 1 steps long, padded
  to 6, computes for each row over its real steps what the row alone computes (the service
  pads rows of different lengths into one batch).
Every run also checks that each state output has its state input's shape.

The reference in each check is the graph itself, run another way: import has nothing else
(no framework model) to compare with.
"""

from __future__ import annotations

import numpy as np

from .errors import ExportError, VerificationError
from .import_plan import Plan
from .inspect_graph import first_line
from .verify import Diffs

TOLERANCE = 1e-5  # max abs difference, every output
BATCH = 3
STEPS, CHUNKS = 6, (3, 3)
PADDED_LENGTHS = (6, 4, 1)
OTHER_DIM = 2  # the size given to a dynamic dimension that is neither batch nor time
INT_HIGH = 8  # random ints are in [0, 8): valid indices into any table of 8 rows or more


def _along(array: np.ndarray, axis: int, index) -> np.ndarray:
    return array[(slice(None),) * axis + (index,)]


class _Runner:
    """Feeds for the plan's inputs, and one checked onnxruntime call."""

    def __init__(self, plan: Plan, seed: int):
        self.plan, self.rng = plan, np.random.default_rng(seed)
        self.outputs = [t.name for t in plan.graph.outputs]
        self.states = {p.input: p for p in plan.states}

    def _random(self, dtype: str, shape: list[int]) -> np.ndarray:
        kind = np.dtype(dtype).kind
        if kind == "f":
            return self.rng.standard_normal(shape).astype(dtype)
        if kind == "b":
            return self.rng.integers(0, 2, shape).astype(bool)
        return self.rng.integers(0, INT_HIGH, shape).astype(dtype)

    def feed(self, batch: int, steps: int) -> dict[str, np.ndarray]:
        """Random per-step inputs and state for `batch` rows of `steps` steps each."""
        plan, feed = self.plan, {}
        for c in plan.constants:
            feed[c.name] = np.asarray(c.value, dtype=c.dtype)
        for t in plan.graph.inputs:
            if t.name in feed:
                continue
            if t.name == plan.lengths:
                feed[t.name] = np.full(batch, steps, t.dtype)
                continue
            shape = [d if isinstance(d, int) else OTHER_DIM for d in t.shape]
            shape[plan.batch_axes[t.name]] = batch
            if t.name in plan.time_axes:
                shape[plan.time_axes[t.name]] = steps
            value = self._random(t.dtype, shape)
            # State of the size a running session has: not zeros, so carrying it matters.
            feed[t.name] = value * np.float32(0.5) if t.name in self.states else value
        return feed

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            got = dict(zip(self.outputs, self.plan.graph.session.run(self.outputs, feed),
                           strict=True))
        except Exception as e:  # onnxruntime's own exception types
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())
            raise ExportError(f"onnxruntime cannot run the graph on random inputs ({shapes}): "
                              f"{first_line(e)}") from e
        for p in self.plan.states:
            if got[p.output].shape != feed[p.input].shape:
                raise VerificationError(
                    f"state output {p.output!r} has shape {list(got[p.output].shape)} for "
                    f"state input {p.input!r} of shape {list(feed[p.input].shape)}")
        return got

    def row(self, feed: dict, b: int, steps: int | None = None) -> dict[str, np.ndarray]:
        """Row b of a feed, alone (and only its first `steps` steps)."""
        plan, row = self.plan, {}
        for name, value in feed.items():
            if name in plan.batch_axes:
                value = _along(value, plan.batch_axes[name], slice(b, b + 1))
            if steps is not None and name in plan.time_axes:
                value = _along(value, plan.time_axes[name], slice(0, steps))
            row[name] = value
        if steps is not None and plan.lengths:
            row[plan.lengths] = np.full(1, steps, row[plan.lengths].dtype)
        return row


def _rows_alone(runner: _Runner, diffs: Diffs) -> None:
    plan = runner.plan
    feed = runner.feed(BATCH, STEPS)
    together = runner.run(feed)
    for b in range(BATCH):
        alone = runner.run(runner.row(feed, b))
        for name, value in together.items():
            got = _along(value, plan.batch_axes[name], slice(b, b + 1))
            diffs.add(f"a batch of {BATCH} vs row {b} alone", name, got, alone[name])
        diffs.cases += 1


def _chunks(runner: _Runner, diffs: Diffs) -> None:
    plan = runner.plan
    feed = runner.feed(BATCH, STEPS)
    whole = runner.run(feed)
    pieces, start, carried = [], 0, {}
    for n in CHUNKS:
        chunk = {}
        for name, value in feed.items():
            if name in plan.time_axes:
                value = _along(value, plan.time_axes[name], slice(start, start + n))
            chunk[name] = value
        chunk.update(carried)
        if plan.lengths:
            chunk[plan.lengths] = np.full(BATCH, n, feed[plan.lengths].dtype)
        out = runner.run(chunk)
        pieces.append(out)
        carried = {p.input: out[p.output] for p in plan.states}
        start += n
    case = f"{STEPS} steps in one call vs {' + '.join(map(str, CHUNKS))} with the state carried"
    for name, value in whole.items():
        if name in plan.time_axes:
            got = np.concatenate([p[name] for p in pieces], axis=plan.time_axes[name])
        else:
            got = pieces[-1][name]
        diffs.add(case, name, got, value)
    diffs.cases += 1


def _padded(runner: _Runner, diffs: Diffs) -> None:
    plan = runner.plan
    feed = runner.feed(len(PADDED_LENGTHS), max(PADDED_LENGTHS))
    feed[plan.lengths] = np.array(PADDED_LENGTHS, feed[plan.lengths].dtype)
    together = runner.run(feed)
    for b, n in enumerate(PADDED_LENGTHS):
        alone = runner.run(runner.row(feed, b, steps=n))
        for name, value in together.items():
            got = _along(value, plan.batch_axes[name], slice(b, b + 1))
            if name in plan.time_axes:
                got = _along(got, plan.time_axes[name], slice(0, n))
            diffs.add(f"padded batch of lengths {PADDED_LENGTHS} vs row {b} ({n} steps) alone",
                      name, got, alone[name])
        diffs.cases += 1


def verify_import(plan: Plan, seed: int = 0, tolerance: float = TOLERANCE) -> dict:
    """Run every check that applies; VerificationError with the first difference past
    `tolerance`, else the manifest's `verification` record."""
    runner = _Runner(plan, seed)
    checks = [(f"a batch of {BATCH} vs each row alone", _rows_alone)]
    if plan.time:
        checks.append((f"{STEPS} steps in one call vs {' + '.join(map(str, CHUNKS))} with the "
                       "state carried", _chunks))
    if plan.lengths:
        checks.append((f"a padded batch of lengths {list(PADDED_LENGTHS)} vs each row alone",
                       _padded))
    record = {"tolerance": tolerance, "batch": BATCH, "steps": STEPS if plan.time else None,
              "checks": []}
    for what, check in checks:
        diffs = Diffs(tolerance)
        check(runner, diffs)
        if diffs.failure:
            raise VerificationError(f"the graph cannot be served as carousel batches and "
                                    f"steps sessions: {diffs.failure}")
        record["checks"].append({"check": what, "cases": diffs.cases, "max_abs_diff": diffs.max})
    return record
