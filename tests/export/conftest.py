"""Fixtures for export tests: tiny random models of every variant, saved as checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from carousel.model.model import LanguageModel, ModelConfig


def _make_model(variant: str, num_layers: int = 2, hidden: int = 24, embed: int = 12,
               seed: int = 0) -> LanguageModel:
    """A tiny model with weights pushed away from their init, so every gate, peephole and
    bias matters to the output (at init most of them barely move the logits)."""
    torch.manual_seed(seed)
    model = LanguageModel(ModelConfig(variant=variant, embed_dim=embed, hidden_size=hidden,
                                      num_layers=num_layers))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.4)
    return model.eval()


def checkpoint_of(model: LanguageModel, metrics: dict | None = None) -> dict:
    return {"model": model.state_dict(), "config": model.config.to_dict(),
            "metrics": metrics or {}}


@pytest.fixture(scope="session")
def make_model():
    """make_model(variant, num_layers=2, hidden=24, embed=12, seed=0) -> LanguageModel."""
    return _make_model


@pytest.fixture(scope="session")
def make_checkpoint():
    """make_checkpoint(variant, num_layers=2, ...) -> (model, checkpoint dict)."""

    def make(variant: str = "lstm", **kwargs):
        model = _make_model(variant, **kwargs)
        return model, checkpoint_of(model)

    return make


@pytest.fixture
def checkpoint_file(tmp_path, make_checkpoint):
    """A checkpoint.pt on disk, as `carousel train` writes it (with training metrics)."""
    model, ckpt = make_checkpoint("lstm", num_layers=1, hidden=16, embed=8)
    ckpt["metrics"] = {"corpus": "test text", "steps": 10, "tokens_seen": 12_800,
                       "val_bpb": 7.5, "parameters": model.num_parameters()}
    path = tmp_path / "checkpoint.pt"
    torch.save(ckpt, path)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
