"""An ONNX graph's inputs and outputs as onnxruntime sees them: names, dtypes, shapes.

Import reads a graph with onnxruntime alone (serving installs have neither torch nor onnx):
`get_inputs()` / `get_outputs()` give each tensor's type as a string ('tensor(float)') and
its shape as a list of ints (fixed), strings (named dynamic dims) and None (unnamed dynamic
dims). Only the rank of an input onnxruntime shows as `[]` is ambiguous; onnx_wire settles it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError

# onnxruntime's type strings for the dtypes the manifest schema allows.
DTYPES = {
    "tensor(bool)": "bool",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
}

Dim = int | str | None  # fixed size, named dynamic dimension, unnamed dynamic dimension


@dataclass(frozen=True)
class Tensor:
    """One graph input or output. `shape` is None when the graph does not declare a rank."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[Dim, ...] | None

    def names(self) -> list[str]:
        """The named dynamic dimensions, in order."""
        return [d for d in self.shape or () if isinstance(d, str)]

    def describe(self) -> str:
        dims = "?" if self.shape is None else ", ".join("?" if d is None else str(d)
                                                        for d in self.shape)
        return f"{self.name} {self.dtype} [{dims}]"


@dataclass(frozen=True)
class Graph:
    path: Path
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    session: object  # the onnxruntime.InferenceSession it was read with, for verification

    def input(self, name: str) -> Tensor | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> Tensor | None:
        return next((t for t in self.outputs if t.name == name), None)


def first_line(error: Exception) -> str:
    """onnxruntime's messages run over several lines; a refusal is one."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _tensor(arg, ranked: dict[str, bool], role: str) -> Tensor:
    dtype = DTYPES.get(arg.type)
    if dtype is None:
        raise ExportError(
            f"{role} {arg.name!r} has type {arg.type}, which carousel cannot serve "
            f"(supported: {', '.join(sorted(set(DTYPES.values())))})"
        )
    shape = tuple(arg.shape)
    if not shape and not ranked.get(arg.name, False):
        return Tensor(arg.name, dtype, None)
    return Tensor(arg.name, dtype, shape)


def read_graph(path: Path, label: str | None = None) -> Graph:
    """Load `path` in onnxruntime (CPU) and describe its inputs and outputs; ExportError if
    onnxruntime cannot load it or a tensor has a type the manifest cannot describe.
    `label` names the file in messages (import reads a staged copy; the user knows the
    original)."""
    from .onnx_wire import ranked_tensors
    from .verify import open_session

    path = Path(path)
    label = label or path.name
    if not path.is_file():
        raise ExportError(f"graph not found: {label}")
    try:
        session = open_session(path)
    except Exception as e:  # onnxruntime raises its own exception types for a bad file
        reason = first_line(e).replace(str(path), label)
        raise ExportError(f"{label} is not a graph onnxruntime can load: {reason}") from e
    ranked = ranked_tensors(path.read_bytes())
    return Graph(
        path=path,
        inputs=tuple(_tensor(a, ranked, "input") for a in session.get_inputs()),
        outputs=tuple(_tensor(a, ranked, "output") for a in session.get_outputs()),
        session=session,
    )
