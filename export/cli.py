"""`carousel export`: a checkpoint into the model repository, verified."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from carousel.paths import bundled_model_repository

    parser.add_argument("checkpoint", help="checkpoint.pt written by `carousel train`")
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--version", type=int, default=None,
                        help="integer version to write (default: the next free one)")
    parser.add_argument("--repository", type=Path, default=bundled_model_repository(),
                        help="model repository folder (default: %(default)s)")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="write an onnxruntime dynamically quantized int8 graph")
    parser.add_argument("--force", action="store_true",
                        help="overwrite the version if it exists")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="onnx.checker + onnxruntime vs PyTorch before publishing "
                             "(default: on; --no-verify skips it)")
    parser.add_argument("--validation-corpus", nargs="*", default=None, metavar="PATH",
                        help="text the int8 trade is measured on (default: the checkpoint's "
                             "corpus, validation split)")
    parser.add_argument("--validation-bytes", type=int, default=65_536,
                        help="bytes of validation text for --quantize (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from . import ExportError, export_checkpoint
    from .manifest import read_manifest

    try:
        folder = export_checkpoint(
            args.checkpoint, args.repository, args.name, version=args.version,
            quantize=args.quantize, force=args.force, verify=args.verify,
            validation_corpus=args.validation_corpus, validation_bytes=args.validation_bytes,
        )
    except ExportError as e:
        print(f"carousel export: error: {e}", file=sys.stderr)
        return 1
    manifest = read_manifest(folder / "manifest.json")
    print(f"wrote {folder} ({manifest['graph']['bytes']:,} bytes, sha256 "
          f"{manifest['graph']['sha256'][:12]})")
    check = manifest.get("verification")
    if check:
        worst = max(check["max_abs_diff"].values())
        print(f"verified: {check['cases']} cases, max abs diff {worst:.2e} vs PyTorch "
              f"(tolerance {check['tolerance']:g})")
    q = manifest.get("quantization")
    if q:
        print(f"int8: {q['bpb_fp32']:.4f} -> {q['bpb_int8']:.4f} bits per byte, "
              f"step speed-up x{q['speedup_per_step']:.2f} at batch 1")
    return 0
