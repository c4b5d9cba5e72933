"""End-to-end fixtures: tiny exported models, real `carousel serve` processes, clients.

Everything here is the real thing: the models are exported with `carousel.export`, the server
is the console script started as a subprocess on a free port on 127.0.0.1, and the clients
speak HTTP (httpx), SSE (raw lines) and WebSocket (`websockets`). The PyTorch models the
exports came from stay in memory, so tests compare what the service answers with
`LanguageModel.forward` on the same bytes: an independent computation, not the service's own.

Helpers live on the objects the fixtures return (`api.expect_error`, `tiny["tinylstm"]`), so
test modules never import this file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from carousel.model.model import LanguageModel, ModelConfig, encode
from prometheus_client.parser import text_string_to_metric_families
from sse import sse_events

CAROUSEL = Path(sys.executable).with_name("carousel")  # the venv's console script
TOL = 1e-4  # the bound between any two computations of the same logits
CODE_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")

# Limits every tiny server runs with, small enough that tests can cross them cheaply.
LIMITS = {
    "CAROUSEL_MAX_BODY_BYTES": "65536",
    "CAROUSEL_MAX_TOKENS_PER_REQUEST": "2048",
    "CAROUSEL_MAX_GENERATE_TOKENS": "20000",
    "CAROUSEL_MAX_PREDICT_INPUTS": "8",
    "CAROUSEL_MAX_SESSION_TTL_S": "7200",
    "CAROUSEL_SWEEP_INTERVAL_S": "0.25",
    "CAROUSEL_SHUTDOWN_GRACE_S": "60",
}

# The UTF-8 cycle model's output: é (2 bytes), € (3 bytes), 😀 (4 bytes), again and again.
CYCLE_TEXT = "é€😀"
CYCLE = encode(CYCLE_TEXT)


# ------------------------------------------------------------------------- tiny models


@dataclass
class Reference:
    """One exported model version and the PyTorch model it was exported from."""

    name: str
    version: int
    variant: str
    model: LanguageModel

    def logits(self, tokens: list[int] | str) -> np.ndarray:
        """PyTorch's logits at every position, (T, V), from the zero state."""
        if isinstance(tokens, str):
            tokens = encode(tokens)
        with torch.no_grad():
            out, _ = self.model(torch.tensor([tokens], dtype=torch.long))
        return out[0].double().numpy()

    def last(self, tokens: list[int] | str) -> np.ndarray:
        return self.logits(tokens)[-1]


class References(dict):
    """(name, version) -> Reference; `refs["tinylstm"]` is the latest version."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return max((r for (n, _), r in self.items() if n == key), key=lambda r: r.version)
        return super().__getitem__(key)


def random_model(variant: str, seed: int, layers: int = 2, hidden: int = 32) -> LanguageModel:
    """Random weights, scaled up from the training init so that the state matters: with
    near-zero weights every history gives almost the same logits, and a test that mixed two
    sessions' state could pass by accident."""
    torch.manual_seed(seed)
    model = LanguageModel(ModelConfig(variant=variant, embed_dim=16, hidden_size=hidden,
                                      num_layers=layers))
    with torch.no_grad():
        model.embedding.weight.mul_(10.0)
        for name, p in model.layers.named_parameters():
            p.mul_(2.5 if "weight" in name else 1.0)
        model.head.weight.mul_(3.0)
    return model.eval()


def utf8_cycle_model() -> LanguageModel:
    """A one-layer LSTM built by hand so that greedy decoding emits the bytes of CYCLE_TEXT
    forever: a bigram machine. Forget gate shut, input and output gates open, no recurrence,
    so h depends only on the current byte; each byte of the cycle lights one hidden unit and
    the head maps that unit to the next byte. Any other byte lights nothing and the head's
    bias starts the cycle. This makes multi-byte characters split across tokens certain."""
    H = E = 16
    model = LanguageModel(ModelConfig(variant="lstm", embed_dim=E, hidden_size=H, num_layers=1))
    layer = model.layers[0]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for k, byte in enumerate(CYCLE):
            model.embedding.weight[byte, k] = 1.0
            layer.weight_ih[2 * H + k, k] = 4.0  # candidate g (PyTorch gates i, f, g, o)
            model.head.weight[CYCLE[(k + 1) % len(CYCLE)], k] = 20.0
        layer.bias_ih[:H] = 10.0  # input gate open
        layer.bias_ih[H : 2 * H] = -10.0  # forget gate shut
        layer.bias_ih[3 * H :] = 10.0  # output gate open
        model.head.bias[CYCLE[0]] = 5.0
    return model.eval()


