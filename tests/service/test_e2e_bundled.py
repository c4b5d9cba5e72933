"""`carousel serve` with no settings serves both bundled models, and for each of them any
split of a text into steps ends at stateless predict's logits and PyTorch's.

The bundled models' checkpoints are not in the repository, so the PyTorch reference is
rebuilt from the exported graph's own weights, reading ONNX's layouts as the operator spec
defines them (not as the exporter wrote them)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from carousel.model.model import LanguageModel, ModelConfig, encode

BUNDLED = Path(__file__).resolve().parents[2] / "models"
TEXT = "def carousel(models):\n    # ünïcode ✓ — streams 🚀\n    return [m for m in models]\n"


def torch_from_onnx(version_dir: Path) -> LanguageModel:
    """The PyTorch model whose weights an exported graph holds: ONNX gates i,o,f,c (LSTM)
    and z,r,h (GRU) back to PyTorch's i,f,g,o and r,z,n; B = [Wb; Rb]; P = i,o,f."""
    import onnx
    from onnx import numpy_helper

    manifest = json.loads((version_dir / "manifest.json").read_text())
    graph = onnx.load(str(version_dir / manifest["graph"]["file"])).graph
    inits = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in graph.initializer}
    arch = manifest["architecture"]
    variant, H = arch["variant"], arch["hidden_size"]

    def blocks(a, order):
        parts = [a[k * H : (k + 1) * H] for k in range(a.shape[0] // H)]
        return np.concatenate([parts[k] for k in order])

    # ONNX block index for each PyTorch gate, in PyTorch's order.
    order = {"lstm": [0, 2, 3, 1], "peephole": [0, 2, 3, 1], "coupled": [0, 3, 1],
             "gru": [1, 0, 2]}[variant]
    sd = {}
    recurrent = [n for n in graph.node if n.op_type in ("LSTM", "GRU")]
    for layer, node in enumerate(recurrent):
        W, R, B = (inits[node.input[k]][0] for k in (1, 2, 3))  # inputs X, W, R, B, ...
        gh = B.shape[0] // 2
        p = f"layers.{layer}."
        sd[p + "weight_ih"] = blocks(W, order)
        sd[p + "weight_hh"] = blocks(R, order)
        sd[p + "bias_ih"] = blocks(B[:gh], order)
        sd[p + "bias_hh"] = blocks(B[gh:], order)
        if variant == "peephole":
            sd[p + "weight_peep"] = blocks(inits[node.input[7]][0], [0, 2, 1])
    gather = next(n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits)
    sd["embedding.weight"] = inits[gather.input[0]]
    for node in graph.node:
        consts = [inits[i] for i in node.input if i in inits]
        if node.op_type == "MatMul" and consts and consts[0].ndim == 2:
            sd["head.weight"] = consts[0].T
        elif node.op_type == "Add" and consts and consts[0].shape == (arch["vocab_size"],):
            sd["head.bias"] = consts[0]
    config = ModelConfig(variant=variant, vocab_size=arch["vocab_size"],
                         embed_dim=sd["embedding.weight"].shape[1], hidden_size=H,
                         num_layers=len(recurrent))
    model = LanguageModel(config)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
    return model.eval()


def torch_logits(model: LanguageModel, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        out, _ = model(torch.tensor([tokens], dtype=torch.long))
    return out[0].double().numpy()  # (T, V)


@pytest.fixture(scope="module")
def bundled() -> dict[str, LanguageModel]:
    """bytelm/1 and bytegru/1 as PyTorch models. Missing models fail (they must ship)."""
    models = {}
    for name in ("bytelm", "bytegru"):
        folder = BUNDLED / name / "1"
        assert (folder / "manifest.json").is_file(), f"bundled model {folder} is missing"
        models[name] = torch_from_onnx(folder)
    return models


@pytest.fixture(scope="module")
def bundled_api(bundled, start_server, api_factory):
    """`carousel serve` with no repository setting: it must serve the bundled models."""
    return api_factory(start_server("bundled", {}))


def test_bundled_models_are_listed(bundled_api):
    body = bundled_api.ok(bundled_api.http.get("/v1/models"))
    for name in ("bytelm", "bytegru"):
        assert name in json.dumps(body), body
        one = bundled_api.ok(bundled_api.http.get(f"/v1/models/{name}"))
        assert one["version"] >= 1


@pytest.mark.parametrize("name", ["bytelm", "bytegru"])
def test_bundled_splits_equal_predict_and_pytorch(bundled_api, bundled, check, name):
    api, tokens = bundled_api, encode(TEXT)
    ref = torch_logits(bundled[name], tokens)
    predict = api.predict(name, tokens=tokens, version=1, return_logits=True)
    predict = predict["outputs"][0]["logits"]
    check.logits(predict, ref[-1], f"{name} predict vs PyTorch")

    rng = random.Random(3)
    for trial in range(3):
        cuts = sorted(rng.sample(range(1, len(tokens)), 4 + 3 * trial))
        sid = api.create_session(name, version=1)["session_id"]
        at = 0
        for cut in [*cuts, len(tokens)]:
            out = api.step(sid, tokens=tokens[at:cut], return_logits=True)
            at = cut
            assert out["position"] == at
            check.logits(out["logits"], ref[at - 1], f"{name} step ending at {at}")
        check.logits(out["logits"], predict, f"{name} split {cuts} vs predict")
        check.top_k(out["top_k"], ref[-1])
        assert api.http.delete(f"/v1/sessions/{sid}").status_code == 204
