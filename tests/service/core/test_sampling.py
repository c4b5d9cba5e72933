"""Sampling and top-k against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
from carousel.service.sampling import SamplingParams, log_softmax, sample, top_k

rng = np.random.default_rng(0)
LOGITS = rng.normal(0, 2, size=(4, 256)).astype(np.float32)


def probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


def test_log_softmax_matches_the_definition():
    x = LOGITS.astype(np.float64)
    want = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(log_softmax(LOGITS), want, atol=1e-12)


def test_top_k_is_sorted_likeliest_first_with_ties_to_the_lower_token():
    lp = np.array([[0.0, -1.0, 0.0, -0.5]])
    tokens, values = top_k(lp, 3)
    assert tokens.tolist() == [[0, 2, 3]] and values.tolist() == [[0.0, 0.0, -0.5]]
    assert top_k(lp, 0)[0].shape == (1, 0)


def test_greedy_and_top_k_1_pick_the_argmax_whatever_the_draw():
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)):
        for u in (0.0, 0.5, 0.999999):
            got = sample(LOGITS, [params] * 4, np.full(4, u))
            assert got.tolist() == LOGITS.argmax(axis=1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_inverse_cdf_over_a_grid_of_draws_reproduces_the_distribution(temperature):
    """With draws on a fine uniform grid, each token's share of the samples is its
    probability (up to the grid step): the sampler is exactly the categorical distribution."""
    n = 20_000
    grid = (np.arange(n) + 0.5) / n
    row = LOGITS[:1]
    got = sample(np.repeat(row, n, axis=0), [SamplingParams(temperature)] * n, grid)
    share = np.bincount(got, minlength=256) / n
    np.testing.assert_allclose(share, probabilities(row[0], temperature), atol=2 / n)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    n = 10_000
    grid = (np.arange(n) + 0.5) / n
    got = sample(np.repeat(logits, n, axis=0), [SamplingParams(1.0, top_p=0.7)] * n, grid)
    share = np.bincount(got, minlength=4) / n
    # 0.5 < 0.7, so token 1 is needed too; tokens 2 and 3 are dropped: renormalised 5:3.
    np.testing.assert_allclose(share, [0.625, 0.375, 0, 0], atol=2 / n)


def test_top_k_sampling_never_leaves_the_k_likeliest():
    k = 5
    allowed = set(np.argsort(-LOGITS[2])[:k].tolist())
    draws = np.linspace(0, 0.999999, 1000)
    got = sample(np.repeat(LOGITS[2:3], 1000, axis=0), [SamplingParams(1.5, top_k=k)] * 1000,
                 draws)
    assert set(got.tolist()) <= allowed and len(set(got.tolist())) == k


def test_a_row_samples_the_same_alone_or_in_a_batch():
    params = [SamplingParams(0.8, top_k=40, top_p=0.9), SamplingParams(1.0),
              SamplingParams(0.0), SamplingParams(1.3, top_p=0.5)]
    u = rng.random(4)
    together = sample(LOGITS, params, u)
    alone = [sample(LOGITS[i:i + 1], [params[i]], u[i:i + 1])[0] for i in range(4)]
    assert together.tolist() == alone
