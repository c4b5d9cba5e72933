"""The one error hierarchy of `carousel export` and `carousel import`: their CLIs turn any of
them into a one-line message (export exits 1, import 2)."""

from __future__ import annotations


class ExportError(Exception):
    """Anything that stops an export; nothing has been written to the repository."""


class VersionExists(ExportError):
    """The version folder is already there and `force` was not given."""


class VerificationError(ExportError):
    """The exported graph does not compute what the PyTorch model computes."""
