"""Gradient clipping by global norm (carousel.model.train.clip_gradients)."""

from __future__ import annotations

import numpy as np
import torch
from carousel.model.train import clip_gradients, masked_loss
from model_helpers import make_model, random_tokens


def gradients(model) -> list[np.ndarray]:
    return [p.grad.detach().double().numpy().copy() for p in model.parameters()]


def global_norm(grads: list[np.ndarray]) -> float:
    return float(np.sqrt(sum((g**2).sum() for g in grads)))


def model_with_gradients(scale: float):
    model = make_model("lstm", layers=2, embed=6, hidden=12).train()
    logits, _ = model(random_tokens(4, 10))
    (scale * masked_loss(logits, random_tokens(4, 10, seed=3))).backward()
    return model


def test_clipping_bounds_the_global_norm_and_keeps_the_direction():
    model = model_with_gradients(scale=1000.0)
    before = gradients(model)
    norm_before = global_norm(before)
    bound = 0.5
    assert norm_before > 10 * bound  # the bound really bites

    returned = clip_gradients(model, bound)

    after = gradients(model)
    assert abs(returned - norm_before) <= 1e-5 * norm_before  # reports the norm before
    assert global_norm(after) <= bound * (1 + 1e-6)
    assert global_norm(after) >= bound * (1 - 1e-4)  # scaled to the bound, not below it
    factor = global_norm(after) / norm_before
    for a, b in zip(after, before, strict=True):  # every gradient scaled by the same factor
        np.testing.assert_allclose(a, b * factor, rtol=1e-5, atol=1e-9)


def test_clipping_leaves_gradients_under_the_bound_unchanged():
    model = model_with_gradients(scale=1.0)
    before = [p.grad.clone() for p in model.parameters()]
    norm = global_norm(gradients(model))

    returned = clip_gradients(model, 10 * norm)

    assert abs(returned - norm) <= 1e-5 * norm
    for p, g in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.grad, g)
