"""Serving needs no torch and no onnx: not in `pip install .`'s dependencies, not anywhere
under them, not in the image's lock, and `carousel serve --help` works when neither can be
imported."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import tomllib

from deploy_files import BLOCKER
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

TRAINING_ONLY = {"torch", "onnx", "onnxscript", "tqdm", "matplotlib"}


def pyproject(repo) -> dict:
    return tomllib.loads((repo / "pyproject.toml").read_text())


def serving_closure(requirements: list[str]) -> set[str]:
    """Every distribution a bare install pulls in, followed through installed metadata
    (extras only where a requirement asks for them, markers evaluated for this machine)."""
    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, via_extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": via_extra}):
            continue
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        for sub in md.requires(req.name) or []:
            sub_req = Requirement(sub)
            extras = [""] + sorted(req.extras)
            # a sub-requirement counts when its marker holds for no extra or one we asked for
            holds = [
                e for e in extras if not sub_req.marker or sub_req.marker.evaluate({"extra": e})
            ]
            if holds:
                todo.append((sub_req, holds[0]))
    return {k.split("[")[0] for k in seen}


def lock(repo) -> dict[str, Version]:
    pins = {}
    for line in (repo / "deploy" / "requirements-serve.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_serving_dependencies_exclude_training_packages(repo):
    direct = {
        canonicalize_name(Requirement(r).name) for r in pyproject(repo)["project"]["dependencies"]
    }
    assert {"onnxruntime", "numpy", "fastapi", "uvicorn"} <= direct
    assert not direct & TRAINING_ONLY


def test_nothing_under_the_serving_dependencies_pulls_torch_or_onnx(repo):
    closure = serving_closure(pyproject(repo)["project"]["dependencies"])
    assert {"onnxruntime", "starlette", "pydantic-core"} <= closure  # the walk goes deep
    assert not closure & TRAINING_ONLY, closure & TRAINING_ONLY


def test_the_train_extra_is_where_torch_and_onnx_live(repo):
    extra = {
        canonicalize_name(Requirement(r).name)
        for r in pyproject(repo)["project"]["optional-dependencies"]["train"]
    }
    assert {"torch", "onnx"} <= extra


def test_image_lock_pins_exactly_the_serving_closure(repo):
    """The image installs deploy/requirements-serve.txt: every package a bare install pulls,
    at a version pyproject accepts, and nothing else. (`make lock` regenerates it.)"""
    pins = lock(repo)
    requirements = pyproject(repo)["project"]["dependencies"]
    for r in map(Requirement, requirements):
        name = canonicalize_name(r.name)
        assert name in pins, f"{name} is a serving dependency but not in the lock"
        assert r.specifier.contains(pins[name]), f"lock has {name}=={pins[name]}, needs {r}"
    assert not set(pins) & TRAINING_ONLY
    assert set(pins) == serving_closure(requirements), "run `make lock`"


def test_requirements_script_follows_self_referencing_extras(repo):
    script = repo / "deploy" / "requirements.py"
    out = subprocess.run(
        [sys.executable, str(script), str(repo / "pyproject.toml"), "test"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    names = {canonicalize_name(Requirement(r).name) for r in out}
    project = pyproject(repo)["project"]
    expected = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    for extra in ("test", "train", "bench"):
        expected |= {
            canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"][extra]
        }
    expected.discard("carousel")
    assert names == expected
    base = subprocess.run(
        [sys.executable, str(script), str(repo / "pyproject.toml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert base == project["dependencies"]


def run_blocked(tmp_path, code: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )


def test_blocker_really_blocks(tmp_path):
    result = run_blocked(tmp_path, "import torch")
    assert result.returncode == 1 and "blocked" in result.stderr


def test_serve_help_without_torch_or_onnx(tmp_path):
    # The console script's entry point, carousel.cli:main, with argv as `carousel serve --help`.
    result = run_blocked(
        tmp_path,
        "import sys; from carousel.cli import main; sys.argv[0] = 'carousel'; "
        "sys.exit(main(['serve', '--help']))",
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--host", "--port", "--model-repository", "--max-batch-size"):
        assert flag in result.stdout, flag
