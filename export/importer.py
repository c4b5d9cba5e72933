"""import_graph: someone else's stateful ONNX graph -> a verified version in the model repository.

The steps, in order: copy the graph into a staging folder inside the repository; read its
inputs and outputs with onnxruntime (inspect_graph); decide what each one is for
(import_plan: state pairs, batch and time axes, constants, lengths); check on random inputs
that it can be batched and stepped as the service does (import_verify); write the manifest,
validated against the schema; rename the folder into place (repository). Everything checked
is the staged copy, the file that will be served. Any failure removes the staging folder,
so the repository never holds half a version.

Only onnxruntime and numpy are needed (serving installs have no torch and no onnx), and
jsonschema for the manifest check.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from . import repository as repo
from .errors import ExportError
from .import_plan import Plan, plan_import
from .import_verify import verify_import
from .inspect_graph import Tensor, read_graph
from .manifest import (
    MANIFEST_VERSION,
    graph_record,
    timestamp,
    tool_versions,
    validate_manifest,
    write_manifest,
)

TOOLS = ("onnxruntime", "numpy")


def _tensor(plan: Plan, t: Tensor) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": plan.manifest_shape(t)}


def import_manifest(plan: Plan, *, name: str, version: int, graph_path: Path, source: str,
                    description: str | None, verification: dict) -> dict:
    """The manifest of an imported graph: the `tensor` adapter, every input and output."""
    graph = plan.graph
    return {
        "manifest_version": MANIFEST_VERSION,
        "name": name,
        "version": version,
        "description": description or f"imported from {source}",
        "graph": graph_record(graph_path),
        "inputs": [_tensor(plan, t) for t in graph.inputs],
        "outputs": [_tensor(plan, t) for t in graph.outputs],
        "state": [
            {"input": s.input, "output": s.output, "dtype": "float32",
             "shape": plan.manifest_shape(graph.input(s.input)), "batch_axis": s.batch_axis,
             "init": "zeros"}
            for s in plan.states
        ],
        "constants": [
            {"name": c.name, "dtype": c.dtype, "shape": list(c.shape), "value": c.value,
             "overridable": c.overridable}
            for c in plan.constants
        ],
        "sequence": {"axis": plan.time, "lengths": plan.lengths} if plan.time else None,
        "adapter": {"type": "tensor"},
        "source": {"kind": "import", "file": source},
        "verification": verification,
        "exported_at": timestamp(),
        "tools": tool_versions(TOOLS),
    }


def import_graph(
    graph_path: str | Path,
    repository: Path,
    name: str,
    version: int | None = None,
    *,
    states: Sequence[str] = (),
    constants: Sequence[str] = (),
    lengths: str | None = None,
    batch_dim: str | None = None,
    time_dim: str | None = None,
    description: str | None = None,
    force: bool = False,
    seed: int = 0,
) -> Path:
    """Write `repository/name/version/{model.onnx, manifest.json}` and return that folder.

    version: None writes the next free integer; force: overwrite an existing version.
    states, constants: the CLI's `IN[:AXIS]=OUT` and `NAME=VALUE[:overridable]` strings
    (no states: detect them). lengths, batch_dim, time_dim: settle what detection cannot.
    Raises ExportError (VerificationError when a check fails) and writes nothing then."""
    source = Path(graph_path)
    repository = Path(repository)
    repo.check_name(name)
    if not source.is_file():
        raise ExportError(f"graph not found: {source}")
    version = repo.resolve_version(repository, name, version, force)
    with repo.staging(repository, name) as staged:
        staged_graph = staged / repo.GRAPH_FILE
        shutil.copyfile(source, staged_graph)
        graph = read_graph(staged_graph, label=source.name)
        plan = plan_import(graph, states=states, constants=constants, lengths=lengths,
                           batch_dim=batch_dim, time_dim=time_dim)
        verification = verify_import(plan, seed=seed)
        manifest = import_manifest(plan, name=name, version=version, graph_path=staged_graph,
                                   source=source.name, description=description,
                                   verification=verification)
        validate_manifest(manifest)
        write_manifest(manifest, staged / repo.MANIFEST_FILE)
        target = repository / name / str(version)
        repo.publish(staged, target, force)
    return target
