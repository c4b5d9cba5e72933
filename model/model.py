"""Recurrent byte-level language models, written from the LSTM equations.

Read top to bottom: the config, the tokenizer, the four recurrent cells (LSTM, peephole
LSTM, coupled input-forget LSTM, GRU) as the papers write them, the layer that runs a cell
over time (or torch's fused kernel on the same parameters), and the language model.

Shapes: B batch, T time, L layers, H hidden, E embedding, V vocabulary.
State is always a tuple of tensors shaped (L, B, H): (h, c) for the LSTMs, (h,) for the GRU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

VARIANTS = ("lstm", "peephole", "coupled", "gru")


@dataclass
class ModelConfig:
    variant: str = "lstm"  # one of VARIANTS
    vocab_size: int = 256  # byte-level: every UTF-8 byte is a token, no vocabulary file
    embed_dim: int = 64
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.0  # between recurrent layers (and after the last), training only
    # Run plain LSTM / GRU layers on torch's fused kernel. The equation-level cell is the
    # reference and the only path for peephole and coupled models; tests prove they agree.
    fused: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h",) if self.variant == "gru" else ("h", "c")

    def to_dict(self) -> dict:
        return asdict(self)


# -------------------------------------------------------------------------------- tokenizer


def encode(text: str) -> list[int]:
    """Text to tokens: its UTF-8 bytes."""
    return list(text.encode("utf-8"))


def decode(tokens: list[int]) -> str:
    """Tokens to text; a byte sequence that is not valid UTF-8 shows as U+FFFD."""
    return bytes(tokens).decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------ cells
# Each cell computes one time step for a batch. Weights follow PyTorch's layout so the
# fused kernels can run on the very same tensors: W (gates*H, in), R (gates*H, H) and two
# biases, gates stacked in PyTorch's order (LSTM i, f, g, o; GRU r, z, n).


def lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """f_t = σ(W_f·[h,x]+b_f), i_t = σ(W_i·[h,x]+b_i), C~_t = tanh(W_C·[h,x]+b_C),
    o_t = σ(W_o·[h,x]+b_o), C_t = f_t⊙C_{t-1} + i_t⊙C~_t, h_t = o_t⊙tanh(C_t)."""
    gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    h = o * torch.tanh(c)
    return h, c


def peephole_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, p):
    """Gers & Schmidhuber (2000): the input and forget gates also see C_{t-1}, the output
    gate sees the new C_t. p is (3H,) ordered i, f, o (like the gates here; ONNX's LSTM `P`
    is ordered i, o, f, so an exporter must reorder it)."""
    p_i, p_f, p_o = p.chunk(3)
    gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=1)
    i = torch.sigmoid(i + p_i * c)
    f = torch.sigmoid(f + p_f * c)
    c = f * c + i * torch.tanh(g)
    o = torch.sigmoid(o + p_o * c)
    h = o * torch.tanh(c)
    return h, c


def coupled_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """Coupled input-forget gate: f_t = 1 - i_t, so the cell forgets exactly as much as it
    writes. There are no forget-gate weights: gates are stacked i, g, o (3H)."""
    gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh  # (B, 3H)
    i, g, o = gates.chunk(3, dim=1)
    i, g, o = torch.sigmoid(i), torch.tanh(g), torch.sigmoid(o)
    c = (1 - i) * c + i * g
    h = o * torch.tanh(c)
    return h, c


def gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    """Cho et al. (2014), PyTorch's form: r = σ(W_r x + b_ir + R_r h + b_hr),
    z = σ(W_z x + b_iz + R_z h + b_hz), n = tanh(W_n x + b_in + r⊙(R_n h + b_hn)),
    h_t = (1 - z)⊙n + z⊙h_{t-1}. The reset gate applies after the recurrent product
    (ONNX calls this linear_before_reset=1)."""
    gx = x @ w_ih.T + b_ih  # (B, 3H)
    gh = h @ w_hh.T + b_hh  # (B, 3H)
    xr, xz, xn = gx.chunk(3, dim=1)
    hr, hz, hn = gh.chunk(3, dim=1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


GATES = {"lstm": 4, "peephole": 4, "coupled": 3, "gru": 3}


# ------------------------------------------------------------------------------------ layer


class RecurrentLayer(nn.Module):
    """One recurrent layer of any variant, run over a (B, T, in) sequence."""

    def __init__(self, variant: str, input_size: int, hidden_size: int, fused: bool = True):
        super().__init__()
        self.variant, self.hidden_size = variant, hidden_size
        self.fused = fused and variant in ("lstm", "gru")
        gates = GATES[variant] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(gates))
        self.bias_hh = nn.Parameter(torch.empty(gates))
        if variant == "peephole":
            self.weight_peep = nn.Parameter(torch.empty(3 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small uniform weights, U(-1/sqrt(H), 1/sqrt(H)) as PyTorch and the LSTM
        # literature use: gates start near their midpoint, gradients flow in both signs.
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        H = self.hidden_size
        with torch.no_grad():
            if self.variant in ("lstm", "peephole"):
                # Forget-gate bias starts at 1 (Gers et al. 2000; Jozefowicz et al. 2015):
                # σ(1) ≈ 0.73, so the cell keeps most of its memory from the first step and
                # gradients reach far back in time before the gate has learnt anything;
                # at 0 the cell would halve its memory every step and learn long ranges late.
                self.bias_ih[H : 2 * H].fill_(1.0)
                self.bias_hh[H : 2 * H].zero_()
            elif self.variant == "coupled":
                # Here f = 1 - i, so remembering by default means writing little: an input
                # bias of -1 gives f = 1 - σ(-1) ≈ 0.73, the same start as the forget bias above.
                self.bias_ih[:H].fill_(-1.0)
                self.bias_hh[:H].zero_()

    def forward(self, x, state, lengths=None):
        """x (B, T, in); state tuple of (B, H); lengths (B,) int or None (all T).
        Returns outputs (B, T, H), zero past each row's length, and the state at each
        row's last valid step (a row of length 0 keeps its state)."""
        if self.fused:
            return self._forward_fused(x, state, lengths)
        return self._forward_cells(x, state, lengths)

    def _weights(self):
        return [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]

    def _forward_cells(self, x, state, lengths):
        B, T, _ = x.shape
        w = self._weights()
        outputs = []
        for t in range(T):
            xt = x[:, t]
            if self.variant == "lstm":
                new = lstm_cell(xt, *state, *w)
            elif self.variant == "peephole":
                new = peephole_cell(xt, *state, *w, self.weight_peep)
            elif self.variant == "coupled":
                new = coupled_cell(xt, *state, *w)
            else:
                new = (gru_cell(xt, *state, *w),)
            if lengths is not None:  # padded steps neither emit nor move the state
                valid = (t < lengths).unsqueeze(1)  # (B, 1)
                new = tuple(torch.where(valid, n, s) for n, s in zip(new, state, strict=True))
                outputs.append(new[0] * valid)
            else:
                outputs.append(new[0])
            state = new
        return torch.stack(outputs, dim=1), state

    def _forward_fused(self, x, state, lengths):
        B, T, _ = x.shape
        hx = tuple(s.unsqueeze(0).contiguous() for s in state)  # (1, B, H) each
        rnn = torch.lstm if self.variant == "lstm" else torch.gru
        hx_arg = hx if self.variant == "lstm" else hx[0]
        if lengths is None or bool((lengths == T).all()):
            out, *new = rnn(x, hx_arg, self._weights(), True, 1, 0.0, self.training, False, True)
            return out, tuple(n.squeeze(0) for n in new)
        # Uneven lengths: run the packed kernel on rows with length > 0, keep the rest.
        live = (lengths > 0).nonzero().squeeze(1)
        if len(live) == 0:  # nothing to run (the packer rejects it): every row keeps its state
            return x.new_zeros(B, T, self.hidden_size), state
        packed = pack_padded_sequence(
            x[live], lengths[live].cpu(), batch_first=True, enforce_sorted=False
        )
        hx_live = tuple(h[:, live].index_select(1, packed.sorted_indices) for h in hx)
        hx_arg = hx_live if self.variant == "lstm" else hx_live[0]
        out_data, *new = rnn(
            packed.data, packed.batch_sizes, hx_arg, self._weights(), True, 1, 0.0,
            self.training, False,
        )
        out, _ = pad_packed_sequence(
            packed._replace(data=out_data), batch_first=True, total_length=T
        )
        outputs = x.new_zeros(B, T, self.hidden_size).index_copy(0, live, out)
        new_state = tuple(
            s.index_copy(0, live, n.squeeze(0).index_select(0, packed.unsorted_indices))
            for s, n in zip(state, new, strict=True)
        )
        return outputs, new_state


