"""Export checkpoints to ONNX graphs in a versioned model repository.

Importing this package is cheap: torch and onnx load only when a function runs (the service
reads the repository with onnxruntime alone and never needs them)."""

from __future__ import annotations

from pathlib import Path

from .errors import ExportError, VerificationError, VersionExists

__all__ = ["ExportError", "VerificationError", "VersionExists", "export_checkpoint"]


def export_checkpoint(
    checkpoint: str | Path | dict,
    repository: Path,
    name: str,
    version: int | None = None,
    quantize: str | None = None,
    force: bool = False,
    verify: bool = True,
    **options,
) -> Path:
    """Export a checkpoint (path or loaded dict) to `repository/name/version/` and return
    that folder. See `carousel.export.pipeline.export_checkpoint` for the options."""
    from .pipeline import export_checkpoint as run

    return run(checkpoint, repository, name, version=version, quantize=quantize, force=force,
               verify=verify, **options)
