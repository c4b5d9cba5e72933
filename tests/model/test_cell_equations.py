"""Each variant's cell against a numpy computation of the equations (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from carousel.model.model import ModelConfig
from model_helpers import PATHS, make_model, random_state, random_tokens
from numpy_reference import forward, numpy_params


def run_model(model, tokens, state):
    with torch.no_grad():
        logits, new_state = model(tokens, state)
    return logits.numpy(), tuple(s.numpy() for s in new_state)


@pytest.mark.parametrize("variant,fused", PATHS)
def test_one_step_equals_the_equations(variant, fused):
    model = make_model(variant, fused=fused)
    # A large state makes the peephole terms (p ⊙ C) and the GRU's reset gate matter.
    state = random_state(model, batch=3, scale=2.0)
    tokens = random_tokens(3, 1)

    logits, new_state = run_model(model, tokens, state)
    want_logits, want_state = forward(numpy_params(model), variant, tokens.numpy(),
                                      [s.numpy() for s in state])

    assert logits.shape == (3, 1, 256)
    assert len(new_state) == len(model.config.state_names)
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-5)
    for got, want in zip(new_state, want_state, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant,fused", PATHS)
def test_several_steps_equal_the_equations(variant, fused):
    model = make_model(variant, layers=3, fused=fused, seed=3)
    state = random_state(model, batch=2, seed=4)
    tokens = random_tokens(2, 6, seed=5)

    logits, new_state = run_model(model, tokens, state)
    want_logits, want_state = forward(numpy_params(model), variant, tokens.numpy(),
                                      [s.numpy() for s in state])

    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-5)
    for got, want in zip(new_state, want_state, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_peephole_order_is_checked():
    """The check above can fail: reading weight_peep in another gate order (ONNX's i, o, f)
    gives a clearly different step, so the documented i, f, o order is what is tested."""
    model = make_model("peephole")
    state = random_state(model, batch=3, scale=2.0)
    tokens = random_tokens(3, 1)
    params, np_state = numpy_params(model), [s.numpy() for s in state]
    _, right = forward(params, "peephole", tokens.numpy(), np_state)
    _, wrong = forward(params, "peephole", tokens.numpy(), np_state, peephole_order="iof")
    assert np.abs(right[1] - wrong[1]).max() > 1e-3


def test_coupled_has_no_forget_gate_weights():
    model = make_model("coupled")
    cfg = model.config
    for layer in model.layers:
        assert layer.weight_ih.shape == (3 * cfg.hidden_size, layer.weight_ih.shape[1])
        assert layer.weight_hh.shape == (3 * cfg.hidden_size, cfg.hidden_size)
        assert layer.bias_ih.shape == layer.bias_hh.shape == (3 * cfg.hidden_size,)
    assert model.layers[0].weight_ih.shape[1] == cfg.embed_dim
    assert model.layers[1].weight_ih.shape[1] == cfg.hidden_size


def test_state_names_and_shapes():
    for variant in ("lstm", "peephole", "coupled"):
        assert ModelConfig(variant=variant).state_names == ("h", "c")
    assert ModelConfig(variant="gru").state_names == ("h",)
    with pytest.raises(ValueError, match="variant"):
        ModelConfig(variant="rnn")
