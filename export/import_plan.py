"""What each input and output of an imported graph is for: the plan carousel serves it by.

From the graph's tensors (inspect_graph) and the user's flags this module decides
- the state pairs: an input and an output of the same dtype and shape, carried from one
  call of a session to the next. `--state IN=OUT` names them; without it they are detected
  by shape, and where several inputs fit the same output by common naming (h0 -> hn,
  state -> stateN, h_in -> h_out, state_h -> state_h_out);
- the batch dimension: the named dynamic dimension every state input and every batched
  input has (rows of different sessions are stacked along it), or `--batch-dim`, or the
  axis given as `--state IN:AXIS=OUT`;
- the constants: inputs without the batch axis, fed one value for the whole batch, which
  `--constant NAME=VALUE` must give;
- the time axis: a named dynamic dimension, not the batch one, that every per-step input has
  (`--time-dim` picks one when several fit), and the lengths input that tells each row's real
  length (an int input of shape [batch] named lengths / seq_lens / sequence_lens, or
  `--lengths`).

Detection answers only when exactly one answer fits. Otherwise it refuses with the
candidates and the flag that settles it: a guess that is wrong would serve wrong numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import ExportError
from .inspect_graph import Dim, Graph, Tensor
from .names import BATCH

# Compared lower-case. A dimension is a batch dimension by name only to break a tie.
BATCH_NAMES = ("batch", "batch_size", "batchsize", "bs", "b", "n")
TIME_NAMES = ("time", "t", "seq", "seq_len", "sequence", "sequence_length", "steps")
LENGTHS_NAMES = ("lengths", "seq_lens", "sequence_lens")
# A state input's name ends in one of IN_MARKS, its output is the same stem + an OUT_MARK.
IN_MARKS = ("_in", "_0", "0", "")
OUT_MARKS = ("_out", "_n", "n", "_next", "_new")
OVERRIDABLE = ":overridable"
STATE_DTYPE = "float32"  # sessions keep state as float32 (the schema allows no other)


@dataclass(frozen=True)
class StatePair:
    input: str
    output: str
    shape: tuple[Dim, ...]  # the state input's
    batch_axis: int


@dataclass(frozen=True)
class Constant:
    name: str
    dtype: str
    shape: tuple[int, ...]
    value: object  # as given: a number, a bool or a (nested) list
    overridable: bool


@dataclass(frozen=True)
class Plan:
    graph: Graph
    batch: str  # the batch dimension's name in the graph
    states: tuple[StatePair, ...]
    constants: tuple[Constant, ...]
    per_step: tuple[str, ...]  # batched inputs that are neither state nor lengths
    lengths: str | None
    time: str | None  # the time dimension's name in the graph
    batch_axes: dict[str, int] = field(default_factory=dict)  # every batched tensor
    time_axes: dict[str, int] = field(default_factory=dict)  # per-step inputs, outputs

    def manifest_shape(self, tensor: Tensor) -> list:
        """The shape as the manifest writes it: "batch" on the batch axis, fixed sizes as
        ints, other dynamic dimensions by name (an unnamed one gets `<tensor>_dim_<axis>`)."""
        axis = self.batch_axes.get(tensor.name)
        return [BATCH if i == axis else f"{tensor.name}_dim_{i}" if d is None else d
                for i, d in enumerate(tensor.shape)]


def _listing(tensors) -> str:
    return ", ".join(t.describe() for t in tensors)


def _pairs(pairs) -> str:
    return ", ".join(f"{i.name} -> {o.name}" for i, o in pairs)


def _dynamic(d: Dim) -> bool:
    return not isinstance(d, int)


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Same dtype and rank, and no dimension fixed at two different sizes. A dynamic
    dimension matches any: exporters name an output's dimensions on their own, and may leave
    one dynamic that the input fixes. Verification runs the pair and compares real shapes."""
    return a.dtype == b.dtype and len(a.shape) == len(b.shape) and all(
        _dynamic(x) or _dynamic(y) or x == y for x, y in zip(a.shape, b.shape, strict=True))


def conventional_pair(input_name: str, output_name: str) -> bool:
    """h0/hn, h_0/h_n, state/stateN, state_h/state_h_out, x_in/x_out, h/h_next ..."""
    i, o = input_name.lower(), output_name.lower()
    for mark in IN_MARKS:
        stem = i[: len(i) - len(mark)]
        if i.endswith(mark) and stem and any(o == stem + m for m in OUT_MARKS):
            return True
    return False


