"""The equation-level LSTM and GRU against torch.nn.LSTM / torch.nn.GRU, and the fused path
against the cell path (outputs, states and gradients)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import make_model, random_state, random_tokens
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

TOL = 1e-5


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def torch_reference(variant: str, model, seed: int = 7):
    """A multi-layer nn.LSTM / nn.GRU with its own random weights, copied into `model`."""
    cfg = model.config
    torch.manual_seed(seed)
    rnn_cls = torch.nn.LSTM if variant == "lstm" else torch.nn.GRU
    rnn = rnn_cls(cfg.embed_dim, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True)
    with torch.no_grad():
        for p in rnn.parameters():  # wider than the default init: saturating gates included
            p.uniform_(-0.8, 0.8)
        for k, layer in enumerate(model.layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(layer, name).copy_(getattr(rnn, f"{name}_l{k}"))
    return rnn.eval()


def reference_run(rnn, model, tokens, state, lengths=None):
    """Logits and state of embedding → nn.LSTM/GRU → head, packed when lengths are given."""
    x = model.embedding(tokens)
    hx = state if len(state) == 2 else state[0]
    if lengths is None:
        out, new = rnn(x, hx)
    else:
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, new = rnn(packed, hx)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
    new = new if isinstance(new, tuple) else (new,)
    return model.head(out), new, out


@pytest.mark.parametrize("variant", ["lstm", "gru"])
@pytest.mark.parametrize("fused", [False, True])
def test_matches_torch_rnn_with_copied_weights(variant, fused):
    model = make_model(variant, layers=3, embed=6, hidden=10, fused=fused)
    rnn = torch_reference(variant, model)
    state = random_state(model, batch=4)
    tokens = random_tokens(4, 9)
    with torch.no_grad():
        want_logits, want_state, _ = reference_run(rnn, model, tokens, state)
        logits, new_state = model(tokens, state)
    assert max_diff(logits, want_logits) <= TOL
    assert len(new_state) == len(want_state)
    for got, want in zip(new_state, want_state, strict=True):
        assert got.shape == want.shape == (3, 4, 10)
        assert max_diff(got, want) <= TOL


@pytest.mark.parametrize("variant", ["lstm", "gru"])
@pytest.mark.parametrize("fused", [False, True])
def test_padded_batch_matches_packed_torch_rnn(variant, fused):
    """Rows of different lengths: each row's outputs and final state equal nn.LSTM/GRU run on
    a packed sequence (which stops every row at its own length)."""
    model = make_model(variant, layers=2, embed=6, hidden=10, fused=fused)
    rnn = torch_reference(variant, model)
    state = random_state(model, batch=4)
    tokens = random_tokens(4, 8)
    lengths = torch.tensor([8, 3, 6, 1])
    with torch.no_grad():
        _, want_state, want_out = reference_run(rnn, model, tokens, state, lengths)
        logits, new_state = model(tokens, state, lengths)
        x = model.embedding(tokens)
        for k, layer in enumerate(model.layers):  # the top layer's outputs, zero past lengths
            x, _ = layer(x, tuple(s[k] for s in state), lengths)
        want_logits = model.head(want_out)
    assert max_diff(x, want_out) <= TOL
    for got, want in zip(new_state, want_state, strict=True):
        assert max_diff(got, want) <= TOL
    for b, n in enumerate(lengths.tolist()):
        assert max_diff(logits[b, :n], want_logits[b, :n]) <= TOL


@pytest.mark.parametrize("variant", ["lstm", "gru"])
def test_fused_path_equals_cell_path(variant):
    """Outputs, states and every parameter's gradient agree between the two paths, on a
    padded batch with carried state, in training mode (as the trainer runs it)."""
    model = make_model(variant, layers=2, embed=6, hidden=12, fused=True)
    model.train()
    state = random_state(model, batch=3)
    tokens = random_tokens(3, 7)
    targets = random_tokens(3, 7, seed=9)
    lengths = torch.tensor([7, 4, 0])

    results = {}
    for fused in (True, False):
        model.set_fused(fused)
        assert all(layer.fused is fused for layer in model.layers)
        model.zero_grad()
        logits, new_state = model(tokens, state, lengths)
        loss = sum((logits[b, :n].log_softmax(-1).gather(1, targets[b, :n, None])).sum()
                   for b, n in enumerate(lengths.tolist()))
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results[fused] = (logits.detach(), [s.detach() for s in new_state], grads)

    (l_f, s_f, g_f), (l_c, s_c, g_c) = results[True], results[False]
    assert max_diff(l_f, l_c) <= TOL
    for a, b in zip(s_f, s_c, strict=True):
        assert max_diff(a, b) <= TOL
    for name in g_c:
        scale = max(1.0, float(g_c[name].abs().max()))
        assert max_diff(g_f[name], g_c[name]) <= TOL * scale, name


def test_peephole_and_coupled_never_take_the_fused_path():
    for variant in ("peephole", "coupled"):
        model = make_model(variant, fused=True)
        assert not any(layer.fused for layer in model.layers)
        model.set_fused(True)
        assert not any(layer.fused for layer in model.layers)
