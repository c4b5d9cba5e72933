"""Export checkpoints to ONNX graphs in a versioned model repository, and import stateful
ONNX graphs from elsewhere into it (`carousel.export.importer.import_graph`, onnxruntime only).

Importing this package is cheap: torch and onnx load only when `export_checkpoint` is first
looked up (the service reads the repository with onnxruntime alone and never needs them).
`export_checkpoint` is `carousel.export.pipeline.export_checkpoint`; see it for the options."""

from __future__ import annotations

from .errors import ExportError, VerificationError, VersionExists

__all__ = ["ExportError", "VerificationError", "VersionExists", "export_checkpoint"]


def __getattr__(name: str):
    # PEP 562: resolve the heavy function on first use, not at import.
    if name == "export_checkpoint":
        from .pipeline import export_checkpoint

        return export_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