# ------------------------------------------------------------------------------ state pairs


def _resolve_state_flag(spec: str, graph: Graph) -> tuple[Tensor, int | None, Tensor]:
    """--state IN=OUT or IN:AXIS=OUT. A name with a ':' of its own (x:0) is an input name
    when the graph has that input; otherwise the digits after the last ':' are the axis."""
    left, sep, right = spec.partition("=")
    if not (sep and left and right):
        raise ExportError(f"--state {spec!r}: expected IN=OUT or IN:AXIS=OUT")
    axis = None
    tensor = graph.input(left)
    if tensor is None and ":" in left:
        name, _, digits = left.rpartition(":")
        if digits.isdigit() and graph.input(name) is not None:
            tensor, axis = graph.input(name), int(digits)
    if tensor is None:
        raise ExportError(f"--state {spec!r}: the graph has no input {left!r} "
                          f"(inputs: {_listing(graph.inputs)})")
    out = graph.output(right)
    if out is None:
        raise ExportError(f"--state {spec!r}: the graph has no output {right!r} "
                          f"(outputs: {_listing(graph.outputs)})")
    if not same_layout(tensor, out):
        raise ExportError(f"--state {spec!r}: output {out.describe()} does not match input "
                          f"{tensor.describe()}; a state output must have its input's "
                          "dtype and shape")
    if axis is not None and not 0 <= axis < len(tensor.shape):
        raise ExportError(f"--state {spec!r}: axis {axis} is outside {tensor.describe()}")
    return tensor, axis, out


def _detect_pairs(graph: Graph) -> list[tuple[Tensor, Tensor]]:
    # Scalars are left out: a scalar input is a constant, whatever outputs look like it.
    candidates = [(i, o) for i in graph.inputs for o in graph.outputs
                  if i.shape and same_layout(i, o)]
    if not candidates:
        raise ExportError("the graph has no input/output pair of the same dtype and shape; "
                          "name them with --state IN=OUT")
    named = [(i, o) for i, o in candidates if conventional_pair(i.name, o.name)]
    pairs = named or candidates
    ins, outs = [i.name for i, _ in pairs], [o.name for _, o in pairs]
    # Unnamed candidates beside named pairs: a per-step input shaped like a per-step output,
    # or a state with unusual names. Only the user can tell.
    left_over = [(i, o) for i, o in candidates if i.name not in ins and o.name not in outs]
    if len(set(ins)) < len(ins) or len(set(outs)) < len(outs) or left_over:
        raise ExportError(
            f"cannot tell which inputs and outputs are state pairs; candidates of the same "
            f"dtype and shape: {_pairs(candidates)}; name each pair with --state IN=OUT")
    return pairs


def _state_flags(specs: Sequence[str], graph: Graph):
    resolved = [_resolve_state_flag(s, graph) for s in specs]
    for role, names in (("input", [i.name for i, _, _ in resolved]),
                        ("output", [o.name for _, _, o in resolved])):
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ExportError(f"--state names the {role} {repeated[0]!r} more than once")
    return resolved


# ------------------------------------------------------------------------ batch and time


def _pick(candidates: set[str], conventional: tuple[str, ...]) -> str | None:
    """The only candidate, else the only one with a conventional name, else None."""
    if len(candidates) == 1:
        return next(iter(candidates))
    usual = [c for c in candidates if c.lower() in conventional]
    return usual[0] if len(usual) == 1 else None


def _batch_dim(graph: Graph, resolved, batch_dim: str | None) -> str:
    state_inputs = {i.name for i, _, _ in resolved}
    if batch_dim is not None:
        if not any(batch_dim in t.names() for t in graph.inputs):
            raise ExportError(f"--batch-dim {batch_dim!r}: no input has a dimension of that "
                              f"name (inputs: {_listing(graph.inputs)})")
        return batch_dim
    # A state given with its axis says which dimension is the batch one, if it is named.
    from_axes = {i.shape[axis] for i, axis, _ in resolved
                 if axis is not None and isinstance(i.shape[axis], str)}
    # Every state input and every input with a named dynamic dimension has the batch axis.
    # (A state with no dynamic dimension at all is refused for that below, not here.)
    groups = [set(i.names()) for i, axis, _ in resolved if axis is None and i.names()]
    groups += [set(t.names()) for t in graph.inputs if t.name not in state_inputs and t.names()]
    candidates = set.intersection(*groups) if groups else set()
    if from_axes:
        candidates = (candidates & from_axes) if groups else from_axes
    chosen = _pick(candidates, BATCH_NAMES)
    if chosen is None:
        found = (f"candidates: {', '.join(sorted(candidates))}" if candidates else
                 "no named dynamic dimension is in every state input and every batched input")
        raise ExportError(f"cannot tell the batch dimension ({found}); pass --batch-dim NAME "
                          "or give each state's batch axis as --state IN:AXIS=OUT")
    return chosen


