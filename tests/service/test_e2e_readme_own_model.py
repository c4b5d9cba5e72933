"""The README's "Serve your own model" walk-through, run as a new user would: its export
script, its `carousel import` line (pointed at a scratch repository instead of the
checkout's models/), a real `carousel serve`, and its tritonclient loop, whose printed
predictions must equal the PyTorch module run on the whole series at once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

README = Path(__file__).resolve().parents[2] / "README.md"
CAROUSEL = Path(sys.executable).with_name("carousel")


def section_blocks() -> tuple[list[str], list[str]]:
    text = README.read_text().split("## Serve your own model", 1)[1].split("\n## ", 1)[0]
    return (re.findall(r"```python\n(.*?)```", text, re.S),
            re.findall(r"```bash\n(.*?)```", text, re.S))


def test_the_walk_through_works(tmp_path, start_server):
    (export_py, client_py), (shell,) = section_blocks()
    done = subprocess.run([sys.executable, "-c", export_py], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "forecaster.onnx").is_file()

    import_line = next(line for line in shell.splitlines() if "carousel import" in line)
    args = import_line.split("#")[0].split()[1:]
    repo = tmp_path / "models"
    done = subprocess.run([str(CAROUSEL), *args, "--repository", str(repo)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (repo / "forecaster" / "1" / "manifest.json").is_file()

    server = start_server("readme-own-model", {"CAROUSEL_MODEL_REPOSITORY": str(repo)})
    code = client_py.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "'x'" in lines[0] and "[-1, -1, 3]" in lines[0], lines[0]
    printed = np.concatenate([np.array(line.strip("[]").split(), dtype=np.float32)
                              for line in lines[1:]])

    # The same module (same seed, same construction) over the whole series in one call.
    namespace: dict = {}
    exec(compile(export_py.split("torch.manual_seed(0)")[0], "readme", "exec"), namespace)
    torch.manual_seed(0)
    module = namespace["Forecaster"]().eval()
    series = np.random.default_rng(0).standard_normal((1, 12, 3)).astype(np.float32)
    with torch.no_grad():
        y, _, _ = module(torch.from_numpy(series), torch.zeros(2, 1, 16), torch.zeros(2, 1, 16))
    np.testing.assert_allclose(printed, y[0, :, 0].numpy(), atol=1e-5)