# ----------------------------------------------------------------------------------- model


class LanguageModel(nn.Module):
    """embedding → L recurrent layers (dropout between) → linear head over the bytes."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.layers = nn.ModuleList(
            RecurrentLayer(
                config.variant,
                config.embed_dim if i == 0 else config.hidden_size,
                config.hidden_size,
                fused=config.fused,
            )
            for i in range(config.num_layers)
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        nn.init.normal_(self.embedding.weight, std=0.1)

    def init_state(self, batch_size: int, device=None) -> tuple[torch.Tensor, ...]:
        """Zero state: (h, c) or (h,), each (L, B, H)."""
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        return tuple(torch.zeros(shape, device=device) for _ in self.config.state_names)

    def set_fused(self, fused: bool) -> None:
        """Switch every layer between the fused kernel and the equation-level cells."""
        for layer in self.layers:
            layer.fused = fused and layer.variant in ("lstm", "gru")

    def forward(self, tokens, state=None, lengths=None):
        """tokens (B, T) int64; state tuple of (L, B, H) or None for zeros; lengths (B,) or
        None. Returns logits (B, T, V) and the new state (rows past their length keep it)."""
        B = tokens.shape[0]
        if state is None:
            state = self.init_state(B, tokens.device)
        x = self.embedding(tokens)  # (B, T, E)
        new_state = []
        for i, layer in enumerate(self.layers):
            layer_state = tuple(s[i] for s in state)  # (B, H) each
            x, layer_state = layer(x, layer_state, lengths)
            new_state.append(layer_state)
            x = self.drop(x)
        logits = self.head(x)  # (B, T, V)
        state = tuple(torch.stack(s) for s in zip(*new_state, strict=True))  # (L, B, H) each
        return logits, state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
