"""Training: truncated BPTT over a byte stream, AdamW, warm-up + cosine, clipping, checkpoints.

The loop is visible top to bottom in `train`: get a chunk of every row, forward from the
carried state, masked loss, backward, clip, step, detach the state, validate, checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import PAD_TARGET, Corpus, CorpusError, StreamBatches, load_corpus
from .model import VARIANTS, LanguageModel, ModelConfig

LN2 = math.log(2)


class TrainError(ValueError):
    """Training cannot start as asked (the message says what to change)."""


@dataclass
class TrainConfig:
    corpus: list[str] = field(default_factory=list)  # files or folders; empty: Python stdlib
    out_dir: str = "runs/bytelm"
    batch_size: int = 64  # parallel rows of the stream
    seq_len: int = 128  # T: gradient flows back at most T steps; state flows on forever
    max_steps: int = 4000
    lr: float = 3e-3
    min_lr: float = 3e-4  # cosine decays to this
    warmup_steps: int = 200  # linear warm-up: Adam's moment estimates are noisy at first
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # global-norm bound; LSTMs' gradients explode rarely but hard
    eval_interval: int = 250
    eval_bytes: int = 262_144  # validation text scored at each interval
    final_eval_bytes: int = 4_194_304  # and at the end
    ckpt_interval: int = 500
    val_fraction: float = 0.1
    seed: int = 1337
    threads: int = 0  # torch intra-op threads; 0: torch's default
    progress: bool = True


PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    # The bundled default model: 2 x 512 LSTM, 3.4M parameters, ~33M bytes of stdlib.
    "bytelm": (
        ModelConfig(variant="lstm", embed_dim=64, hidden_size=512, num_layers=2),
        TrainConfig(out_dir="runs/bytelm", max_steps=3500),
    ),
    # The bundled second model: a small GRU.
    "bytegru": (
        ModelConfig(variant="gru", embed_dim=32, hidden_size=256, num_layers=2),
        TrainConfig(out_dir="runs/bytegru", max_steps=1200, batch_size=32, lr=4e-3),
    ),
    # Seconds on any machine: for trying the pipeline end to end.
    "tiny": (
        ModelConfig(variant="lstm", embed_dim=16, hidden_size=64, num_layers=1),
        TrainConfig(out_dir="runs/tiny", max_steps=200, batch_size=16, seq_len=64,
                    eval_interval=50, eval_bytes=32_768, final_eval_bytes=65_536),
    ),
}


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at cfg.max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Scale all gradients together so their global L2 norm is at most max_norm.
    Returns the norm before clipping."""
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))


