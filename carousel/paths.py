"""Where the project's own files live, for defaults that must work from a checkout."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def bundled_model_repository() -> Path:
    """The `models/` folder that ships with the repository (bytelm and bytegru).

    From a checkout (editable install) that is <checkout>/models. A non-editable install
    has no checkout beside it: then `./models` in the working directory, if there is one
    (the container sets CAROUSEL_MODEL_REPOSITORY instead)."""
    beside_source = PROJECT_ROOT / "models"
    if beside_source.is_dir() or not (Path.cwd() / "models").is_dir():
        return beside_source
    return Path.cwd() / "models"
