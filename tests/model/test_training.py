"""Short real training runs on a tiny corpus: loss goes down, resume continues exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from carousel.model import train as train_module
from carousel.model.data import load_corpus
from carousel.model.model import LanguageModel, ModelConfig
from carousel.model.train import (
    TrainConfig,
    estimate_bpb,
    learning_rate,
    load_checkpoint,
    model_from_checkpoint,
    train,
)


def tiny_train_config(corpus, out_dir, **overrides) -> TrainConfig:
    settings = dict(
        corpus=[str(corpus)], out_dir=str(out_dir), batch_size=8, seq_len=32, max_steps=60,
        lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_interval=20, eval_bytes=8192,
        final_eval_bytes=8192, ckpt_interval=1000, progress=False, threads=1,
    )
    return TrainConfig(**{**settings, **overrides})


def test_short_run_lowers_validation_loss_and_writes_its_files(text_corpus, tmp_path):
    model_cfg = ModelConfig(variant="lstm", embed_dim=16, hidden_size=32, num_layers=1)
    cfg = tiny_train_config(text_corpus, tmp_path / "run")
    corpus = load_corpus(cfg.corpus)
    torch.manual_seed(cfg.seed)  # the same initial weights train() starts from
    untrained_bpb = estimate_bpb(LanguageModel(model_cfg), corpus.val, cfg.final_eval_bytes)
    assert 7.5 < untrained_bpb < 8.5  # about log2(256): a uniform guess over bytes

    metrics = train(model_cfg, cfg)

    assert metrics["steps"] == 60
    assert metrics["val_bpb"] < untrained_bpb - 2.0
    assert [s for s, _ in metrics["history"]["val"]] == [20, 40, 60]
    losses = [loss for _, loss in metrics["history"]["train"]]
    assert len(losses) == 60 and sum(losses[-10:]) < sum(losses[:10])
    assert 0.9 * 60 * 8 * 32 < metrics["tokens_seen"] <= 60 * 8 * 32  # padding is not counted
    # what the run leaves beside its checkpoint
    out = tmp_path / "run"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["val_bpb"] == metrics["val_bpb"] and on_disk["steps"] == 60
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert {"model", "config", "metrics", "optimizer", "step"} <= set(ckpt)
    assert ckpt["step"] == 60 and ckpt["config"] == model_cfg.to_dict()
    model = model_from_checkpoint(ckpt)
    assert model.num_parameters() == metrics["parameters"]
    # the checkpoint holds the trained weights: scoring them again gives the reported bpb
    assert estimate_bpb(model, corpus.val, cfg.final_eval_bytes) == pytest.approx(
        metrics["val_bpb"], abs=1e-6
    )


class Interrupted(Exception):
    pass


def test_resumed_run_continues_exactly_from_the_saved_step(text_corpus, tmp_path, monkeypatch):
    """Run A: 30 steps straight. Run B: the same, killed right after its step-20 checkpoint,
    then resumed from it to step 30. Training is seeded and the checkpoint carries the
    optimiser, the carried state and the RNG (dropout uses it), so on one thread B ends
    bit-for-bit where A does."""
    model_cfg = ModelConfig(variant="lstm", embed_dim=16, hidden_size=32, num_layers=2,
                            dropout=0.2)
    settings = dict(max_steps=30, eval_interval=10, ckpt_interval=10, eval_bytes=4096,
                    final_eval_bytes=4096)
    straight = train(model_cfg, tiny_train_config(text_corpus, tmp_path / "a", **settings))

    save = train_module.save_checkpoint

    def save_then_die_at_20(path, **payload):
        save(path, **payload)
        if payload["step"] == 20:
            raise Interrupted

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die_at_20)
    cfg_b = tiny_train_config(text_corpus, tmp_path / "b", **settings)
    with pytest.raises(Interrupted):
        train(model_cfg, cfg_b)
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert saved["step"] == 20 and len(saved["history"]["train"]) == 20

    resumed = train(model_cfg, cfg_b, resume=str(tmp_path / "b" / "checkpoint.pt"))

    a, b = load_checkpoint(tmp_path / "a" / "checkpoint.pt"), load_checkpoint(
        tmp_path / "b" / "checkpoint.pt")
    assert resumed["steps"] == straight["steps"] == b["step"] == 30
    assert [s for s, _ in resumed["history"]["train"]] == list(range(1, 31))
    assert resumed["tokens_seen"] == straight["tokens_seen"]
    assert resumed["history"]["train"] == straight["history"]["train"]
    assert resumed["history"]["val"] == straight["history"]["val"]
    for name, weight in a["model"].items():
        assert torch.equal(b["model"][name], weight), name
    for x, y in zip(a["carried_state"], b["carried_state"], strict=True):
        assert torch.equal(x, y)
    assert resumed["val_bpb"] == straight["val_bpb"]


def test_learning_rate_warms_up_then_decays_by_cosine():
    cfg = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=10, max_steps=110)
    lrs = [learning_rate(s, cfg) for s in range(111)]
    assert lrs[:10] == pytest.approx([1e-2 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1e-2)
    assert lrs[60] == pytest.approx(1e-3 + 0.5 * 9e-3 * (1 + math.cos(math.pi / 2)))
    assert lrs[110] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_resume_keeps_the_checkpoints_architecture(text_corpus, tmp_path):
    """Resuming with other model options (say, a forgotten --preset) trains the checkpoint's
    model and saves it under the checkpoint's config, so the checkpoint still loads."""
    first = ModelConfig(variant="gru", embed_dim=8, hidden_size=16, num_layers=1)
    cfg = tiny_train_config(text_corpus, tmp_path / "run", max_steps=3, batch_size=4,
                            eval_interval=100, eval_bytes=2048, final_eval_bytes=2048)
    train(first, cfg)
    other = ModelConfig(variant="lstm", embed_dim=32, hidden_size=24, num_layers=2)
    cfg.max_steps = 5
    metrics = train(other, cfg, resume=str(tmp_path / "run" / "checkpoint.pt"))

    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["step"] == 5 and metrics["variant"] == "gru"
    assert ckpt["config"] == first.to_dict()
    assert model_from_checkpoint(ckpt).config == first
