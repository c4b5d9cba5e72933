"""The byte language model adapter: tokens in, the next-token answer out, and generation.

On top of the tensor core (a step is named tensors; state is whatever pairs the manifest
lists) a byte LM is: one per-step input of int64 tokens (UTF-8 bytes of text), a logits
output at every position, and, kept in each session's row after its state, the logits after
the last consumed token (the row's extras). A step's answer is the top-k of those logits; a
generation samples its next token from them, feeds it, and goes on (decode.py steps it).

Everything here runs on a batch at once in the inference thread (`finish`, the generation
group's `next`), so a row's answer never depends on the other rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .errors import EmptyInput, TokenOutOfRange
from .generation import Generation
from .manifest import Manifest
from .sampling import SamplingBatch, sample, top_logprobs


@dataclass(slots=True)
class Answer:
    """The next-token prediction after some input."""

    position: int
    top_tokens: np.ndarray
    top_logprobs: np.ndarray
    logits: np.ndarray  # (V,) the last position's logits (shown only when asked for)


def digest(tokens: np.ndarray) -> bytes:
    return hashlib.blake2b(tokens.tobytes(), digest_size=16).digest()


class ByteLM:
    """The adapter of one byte LM version (`manifest.adapter == "byte_lm"`)."""

    def __init__(self, manifest: Manifest) -> None:
        self.tokens = manifest.tokens
        self.logits = manifest.logits
        self.vocab_size = manifest.vocab_size
        self.extra_size = self.vocab_size  # the last logits, after the state

    def inputs(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """A step's per-step inputs: its tokens, checked against the vocabulary."""
        if tokens.size == 0:
            raise EmptyInput("the input is empty: send at least one token or character")
        if tokens.size <= 32:  # a decode step: Python's min/max beat two numpy reductions
            values = tokens.tolist()
            low, high = min(values), max(values)
        else:
            low, high = tokens.min(), tokens.max()
        if low < 0 or high >= self.vocab_size:
            bad = int(tokens[(tokens < 0) | (tokens >= self.vocab_size)][0])
            raise TokenOutOfRange(
                f"token {bad} is outside the vocabulary: tokens are 0..{self.vocab_size - 1}")
        return {self.tokens: tokens}

    def finish(self, outputs: dict[str, np.ndarray], lengths: np.ndarray,
               works: list) -> tuple[np.ndarray, list]:
        """Keep each row's logits at its last real position; answer each work's top k."""
        logits = outputs[self.logits]  # (B, T, V)
        if logits.shape[1] == 1:  # decode steps: every row's last position is its only one
            last = logits[:, 0]
        else:
            last = logits[np.arange(logits.shape[0]), lengths.astype(np.intp) - 1]
        if not works:
            return last, []
        kmax = max(w.options for w in works)
        tokens, logprobs = top_logprobs(last, kmax)
        return last, [(tokens[i, : w.options], logprobs[i, : w.options])
                      for i, w in enumerate(works)]

    @staticmethod
    def merge(results: list):
        """A long input ran in chunks: its answer is the last chunk's (the next token)."""
        return results[-1]

    def answer(self, result, row: np.ndarray, position: int, layout) -> Answer:
        tokens, logprobs = result
        return Answer(position, tokens, logprobs, layout.extra(row))

    def replay(self, row: np.ndarray, position: int, k: int, layout) -> Answer:
        """The answer of the step that led to `row`, again (a retried step)."""
        logits = layout.extra(row)
        tokens, logprobs = top_logprobs(logits[None], k)
        return Answer(position, tokens[0], logprobs[0], logits)

    def open_streams(self, gens: list[Generation]) -> GenerationGroup:
        return GenerationGroup(self, gens)


class GenerationGroup:
    """Generations decoding together: each iteration samples every row's next token from
    its logits (the first from the row's stored logits), checks its stop rule, and hands
    the tokens to the graph."""

    def __init__(self, adapter: ByteLM, gens: list[Generation]) -> None:
        self.name = adapter.tokens
        self.gens = gens
        self.sampling = SamplingBatch([g.params for g in gens], adapter.vocab_size)
        self.rules = [g.rule for g in gens]

    def next(self, logits: np.ndarray) -> tuple[dict[str, np.ndarray], list, list]:
        uniforms = np.array([g.draw() for g in self.gens])
        tokens = sample(logits, self.sampling, uniforms)
        fed = tokens.tolist()
        reasons = [rule.check(t) for rule, t in zip(self.rules, fed, strict=True)]
        return {self.name: tokens.reshape(-1, 1)}, fed, reasons
