"""The README tells the truth: its configuration table is the Settings class, its two
commands are the Makefile's, and CI runs the same test command."""

from __future__ import annotations

import os
import re
import subprocess

import pytest


def make(repo, *args: str) -> subprocess.CompletedProcess:
    """`make ARGS` in the checkout, free of any make this test itself runs under (CI runs
    pytest from `make test`, whose MAKEFLAGS would otherwise reach this one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=repo, env=env, capture_output=True, text=True
    )


def config_rows(readme: str) -> dict[str, str]:
    """`CAROUSEL_*` variable -> default cell, from the README's configuration table."""
    rows = {}
    for line in readme.splitlines():
        if m := re.match(r"\|\s*`(CAROUSEL_\w+)`\s*\|([^|]*)\|", line):
            assert m[1] not in rows, f"{m[1]} listed twice"
            rows[m[1]] = m[2].strip()
    return rows


def test_configuration_table_lists_every_setting(repo, settings_fields):
    rows = config_rows((repo / "README.md").read_text())
    expected = {f"CAROUSEL_{name.upper()}" for name in settings_fields}
    assert set(rows) == expected, {"missing": expected - set(rows), "stale": set(rows) - expected}


def test_configuration_defaults_match_the_settings(repo, settings_fields):
    rows = config_rows((repo / "README.md").read_text())
    checked = 0
    for name, field in settings_fields.items():
        cell = rows[f"CAROUSEL_{name.upper()}"]
        if field.default_factory is not None:
            continue  # computed at run time (the checkout's models/): described in words
        if field.default is None:  # an optional setting, off unless set
            assert cell == "none", f"{name}: an unset default is written none, got {cell!r}"
            checked += 1
            continue
        literal = re.fullmatch(r"`([^`]*)`", cell)
        assert literal, f"{name}: default cell should be one `literal`, got {cell!r}"
        default = field.default
        if isinstance(default, bool):
            assert literal[1] == str(default).lower(), name
        else:
            assert type(default)(literal[1]) == default, name
        checked += 1
    assert checked >= len(settings_fields) - 1


def test_the_two_commands_are_the_makefile_targets(repo):
    readme = (repo / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
    # -n: print the recipes without running them; -B: as from a fresh clone (no stamps yet)
    serve = make(repo, "-n", "-B", "serve")
    assert serve.returncode == 0, serve.stderr
    assert re.search(r"bin/carousel serve --host 127\.0\.0\.1 --port 8000 ", serve.stdout)
    assert "torch" not in serve.stdout and "[" not in serve.stdout  # no extras for serving
    test = make(repo, "-n", "-B", "test")
    assert test.returncode == 0, test.stderr
    lines = test.stdout.splitlines()
    torch = next(n for n, line in enumerate(lines) if "pip install torch==2.13.0" in line)
    extra = next(n for n, line in enumerate(lines) if "--editable '.[test]'" in line)
    assert "--constraint deploy/requirements-serve.txt" in lines[extra]  # what the image runs
    assert torch < extra, "torch must be installed before the test extra"
    assert any("ruff check ." in line for line in lines)
    assert any("-m pytest" in line for line in lines)


def test_ci_runs_the_readme_test_command(repo):
    script = (repo / ".ci" / "run").read_text()
    assert script.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script
    assert re.search(r"^make test\b", script, re.M)
    assert subprocess.run(["bash", "-n", str(repo / ".ci" / "run")]).returncode == 0


@pytest.mark.parametrize("status", [5, 1, 0])
def test_make_test_fails_when_pytest_runs_nothing(repo, tmp_path, status):
    """pytest's exit status 5 (no tests collected) must fail `make test` with a message;
    other statuses pass through. A stand-in python replaces the venv's, so only the test
    recipe's own logic runs (`-o lint`: its prerequisite is not remade)."""
    fake = tmp_path / "venv" / "bin"
    fake.mkdir(parents=True)
    (fake / "python").write_text(f"#!/bin/sh\nexit {status}\n")
    (fake / "python").chmod(0o755)
    result = make(repo, "-o", "lint", "test", f"VENV={tmp_path / 'venv'}")
    assert (result.returncode == 0) == (status == 0), result.stderr
    assert ("pytest collected no tests" in result.stderr) == (status == 5)


def test_every_path_the_readme_uses_is_served(repo, tmp_path):
    """Each URL in the README's examples names a route the app really has."""
    from carousel.service.app import create_app
    from carousel.service.settings import Settings

    app = create_app(Settings(model_repository=tmp_path))  # routes exist before models load
    # the OpenAPI paths (routers included) and the app's own routes (the WebSocket, /docs)
    paths = set(app.openapi()["paths"]) | {r.path for r in app.routes if hasattr(r, "path")}
    templates = [re.sub(r"\{[^}]+\}", "[^/]+", path) for path in paths]
    readme = (repo / "README.md").read_text()
    used = re.findall(r"(?:localhost|127\.0\.0\.1):8000(/[^\s'\"<>)]*)", readme)
    used = {re.sub(r"\$\w+|\{\w+\}", "ID", path).split("?")[0] for path in used}
    assert {
        "/v1/models/bytelm/predict",
        "/v1/sessions/ID/step",
        "/v1/sessions/ID/ws",
        "/v1/sessions/ID/generate",
        "/metrics",
        "/docs",
    } <= used
    for path in used:
        assert any(re.fullmatch(t, path) for t in templates), f"README uses {path}: no route"
