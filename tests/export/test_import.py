"""`carousel import`: graphs exported from real PyTorch modules (tests/graphs.py) go into the
repository with the state pairs, batch axes, time axis and constants they have; the graph
written computes what the module computes, stepped the way the service steps it; what
carousel cannot serve is refused with the reason, through the real console script."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import graphs
import jsonschema
import numpy as np
import onnxruntime as ort
import pytest
import torch
from carousel.export import ExportError, VerificationError, VersionExists, export_checkpoint
from carousel.export.import_plan import conventional_pair, parse_constant_flag
from carousel.export.importer import import_graph
from carousel.export.manifest import load_schema

TOL = 1e-5
CAROUSEL = Path(sys.executable).with_name("carousel")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(builder_name, **kwargs) -> graphs.Built, each graph exported once per module."""
    folder, made = tmp_path_factory.mktemp("graphs"), {}

    def get(name: str, **kwargs) -> graphs.Built:
        key = (name, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = getattr(graphs, name)(folder, **kwargs)
        return made[key]

    return get


@pytest.fixture(scope="module")
def validator():
    return jsonschema.Draft202012Validator(
        load_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def run_onnx(path: Path, feed: dict) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


# (builder, builder kwargs, import flags): auto-detected where the names allow it.
CASES = {
    "forecaster batch-first": ("lstm_forecaster", {"batch_first": True}, {}),
    "forecaster time-major": ("lstm_forecaster", {"batch_first": False}, {}),
    "gru, detected": ("gru_single_state", {}, {}),
    "gru, --state with axis": ("gru_single_state", {}, {"states": ["state:1=stateN"]}),
    "stacked h and c + constant": ("stacked_state_with_constant", {},
                                   {"states": ["memory=memory_next"], "constants": ["gain=0.5"]}),
    "batch axis 0, detected": ("batch_axis_zero_state", {}, {}),
    "batch axis 0, --state": ("batch_axis_zero_state", {}, {"states": ["h_in:0=h_out"]}),
    "two states, named by --state": ("two_same_shaped_states", {},
                                     {"states": ["first=out_a", "second=out_b"]}),
}


@pytest.mark.parametrize("case", CASES)
def test_import_finds_the_layout_the_module_has(tmp_path, build, validator, case):
    builder, kwargs, flags = CASES[case]
    built = build(builder, **kwargs)
    folder = import_graph(built.path, tmp_path, "m", **flags)
    assert folder == tmp_path / "m" / "1"
    assert listing(tmp_path) == ["m", "m/1", "m/1/manifest.json", "m/1/model.onnx"]
    manifest = manifest_of(folder)
    validator.validate(manifest)

    assert manifest["inputs"] == [{"name": n, "dtype": "float32", "shape": list(s)}
                                  for n, s in built.inputs.items()]
    assert manifest["outputs"] == [{"name": n, "dtype": "float32", "shape": list(s)}
                                   for n, s in built.outputs.items()]
    assert manifest["state"] == [
        {"input": i, "output": o, "dtype": "float32", "shape": list(built.inputs[i]),
         "batch_axis": built.batch_axes[i], "init": "zeros"} for i, o in built.state.items()]
    assert manifest["sequence"] == ({"axis": built.time, "lengths": None} if built.time else None)
    assert manifest["constants"] == [
        {"name": n, "dtype": "float32", "shape": [], "value": v, "overridable": False}
        for n, v in built.constants.items()]
    assert manifest["adapter"] == {"type": "tensor"}
    assert manifest["source"] == {"kind": "import", "file": built.path.name}
    data = (folder / "model.onnx").read_bytes()
    assert data == built.path.read_bytes()
    assert manifest["graph"] == {"file": "model.onnx", "sha256": hashlib.sha256(data).hexdigest(),
                                 "bytes": len(data)}
    checks = manifest["verification"]["checks"]
    assert len(checks) == (2 if built.time else 1)
    assert all(max(c["max_abs_diff"].values()) <= TOL for c in checks)


@pytest.mark.parametrize("case", CASES)
def test_imported_graph_computes_what_the_module_computes(tmp_path, build, case):
    """The written model.onnx against the PyTorch module on random inputs: one call, and
    (with a time axis) the steps split over two calls with the state outputs fed back in,
    as the service runs a session, against the module's one call."""
    builder, kwargs, flags = CASES[case]
    built = build(builder, **kwargs)
    graph = import_graph(built.path, tmp_path, "m", **flags) / "model.onnx"
    rng = np.random.default_rng(7)
    steps = 5 if built.time else 1
    feed = built.random_feed(rng, batch=4, steps=steps)
    want = built.torch_outputs(feed)
    got = run_onnx(graph, feed)
    for name in built.outputs:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOL, err_msg=name)
    if not built.time:
        return
    carried, pieces = {}, []
    for part in (slice(0, 2), slice(2, 5)):
        chunk = {}
        for name, shape in built.inputs.items():
            value = feed[name]
            if shape and built.time in shape:
                axis = shape.index(built.time)
                value = value[(slice(None),) * axis + (part,)]
            chunk[name] = value
        out = run_onnx(graph, {**chunk, **carried})
        carried = {i: out[o] for i, o in built.state.items()}
        pieces.append(out)
    for name, shape in built.outputs.items():
        if name in built.state.values():
            got = pieces[-1][name]
        else:
            got = np.concatenate([p[name] for p in pieces], axis=shape.index(built.time))
        np.testing.assert_allclose(got, want[name], rtol=0, atol=TOL, err_msg=name)


def test_forecaster_manifest(tmp_path, build):
    built = build("lstm_forecaster", batch_first=True)
    manifest = manifest_of(import_graph(built.path, tmp_path, "forecaster",
                                        description="an LSTM forecaster"))
    assert manifest["name"] == "forecaster" and manifest["version"] == 1
    assert manifest["manifest_version"] == 2
    assert manifest["description"] == "an LSTM forecaster"
    assert [(s["input"], s["output"], s["batch_axis"]) for s in manifest["state"]] == [
        ("h0", "hn", 1), ("c0", "cn", 1)]
    assert manifest["sequence"] == {"axis": "time", "lengths": None}
    assert {"python", "carousel", "onnxruntime", "numpy"} == set(manifest["tools"])
    assert manifest["verification"]["tolerance"] == TOL


def test_reimporting_a_carousel_export(tmp_path, make_checkpoint, validator):
    """carousel's own export is a stateful graph like any other: imported, it gets the
    layout the export wrote (lengths input found by its name, padded rows checked)."""
    _, ckpt = make_checkpoint("lstm", num_layers=2, hidden=16, embed=8)
    exported = export_checkpoint(ckpt, tmp_path / "a", "lm")
    folder = import_graph(exported / "model.onnx", tmp_path / "b", "lm")
    mine, theirs = manifest_of(folder), manifest_of(exported)
    validator.validate(mine)
    for key in ("inputs", "outputs", "state", "sequence", "constants", "graph"):
        assert mine[key] == theirs[key], key
    assert mine["adapter"] == {"type": "tensor"}
    checks = [c["check"] for c in mine["verification"]["checks"]]
    assert len(checks) == 3 and "padded" in checks[2]


def test_overridable_constant(tmp_path, build):
    built = build("stacked_state_with_constant")
    manifest = manifest_of(import_graph(built.path, tmp_path, "m",
                                        constants=["gain=0.25:overridable"]))
    assert manifest["constants"] == [{"name": "gain", "dtype": "float32", "shape": [],
                                      "value": 0.25, "overridable": True}]
    assert manifest["state"][0]["input"] == "memory"  # memory -> memory_next, by its names


@pytest.mark.parametrize("mix, check", [("rows", "a batch of 3 vs row 0 alone"),
                                        ("steps", "6 steps in one call vs 3 + 3")])
def test_a_graph_that_cannot_be_served_is_refused(tmp_path, build, mix, check):
    """Rows that see each other, or results that depend on how steps are split into calls,
    fail verification with the check and the difference; nothing is written."""
    built = build("gru_single_state", mix=mix)
    pattern = re.escape(check) + r".*: y differs by [0-9.e-]+ \(tolerance 1e-05\)$"
    with pytest.raises(VerificationError, match=pattern):
        import_graph(built.path, tmp_path, "m")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("builder, kwargs, flags, message", [
    ("two_same_shaped_states", {}, {},
     "cannot tell which inputs and outputs are state pairs; candidates of the same dtype and "
     "shape: x -> out_a, x -> out_b, first -> out_a, first -> out_b, second -> out_a, "
     "second -> out_b; name each pair with --state IN=OUT"),
    ("stateless", {}, {}, "the graph has no input/output pair of the same dtype and shape"),
    ("dynamic_rank_input", {}, {}, "input 'x' has a dynamic rank"),
    ("stacked_state_with_constant", {}, {},
     "input gain float32 [] has no batch axis, so it is a constant: give its value with "
     "--constant gain=VALUE"),
    ("stacked_state_with_constant", {}, {"constants": ["gain=[1, 2]"]},
     "the value has shape [2], input gain float32 [] needs []"),
    ("stacked_state_with_constant", {}, {"constants": ["gain=0.5", "x=1"]},
     "input x float32 [batch, time, 3] has the batch axis"),
    ("stacked_state_with_constant", {}, {"constants": ["gain=high"]},
     "'high' is not a number, true/false or a JSON array"),
    ("with_string_input", {}, {}, "input 'label' has type tensor(string)"),
    ("gru_single_state", {"dtype": torch.float64}, {}, "carousel keeps state in float32 only"),
    ("gru_single_state", {"dynamic_state": False}, {},
     "state state float32 [1, 2, 16] has no batch axis"),
    ("lstm_forecaster", {}, {"states": ["h0=y"]}, "output y float32 [batch, time, 1] does not "
                                                  "match input h0 float32 [2, batch, 16]"),
    ("lstm_forecaster", {}, {"states": ["h0=hn", "c0=hn"]}, "names the output 'hn' more than"),
    ("lstm_forecaster", {}, {"states": ["h0:0=hn"]}, "axis 0 is fixed at 2"),
    ("lstm_forecaster", {}, {"states": ["hidden=hn"]}, "the graph has no input 'hidden'"),
    ("lstm_forecaster", {}, {"lengths": "x"}, "--lengths 'x': needs an int32 or int64 input"),
    ("lstm_forecaster", {}, {"batch_dim": "rows"}, "--batch-dim 'rows': no input has"),
])
def test_refusals_say_why(tmp_path, build, builder, kwargs, flags, message):
    built = build(builder, **kwargs)
    with pytest.raises(ExportError) as refused:
        import_graph(built.path, tmp_path, "m", **flags)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)
    assert listing(tmp_path) == []


