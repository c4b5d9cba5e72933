"""The engine on a real exported graph: a padded batch with lengths gives each row exactly
what it gets alone, state splits back per row, and both agree with PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from carousel.model.model import LanguageModel, ModelConfig
from carousel.service.engine import Engine
from carousel.service.registry import Registry


@pytest.fixture(scope="module", params=["lstm", "gru"])
def exported(request, tmp_path_factory):
    from carousel.export import export_checkpoint

    torch.manual_seed(3)
    model = LanguageModel(ModelConfig(variant=request.param, embed_dim=8, hidden_size=16,
                                      num_layers=2)).eval()
    repo = tmp_path_factory.mktemp(f"repo-{request.param}")
    ckpt = {"model": model.state_dict(), "config": model.config.to_dict(), "metrics": {}}
    export_checkpoint(ckpt, repo, "m", version=1)
    return model, Registry.load(repo).get("m")


def run_rows(engine: Engine, inputs: list[list[int]], rows=None):
    rows = rows or [None] * len(inputs)
    lengths = np.array([len(x) for x in inputs], dtype=np.int32)
    tokens = np.zeros((len(inputs), lengths.max()), dtype=np.int64)
    for i, x in enumerate(inputs):
        tokens[i, : len(x)] = x
    last, outputs = engine.infer(tokens, lengths, engine.layout.stack(rows))
    return engine.layout.unstack(outputs, last)


def test_padded_batch_rows_equal_rows_run_alone(exported):
    _, mv = exported
    inputs = [[1, 2, 3, 4, 5], [6], [7, 8, 9], [10, 11]]
    together = run_rows(mv.engine, inputs)
    for x, row in zip(inputs, together, strict=True):
        np.testing.assert_array_equal(row, run_rows(mv.engine, [x])[0])


def test_step_by_step_equals_one_pass_and_pytorch(exported):
    model, mv = exported
    text = list(b"stateful serving")
    row = None
    for i in range(0, len(text), 3):
        row = run_rows(mv.engine, [text[i:i + 3]], [row])[0]
    one_pass = run_rows(mv.engine, [text])[0]
    np.testing.assert_allclose(row, one_pass, atol=1e-5)
    with torch.no_grad():
        logits, state = model(torch.tensor([text]))
    layout = mv.layout
    np.testing.assert_allclose(layout.logits(row), logits[0, -1].numpy(), atol=1e-4)
    tensors = layout.tensors(row)
    for spec, torch_state in zip(layout.states, state, strict=True):
        np.testing.assert_allclose(tensors[spec.input], torch_state.numpy(), atol=1e-4)
