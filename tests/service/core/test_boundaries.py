"""Architecture rules that must hold: the core never imports FastAPI, and nothing in the
service imports torch (serving does not need it installed)."""

from __future__ import annotations

import subprocess
import sys

CORE = ["engine", "scheduler", "decode", "sessions", "store", "state", "sampling",
        "generation", "registry", "manifest", "bytelm", "tensormodel", "dataplane", "locks",
        "text", "errors", "settings", "metrics", "runtime"]


def modules_after(code: str) -> set[str]:
    code += "\nimport sys\nprint(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_core_imports_nothing_from_fastapi_or_starlette():
    loaded = modules_after("\n".join(f"import carousel.service.{m}" for m in CORE))
    assert not {m for m in loaded if m.split(".")[0] in ("fastapi", "starlette")}


def test_the_whole_service_runs_without_torch():
    loaded = modules_after("import carousel.service.app, carousel.service.cli, "
                           "carousel.service.server")
    assert "torch" not in loaded and "onnx" not in loaded