def test_versions_and_force(tmp_path, build):
    gru, lstm = build("gru_single_state"), build("lstm_forecaster", batch_first=True)
    assert import_graph(gru.path, tmp_path, "m") == tmp_path / "m" / "1"
    assert import_graph(gru.path, tmp_path, "m") == tmp_path / "m" / "2"
    assert import_graph(gru.path, tmp_path, "m", version=5) == tmp_path / "m" / "5"
    with pytest.raises(VersionExists, match="--force"):
        import_graph(lstm.path, tmp_path, "m", version=2)
    assert manifest_of(tmp_path / "m" / "2")["source"]["file"] == gru.path.name
    import_graph(lstm.path, tmp_path, "m", version=2, force=True)
    assert manifest_of(tmp_path / "m" / "2")["source"]["file"] == lstm.path.name
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2", "5"]


@pytest.mark.parametrize("inp, out, paired", [
    ("h0", "hn", True), ("c0", "cn", True), ("h0", "cn", False), ("h_0", "h_n", True),
    ("state", "stateN", True), ("state", "state_out", True), ("x_in", "x_out", True),
    ("state_h", "state_h_out", True), ("memory", "memory_next", True),
    ("first", "out_a", False), ("x", "y", False), ("h_in", "c_out", False),
])
def test_conventional_pair_names(inp, out, paired):
    assert conventional_pair(inp, out) is paired