def masked_loss(logits, targets) -> torch.Tensor:
    """Mean next-byte cross entropy (nats) over real positions; padding adds nothing."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD_TARGET
    )


@torch.no_grad()
def estimate_bpb(model: LanguageModel, data, max_bytes: int, batch_size: int = 16,
                 seq_len: int = 256) -> float:
    """Bits per byte on `data` (at most max_bytes), state carried across chunks as served."""
    was_training = model.training
    model.eval()
    data = data[:max_bytes]
    batches = StreamBatches(data, min(batch_size, max(1, len(data) // 512)), seq_len)
    state = model.init_state(batches.batch_size)
    total, count = 0.0, 0
    for k in range(batches.chunks_per_epoch):
        x, y, lengths = batches.get_batch(k)
        logits, state = model(x, state, lengths)
        n = int((y != PAD_TARGET).sum())
        if n:
            total += float(masked_loss(logits, y)) * n
            count += n
    model.train(was_training)
    return total / max(1, count) / LN2


def configure_optimizer(model: LanguageModel, cfg: TrainConfig) -> torch.optim.AdamW:
    # Decay matrices only: decaying biases and the peephole vectors just fights the init.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))


def save_checkpoint(path: Path, **payload) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def model_from_checkpoint(ckpt: dict) -> LanguageModel:
    """Rebuild the model from the checkpoint's own config and load its weights."""
    model = LanguageModel(ModelConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model


def train(model_cfg: ModelConfig, cfg: TrainConfig, resume: str | None = None,
          corpus: Corpus | None = None) -> dict:
    """Train, checkpoint to cfg.out_dir/checkpoint.pt, and return the final metrics."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus or load_corpus(cfg.corpus or None, cfg.val_fraction)
    batches = StreamBatches(corpus.train, cfg.batch_size, cfg.seq_len)

    model = LanguageModel(model_cfg)
    optimizer = configure_optimizer(model, cfg)
    step, state, history = 0, model.init_state(cfg.batch_size), {"train": [], "val": []}
    tokens_seen = 0
    if resume:
        ckpt = load_checkpoint(resume)
        saved_batch = ckpt["train_config"]["batch_size"]
        if saved_batch != cfg.batch_size:  # the carried state has one row per stream
            raise TrainError(
                f"{resume} was trained with --batch-size {saved_batch} and carries the state "
                f"of {saved_batch} parallel rows; resume with --batch-size {saved_batch}")
        model = model_from_checkpoint(ckpt)
        # The checkpoint's architecture wins over the options given: saving these weights
        # under another config would write a checkpoint that no longer loads.
        model_cfg = model.config
        optimizer = configure_optimizer(model, cfg)
        optimizer.load_state_dict(ckpt["optimizer"])
        step, state, history = ckpt["step"], ckpt["carried_state"], ckpt["history"]
        tokens_seen = ckpt["metrics"]["tokens_seen"]
        torch.set_rng_state(ckpt["rng_state"])
    model.train()

    def checkpoint(metrics: dict) -> None:
        save_checkpoint(
            out / "checkpoint.pt", model=model.state_dict(), config=model_cfg.to_dict(),
            train_config=asdict(cfg), optimizer=optimizer.state_dict(), step=step,
            carried_state=state, history=history, metrics=metrics,
            rng_state=torch.get_rng_state(),
        )

    def metrics_now(val_bpb: float | None) -> dict:
        return {
            "variant": model_cfg.variant, "parameters": model.num_parameters(),
            "steps": step, "tokens_seen": tokens_seen, "val_bpb": val_bpb,
            "corpus": corpus.description, "corpus_files": corpus.files,
            "train_bytes": int(len(corpus.train)), "val_bytes": int(len(corpus.val)),
        }

    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, unit="step", mininterval=2.0)
    t0, tokens_t0 = time.time(), tokens_seen
    while step < cfg.max_steps:
        chunk = step % batches.chunks_per_epoch
        if chunk == 0:  # a new pass over the stream starts every row from zero state
            state = model.init_state(cfg.batch_size)
        x, y, lengths = batches.get_batch(chunk)
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        logits, state = model(x, state, lengths)
        loss = masked_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(model, cfg.grad_clip)
        optimizer.step()
        # Truncated BPTT: keep the state's values for the next chunk, drop its history, so
        # memory and compute per step stay bounded while the state still flows on.
        state = tuple(s.detach() for s in state)

        step += 1
        tokens_seen += int(lengths.sum())
        history["train"].append([step, loss.item()])
        if bar is not None:
            tps = (tokens_seen - tokens_t0) / max(1e-9, time.time() - t0)
            bar.set_postfix(loss=f"{loss.item():.3f}", bpb=f"{loss.item() / LN2:.3f}",
                            tok_s=f"{tps:,.0f}", lr=f"{lr:.1e}", refresh=False)
            bar.update(1)
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val_bpb = estimate_bpb(model, corpus.val, cfg.eval_bytes)
            history["val"].append([step, val_bpb])
            if bar is not None:
                bar.write(f"step {step}: val bpb {val_bpb:.3f}")
        if step % cfg.ckpt_interval == 0:
            checkpoint(metrics_now(history["val"][-1][1] if history["val"] else None))
    if bar is not None:
        bar.close()

    final_bpb = estimate_bpb(model, corpus.val, cfg.final_eval_bytes)
    metrics = metrics_now(final_bpb)
    metrics.update(
        val_bytes_scored=int(min(len(corpus.val), cfg.final_eval_bytes)),
        seconds=round(time.time() - t0, 1),
        tokens_per_s=round((tokens_seen - tokens_t0) / max(1e-9, time.time() - t0), 1),
        history=history,
    )
    checkpoint(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_loss(history, out / "loss_curve.png")
    return metrics


def plot_loss(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        steps, losses = zip(*history["train"], strict=True)
        ax.plot(steps, [v / LN2 for v in losses], lw=0.7, alpha=0.6, label="train (bits/byte)")
    if history["val"]:
        steps, bpb = zip(*history["val"], strict=True)
        ax.plot(steps, bpb, "o-", label="validation (bits/byte)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    """`carousel train` options: every ModelConfig and TrainConfig field, plus presets."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bytelm",
                        help="starting values for every option below (default: bytelm, "
                             "the bundled default model)")
    parser.add_argument("--corpus", nargs="+", metavar="PATH", default=None,
                        help="text files or folders to train on (default: the running "
                             "Python's standard library .py files)")
    parser.add_argument("--resume", metavar="CHECKPOINT",
                        help="continue a run from its checkpoint.pt (same options)")
    helps = {
        "variant": "recurrent cell: lstm, peephole, coupled (f = 1 - i) or gru",
        "embed_dim": "byte embedding size", "hidden_size": "hidden units per layer",
        "num_layers": "stacked recurrent layers", "dropout": "dropout between layers",
        "out_dir": "folder for checkpoint.pt, metrics.json and loss_curve.png",
        "batch_size": "parallel rows of the byte stream",
        "seq_len": "truncated BPTT length T (state is carried across chunks)",
        "max_steps": "optimizer steps", "lr": "peak learning rate (AdamW)",
        "min_lr": "learning rate at the end of the cosine decay",
        "warmup_steps": "linear warm-up steps", "weight_decay": "AdamW weight decay",
        "grad_clip": "global gradient-norm bound", "eval_interval": "steps between validations",
        "eval_bytes": "validation bytes scored at each interval",
        "final_eval_bytes": "validation bytes scored at the end",
        "ckpt_interval": "steps between checkpoints",
        "val_fraction": "share of files held out for validation", "seed": "random seed",
        "threads": "torch threads (0: torch's default)",
    }
    for cls in (ModelConfig, TrainConfig):
        for f in fields(cls):
            if f.name in ("corpus", "fused", "progress", "vocab_size"):
                continue
            kind = {"int": int, "float": float, "str": str}[f.type]
            extra = {"choices": list(VARIANTS)} if f.name == "variant" else {}
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                                help=helps.get(f.name, f.name) + " (preset value if omitted)",
                                **extra)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    model_cfg, train_cfg = PRESETS[args.preset]
    model_over = {f.name: getattr(args, f.name) for f in fields(ModelConfig)
                  if getattr(args, f.name, None) is not None}
    train_over = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                  if getattr(args, f.name, None) is not None}
    model_cfg = ModelConfig(**{**model_cfg.to_dict(), **model_over})
    train_cfg = TrainConfig(**{**asdict(train_cfg), **train_over})
    if args.no_progress:
        train_cfg.progress = False
    print(f"training {model_cfg.variant} {model_cfg.num_layers}x{model_cfg.hidden_size} "
          f"({LanguageModel(model_cfg).num_parameters():,} parameters) into {train_cfg.out_dir}")
    try:
        metrics = train(model_cfg, train_cfg, resume=args.resume)
    except (TrainError, CorpusError, FileNotFoundError) as e:
        print(f"carousel train: {e}", file=sys.stderr)
        return 2
    print(f"validation bits per byte: {metrics['val_bpb']:.4f} "
          f"({metrics['steps']} steps, {metrics['tokens_seen']:,} tokens, "
          f"{metrics['seconds']:.0f} s); wrote {train_cfg.out_dir}/checkpoint.pt")
    return 0
