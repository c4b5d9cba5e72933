"""Where the project's own files live, for defaults that must work from a checkout."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def bundled_model_repository() -> Path:
    """The `models/` folder that ships with the repository (bytelm and bytegru)."""
    return PROJECT_ROOT / "models"