@pytest.mark.parametrize("spec, parsed", [
    ("gain=0.5", ("gain", 0.5, False)),
    ("gain=2:overridable", ("gain", 2, True)),
    ("bias=[0.1, 0.2]", ("bias", [0.1, 0.2], False)),
    ("flag=true", ("flag", True, False)),
])
def test_constant_flag_syntax(spec, parsed):
    assert parse_constant_flag(spec) == parsed


# ------------------------------------------------------------------- the console script


def carousel(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CAROUSEL), *map(str, args)], capture_output=True, text=True,
                          timeout=180)


def test_cli_writes_versions(tmp_path, build):
    built = build("gru_single_state")
    base = ["import", built.path, "--name", "gru", "--repository", tmp_path]
    first = carousel(*base)
    assert first.returncode == 0, first.stderr
    assert f"wrote {tmp_path / 'gru' / '1'}" in first.stdout
    assert "state: state -> stateN [1, 'batch', 16] (batch axis 1)" in first.stdout
    assert "time axis: 'time' (no lengths input)" in first.stdout
    assert "verified a batch of 3 vs each row alone: max abs diff" in first.stdout
    assert carousel(*base).returncode == 0  # the next free version
    assert carousel(*base, "--version", "4", "--state", "state:1=stateN").returncode == 0
    again = carousel(*base, "--version", "4")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"carousel import: error: {tmp_path / 'gru' / '4'} already exists; pass --force to "
        "overwrite it or omit --version to write the next free version"]
    assert carousel(*base, "--version", "4", "--force").returncode == 0
    assert sorted(p.name for p in (tmp_path / "gru").iterdir()) == ["1", "2", "4"]


