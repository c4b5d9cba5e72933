"""`carousel train`, run through the installed console script."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from carousel.model.model import ModelConfig
from carousel.model.train import PRESETS, TrainConfig, add_arguments, load_checkpoint

CAROUSEL = Path(sys.executable).parent / "carousel"
# Fields set another way than --field-name: --corpus PATH..., --no-progress, or not at all.
NOT_OPTIONS = {"corpus", "progress", "fused", "vocab_size"}


def carousel(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CAROUSEL), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240)


def test_help_documents_every_option(tmp_path):
    result = carousel("train", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    options = {"--preset", "--corpus", "--resume", "--no-progress"}
    for cls in (ModelConfig, TrainConfig):
        options |= {"--" + f.name.replace("_", "-") for f in fields(cls)
                    if f.name not in NOT_OPTIONS}
    for option in options:
        assert option in text, option
    for preset in PRESETS:
        assert preset in text
    # every option carries its own explanation, not just its name
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for action in parser._actions:
        if action.dest != "help":
            explanation = (action.help or "").replace("(preset value if omitted)", "").strip()
            assert explanation != action.dest and len(explanation.split()) >= 2, action.dest
    assert {a.option_strings[0] for a in parser._actions if a.dest != "help"} == options


def test_tiny_preset_trains_and_writes_checkpoint_metrics_and_curve(text_corpus, tmp_path):
    out = tmp_path / "run"
    result = carousel("train", "--preset", "tiny", "--corpus", str(text_corpus),
                      "--out-dir", str(out), "--max-steps", "6", "--eval-interval", "3",
                      "--hidden-size", "24", "--eval-bytes", "4096",
                      "--final-eval-bytes", "4096", "--threads", "1", "--no-progress",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "validation bits per byte" in result.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["variant"] == "lstm"
    assert [s for s, _ in metrics["history"]["val"]] == [3, 6]
    assert 0 < metrics["val_bpb"] < 9
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = load_checkpoint(out / "checkpoint.pt")
    tiny_model, _ = PRESETS["tiny"]
    # the preset's values, with the one option given on the command line overriding it
    assert ckpt["config"] == {**tiny_model.to_dict(), "hidden_size": 24}
    assert ckpt["train_config"]["corpus"] == [str(text_corpus)]
    assert ckpt["train_config"]["seq_len"] == PRESETS["tiny"][1].seq_len

    # --resume continues the step counter from the checkpoint
    result = carousel("train", "--preset", "tiny", "--corpus", str(text_corpus),
                      "--out-dir", str(out), "--max-steps", "9", "--eval-interval", "3",
                      "--hidden-size", "24", "--eval-bytes", "4096",
                      "--final-eval-bytes", "4096", "--threads", "1", "--no-progress",
                      "--resume", str(out / "checkpoint.pt"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 9
    assert [s for s, _ in metrics["history"]["train"]] == list(range(1, 10))

    # resuming with another batch size is refused with what to change, not a traceback
    result = carousel("train", "--preset", "tiny", "--corpus", str(text_corpus),
                      "--out-dir", str(out), "--max-steps", "12", "--hidden-size", "24",
                      "--batch-size", "3", "--threads", "1", "--no-progress",
                      "--resume", str(out / "checkpoint.pt"), cwd=tmp_path)
    saved_batch = PRESETS["tiny"][1].batch_size
    assert result.returncode == 2, result.stderr
    assert f"resume with --batch-size {saved_batch}" in result.stderr
    assert "Traceback" not in result.stderr
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 9  # nothing was overwritten


def test_unusable_inputs_exit_2_with_the_reason(tmp_path):
    (tmp_path / "small.txt").write_text("tiny")
    for args, reason in ((["--corpus", str(tmp_path / "missing")], "corpus path not found"),
                         (["--corpus", str(tmp_path / "small.txt")], "too few"),
                         (["--resume", str(tmp_path / "none.pt")], "none.pt")):
        result = carousel("train", "--preset", "tiny", "--out-dir", str(tmp_path / "run"),
                          "--threads", "1", "--no-progress", *args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert reason in result.stderr and "Traceback" not in result.stderr, result.stderr
