"""Stateful ONNX graphs from real PyTorch modules, for the import tests and the service tests.

Each builder takes a folder, exports its module there with `torch.onnx.export` (the
TorchScript exporter, `dynamo=False`, opset 17, `dynamic_axes` naming the batch and time
dimensions) and returns a `Built`: the .onnx path, the module it came from (in eval mode,
weights drawn from a fixed seed) and what the graph is meant to hold, so a test can check
what import detected and compare any run of the graph with the module itself.

    from graphs import lstm_forecaster
    built = lstm_forecaster(tmp_path, batch_first=True)
    built.torch_outputs({"x": x, "h0": h0, "c0": c0})  # {"y": ..., "hn": ..., "cn": ...}

`pythonpath = ["tests"]` in pyproject.toml makes this importable from every test folder.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 17
FEATURES, HIDDEN, LAYERS = 3, 16, 2


@dataclass
class Built:
    path: Path
    module: nn.Module
    inputs: dict[str, tuple]  # name -> shape, dims named as in the graph
    outputs: dict[str, tuple]
    state: dict[str, str]  # state input -> state output
    batch_axes: dict[str, int]  # state input -> its batch axis
    time: str | None = None  # the time dimension's name, if the graph has one
    constants: dict[str, float] = field(default_factory=dict)  # input -> value to import with

    def torch_outputs(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The module on the same inputs (given by graph input name), by graph output name."""
        args = [torch.from_numpy(np.asarray(feed[name])) for name in self.inputs]
        with torch.no_grad():
            out = self.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {name: t.numpy() for name, t in zip(self.outputs, out, strict=True)}

    def random_feed(self, rng: np.random.Generator, batch: int, steps: int) -> dict:
        """Random inputs and state for `batch` rows of `steps` steps; constants as imported."""
        feed = {}
        for name, shape in self.inputs.items():
            if name in self.constants:
                feed[name] = np.asarray(self.constants[name], np.float32)
                continue
            dims = [batch if d == "batch" else steps if d == self.time else d for d in shape]
            feed[name] = rng.standard_normal(dims).astype(np.float32)
        return feed


def _export(module: nn.Module, folder: Path, filename: str, example: tuple, built: dict) -> Built:
    """torch.onnx.export with the dims of `built["inputs"]` / `["outputs"]` made dynamic."""
    module.eval()
    path = Path(folder) / filename

    def dynamic(shapes):
        return {name: {i: d for i, d in enumerate(shape) if isinstance(d, str)}
                for name, shape in shapes.items()}

    with warnings.catch_warnings():
        # The exporter warns that an LSTM exported at batch > 1 may not run at other batch
        # sizes unless its initial state is an input; here it always is.
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size",
                                category=UserWarning)
        # nn.LSTM / nn.GRU check the input's feature size with a tensor compare the tracer
        # warns about; the size is fixed in the graph, so the check holding once is enough.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module, example, str(path), dynamo=False, opset_version=OPSET,
            input_names=list(built["inputs"]), output_names=list(built["outputs"]),
            dynamic_axes={**dynamic(built["inputs"]), **dynamic(built["outputs"])},
        )
    return Built(path=path, module=module, **built)


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------- modules


class Forecaster(nn.Module):
    """nn.LSTM(3 -> 16, 2 layers) + nn.Linear(16, 1): one prediction per step."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, HIDDEN, num_layers=LAYERS, batch_first=batch_first)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x, h0, c0):
        y, (hn, cn) = self.lstm(x, (h0, c0))
        return self.head(y), hn, cn


class GRUModel(nn.Module):
    """nn.GRU(3 -> 16, 1 layer, batch first) + nn.Linear(16, 2); one state tensor.

    mix="rows" subtracts the batch's mean from the output (a row's result depends on the
    other rows); mix="steps" subtracts the call's mean over time (a result depends on how
    the steps were split into calls). carousel can serve neither."""

    def __init__(self, mix: str | None = None):
        super().__init__()
        self.gru = nn.GRU(FEATURES, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 2)
        self.mix = mix

    def forward(self, x, state):
        y, state_n = self.gru(x, state)
        if self.mix is not None:
            y = y - y.mean(dim=0 if self.mix == "rows" else 1, keepdim=True)
        return self.head(y), state_n


class StackedStateCell(nn.Module):
    """An LSTM whose h and c travel as one tensor (2, batch, H), and a scalar `gain`
    multiplied into the output."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x, memory, gain):
        h, c = memory[0:1], memory[1:2]
        y, (hn, cn) = self.lstm(x, (h, c))
        return self.head(y) * gain, torch.cat([hn, cn], dim=0)


class BatchMajorStateGRU(nn.Module):
    """A GRU whose state is (batch, H): batch axis 0, moved to the GRU's layout inside."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(FEATURES, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 4)

    def forward(self, x, h_in):
        y, hn = self.gru(x, h_in.unsqueeze(0))
        return self.head(y), hn.squeeze(0)


class TwoStates(nn.Module):
    """Two states of one shape with neutral names: which output feeds which input is
    anyone's guess."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(HIDDEN, HIDDEN)
        self.b = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x, first, second):
        drive = x.sum(dim=1, keepdim=True)
        return torch.tanh(self.a(first) + drive), torch.tanh(self.b(second) - drive)


