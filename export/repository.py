"""The model repository on disk: `<repo>/<name>/<version>/{model.onnx, manifest.json}`.

A version appears all at once: it is written into a hidden temporary folder next to where
it will live (same file system) and renamed into place only when complete, so a failed
export leaves nothing a service could load."""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ExportError, VersionExists

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
GRAPH_FILE, MANIFEST_FILE = "model.onnx", "manifest.json"


def check_name(name: str) -> str:
    """A model name is one safe path segment (it also appears in the service's URLs)."""
    if not NAME_RE.match(name):
        raise ExportError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' "
            "(at most 64, starting with a letter or digit)"
        )
    return name


def versions(repository: Path, name: str) -> list[int]:
    """The integer versions a model has, ascending (other folders are ignored)."""
    folder = repository / name
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def resolve_version(repository: Path, name: str, version: int | None, force: bool) -> int:
    """The version to write: the one asked for, or the next free integer (from 1)."""
    existing = versions(repository, name)
    if version is None:
        return (existing[-1] + 1) if existing else 1
    if version < 1:
        raise ExportError(f"version must be a positive integer, got {version}")
    if (repository / name / str(version)).exists() and not force:
        raise VersionExists(
            f"{repository / name / str(version)} already exists; pass --force to overwrite it "
            "or omit --version to write the next free version"
        )
    return version


@contextlib.contextmanager
def staging(repository: Path, name: str) -> Iterator[Path]:
    """A temporary folder inside `repository/name`, removed on exit whatever happens."""
    parent = repository / name
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):  # leave no empty model folder behind
            parent.rmdir()


def publish(staged: Path, target: Path, force: bool) -> None:
    """Move a complete staged version into place. With `force`, an existing version is moved
    aside first and deleted only once the new one is in place."""
    old = None
    if target.exists():
        if not force:
            raise VersionExists(f"{target} already exists; pass --force to overwrite it")
        old = target.with_name(f".replaced-{target.name}-{staged.name}")
        target.rename(old)
    # mkdtemp makes the folder owner-only (0700); a published version must be readable by
    # whoever serves it (the container runs as a non-root user), like any other file here.
    staged.chmod(0o755)
    staged.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