def checkpoint(model: LanguageModel) -> dict:
    return {"model": model.state_dict(), "config": model.config.to_dict(), "metrics": {}}


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> tuple[Path, References]:
    """A model repository of tiny random models, exported by carousel.export, with their
    PyTorch originals: tinylstm (two versions, different weights), tinygru, utf8cycle."""
    from carousel.export import export_checkpoint

    repo = tmp_path_factory.mktemp("repository")
    refs = References()
    specs = [
        ("tinylstm", 1, random_model("lstm", seed=11)),
        ("tinylstm", 2, random_model("lstm", seed=12)),
        ("tinygru", 1, random_model("gru", seed=13)),
        ("utf8cycle", 1, utf8_cycle_model()),
    ]
    for name, version, model in specs:
        export_checkpoint(checkpoint(model), repo, name, version=version)
        refs[(name, version)] = Reference(name, version, model.config.variant, model)
    return repo, refs


@pytest.fixture(scope="session")
def tiny(tiny_repo) -> References:
    return tiny_repo[1]


# ------------------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `carousel serve` subprocess; its stdout and stderr go to a log file."""

    def __init__(self, name: str, log_dir: Path, env: dict[str, str]):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}-{self.port}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CAROUSEL_")}
        full_env.update({"CAROUSEL_INTRA_OP_THREADS": "1", "CAROUSEL_INTER_OP_THREADS": "1"})
        full_env.update(env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(CAROUSEL), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env=full_env, stdout=log, stderr=subprocess.STDOUT,
            )

    def log(self, lines: int = 120) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_ready(self, deadline_s: float = 120.0) -> None:
        """Poll /readyz until 200. Generous: the training run shares the two cores."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"server {self.name} exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/readyz", timeout=5, trust_env=False).status_code == 200:
                    return
            time.sleep(0.1)
        pytest.fail(f"server {self.name} not ready after {deadline_s}s:\n{self.log()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_LIVE: list[Server] = []


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Factory: start a server with these CAROUSEL_* settings, wait for /readyz, and stop it
    at the end of the session (tests that stop it themselves are fine)."""
    log_dir = tmp_path_factory.mktemp("server-logs")
    started: list[Server] = []

    def start(name: str, env: dict[str, str], wait: bool = True) -> Server:
        server = Server(name, log_dir, env)
        started.append(server)
        _LIVE.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
        _LIVE.remove(server)


@pytest.fixture(scope="session")
def server(start_server, tiny_repo) -> Server:
    """The shared server on the tiny repository, shared by most tests."""
    return start_server("tiny", {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]), **LIMITS})


@pytest.fixture(scope="session")
def bundled_server(start_server) -> Server:
    """`carousel serve` with no repository setting: the bundled models (bytelm, bytegru), for
    what a user sees (README examples, the playground's screenshot)."""
    return start_server("bundled-shared", {})


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(autouse=True)
def _dump_server_logs_on_failure(request):
    """On a failed test, print the tail of every live server's log (shown by pytest)."""
    yield
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for server in _LIVE:
            print(f"\n----- server {server.name} (port {server.port}) log tail -----")
            print(server.log(80))


# ------------------------------------------------------------------------------ clients


class Metrics:
    """A parsed /metrics page, searched by words in the metric names (the exact names are
    the service's; the tests check what they measure)."""

    def __init__(self, text: str):
        self.text = text
        self.families = list(text_string_to_metric_families(text))

    def family(self, *words: str, kind: str | None = None):
        found = [f for f in self.families
                 if all(w in f.name for w in words) and (kind is None or f.type == kind)]
        names = sorted(f.name for f in self.families)
        assert found, f"no {kind or ''} metric named with {words}; have {names}"
        return found[0]

    def total(self, *words: str, kind: str | None = None, suffix: str = "", **labels) -> float:
        """Sum of the samples of the first family matching `words` whose name ends with
        `suffix` (e.g. "_sum", "_count") and whose labels include `labels`."""
        fam = self.family(*words, kind=kind)
        return sum(
            s.value for s in fam.samples
            if s.name.endswith(suffix) and not s.name.endswith("_created")
            and all(s.labels.get(k) == v for k, v in labels.items())
        )


