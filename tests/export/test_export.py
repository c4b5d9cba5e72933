"""export_checkpoint and `carousel export`: the repository layout, versions, refusing to
overwrite, --force, and a failed verification leaving nothing behind."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from carousel.export import ExportError, VerificationError, VersionExists, export_checkpoint
from carousel.export import graph as graph_module

from carousel.cli import main


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("variant", ["lstm", "peephole", "coupled", "gru"])
def test_export_writes_graph_and_manifest(tmp_path, make_checkpoint, variant):
    model, ckpt = make_checkpoint(variant, num_layers=2)
    ckpt["metrics"] = {"corpus": "python stdlib", "steps": 3, "tokens_seen": 384,
                       "val_bpb": 6.25, "parameters": model.num_parameters()}
    folder = export_checkpoint(ckpt, tmp_path, "tiny")
    assert folder == tmp_path / "tiny" / "1"
    assert listing(tmp_path) == ["tiny", "tiny/1", "tiny/1/manifest.json", "tiny/1/model.onnx"]
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / "model.onnx").read_bytes()
    assert manifest["graph"] == {"file": "model.onnx", "sha256": hashlib.sha256(data).hexdigest(),
                                 "bytes": len(data)}
    assert manifest["name"] == "tiny" and manifest["version"] == 1
    assert manifest["variant"] == manifest["architecture"]["variant"] == variant
    assert manifest["architecture"] == {
        "variant": variant, "num_layers": 2, "hidden_size": 24, "embed_dim": 12,
        "vocab_size": 256, "parameters": sum(p.numel() for p in model.parameters())}
    names = ["h"] if variant == "gru" else ["h", "c"]
    assert manifest["state"] == [
        {"input": f"state_{n}", "output": f"state_{n}_out", "dtype": "float32",
         "shape": [2, "batch", 24], "batch_axis": 1, "init": "zeros"} for n in names]
    assert [i["name"] for i in manifest["inputs"]] == ["tokens", *(f"state_{n}" for n in names),
                                                       "lengths"]
    assert [o["name"] for o in manifest["outputs"]] == ["logits",
                                                        *(f"state_{n}_out" for n in names)]
    assert manifest["training"] == ckpt["metrics"]
    assert manifest["quantization"] is None
    check = manifest["verification"]
    assert check["cases"] >= 12 and max(check["max_abs_diff"].values()) <= 1e-4
    assert check["service_view"]["next_byte"] == check["service_view"]["torch_next_byte"]
    assert {"onnx", "onnxruntime", "torch", "python"} <= set(manifest["tools"])


@pytest.mark.parametrize("corpus, public", [
    ("python stdlib .py files under /root/.pyenv/versions/3.11.7/lib/python3.11",
     "python stdlib .py files (Python 3.11)"),
    ("files: /home/someone/data/notes.txt, /srv/corpora/python/, relative/dir/code.py",
     "files: notes.txt, python, code.py"),
    ("scraped from /mnt/build/cache/dump.txt on the CI box", "scraped from dump.txt on the CI box"),
    ("test text", "test text"),
])
def test_manifest_names_no_build_machine_path(tmp_path, make_checkpoint, corpus, public):
    """Manifests are served to clients: the corpus is described without its directories."""
    _, ckpt = make_checkpoint("gru", num_layers=1)
    ckpt["metrics"] = {"corpus": corpus}
    folder = export_checkpoint(ckpt, tmp_path, "m")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["training"]["corpus"] == public
    assert manifest["description"] == f"byte-level GRU language model trained on {public}"
    assert str(tmp_path) not in (folder / "manifest.json").read_text()


def test_service_view_needs_no_torch(tmp_path, make_checkpoint):
    """Read the version folder as the service does, in a process where torch cannot be
    imported, and get PyTorch's next-byte distribution for a sample text."""
    model, ckpt = make_checkpoint("peephole", num_layers=2)
    folder = export_checkpoint(ckpt, tmp_path, "tiny")
    text = "for i in range(10):\n    print("
    code = f"""
import sys, json
sys.modules["torch"] = None  # any import of torch now fails
from carousel.export.verify import service_view
logits = service_view(__import__("pathlib").Path({str(folder)!r}), {text!r})
print(json.dumps(logits.tolist()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    got = np.array(json.loads(out.stdout))
    with torch.no_grad():
        want = model(torch.tensor([list(text.encode())]))[0][0, -1].numpy()
    assert got.argmax() == want.argmax()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_next_free_version_and_refusing_to_overwrite(tmp_path, make_checkpoint):
    _, ckpt = make_checkpoint("gru", num_layers=1)
    assert export_checkpoint(ckpt, tmp_path, "m") == tmp_path / "m" / "1"
    assert export_checkpoint(ckpt, tmp_path, "m") == tmp_path / "m" / "2"
    assert export_checkpoint(ckpt, tmp_path, "m", version=7) == tmp_path / "m" / "7"
    assert export_checkpoint(ckpt, tmp_path, "m") == tmp_path / "m" / "8"
    before = (tmp_path / "m" / "2" / "manifest.json").read_bytes()
    with pytest.raises(VersionExists, match="--force"):
        export_checkpoint(ckpt, tmp_path, "m", version=2)
    assert (tmp_path / "m" / "2" / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2", "7", "8"]


def test_published_version_is_readable_by_everyone(tmp_path, make_checkpoint):
    # The container serves the repository as a non-root user; a staging folder made by
    # mkdtemp is owner-only, so publishing must open it up like any other folder.
    _, ckpt = make_checkpoint("gru", num_layers=1)
    folder = export_checkpoint(ckpt, tmp_path, "m")
    assert folder.stat().st_mode & 0o755 == 0o755
    for f in folder.iterdir():
        assert f.stat().st_mode & 0o444 == 0o444, f


def test_force_overwrites(tmp_path, make_checkpoint):
    _, first = make_checkpoint("lstm", num_layers=1, seed=1)
    _, second = make_checkpoint("lstm", num_layers=1, seed=2)
    export_checkpoint(first, tmp_path, "m")
    old = json.loads((tmp_path / "m" / "1" / "manifest.json").read_text())["graph"]["sha256"]
    export_checkpoint(second, tmp_path, "m", version=1, force=True)
    new = json.loads((tmp_path / "m" / "1" / "manifest.json").read_text())["graph"]["sha256"]
    assert new != old
    assert new == hashlib.sha256((tmp_path / "m" / "1" / "model.onnx").read_bytes()).hexdigest()
    assert listing(tmp_path) == ["m", "m/1", "m/1/manifest.json", "m/1/model.onnx"]


def test_failed_verification_leaves_nothing(tmp_path, make_checkpoint, monkeypatch):
    _, ckpt = make_checkpoint("gru", num_layers=1)
    export_checkpoint(ckpt, tmp_path, "other")
    right = graph_module.onnx_weights

    def broken(variant, params, H):  # PyTorch's r, z, n order left as is
        out = right(variant, params, H)
        out["R"] = params["weight_hh"].detach().numpy()[None]
        return out

    monkeypatch.setattr(graph_module, "onnx_weights", broken)
    with pytest.raises(VerificationError):
        export_checkpoint(ckpt, tmp_path, "m")
    with pytest.raises(VerificationError):
        export_checkpoint(ckpt, tmp_path, "other", version=1, force=True)
    # No new version, no staging folder, no empty model folder; the old version untouched.
    expected = ["other", "other/1", "other/1/manifest.json", "other/1/model.onnx"]
    assert listing(tmp_path) == expected
    with pytest.raises(VerificationError):
        export_checkpoint(ckpt, tmp_path, "other")
    assert listing(tmp_path) == expected
    monkeypatch.undo()
    export_checkpoint(ckpt, tmp_path, "other")
    assert listing(tmp_path)[-3:] == ["other/2", "other/2/manifest.json", "other/2/model.onnx"]


@pytest.mark.parametrize("name", ["", "../up", "a/b", ".hidden", "x" * 65])
def test_bad_names_are_refused(tmp_path, make_checkpoint, name):
    _, ckpt = make_checkpoint("lstm", num_layers=1)
    with pytest.raises(ExportError, match="invalid model name"):
        export_checkpoint(ckpt, tmp_path, name)
    assert listing(tmp_path) == []


def test_cli_export(tmp_path, checkpoint_file, capsys):
    repo = tmp_path / "repo"
    args = ["export", str(checkpoint_file), "--name", "tiny", "--repository", str(repo)]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(args) == 0  # the next free version
    assert main([*args, "--version", "1"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert main([*args, "--version", "1", "--force"]) == 0
    assert main([*args, "--version", "2", "--verify"]) == 1
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1", "2"]
    manifest = json.loads((repo / "tiny" / "2" / "manifest.json").read_text())
    assert manifest["training"]["tokens_seen"] == 12_800
    assert main(["export", str(tmp_path / "missing.pt"), "--name", "x",
                 "--repository", str(repo)]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_cli_default_repository_is_the_bundled_one():
    from carousel.cli import build_parser
    from carousel.paths import bundled_model_repository

    args = build_parser("export").parse_args(["export", "ckpt.pt", "--name", "m"])
    assert args.repository == bundled_model_repository()
    assert args.verify is True and args.quantize is None and args.version is None


def test_import_is_light():
    code = ("import sys, carousel.export; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_console_script_end_to_end(tmp_path, checkpoint_file):
    """`python -m carousel export ...` as a user runs it: exit 0, a loadable version."""
    repo = tmp_path / "repo"
    cmd = [sys.executable, "-m", "carousel", "export", str(checkpoint_file), "--name", "tiny",
           "--repository", str(repo)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert f"wrote {repo / 'tiny' / '1'}" in out.stdout and "verified: " in out.stdout
    again = subprocess.run([*cmd, "--version", "1"], capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 1
    assert "already exists" in again.stderr and "Traceback" not in again.stderr


def test_unreadable_checkpoints_are_clear_errors(tmp_path, make_checkpoint):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="cannot read checkpoint"):
        export_checkpoint(garbage, tmp_path / "repo", "m")
    with pytest.raises(ExportError, match="not a carousel checkpoint"):
        export_checkpoint({"weights": {}}, tmp_path / "repo", "m")
    _, ckpt = make_checkpoint("lstm", num_layers=1)
    ckpt["config"] = {**ckpt["config"], "hidden_size": 99}  # weights no longer fit
    with pytest.raises(ExportError, match="does not describe"):
        export_checkpoint(ckpt, tmp_path / "repo", "m")
    assert not (tmp_path / "repo").exists()