def test_cli_constant(tmp_path, build):
    built = build("stacked_state_with_constant")
    done = carousel("import", built.path, "--name", "s", "--repository", tmp_path,
                    "--state", "memory=memory_next", "--constant", "gain=0.5")
    assert done.returncode == 0, done.stderr
    assert "constant: gain = 0.5" in done.stdout
    assert manifest_of(tmp_path / "s" / "1")["constants"][0]["value"] == 0.5


@pytest.mark.parametrize("builder, kwargs, extra, reason", [
    ("two_same_shaped_states", {}, [], "cannot tell which inputs and outputs are state pairs"),
    ("stateless", {}, [], "the graph has no input/output pair of the same dtype and shape; "
                          "name them with --state IN=OUT"),
    ("dynamic_rank_input", {}, [], "input 'x' has a dynamic rank"),
    ("stacked_state_with_constant", {}, [], "give its value with --constant gain=VALUE"),
    (None, {}, [], "not-a-graph.onnx is not a graph onnxruntime can load"),
])
def test_cli_refusals_exit_2_with_one_line(tmp_path, build, builder, kwargs, extra, reason):
    if builder is None:
        path = tmp_path / "not-a-graph.onnx"
        path.write_text("this is a text file\n")
    else:
        path = build(builder, **kwargs).path
    repo = tmp_path / "repo"
    done = carousel("import", path, "--name", "m", "--repository", repo, *extra)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("carousel import: error: "), done.stderr
    assert reason in lines[0]
    assert str(repo) not in lines[0]  # not the staging folder's path
    assert listing(repo) == []


def test_cli_help_documents_the_flags():
    done = carousel("import", "--help")
    assert done.returncode == 0
    for flag in ("--state IN[:AXIS]=OUT", "--constant NAME=VALUE[:overridable]", "--lengths",
                 "--batch-dim", "--time-dim", "--force", "--version", "--repository"):
        assert flag in done.stdout


def test_import_needs_neither_torch_nor_onnx(tmp_path, build):
    """A serving install has onnxruntime and numpy only: import a graph (and refuse one of
    unknown rank, which needs the graph's own declarations) where torch and onnx cannot be
    imported."""
    good, bad = build("lstm_forecaster", batch_first=True), build("dynamic_rank_input")
    code = f"""
import sys, json
sys.modules["torch"] = None  # any import of torch now fails
sys.modules["onnx"] = None
from pathlib import Path
from carousel.export import ExportError
from carousel.export.importer import import_graph
folder = import_graph({str(good.path)!r}, Path({str(tmp_path)!r}), "m")
try:
    import_graph({str(bad.path)!r}, Path({str(tmp_path)!r}), "bad")
except ExportError as e:
    refusal = str(e)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx")
                and sys.modules[m] is not None)
print(json.dumps({{"folder": str(folder), "refusal": refusal, "loaded": loaded}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["loaded"] == []
    assert result["refusal"].startswith("input 'x' has a dynamic rank")
    manifest = manifest_of(Path(result["folder"]))
    assert [(s["input"], s["output"]) for s in manifest["state"]] == [("h0", "hn"), ("c0", "cn")]