class Api:
    """An httpx client on one server plus the checks every test repeats."""

    def __init__(self, server: Server):
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=60, trust_env=False)

    def close(self) -> None:
        self.http.close()

    # --- raw
    def post(self, path: str, body=None, **kw) -> httpx.Response:
        if isinstance(body, str | bytes):
            return self.http.post(path, content=body,
                                  headers={"content-type": "application/json"}, **kw)
        return self.http.post(path, json=body, **kw)

    @staticmethod
    def ok(resp: httpx.Response, status: int = 200) -> dict:
        assert resp.status_code == status, f"{resp.status_code} {resp.text[:500]}"
        return resp.json() if resp.content else {}

    @staticmethod
    def expect_error(resp: httpx.Response, *statuses: int, code: str | None = None) -> dict:
        """The issue's error envelope with one of `statuses`; returns the error object."""
        assert resp.status_code in statuses, (
            f"expected {statuses}, got {resp.status_code}: {resp.text[:500]}")
        assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
        err = resp.json()["error"]
        assert isinstance(err, dict), err
        assert isinstance(err.get("code"), str) and CODE_RE.match(err["code"]), err
        assert isinstance(err.get("message"), str) and err["message"].strip(), err
        if code is not None:
            assert err["code"] == code, err
        return err

    # --- the API
    def create_session(self, model: str = "tinylstm", **fields) -> dict:
        return self.ok(self.post("/v1/sessions", {"model": model, **fields}), 201)

    def step(self, sid: str, **fields) -> dict:
        return self.ok(self.post(f"/v1/sessions/{sid}/step", fields))

    def generate(self, sid: str, **fields) -> dict:
        return self.ok(self.post(f"/v1/sessions/{sid}/generate", {**GEN, **fields}))

    def predict(self, model: str, **fields) -> dict:
        return self.ok(self.post(f"/v1/models/{model}/predict", fields))

    def session(self, sid: str) -> dict:
        return self.ok(self.http.get(f"/v1/sessions/{sid}"))

    def position(self, sid: str) -> int:
        return self.session(sid)["position"]

    def fork(self, sid: str) -> dict:
        return self.ok(self.post(f"/v1/sessions/{sid}/fork"), 201)

    def metrics(self) -> Metrics:
        resp = self.http.get("/metrics")
        assert resp.status_code == 200, resp.text[:500]
        return Metrics(resp.text)

    @contextlib.contextmanager
    def stream(self, sid: str, **fields) -> Iterator[Iterator[tuple[str, dict]]]:
        """POST /generate with stream: true; yields an iterator of (event, data) pairs."""
        body = {**GEN, **fields, "stream": True}
        with self.http.stream("POST", f"/v1/sessions/{sid}/generate", json=body) as resp:
            assert resp.status_code == 200, resp.read()[:500]
            assert resp.headers["content-type"].startswith("text/event-stream"), resp.headers
            yield sse_events(resp)

    def streamed(self, sid: str, **fields) -> tuple[list[dict], dict]:
        """A whole SSE generation: the token events and the end event's data."""
        tokens, end = [], None
        with self.stream(sid, **fields) as events:
            for event, data in events:
                assert end is None, f"event after the end event: {event} {data}"
                if event == "end":
                    end = data
                else:
                    assert event == "message", event
                    tokens.append(data)
        assert end is not None, "the stream closed without an end event"
        return tokens, end


# Sampling options every generation sends unless a test overrides them (the issue lists
# them all on /generate): sampling at temperature 1 among the 50 likeliest bytes, values
# valid under any reading of top_k (0 may mean "off" or be refused; 50 means 50 everywhere).
GEN = {"max_tokens": 16, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "seed": 1234}


@pytest.fixture(scope="session")
def api_factory():
    """Factory: an Api on any Server, closed at the end of the session."""
    clients: list[Api] = []

    def make(server: Server) -> Api:
        clients.append(Api(server))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.fixture(scope="session")
def api(server, api_factory) -> Api:
    return api_factory(server)


# ------------------------------------------------------------------------- comparisons


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max()
    return z - math.log(np.exp(z).sum())


def assert_logits(served, expected, what: str = "logits") -> None:
    served = np.asarray(served, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert served.shape == expected.shape, (what, served.shape, expected.shape)
    diff = float(np.abs(served - expected).max())
    assert diff <= TOL, f"{what}: max abs diff {diff:.3g} > {TOL}"


def assert_top_k(top_k: list[dict], expected_logits: np.ndarray, k: int = 5) -> None:
    """The served top-k are the k most likely tokens with PyTorch's log-probabilities."""
    ref = log_softmax(expected_logits)
    assert len(top_k) == k, top_k
    tokens = [t["token"] for t in top_k]
    logprobs = [t["logprob"] for t in top_k]
    assert logprobs == sorted(logprobs, reverse=True), top_k
    for entry in top_k:
        assert abs(entry["logprob"] - ref[entry["token"]]) <= TOL, (entry, ref[entry["token"]])
        if 32 <= entry["token"] < 127:
            assert entry["text"] == chr(entry["token"]), entry
    kth = np.sort(ref)[::-1][k - 1]
    assert min(ref[t] for t in tokens) >= kth - TOL, (tokens, np.argsort(ref)[::-1][:k])


def timestamp(value) -> float:
    """A served time as seconds since the epoch (epoch numbers or ISO 8601 strings)."""
    if isinstance(value, int | float):
        return float(value)
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="session")
def check():
    """The comparison helpers, for test modules (which do not import conftest)."""
    return Checks()


class Checks:
    logits = staticmethod(assert_logits)
    top_k = staticmethod(assert_top_k)
    log_softmax = staticmethod(log_softmax)
    timestamp = staticmethod(timestamp)
    GEN = GEN
    CYCLE = CYCLE
    CYCLE_TEXT = CYCLE_TEXT
    LIMITS = LIMITS
