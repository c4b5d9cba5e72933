"""How much to run: the quick and the full plan, and the fixed inputs every run uses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# The fixed text the sessions step through. Each session starts at its own offset, so the
# sessions' states differ and a batch that mixed them up would give wrong answers.
TEXT = (
    "The long short-term memory network keeps a cell state that runs through time with "
    "only small linear interactions, so information can flow along it unchanged. Gates "
    "decide what to forget, what to write and what to show: a sigmoid layer looks at the "
    "previous output and the current input and answers with a number between zero and one "
    "for each component of the cell. A server for such a model holds, for every client, the "
    "hidden and cell vectors after the text the client has sent so far; the next request "
    "continues from there instead of reading the whole history again. Many clients talk at "
    "once, and each of them sends one small piece at a time, which is exactly the case where "
    "one matrix product over many sessions costs little more than a product for one. def "
    "step(self, tokens, state):\n    logits, state = self.graph.run(tokens, state)\n    "
    "return logits[:, -1], state\n\nfor line in open('data.txt'):\n    print(len(line))\n"
    "In the morning the train left the station at seven, crossed the river twice and reached "
    "the coast before the fog lifted; nobody on board could say where the time had gone. "
)


def window(offset: int, length: int) -> list[int]:
    """`length` bytes of TEXT from `offset`, wrapping around."""
    data = TEXT.encode()
    return [data[(offset + k) % len(data)] for k in range(length)]


def session_sequences(sessions: int, steps: int) -> list[list[int]]:
    return [window(37 * s, steps) for s in range(sessions)]


@dataclass
class PredictCase:
    label: str
    text_bytes: int
    batch: int  # inputs per request
    clients: int  # concurrent clients, one connection each
    requests: int  # per client


@dataclass
class Plan:
    name: str
    reps: int  # repeated runs per scenario and server; the table shows medians
    levels: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    step_requests: int = 6000  # timed requests per step run, spread over its sessions
    min_steps: int = 16  # timed steps per session at least
    max_steps: int = 600  # and at most (the single session)
    warmup: int = 4  # untimed steps per session before the barrier
    gen_levels: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    gen_tokens: int = 256
    gen_warmup: int = 2  # untimed tokens per stream first
    prime_bytes: int = 32
    predict: list[PredictCase] = field(default_factory=list)
    memory_counts: list[int] = field(default_factory=lambda: [10_000, 100_000])
    memory_clients: int = 64
    limit_batches: list[int] = field(default_factory=lambda: [1, 4, 16, 64, 256])
    limit_budget_s: float = 1.0  # per batch size and thread setting
    limit_repeats: int = 5
    prefill_length: int = 256
    deadline_s: float = 240.0  # per load run: every loop stops by then

    def steps_per_session(self, sessions: int) -> int:
        return max(self.min_steps, min(self.max_steps, self.step_requests // sessions))

    def to_dict(self) -> dict:
        return asdict(self)


def full() -> Plan:
    return Plan(
        name="full", reps=3,
        predict=[PredictCase("64 B", 64, 16, 4, 20), PredictCase("1 KB", 1024, 8, 2, 5)],
    )


def quick() -> Plan:
    return Plan(
        name="quick", reps=1, step_requests=1500, min_steps=8, max_steps=200, warmup=2,
        gen_tokens=32, limit_budget_s=0.3, limit_repeats=3,
        predict=[PredictCase("64 B", 64, 16, 4, 8), PredictCase("1 KB", 1024, 8, 2, 2)],
        memory_counts=[1_000, 5_000],
    )
