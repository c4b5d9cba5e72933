"""export_checkpoint: checkpoint -> verified ONNX graph + manifest in the model repository.

The steps, in order: rebuild the model from the checkpoint's own config; build the graph;
stage it in a temporary folder inside the repository; onnx.checker; onnxruntime against
PyTorch; (quantize and measure); write the manifest; read the staged folder back the way the
service does; rename it into place. Any failure removes the staging folder, so the
repository never holds half a version.
"""

from __future__ import annotations

from pathlib import Path

from . import repository as repo
from .errors import ExportError
from .manifest import build_manifest, write_manifest

QUANTIZE_MODES = ("int8",)


def load_model(checkpoint: str | Path | dict):
    """The PyTorch model, in eval mode, and the checkpoint dict it came from."""
    from carousel.model.train import load_checkpoint, model_from_checkpoint

    if not isinstance(checkpoint, dict):
        path = Path(checkpoint)
        if not path.is_file():
            raise ExportError(f"checkpoint not found: {path}")
        try:
            checkpoint = load_checkpoint(path)
        except Exception as e:  # torch.load raises many kinds for a file it cannot read
            raise ExportError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(checkpoint, dict) or {"model", "config"} - set(checkpoint):
        raise ExportError("not a carousel checkpoint: expected a dict with 'model' and 'config'")
    try:
        model = model_from_checkpoint(checkpoint)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ExportError(f"checkpoint does not describe a carousel model: {e}") from e
    return model.eval(), checkpoint


def export_checkpoint(
    checkpoint: str | Path | dict,
    repository: Path,
    name: str,
    version: int | None = None,
    quantize: str | None = None,
    force: bool = False,
    verify: bool = True,
    *,
    validation_corpus: list[str] | None = None,
    validation_bytes: int = 65_536,
    seed: int = 0,
) -> Path:
    """Write `repository/name/version/{model.onnx, manifest.json}` and return that folder.

    version: None writes the next free integer. force: overwrite an existing version.
    quantize: None (fp32) or "int8" (onnxruntime dynamic quantization; its manifest records
    bits per byte before and after on validation text and the per-step speed-up).
    verify: run onnx.checker and onnxruntime against PyTorch (a failure raises
    VerificationError and writes nothing). validation_corpus / validation_bytes: the text
    the int8 trade is measured on (default: the checkpoint's own corpus, validation split).
    """
    import onnx

    from .graph import build_model
    from .verify import (
        TOLERANCE,
        check_graph,
        check_service_view,
        compare_with_torch,
        open_session,
    )

    if quantize not in (None, *QUANTIZE_MODES):
        raise ExportError(f"unknown quantization {quantize!r}; choose from {QUANTIZE_MODES}")
    repository = Path(repository)
    repo.check_name(name)
    version = repo.resolve_version(repository, name, version, force)
    model, ckpt = load_model(checkpoint)
    proto = build_model(model.state_dict(), model.config)

    with repo.staging(repository, name) as staged:
        graph_path = staged / repo.GRAPH_FILE
        onnx.save_model(proto, str(graph_path))
        verification = None
        if verify:
            check_graph(graph_path)
            verification = compare_with_torch(model, open_session(graph_path), seed=seed)
            if quantize:  # 1e-4 holds for the fp32 graph; int8 is measured, not held to it
                verification["graph"] = "fp32, before quantization"
        quantization = None
        if quantize == "int8":
            from .quantize import quantize_int8

            quantization = quantize_int8(
                graph_path, model, ckpt, validation_corpus, validation_bytes
            )
            if verify:
                check_graph(graph_path)
        manifest = build_manifest(
            name=name, version=version, config=model.config,
            parameters=model.num_parameters(), metrics=ckpt.get("metrics") or {},
            graph_path=graph_path, verification=verification, quantization=quantization,
        )
        write_manifest(manifest, staged / repo.MANIFEST_FILE)
        if verify:
            # The staged folder read as the service reads it: fp32 must predict what PyTorch
            # predicts; int8 only has to load and run (its trade is in `quantization`).
            verification["service_view"] = check_service_view(
                staged, model, tolerance=None if quantize else TOLERANCE)
            write_manifest(manifest, staged / repo.MANIFEST_FILE)
        target = repository / name / str(version)
        repo.publish(staged, target, force)
    return target
