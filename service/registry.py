"""Every model version in the repository, loaded once at start-up, each with its scheduler.

Layout: `<repository>/<name>/<version>/{manifest.json, model.onnx}`, version an integer
folder. One onnxruntime session (Engine) and one Scheduler per version; "latest" is the
highest version number.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .bytelm import ByteLM
from .engine import Engine
from .errors import UnknownModel, UnknownVersion
from .manifest import BYTE_LM, Manifest, ManifestError, read_manifest
from .scheduler import Scheduler
from .tensormodel import TensorModel

log = logging.getLogger("carousel.service")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def adapter_for(manifest: Manifest) -> ByteLM | TensorModel:
    """The adapter a model version is served with, as its manifest says."""
    return ByteLM(manifest) if manifest.adapter == BYTE_LM else TensorModel(manifest)


@dataclass(eq=False)
class ModelVersion:
    manifest: Manifest
    engine: Engine
    adapter: ByteLM | TensorModel
    scheduler: Scheduler | None = field(default=None)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def layout(self):
        return self.engine.layout

    @property
    def is_lm(self) -> bool:
        return self.manifest.adapter == BYTE_LM


class Registry:
    def __init__(self, versions: list[ModelVersion]) -> None:
        self._models: dict[str, dict[int, ModelVersion]] = {}
        for mv in versions:
            self._models.setdefault(mv.name, {})[mv.version] = mv
        self._latest = {name: vs[max(vs)] for name, vs in self._models.items()}

    @classmethod
    def load(cls, repository: Path, *, intra_op_threads: int = 1,
             inter_op_threads: int = 1, wide_threads: int = 0) -> Registry:
        """Load every version (blocking: onnxruntime sessions are built here). A broken
        version stops start-up with a ManifestError that names its file."""
        repository = Path(repository)
        if not repository.is_dir():
            raise ManifestError(f"model repository {repository} does not exist")
        versions = []
        for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
            if not NAME.match(model_dir.name):
                continue
            for version_dir in sorted(model_dir.iterdir()):
                name = version_dir.name
                if not (version_dir.is_dir() and name.isascii() and name.isdigit()):
                    continue
                manifest = read_manifest(version_dir)
                adapter = adapter_for(manifest)
                engine = Engine(manifest, intra_op_threads=intra_op_threads,
                                inter_op_threads=inter_op_threads, wide_threads=wide_threads,
                                extra_size=adapter.extra_size)
                engine.warm_up()
                log.info("loaded %s version %d (%s, %s)", manifest.name, manifest.version,
                         manifest.adapter, manifest.graph_file)
                versions.append(ModelVersion(manifest, engine, adapter))
        if not versions:
            raise ManifestError(
                f"model repository {repository} holds no model versions "
                "(<name>/<version>/manifest.json); export one with `carousel export`"
            )
        return cls(versions)

    def start(self, make_scheduler: Callable[[ModelVersion], Scheduler]) -> None:
        for mv in self.versions():
            mv.scheduler = make_scheduler(mv)
            mv.scheduler.start()

    async def close(self) -> None:
        for mv in self.versions():
            if mv.scheduler is not None:
                await mv.scheduler.close()

    def versions(self) -> list[ModelVersion]:
        return [mv for vs in self._models.values() for mv in vs.values()]

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions_of(self, name: str) -> list[ModelVersion]:
        if name not in self._models:
            raise self._unknown(name)
        return [self._models[name][v] for v in sorted(self._models[name])]

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        versions = self._models.get(name)
        if versions is None:
            raise self._unknown(name)
        if version is None:
            return self._latest[name]
        mv = versions.get(version)
        if mv is None:
            raise UnknownVersion(
                f"model {name!r} has no version {version}; it has {sorted(versions)}"
            )
        return mv

    def _unknown(self, name: str) -> UnknownModel:
        return UnknownModel(f"no model {name!r}; the models are {self.names()} (GET /v1/models)")
