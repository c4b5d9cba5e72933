"""Fixtures for the model tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import write_corpus


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; with two, torch's workers spin against anything
    else using the cores (a training run) and a 6 ms step takes 500 ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")
