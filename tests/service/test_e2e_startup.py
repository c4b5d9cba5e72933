"""A repository carousel cannot serve stops `carousel serve` before it binds: exit 2, one
message naming the manifest file and what is wrong with it, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CAROUSEL = Path(sys.executable).with_name("carousel")


def broken_repo(tmp_path: Path, source: Path, change) -> tuple[Path, Path]:
    repo = tmp_path / "repo"
    shutil.copytree(source / "tinygru" / "1", repo / "tinygru" / "1")
    path = repo / "tinygru" / "1" / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return repo, path


def drop_batch(m):
    m["state"][0]["shape"] = [2, 32]


def old_version(m):
    m["manifest_version"] = 1


def unknown_adapter(m):
    m["adapter"] = {"type": "speech"}


def wrong_folder_name(m):
    m["name"] = "other"


def not_in_graph(m):
    m["outputs"].append({"name": "extra", "dtype": "float32", "shape": ["batch", 4]})


@pytest.mark.parametrize("change, reason", [
    (drop_batch, "batch"),
    (old_version, "manifest_version must be 2"),
    (unknown_adapter, "adapter"),
    (wrong_folder_name, "does not match its folder"),
])
def test_a_broken_manifest_stops_start_up_with_its_file_and_reason(tmp_path, tiny_repo,
                                                                     change, reason):
    repo, path = broken_repo(tmp_path, tiny_repo[0], change)
    done = subprocess.run([str(CAROUSEL), "serve", "--port", "0", "--model-repository",
                           str(repo)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert str(path) in done.stderr and reason in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_manifest_that_does_not_match_its_graph_fails_start_up(tmp_path, tiny_repo):
    """Caught when the graph loads (the manifest alone looks fine): the server exits non-zero
    naming the graph file and both tensor lists."""
    repo, _ = broken_repo(tmp_path, tiny_repo[0], not_in_graph)
    done = subprocess.run([str(CAROUSEL), "serve", "--port", "0", "--model-repository",
                           str(repo)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "model.onnx" in done.stderr and "'extra'" in done.stderr, done.stderr
