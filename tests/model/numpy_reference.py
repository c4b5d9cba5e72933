"""The language model computed in numpy (float64) straight from the issue's equations.

Independent of carousel's code: it reads only the state_dict, splits each layer's stacked
weights into per-gate matrices by the documented gate order, and applies the equations with
the LSTM's concatenated form W·[h_{t-1}, x_t] + b. Tests compare the model against this.
"""

from __future__ import annotations

import numpy as np

# The documented parameter layout: gates stacked along dim 0 of weight_ih / weight_hh / biases.
GATE_ORDER = {"lstm": "ifgo", "peephole": "ifgo", "coupled": "igo", "gru": "rzn"}
PEEPHOLE_ORDER = "ifo"  # weight_peep (3H,)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def numpy_params(model) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


def layer_gates(params: dict, layer: int, variant: str, peephole_order: str = PEEPHOLE_ORDER):
    """Per gate: W (H, in), R (H, H), b_in, b_rec (H,); and the peephole vectors by gate."""
    pre = f"layers.{layer}."
    H = params[pre + "weight_hh"].shape[1]
    gates = {}
    for k, name in enumerate(GATE_ORDER[variant]):
        rows = slice(k * H, (k + 1) * H)
        gates[name] = {
            "W": params[pre + "weight_ih"][rows],
            "R": params[pre + "weight_hh"][rows],
            "b_in": params[pre + "bias_ih"][rows],
            "b_rec": params[pre + "bias_hh"][rows],
        }
    peep = {}
    if variant == "peephole":
        peep = dict(zip(peephole_order, np.split(params[pre + "weight_peep"], 3), strict=True))
    return gates, peep


def lstm_step(variant, gates, peep, x, h, c):
    """One step of the LSTM, peephole LSTM or coupled LSTM for a batch: x (B, in), h, c (B, H)."""

    def affine(name):  # W_name · [h_{t-1}, x_t] + b_name
        g = gates[name]
        W = np.concatenate([g["R"], g["W"]], axis=1)  # (H, H + in), acting on [h, x]
        return np.concatenate([h, x], axis=1) @ W.T + g["b_in"] + g["b_rec"]

    p = peep if variant == "peephole" else {"i": 0.0, "f": 0.0, "o": 0.0}
    i = sigmoid(affine("i") + p["i"] * c)
    f = 1.0 - i if variant == "coupled" else sigmoid(affine("f") + p["f"] * c)
    c_tilde = np.tanh(affine("g"))
    c_new = f * c + i * c_tilde
    o = sigmoid(affine("o") + p["o"] * c_new)  # the peephole output gate sees C_t
    return o * np.tanh(c_new), c_new


def gru_step(gates, x, h):
    """PyTorch's GRU: the reset gate multiplies the recurrent product including its bias."""
    g = gates
    r = sigmoid(x @ g["r"]["W"].T + g["r"]["b_in"] + h @ g["r"]["R"].T + g["r"]["b_rec"])
    z = sigmoid(x @ g["z"]["W"].T + g["z"]["b_in"] + h @ g["z"]["R"].T + g["z"]["b_rec"])
    n = np.tanh(x @ g["n"]["W"].T + g["n"]["b_in"] + r * (h @ g["n"]["R"].T + g["n"]["b_rec"]))
    return (1.0 - z) * n + z * h


def forward(params, variant, tokens, state, peephole_order: str = PEEPHOLE_ORDER):
    """tokens (B, T) ints; state tuple of (L, B, H). Returns logits (B, T, V), state."""
    state = [np.array(s, dtype=np.float64) for s in state]
    L = state[0].shape[0]
    layers = [layer_gates(params, layer, variant, peephole_order) for layer in range(L)]
    x_seq = params["embedding.weight"][np.asarray(tokens)]  # (B, T, E)
    logits = []
    for t in range(x_seq.shape[1]):
        x = x_seq[:, t]
        for k, (gates, peep) in enumerate(layers):
            if variant == "gru":
                state[0][k] = gru_step(gates, x, state[0][k])
            else:
                state[0][k], state[1][k] = lstm_step(
                    variant, gates, peep, x, state[0][k], state[1][k]
                )
            x = state[0][k]
        logits.append(x @ params["head.weight"].T + params["head.bias"])
    return np.stack(logits, axis=1), tuple(state)


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """Summed next-byte cross entropy (nats) over positions with target >= 0, and their count."""
    logits = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    targets = np.asarray(targets).reshape(-1)
    keep = targets >= 0
    logits, targets = logits[keep], targets[keep]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(targets)), targets].sum()), int(keep.sum())