class Stateless(nn.Module):
    """nn.Linear(3 -> 2): nothing carried from one call to the next."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(FEATURES, 2)

    def forward(self, x):
        return self.linear(x)


# -------------------------------------------------------------------------------- builders


def lstm_forecaster(folder: Path, batch_first: bool = True, seed: int = 0) -> Built:
    """x (batch, time, 3) or (time, batch, 3), h0/c0 (2, batch, 16) -> y, hn, cn."""
    _seeded(seed)
    x_shape = ("batch", "time", FEATURES) if batch_first else ("time", "batch", FEATURES)
    y_shape = x_shape[:2] + (1,)
    state = (LAYERS, "batch", HIDDEN)
    example = (torch.randn(2, 5, FEATURES) if batch_first else torch.randn(5, 2, FEATURES),
               torch.zeros(LAYERS, 2, HIDDEN), torch.zeros(LAYERS, 2, HIDDEN))
    name = "forecaster_bf.onnx" if batch_first else "forecaster_tf.onnx"
    return _export(Forecaster(batch_first), folder, name, example, dict(
        inputs={"x": x_shape, "h0": state, "c0": state},
        outputs={"y": y_shape, "hn": state, "cn": state},
        state={"h0": "hn", "c0": "cn"}, batch_axes={"h0": 1, "c0": 1}, time="time"))


def gru_single_state(folder: Path, seed: int = 1, *, mix: str | None = None,
                     dtype: torch.dtype = torch.float32, dynamic_state: bool = True) -> Built:
    """x (batch, time, 3), state (1, batch, 16) -> y (batch, time, 2), stateN.

    mix: see GRUModel. dtype: of the weights, inputs and state. dynamic_state=False
    exports the state at its example shape (1, 2, 16): a state without a batch axis."""
    _seeded(seed)
    state = (1, "batch" if dynamic_state else 2, HIDDEN)
    example = (torch.randn(2, 5, FEATURES, dtype=dtype), torch.zeros(1, 2, HIDDEN, dtype=dtype))
    name = f"gru_{mix or 'plain'}_{str(dtype).removeprefix('torch.')}_{int(dynamic_state)}.onnx"
    return _export(GRUModel(mix).to(dtype), folder, name, example, dict(
        inputs={"x": ("batch", "time", FEATURES), "state": state},
        outputs={"y": ("batch", "time", 2), "stateN": state},
        state={"state": "stateN"}, batch_axes={"state": 1}, time="time"))


def stacked_state_with_constant(folder: Path, seed: int = 2) -> Built:
    """x (batch, time, 3), memory (2, batch, 16) = stacked h and c, gain [] (import with
    --constant gain=0.5) -> y (batch, time, 1), memory_next."""
    _seeded(seed)
    state = (2, "batch", HIDDEN)
    example = (torch.randn(2, 5, FEATURES), torch.zeros(2, 2, HIDDEN), torch.tensor(0.5))
    return _export(StackedStateCell(), folder, "stacked.onnx", example, dict(
        inputs={"x": ("batch", "time", FEATURES), "memory": state, "gain": ()},
        outputs={"y": ("batch", "time", 1), "memory_next": state},
        state={"memory": "memory_next"}, batch_axes={"memory": 1}, time="time",
        constants={"gain": 0.5}))


def batch_axis_zero_state(folder: Path, seed: int = 3) -> Built:
    """x (batch, time, 3), h_in (batch, 16) -> y (batch, time, 4), h_out (batch, 16)."""
    _seeded(seed)
    example = (torch.randn(2, 5, FEATURES), torch.zeros(2, HIDDEN))
    return _export(BatchMajorStateGRU(), folder, "batch_major.onnx", example, dict(
        inputs={"x": ("batch", "time", FEATURES), "h_in": ("batch", HIDDEN)},
        outputs={"y": ("batch", "time", 4), "h_out": ("batch", HIDDEN)},
        state={"h_in": "h_out"}, batch_axes={"h_in": 0}, time="time"))


def two_same_shaped_states(folder: Path, seed: int = 4) -> Built:
    """x (batch, 16), first/second (batch, 16) -> out_a, out_b (batch, 16): two candidate
    state pairs with names that say nothing (first -> out_a is the real one)."""
    _seeded(seed)
    shape = ("batch", HIDDEN)
    example = (torch.randn(2, HIDDEN), torch.zeros(2, HIDDEN), torch.zeros(2, HIDDEN))
    return _export(TwoStates(), folder, "two_states.onnx", example, dict(
        inputs={"x": shape, "first": shape, "second": shape},
        outputs={"out_a": shape, "out_b": shape},
        state={"first": "out_a", "second": "out_b"}, batch_axes={"first": 0, "second": 0}))


def stateless(folder: Path, seed: int = 5) -> Built:
    """x (batch, 3) -> y (batch, 2): no state at all."""
    _seeded(seed)
    return _export(Stateless(), folder, "stateless.onnx", (torch.randn(2, FEATURES),), dict(
        inputs={"x": ("batch", FEATURES)}, outputs={"y": ("batch", 2)}, state={},
        batch_axes={}))


def dynamic_rank_input(folder: Path) -> Built:
    """The batch-first forecaster with the shape of `x` taken out of the graph: x has no
    declared rank (onnxruntime shows it as [] like a scalar's)."""
    import onnx

    built = lstm_forecaster(folder, batch_first=True)
    model = onnx.load(str(built.path))
    next(i for i in model.graph.input if i.name == "x").type.tensor_type.ClearField("shape")
    built.path = Path(folder) / "dynamic_rank.onnx"
    onnx.save(model, str(built.path))
    built.inputs["x"] = None
    return built


def with_string_input(folder: Path) -> Built:
    """The batch-first forecaster with an extra (unused) input `label` of type string."""
    import onnx

    built = lstm_forecaster(folder, batch_first=True)
    model = onnx.load(str(built.path))
    model.graph.input.append(onnx.helper.make_tensor_value_info(
        "label", onnx.TensorProto.STRING, ["batch"]))
    built.path = Path(folder) / "string_input.onnx"
    onnx.save(model, str(built.path))
    built.inputs["label"] = ("batch",)
    return built