def _axis_of(tensor: Tensor, name: str) -> int | None:
    """The index of dimension `name` in tensor; ExportError if it is there twice."""
    hits = [i for i, d in enumerate(tensor.shape) if d == name]
    if len(hits) > 1:
        raise ExportError(f"{tensor.describe()} has the dimension {name!r} more than once")
    return hits[0] if hits else None


def _state_pairs(resolved, batch: str) -> tuple[StatePair, ...]:
    states = []
    for tensor, axis, out in resolved:
        if tensor.dtype != STATE_DTYPE:
            raise ExportError(f"state {tensor.describe()} is {tensor.dtype}; carousel keeps "
                              f"state in {STATE_DTYPE} only")
        if axis is None:
            axis = _axis_of(tensor, batch)
        if axis is None or not _dynamic(tensor.shape[axis]):
            why = (f"axis {axis} is fixed at {tensor.shape[axis]}" if axis is not None else
                   f"it has no dimension {batch!r}")
            raise ExportError(f"state {tensor.describe()} has no batch axis ({why}); give its "
                              f"axis as --state {tensor.name}:AXIS={out.name}")
        other = [d for i, d in enumerate(tensor.shape) if i != axis and _dynamic(d)]
        if other:
            raise ExportError(
                f"state {tensor.describe()} has a dynamic dimension besides the batch axis; "
                "a session starts at zeros, so every other size must be fixed in the graph")
        states.append(StatePair(tensor.name, out.name, tensor.shape, axis))
    return tuple(states)


def _time_dim(graph: Graph, per_step: list[str], batch: str, time_dim: str | None) -> str | None:
    tensors = [graph.input(n) for n in per_step]
    if time_dim is not None:
        missing = [t.name for t in tensors if time_dim not in t.names()]
        if missing or not tensors:
            raise ExportError(f"--time-dim {time_dim!r}: not a dimension of every per-step "
                              f"input ({', '.join(missing) or 'there are none'})")
        return time_dim
    if not tensors:
        return None
    shared = set.intersection(*(set(t.names()) for t in tensors)) - {batch}
    if not shared:
        return None
    chosen = _pick(shared, TIME_NAMES)
    if chosen is None:
        raise ExportError(f"cannot tell the time axis: the per-step inputs share the "
                          f"dimensions {', '.join(sorted(shared))}; pass --time-dim NAME")
    return chosen


def _is_lengths(tensor: Tensor, batch: str) -> bool:
    return tensor.shape == (batch,) and tensor.dtype in ("int32", "int64")


# ------------------------------------------------------------------------------ constants


def parse_constant_flag(spec: str) -> tuple[str, object, bool]:
    """NAME=VALUE or NAME=VALUE:overridable, VALUE a JSON number, true/false or array."""
    name, sep, text = spec.partition("=")
    if not (sep and name and text):
        raise ExportError(f"--constant {spec!r}: expected NAME=VALUE or NAME=VALUE{OVERRIDABLE}")
    overridable = text.endswith(OVERRIDABLE)
    text = text.removesuffix(OVERRIDABLE)
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict | str) or value is None:
        raise ExportError(f"--constant {spec!r}: {text!r} is not a number, true/false or a "
                          "JSON array")
    return name, value, overridable


def _constant(tensor: Tensor, value, overridable: bool, spec: str) -> Constant:
    try:
        array = np.asarray(value)
    except ValueError as e:  # a ragged list
        raise ExportError(f"--constant {spec!r}: {e}") from e
    if array.dtype == object or array.shape != tensor.shape:
        raise ExportError(f"--constant {spec!r}: the value has shape {list(array.shape)}, "
                          f"input {tensor.describe()} needs {list(tensor.shape)}")
    cast = array.astype(tensor.dtype)
    if np.dtype(tensor.dtype).kind in "iub" and not np.array_equal(cast, array):
        raise ExportError(f"--constant {spec!r}: input {tensor.name!r} is {tensor.dtype}, "
                          "the value does not fit it exactly")
    return Constant(tensor.name, tensor.dtype, tensor.shape, value, overridable)


