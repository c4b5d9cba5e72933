"""One ONNX graph builder for every variant, on the standard `LSTM` / `GRU` operators.

The graph (B batch, T time, L layers, H hidden, E embedding, V vocabulary):

    tokens (B, T) ─► Transpose ─► Gather(embedding) ─► x (T, B, E)        time-major
    per layer l:  LSTM|GRU(x, W, R, B, lengths, state_h[l:l+1], state_c[l:l+1] [, P])
                  ─► Y (T, 1, B, H) ─► Squeeze ─► x (T, B, H)
    x ─► Transpose ─► MatMul(head.weight^T) + head.bias ─► logits (B, T, V)
    Concat(Y_h of every layer) ─► state_h_out (L, B, H)   (and Y_c ─► state_c_out)

onnxruntime refuses `layout=1` (batch-first) on these operators, hence the transposes. The
tokens are transposed before the embedding lookup because they are the smaller tensor.

Length-0 rows: with `sequence_lens` 0 onnxruntime returns a zero state, while the PyTorch
model (and the service's contract) keeps the state of a row that does not advance. A `Where`
on each state output restores the input state for those rows, so the graph means exactly
what the model means whatever batch the service builds.

This module needs torch only for the checkpoint's tensors it is handed (it calls
`.detach().numpy()`); it imports onnx, which the caller has installed (the `train` extra).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .names import BATCH, LENGTHS, LOGITS, OPSET, TIME, TOKENS, state_input, state_output


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def onnx_weights(variant: str, params: dict, H: int) -> dict[str, np.ndarray]:
    """One layer's PyTorch parameters in ONNX's layout: W, R (1, G*H, in), B (1, 2*G*H),
    and P (1, 3H) for peephole.

    PyTorch stacks LSTM gates i, f, g, o; ONNX wants i, o, f, c. The coupled cell has no
    forget gate (i, g, o): its forget block is zero and `input_forget=1` makes onnxruntime
    compute f = 1 - i. PyTorch's GRU stacks r, z, n; ONNX wants z, r, h."""
    w_ih, w_hh = _np(params["weight_ih"]), _np(params["weight_hh"])
    b_ih, b_hh = _np(params["bias_ih"]), _np(params["bias_hh"])

    def blocks(a):
        return [a[k * H : (k + 1) * H] for k in range(a.shape[0] // H)]

    def reorder(a):
        if variant in ("lstm", "peephole"):
            i, f, g, o = blocks(a)
            return np.concatenate([i, o, f, g])
        if variant == "coupled":
            i, g, o = blocks(a)
            return np.concatenate([i, o, np.zeros_like(i), g])
        r, z, n = blocks(a)  # gru
        return np.concatenate([z, r, n])

    out = {
        "W": reorder(w_ih)[None],
        "R": reorder(w_hh)[None],
        "B": np.concatenate([reorder(b_ih), reorder(b_hh)])[None],
    }
    if variant == "peephole":
        # The model keeps peepholes i, f, o; ONNX's `P` is "P[iof]", read i, o, f (as
        # onnxruntime and onnx.reference both do, following the gate order i, o, f, c).
        p_i, p_f, p_o = blocks(_np(params["weight_peep"]))
        out["P"] = np.concatenate([p_i, p_o, p_f])[None]
    return out


def build_model(state_dict: dict, config) -> onnx.ModelProto:
    """The ONNX model for a `LanguageModel`'s state_dict and its `ModelConfig`."""
    variant, L, H = config.variant, config.num_layers, config.hidden_size
    V = config.vocab_size
    lstm = variant != "gru"
    state_names = config.state_names  # ("h", "c") or ("h",)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0], **attrs))

    sd = state_dict
    const("embedding.weight", _np(sd["embedding.weight"]))  # (V, E)
    const("head.weight_t", np.ascontiguousarray(_np(sd["head.weight"]).T))  # (H, V)
    const("head.bias", _np(sd["head.bias"]))  # (V,)
    axis0 = const("axes.0", np.array([0], np.int64)) if L > 1 else None  # for Slice
    axis1 = const("axes.1", np.array([1], np.int64))

    node("Transpose", [TOKENS], ["tokens_tm"], perm=[1, 0])  # (T, B)
    node("Gather", ["embedding.weight", "tokens_tm"], ["x.0"], axis=0)  # (T, B, E)

    x = "x.0"
    layer_states: dict[str, list[str]] = {s: [] for s in state_names}
    for layer in range(L):
        prefix = f"layers.{layer}"
        params = {k[len(prefix) + 1 :]: v for k, v in sd.items() if k.startswith(prefix + ".")}
        weights = onnx_weights(variant, params, H)
        w = {k: const(f"{prefix}.{k}", v) for k, v in weights.items()}

        if L == 1:  # the whole state input is this layer's: no Slice at all
            initial = {s: state_input(s) for s in state_names}
        else:
            lo = const(f"{prefix}.slice_lo", np.array([layer], np.int64))
            hi = const(f"{prefix}.slice_hi", np.array([layer + 1], np.int64))
            initial = {s: f"{prefix}.initial_{s}" for s in state_names}
            for s in state_names:
                node("Slice", [state_input(s), lo, hi, axis0], [initial[s]])  # (1, B, H)

        y, y_h = f"{prefix}.Y", f"{prefix}.Y_h"
        if lstm:
            y_c = f"{prefix}.Y_c"
            inputs = [x, w["W"], w["R"], w["B"], LENGTHS, initial["h"], initial["c"]]
            attrs = {"hidden_size": H}
            if variant == "peephole":
                inputs.append(w["P"])
            if variant == "coupled":
                attrs["input_forget"] = 1
            node("LSTM", inputs, [y, y_h, y_c], **attrs)
            layer_states["c"].append(y_c)
        else:
            inputs = [x, w["W"], w["R"], w["B"], LENGTHS, initial["h"]]
            node("GRU", inputs, [y, y_h], hidden_size=H, linear_before_reset=1)
        layer_states["h"].append(y_h)
        x = f"x.{layer + 1}"
        node("Squeeze", [y, axis1], [x])  # (T, B, H): drop num_directions

    node("Transpose", [x], ["x.bt"], perm=[1, 0, 2])  # (B, T, H)
    node("MatMul", ["x.bt", "head.weight_t"], ["logits.nobias"])
    node("Add", ["logits.nobias", "head.bias"], [LOGITS])  # (B, T, V)

    # Rows with length 0 keep their input state (see the module docstring).
    node("Greater", [LENGTHS, const("zero.i32", np.array(0, np.int32))], ["advanced"])
    node("Unsqueeze", ["advanced", const("axes.0.2", np.array([0, 2], np.int64))],
         ["advanced.1b1"])  # (1, B, 1)
    for s in state_names:
        parts = layer_states[s]
        new = f"state_{s}.new"
        if len(parts) == 1:
            node("Identity", parts, [new])
        else:
            node("Concat", parts, [new], axis=0)  # (L, B, H)
        node("Where", ["advanced.1b1", new, state_input(s)], [state_output(s)])

    state_shape = [L, BATCH, H]
    inputs = [helper.make_tensor_value_info(TOKENS, TensorProto.INT64, [BATCH, TIME])]
    inputs += [helper.make_tensor_value_info(state_input(s), TensorProto.FLOAT, state_shape)
               for s in state_names]
    inputs.append(helper.make_tensor_value_info(LENGTHS, TensorProto.INT32, [BATCH]))
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [BATCH, TIME, V])]
    outputs += [helper.make_tensor_value_info(state_output(s), TensorProto.FLOAT, state_shape)
                for s in state_names]

    graph = helper.make_graph(nodes, f"carousel_{variant}", inputs, outputs, inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="carousel.export",
        doc_string=f"byte-level {variant} language model, {L} x {H}",
    )
    model.ir_version = 8  # the IR that opset 17 shipped with; every onnxruntime >= 1.14 reads it
    return model
