"""The export's one error hierarchy: the CLI turns any of them into a message and exit code 1."""

from __future__ import annotations


class ExportError(Exception):
    """Anything that stops an export; nothing has been written to the repository."""


class VersionExists(ExportError):
    """The version folder is already there and `force` was not given."""


class VerificationError(ExportError):
    """The exported graph does not compute what the PyTorch model computes."""
