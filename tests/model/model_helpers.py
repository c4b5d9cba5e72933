"""Helpers for the model tests: tiny models, random states and inputs, a small text corpus."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from carousel.model.model import LanguageModel, ModelConfig

VARIANTS = ("lstm", "peephole", "coupled", "gru")
# Every (variant, fused) pair that means something: only lstm and gru have a fused path.
PATHS = [("lstm", True), ("lstm", False), ("peephole", False), ("coupled", False),
         ("gru", True), ("gru", False)]


def make_model(variant: str, *, layers: int = 2, embed: int = 5, hidden: int = 7,
               fused: bool = True, seed: int = 0, dropout: float = 0.0) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(variant=variant, embed_dim=embed, hidden_size=hidden, num_layers=layers,
                      fused=fused, dropout=dropout)
    return LanguageModel(cfg).eval()


def random_state(model: LanguageModel, batch: int, seed: int = 1,
                 scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    """A non-zero state, so tests see whether the model really reads the state it is given."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return tuple(scale * torch.randn(cfg.num_layers, batch, cfg.hidden_size, generator=g)
                 for _ in cfg.state_names)


def random_tokens(batch: int, steps: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, steps), generator=g)


WORDS = ("the cat sat on a mat while lstm cells keep state and gates open or close "
         "every byte of text is a token so any language fits").split()


def write_corpus(folder: Path, files: int = 40, lines: int = 30, seed: int = 0) -> Path:
    """A folder of small, learnable text files: random sentences over a few words."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(files):
        text = "".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + ".\n"
            for _ in range(lines)
        )
        (folder / f"doc_{n:03d}.txt").write_text(f"# file {n:03d}\n" + text)
    return folder
