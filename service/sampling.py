"""Next-token arithmetic on logits: log-probabilities, the top-k answer, and sampling.

Everything works on a batch of rows (B, V) so the scheduler does it once per inference call,
and a row's result never depends on the other rows: a generation samples the same tokens
alone or in a batch of 64. Sampling is by inverse CDF with one uniform draw per token from
the generation's own seeded generator, so the same seed, state and options give the same
tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SMALL_K = 8  # up to this many top tokens are found by repeated argmax, beyond by sorting


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy: always the most likely token
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of likeliest tokens with this much mass


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(B, V) -> (B, V) log-probabilities, in float64 so small ones keep their digits."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def top_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k likeliest next tokens of each row of raw logits (B, V), most likely first,
    and their log-probabilities; the answer every step returns, so it is kept cheap."""
    if k <= 0 or k > SMALL_K:
        return top_k(log_softmax(logits), k)
    idx = np.empty((logits.shape[0], k), dtype=np.int64)
    rows = np.arange(logits.shape[0])
    rest = logits.copy()
    for j in range(k):  # k argmaxes beat a sort for small k (3x at k=5); ties: lowest id
        idx[:, j] = best = rest.argmax(axis=1)
        rest[rows, best] = -np.inf
    x = logits.astype(np.float64)
    peak = x.max(axis=1, keepdims=True)
    normaliser = peak + np.log(np.exp(x - peak).sum(axis=1, keepdims=True))
    return idx, np.take_along_axis(x, idx, axis=1) - normaliser


def top_k(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k likeliest tokens of each row, most likely first, ties by lower token id."""
    b = logprobs.shape[0]
    if k <= 0:
        return np.empty((b, 0), dtype=np.int64), np.empty((b, 0))
    # numpy's default (SIMD) sort beats a partition on rows this short; it is not stable,
    # so equal values are put in token order below.
    idx = np.argsort(-logprobs, axis=1)[:, :k]
    vals = np.take_along_axis(logprobs, idx, axis=1)
    order = np.lexsort((idx, -vals), axis=-1)  # by value descending, then token id
    idx = np.take_along_axis(idx, order, axis=1)
    return idx, np.take_along_axis(vals, order, axis=1)


class SamplingBatch:
    """The per-row options of a batch as arrays, and which way each row goes: greedy rows
    take the argmax; rows with top_p < 1 sort their tokens (the nucleus needs the order);
    the rest draw by inverse CDF in token order, after masking all but the top k (no sort).
    Built once for a run of iterations over the same rows."""

    __slots__ = ("temps", "top_ps", "ks", "greedy", "nucleus", "plain", "all_greedy")

    def __init__(self, params: list[SamplingParams], vocab_size: int) -> None:
        self.temps = np.array([p.temperature for p in params], dtype=np.float64)
        self.top_ps = np.array([p.top_p for p in params], dtype=np.float64)
        self.ks = np.array([p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params])
        # top_k=1 keeps only the likeliest token: greedy, without drawing (ties go to the
        # lower token id, as with temperature 0).
        self.greedy = (self.temps == 0.0) | (self.ks == 1)
        self.nucleus = ~self.greedy & (self.top_ps < 1.0)
        self.plain = ~self.greedy & ~self.nucleus
        self.all_greedy = bool(self.greedy.all())


def sample(logits: np.ndarray, params: list[SamplingParams] | SamplingBatch,
           uniforms: np.ndarray) -> np.ndarray:
    """One token per row. `uniforms` (B,) in [0, 1) are the rows' random draws. Each row's
    token depends on that row alone (see SamplingBatch for the three ways)."""
    b = params if isinstance(params, SamplingBatch) else SamplingBatch(params, logits.shape[1])
    if b.all_greedy:
        return logits.argmax(axis=1)
    out = np.empty(logits.shape[0], dtype=np.int64)
    greedy, plain, nucleus = b.greedy, b.plain, b.nucleus
    if greedy.any():
        out[greedy] = logits[greedy].argmax(axis=1)
    if plain.any():
        out[plain] = _sample_plain(logits[plain], b.temps[plain], b.ks[plain], uniforms[plain])
    if nucleus.any():
        out[nucleus] = _sample_nucleus(logits[nucleus], b.temps[nucleus], b.ks[nucleus],
                                       b.top_ps[nucleus], uniforms[nucleus])
    return out


def _inverse_cdf(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Index of the first position where the cumulative mass passes u * total."""
    cdf = np.cumsum(probs, axis=1)
    idx = (cdf <= (uniforms * cdf[:, -1])[:, None]).sum(axis=1)
    # Rounding must never step past the last kept token.
    last_kept = probs.shape[1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=1)
    return np.minimum(idx, last_kept)


def _sample_plain(logits, temps, ks, uniforms) -> np.ndarray:
    z = logits.astype(np.float64) / temps[:, None]
    for k in np.unique(ks[ks < z.shape[1]]):  # keep the k likeliest (and any tied with the k-th)
        rows = ks == k
        kth = -np.partition(-z[rows], k - 1, axis=1)[:, k - 1 : k]
        z[rows] = np.where(z[rows] >= kth, z[rows], -np.inf)
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    return _inverse_cdf(probs, uniforms)


def _sample_nucleus(logits, temps, ks, top_ps, uniforms) -> np.ndarray:
    z = logits.astype(np.float64) / temps[:, None]
    order = np.argsort(-z, axis=1)  # likeliest first (same row, same order: deterministic)
    zs = np.take_along_axis(z, order, axis=1)
    keep = np.arange(z.shape[1])[None, :] < ks[:, None]
    probs = np.where(keep, np.exp(zs - zs[:, :1]), 0.0)
    probs /= probs.sum(axis=1, keepdims=True)
    # Keep a token while the mass of the likelier tokens before it is below top_p, so the
    # token that crosses the threshold is kept (the set is never empty).
    keep &= (np.cumsum(probs, axis=1) - probs) < top_ps[:, None]
    probs = np.where(keep, probs, 0.0)
    return order[np.arange(len(order)), _inverse_cdf(probs, uniforms)]
