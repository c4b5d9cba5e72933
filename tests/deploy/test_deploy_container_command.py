"""Run exactly what the runtime image runs, here, without a Docker engine.

The Dockerfile's runtime stage is parsed for its ENV, ENTRYPOINT, CMD and HEALTHCHECK. The
command starts as a subprocess with that environment and nothing else, each container path
replaced by what its COPY instruction put there (the venv the tests run in stands for
/opt/venv, the checkout's models/ for /models, deploy/healthcheck.py for the probe), on a free
port on 127.0.0.1, with torch and onnx unimportable (the image has neither). Then
/healthz, /readyz, one prediction checked against onnxruntime run directly on the graph,
the image's health probe, and SIGTERM ending the process with status 0 (`docker stop`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from deploy_files import BLOCKER, copy_parts, exec_form, healthcheck

STARTUP_LIMIT_S = 90  # how long to wait for the server; a bound on waiting, not a timing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_paths(dockerfile, repo: Path) -> dict[str, str]:
    """Container path -> path here, from the runtime stage's COPY instructions."""
    mapping = {}
    for flags, sources, dest in map(copy_parts, dockerfile.stage("runtime").all("COPY")):
        if flags.get("from") == "build":
            # the build stage's venv: the project and its serving dependencies, installed.
            # The venv running these tests holds both (and more, which the blocker hides).
            mapping[dest.rstrip("/")] = sys.prefix
        else:
            (source,) = sources
            mapping[dest.rstrip("/")] = str((repo / source).resolve())
    return mapping


def localize(value: str, mapping: dict[str, str]) -> str:
    """Replace container paths where a path starts (a whole value, or after ':' in PATH)."""
    alternatives = "|".join(re.escape(p) for p in sorted(mapping, key=len, reverse=True))
    pattern = re.compile(rf"(?:^|(?<=:))({alternatives})(?=/|:|$)")
    return pattern.sub(lambda m: mapping[m[1]], value)


@pytest.fixture(scope="module")
def container(dockerfile, repo, tmp_path_factory):
    """The runtime image's command, running: (base_url, env, process, log, path mapping)."""
    tmp = tmp_path_factory.mktemp("container")
    mapping = container_paths(dockerfile, repo)
    env = {k: localize(v, mapping) for k, v in dockerfile.env("runtime").items()}
    port = free_port()
    # Adapted: a free port, and loopback (the container's 0.0.0.0 is its own interfaces;
    # tests here listen on 127.0.0.1 only).
    assert env["CAROUSEL_HOST"] == "0.0.0.0"
    env.update(CAROUSEL_PORT=str(port), CAROUSEL_HOST="127.0.0.1", HOME=str(tmp))
    (tmp / "sitecustomize.py").write_text(BLOCKER)
    env["PYTHONPATH"] = str(tmp)

    argv = exec_form(dockerfile.inherited_last("runtime", "ENTRYPOINT").args)
    argv += exec_form(dockerfile.inherited_last("runtime", "CMD").args)
    executable = shutil.which(argv[0], path=env["PATH"])
    assert executable and executable.startswith(sys.prefix), executable

    log = (tmp / "server.log").open("w+")
    # cwd: the runtime stage sets no WORKDIR, so the process must not rely on its cwd.
    process = subprocess.Popen(
        [executable, *argv[1:]], env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(base + "/readyz", process, log)
        yield base, env, process, log, mapping
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def output(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()


def wait_for(url: str, process, log) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{output(log)}")
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} not 200 after {STARTUP_LIMIT_S} s:\n{output(log)}")


def test_health_and_readiness(container):
    base, *_ = container
    assert httpx.get(base + "/healthz", trust_env=False).status_code == 200
    assert httpx.get(base + "/readyz", trust_env=False).status_code == 200


def test_the_server_holds_no_torch_or_onnx(container):
    """Beyond the import blocker: neither library's native code is mapped in the process."""
    *_, process, _, _ = container
    maps = Path(f"/proc/{process.pid}/maps").read_text()
    assert "onnxruntime" in maps  # the check sees shared libraries at all
    for library in ("libtorch", "onnx_cpp2py_export"):
        assert library not in maps, library


def test_one_prediction_matches_onnxruntime_on_the_graph(container):
    base, env, *_ = container
    response = httpx.post(
        base + "/v1/models/bytelm/predict", json={"text": "def "}, trust_env=False
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "bytelm"
    (out,) = body["outputs"]
    assert out["length"] == 4

    # Independent: the served version's graph, run by onnxruntime with zero state.
    folder = Path(env["CAROUSEL_MODEL_REPOSITORY"]) / "bytelm" / str(body["version"])
    manifest = json.loads((folder / "manifest.json").read_text())
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    tokens = np.frombuffer(b"def ", dtype=np.uint8).astype(np.int64)[None, :]
    feeds = {"tokens": tokens, "lengths": np.array([tokens.shape[1]], dtype=np.int32)}
    for state in manifest["state"]:
        shape = [1 if dim == "batch" else dim for dim in state["shape"]]
        feeds[state["input"]] = np.zeros(shape, dtype=np.float32)
    logits = session.run(["logits"], feeds)[0][0, -1].astype(np.float64)
    logprobs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    expected = np.argsort(-logprobs, kind="stable")[: len(out["top_k"])]

    assert [t["token"] for t in out["top_k"]] == expected.tolist()
    for entry in out["top_k"]:
        assert abs(entry["logprob"] - logprobs[entry["token"]]) <= 1e-4


def test_the_image_health_probe_passes(container, dockerfile):
    _, env, _, log, mapping = container
    _, probe = healthcheck(dockerfile.inherited_last("runtime", "HEALTHCHECK"))
    probe = [localize(arg, mapping) for arg in probe]
    executable = shutil.which(probe[0], path=env["PATH"])
    result = subprocess.run([executable, *probe[1:]], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + output(log)


def test_the_health_probe_fails_when_nothing_answers(dockerfile, repo):
    _, probe = healthcheck(dockerfile.inherited_last("runtime", "HEALTHCHECK"))
    probe = [localize(arg, container_paths(dockerfile, repo)) for arg in probe]
    env = {
        "PATH": os.environ["PATH"],
        "CAROUSEL_HOST": "0.0.0.0",
        "CAROUSEL_PORT": str(free_port()),
    }
    result = subprocess.run([sys.executable, *probe[1:]], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "unhealthy: http://127.0.0.1:" in result.stderr


def test_sigterm_exits_zero(container):
    """Last in this file: `docker stop` sends SIGTERM; the server drains and exits 0."""
    base, _, process, log, _ = container
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=STARTUP_LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("server still running after SIGTERM:\n" + output(log))
    assert code == 0, output(log)
