"""Initialisation: small random weights, the forget-gate bias at 1, state at zeros."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import make_model, random_tokens

VARIANTS = ("lstm", "peephole", "coupled", "gru")


@pytest.mark.parametrize("variant", ["lstm", "peephole"])
def test_forget_gate_bias_starts_at_one(variant):
    model = make_model(variant, layers=3, hidden=16)
    H, sd = 16, model.state_dict()
    for k in range(3):
        bias = sd[f"layers.{k}.bias_ih"] + sd[f"layers.{k}.bias_hh"]
        assert torch.equal(bias[H : 2 * H], torch.ones(H))  # gates stacked i, f, g, o
        others = torch.cat([bias[:H], bias[2 * H :]])
        assert float(others.abs().max()) <= 2 / math.sqrt(H)  # the rest stay small


def test_coupled_input_bias_starts_where_forget_is_about_073():
    """f = 1 - i there: an input bias of -1 gives f = 1 - σ(-1) = σ(1), the same start."""
    sd = make_model("coupled", hidden=16).state_dict()
    for k in range(2):
        bias = sd[f"layers.{k}.bias_ih"] + sd[f"layers.{k}.bias_hh"]  # gates i, g, o
        assert torch.equal(bias[:16], -torch.ones(16))


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_are_small_random_and_seeded(variant):
    model = make_model(variant, hidden=16, seed=5)
    bound = 1 / math.sqrt(16)
    for name, p in model.state_dict().items():
        if name.startswith("layers."):
            assert float(p.abs().max()) <= max(bound, 1.0), name
            if ".weight" in name:
                assert float(p.abs().max()) <= bound, name
                assert float(p.std()) > bound / 4, name  # random, not constant
    again = make_model(variant, hidden=16, seed=5)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_starts_at_zeros(variant):
    model = make_model(variant, layers=2, hidden=8)
    state = model.init_state(3)
    assert len(state) == len(model.config.state_names)
    for s in state:
        assert s.shape == (2, 3, 8) and s.dtype == torch.float32
        assert torch.equal(s, torch.zeros(2, 3, 8))
    tokens = random_tokens(3, 5)
    with torch.no_grad():
        implicit = model(tokens)
        explicit = model(tokens, tuple(torch.zeros(2, 3, 8) for _ in state))
        nonzero = model(tokens, tuple(torch.ones(2, 3, 8) for _ in state))
    assert torch.equal(implicit[0], explicit[0])
    for a, b in zip(implicit[1], explicit[1], strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(implicit[0], nonzero[0])  # the state given is really read
