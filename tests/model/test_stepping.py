"""Carried state: stepping token by token (or in uneven chunks) equals one pass."""

from __future__ import annotations

import pytest
import torch
from model_helpers import PATHS, make_model, random_state, random_tokens

TOL = 1e-5


def run_in_chunks(model, tokens, state, sizes):
    logits, start = [], 0
    for size in sizes:
        out, state = model(tokens[:, start : start + size], state)
        logits.append(out)
        start += size
    assert start == tokens.shape[1]
    return torch.cat(logits, dim=1), state


@pytest.mark.parametrize("variant,fused", PATHS)
@pytest.mark.parametrize("start", ["zeros", "random"])
def test_token_by_token_equals_one_pass(variant, fused, start):
    model = make_model(variant, fused=fused, seed=11)
    tokens = random_tokens(3, 12, seed=12)
    state = None if start == "zeros" else random_state(model, batch=3, seed=13)
    with torch.no_grad():
        whole_logits, whole_state = model(tokens, state)
        for sizes in ([1] * 12, [3, 5, 1, 3]):
            logits, new_state = run_in_chunks(model, tokens, state, sizes)
            assert float((logits - whole_logits).abs().max()) <= TOL
            for a, b in zip(new_state, whole_state, strict=True):
                assert float((a - b).abs().max()) <= TOL


@pytest.mark.parametrize("variant,fused", PATHS)
def test_state_is_not_modified_in_place(variant, fused):
    """Callers (the trainer, an export check) keep the state they passed in."""
    model = make_model(variant, fused=fused)
    state = random_state(model, batch=2)
    before = tuple(s.clone() for s in state)
    with torch.no_grad():
        model(random_tokens(2, 4), state, torch.tensor([4, 2]))
    for a, b in zip(state, before, strict=True):
        assert torch.equal(a, b)