def _constants(graph: Graph, unbatched: list[Tensor], specs: Sequence[str]):
    given = {}
    for spec in specs:
        name, value, overridable = parse_constant_flag(spec)
        tensor = graph.input(name)
        if tensor is None:
            raise ExportError(f"--constant {spec!r}: the graph has no input {name!r}")
        if tensor not in unbatched:
            raise ExportError(f"--constant {spec!r}: input {tensor.describe()} has the batch "
                              "axis; only inputs without one are constants")
        if name in given:
            raise ExportError(f"--constant gives {name!r} more than once")
        given[name] = _constant(tensor, value, overridable, spec)
    missing = [t for t in unbatched if t.name not in given]
    if missing:
        raise ExportError(
            f"input {missing[0].describe()} has no batch axis, so it is a constant: give its "
            f"value with --constant {missing[0].name}=VALUE"
            + (f" (also: {', '.join(t.name for t in missing[1:])})" if missing[1:] else ""))
    return tuple(given[t.name] for t in unbatched)


# ---------------------------------------------------------------------------------- plan


def plan_import(graph: Graph, *, states: Sequence[str] = (), constants: Sequence[str] = (),
                lengths: str | None = None, batch_dim: str | None = None,
                time_dim: str | None = None) -> Plan:
    """The plan for `graph`, flags in the CLI's syntax; ExportError says why there is none."""
    for role, tensors in (("input", graph.inputs), ("output", graph.outputs)):
        for t in tensors:
            if t.shape is None:
                raise ExportError(f"{role} {t.name!r} has a dynamic rank (the graph declares no "
                                  "shape for it); carousel needs every tensor's rank")
    resolved = _state_flags(states, graph) if states else [
        (i, None, o) for i, o in _detect_pairs(graph)]
    batch = _batch_dim(graph, resolved, batch_dim)
    pairs = _state_pairs(resolved, batch)
    for t in (*graph.inputs, *graph.outputs):
        if batch != BATCH and BATCH in t.names():
            raise ExportError(f"{t.describe()}: the dimension {BATCH!r} is not the batch axis "
                              f"({batch!r} is), and the manifest keeps that name for it")

    state_inputs = {p.input for p in pairs}
    batch_axes = {p.input: p.batch_axis for p in pairs}
    batch_axes.update({p.output: p.batch_axis for p in pairs})
    batched, unbatched = [], []
    for t in graph.inputs:
        if t.name in state_inputs:
            continue
        axis = _axis_of(t, batch)
        if axis is None:
            if not all(isinstance(d, int) for d in t.shape):
                raise ExportError(f"input {t.describe()} has no batch axis ({batch!r}) but a "
                                  "dynamic dimension; a constant needs a fixed shape")
            unbatched.append(t)
        else:
            batched.append(t.name)
            batch_axes[t.name] = axis
    for t in graph.outputs:
        if t.name in batch_axes:
            continue
        axis = _axis_of(t, batch)
        if axis is None:
            raise ExportError(f"output {t.describe()} has no batch axis ({batch!r}); every "
                              "output must carry the rows of the batch (name that dimension "
                              f"{batch!r} when exporting)")
        batch_axes[t.name] = axis
    consts = _constants(graph, unbatched, constants)

    lengths_given = lengths is not None
    if lengths_given:
        tensor = graph.input(lengths)
        if tensor is None or tensor.name not in batched or not _is_lengths(tensor, batch):
            raise ExportError(f"--lengths {lengths!r}: needs an int32 or int64 input of shape "
                              f"[{batch}] (inputs: {_listing(graph.inputs)})")
    else:
        named = [n for n in batched if n.lower() in LENGTHS_NAMES
                 and _is_lengths(graph.input(n), batch)]
        lengths = named[0] if len(named) == 1 else None
    per_step = [n for n in batched if n != lengths]
    time = _time_dim(graph, per_step, batch, time_dim)
    if time is None and lengths is not None:
        if lengths_given:
            raise ExportError(f"--lengths {lengths!r}: the graph has no time axis to measure")
        per_step, lengths = batched, None  # only named like one: without time, it is data
    time_axes = {}
    if time is not None:
        for t in (*(graph.input(n) for n in per_step), *graph.outputs):
            axis = _axis_of(t, time)
            if axis is not None:
                time_axes[t.name] = axis
    return Plan(graph=graph, batch=batch, states=pairs, constants=consts,
                per_step=tuple(per_step), lengths=lengths, time=time,
                batch_axes=batch_axes, time_axes=time_axes)
