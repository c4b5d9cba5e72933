"""What each session must get, computed in-process one session batch at a time, and the
checks that compare a server's answers against it. A fast wrong answer is a failure, so
every scenario runs its answers through one of these."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .graph import GraphRunner, padded

# fp32 results are bit-identical whatever the batch composition in onnxruntime's CPU
# kernels, and the servers compute log-softmax in float64 as this module does; the tolerance
# is tight because a random-weight stand-in's distributions are nearly flat (log-probs all
# near -5.5), so a session answered from another session's state can differ by only ~1e-3.
LOGPROB_TOLERANCE = 1e-5
# Two candidates closer than this are a tie: either is a correct top-1.
TIE = 1e-6
CHUNK = 64  # rows per reference run, to bound memory at 256 sessions x 1 KB


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def step_logprobs(runner: GraphRunner, sequences: list[list[int]]) -> list[np.ndarray]:
    """For each sequence, the next-token log-probabilities after every prefix: (T, V)."""
    out: list[np.ndarray] = []
    for start in range(0, len(sequences), CHUNK):
        chunk = sequences[start : start + CHUNK]
        tokens, lengths = padded(chunk)
        logits, _ = runner.run(tokens, runner.zero_state(len(chunk)), lengths)
        logprobs = log_softmax(logits.astype(np.float64))
        out += [logprobs[row, : len(seq)] for row, seq in enumerate(chunk)]
    return out


def last_logprobs(runner: GraphRunner, sequences: list[list[int]]) -> np.ndarray:
    """Each sequence's next-token log-probabilities after all of it: (B, V)."""
    return np.stack([lp[-1] for lp in step_logprobs(runner, sequences)])


def greedy(runner: GraphRunner, primes: list[list[int]], steps: int) -> list[list[int]]:
    """Argmax decoding from each primed state, all sessions in one batch."""
    tokens, lengths = padded(primes)
    logits, state = runner.run(tokens, runner.zero_state(len(primes)), lengths)
    last = logits[np.arange(len(primes)), lengths - 1]  # (B, V)
    generated = []
    for _ in range(steps):
        nxt = last.argmax(axis=-1)
        generated.append(nxt)
        logits, state = runner.run(nxt[:, None].astype(np.int64), state)
        last = logits[:, 0]
    return np.stack(generated, axis=1).tolist() if steps else [[] for _ in primes]


@dataclass
class Check:
    """Tally of answers compared with the reference."""

    compared: int = 0
    wrong: int = 0
    missing: int = 0  # requests that failed, so had no answer to compare
    samples: list[str] = field(default_factory=list)

    def fail(self, text: str) -> None:
        self.wrong += 1
        if len(self.samples) < 5:
            self.samples.append(text)

    @property
    def ok(self) -> bool:
        return self.wrong == 0 and self.missing == 0 and self.compared > 0

    def to_dict(self) -> dict:
        return {"compared": self.compared, "wrong": self.wrong, "missing": self.missing,
                "ok": self.ok, "samples": self.samples}


def check_top1(check: Check, where: str, answer, expected: np.ndarray) -> None:
    """answer is [token, logprob] from the server (or None); expected one (V,) row."""
    if answer is None:
        check.missing += 1
        return
    token, logprob = int(answer[0]), float(answer[1])
    check.compared += 1
    best = float(expected.max())
    if not 0 <= token < expected.shape[0]:
        check.fail(f"{where}: token {token} out of range")
    elif expected[token] < best - TIE:
        check.fail(f"{where}: top-1 {token} (logprob {expected[token]:.5f}), "
                   f"reference {int(expected.argmax())} ({best:.5f})")
    elif abs(logprob - expected[token]) > LOGPROB_TOLERANCE:
        check.fail(f"{where}: logprob {logprob:.6f}, reference {expected[token]:.6f}")


def check_steps(runner: GraphRunner, sequences: list[list[int]], answers: list[list]) -> Check:
    """answers[s][k] is the top-1 after session s consumed sequences[s][: k + 1]."""
    check = Check()
    for s, (expected, got) in enumerate(zip(step_logprobs(runner, sequences), answers,
                                             strict=True)):
        for k, answer in enumerate(got):
            check_top1(check, f"session {s} step {k}", answer, expected[k])
    return check


def check_predictions(runner: GraphRunner, sequences: list[list[int]], answers: list) -> Check:
    check = Check()
    for i, (expected, answer) in enumerate(zip(last_logprobs(runner, sequences), answers,
                                               strict=True)):
        check_top1(check, f"input {i}", answer, expected)
    return check


def check_generations(runner: GraphRunner, primes: list[list[int]], steps: int,
                      answers: list) -> Check:
    """Greedy generations (top_k=1) must equal argmax decoding token for token."""
    check = Check()
    for s, (expected, got) in enumerate(zip(greedy(runner, primes, steps), answers,
                                            strict=True)):
        if got is None:
            check.missing += 1
            continue
        check.compared += 1
        if list(got) != list(expected):
            first = next((k for k, (a, b) in enumerate(zip(got, expected, strict=False))
                          if a != b), min(len(got), len(expected)))
            check.fail(f"session {s}: {len(got)} tokens, first difference at {first} "
                       f"of {len(expected)}")
    return check
