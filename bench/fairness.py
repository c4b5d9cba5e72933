"""`carousel bench --scenarios fairness`: fair share across tenants, and the same server
without it, in one run.

Two carousel servers with the same two tenants' API keys, one with fair share (the
default) and one with `CAROUSEL_FAIR_SHARE=false` (one queue, oldest first), measured in
turns (the machine is shared: interleaved runs see the same conditions). On each, per run:

1. alone: tenant B's 16 sessions each step their own text, one token per request, a closed
   loop (each waits for its answer): B's steps/s and latency percentiles;
2. sessions flood (the issue's): the same, while tenant A's 48 sessions step as fast as
   they can from the same moment until B's last answer;
3. predict flood: the same, while tenant A's 8 clients each send 64-input predictions
   (one token each) as fast as they can: A keeps hundreds of rows queued, 10x B's.

For each flood: B's figures, A's steps (or predicted inputs) per second over B's window,
and the issue's targets: B's p99 within 1.5x of its p99 alone, B's throughput at least 80%
of alone. Each run's ratios are against the alone run just before it on the same server;
the table shows medians over the runs.

Every answer, A's and B's, is checked against onnxruntime run in this process on the same
graph (reference.py). The load runs in this process on uvloop with the raw client
(client.py), one connection per session or predict client.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

from .client import Connection
from .graph import GraphRunner, ModelVersion
from .load import FAILURES, percentiles
from .plan import window
from .reference import Check, check_top1, step_logprobs
from .servers import start

KEYS = {"tenant-a": "bench-key-for-tenant-a", "tenant-b": "bench-key-for-tenant-b"}
A_SESSIONS, B_SESSIONS = 48, 16
A_PREDICT_CLIENTS, PREDICT_INPUTS = 8, 64
WARMUP = 4  # untimed requests per client before the start barrier
A_BUDGET = 8  # A's clients may send this many times B's steps (they stop when B ends)
TARGET_P99, TARGET_THROUGHPUT = 1.5, 0.8
SCHEDULERS = {"fair share": {}, "oldest first": {"CAROUSEL_FAIR_SHARE": "false"}}
FLOODS = ("sessions", "predict")
REFUSED = "refused"  # the answer of a prediction the server refused (nothing to check)


@dataclass
class Client:
    """One session (or predict client) of one tenant: what it sends, what it was told, when."""

    tenant: str
    tokens: list[int]  # one per request (a session's step, or every input of a prediction)
    predict: bool = False
    answers: list = field(default_factory=list)  # per request: [token, logprob] (a list of
    # them for a prediction), None if it failed
    latencies: list[float] = field(default_factory=list)  # timed requests only (seconds)
    answered: list[float] = field(default_factory=list)  # when each timed one was answered
    errors: list[str] = field(default_factory=list)
    refused: int = 0  # predictions answered 429 or 503 (sent again at once, as a flood does)

    def top1(self, payload: dict):
        if self.predict:
            return [_best(o) for o in payload["outputs"]]
        return _best(payload)


def _best(answer: dict) -> list:
    best = answer["top_k"][0]
    return [best["token"], best["logprob"]]


async def _client(port: int, model: str, client: Client, start: asyncio.Barrier,
                  stop: asyncio.Event | None) -> None:
    """Send WARMUP requests, wait at the barrier, then the rest (until `stop`, if given)."""
    conn = Connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {KEYS[client.tenant]}\r\n".encode()
    arrived = False
    try:
        if client.predict:
            path = f"/v1/models/{model}/predict"
        else:
            status, raw, _ = await conn.request_with_headers(
                "POST", "/v1/sessions", json.dumps({"model": model}).encode(), auth)
            if status != 201:
                raise RuntimeError(f"create session: {status} {raw[:200]!r}")
            path = f"/v1/sessions/{json.loads(raw)['session_id']}/step"
        for k, token in enumerate(client.tokens):
            if k == WARMUP:
                arrived = True
                await start.wait()
            if stop is not None and stop.is_set():
                break
            if client.predict:  # every input is the same token: one answer to check
                body = json.dumps({"inputs": [{"tokens": [token]}] * PREDICT_INPUTS,
                                   "top_k": 1}).encode()
            else:
                body = b'{"tokens": [%d], "top_k": 1}' % token
            t0 = time.perf_counter()
            try:
                status, raw, _ = await conn.request_with_headers("POST", path, body, auth)
                elapsed = time.perf_counter() - t0
                if client.predict and status in (429, 503):  # its share of the queue is full
                    client.refused += 1
                    client.answers.append(REFUSED)
                    continue
                if status != 200:
                    raise RuntimeError(f"{status} {raw[:200]!r}")
                client.answers.append(client.top1(json.loads(raw)))
                if k >= WARMUP:
                    client.latencies.append(elapsed)
                    client.answered.append(t0 + elapsed)
            except FAILURES as e:
                client.errors.append(f"request {k}: {e!r}"[:300])
                client.answers.append(None)
                break  # a session's position is unknown now: its later answers would be too
    finally:
        conn.close()
        if not arrived:  # one that failed early still arrives, or the others wait forever
            await start.wait()


def _clients(tenant: str, n: int, offset: int, requests: int, predict: bool = False
             ) -> list[Client]:
    return [Client(tenant, window(offset + 37 * s, requests), predict) for s in range(n)]


async def _load(port: int, model: str, steps: int, flood: str | None, rep: int) -> dict:
    """One run: B's sessions, and A flooding, from one barrier; B's figures, A's rate."""
    b = _clients("tenant-b", B_SESSIONS, 1000 * rep, WARMUP + steps)
    budget = WARMUP + A_BUDGET * steps
    a = {None: [], "sessions": _clients("tenant-a", A_SESSIONS, 1000 * rep + 500, budget),
         "predict": _clients("tenant-a", A_PREDICT_CLIENTS, 1000 * rep + 500, budget,
                             predict=True)}[flood]
    start = asyncio.Barrier(len(a) + len(b) + 1)
    b_done = asyncio.Event()
    tasks_b = [asyncio.create_task(_client(port, model, c, start, None)) for c in b]
    tasks_a = [asyncio.create_task(_client(port, model, c, start, b_done)) for c in a]
    await start.wait()
    t0 = time.perf_counter()
    await asyncio.gather(*tasks_b)
    b_end = max((t for c in b for t in c.answered), default=t0)
    b_done.set()
    await asyncio.gather(*tasks_a)
    span = b_end - t0
    b_lat = percentiles([x for c in b for x in c.latencies])
    # A's rows answered inside B's window (a request in flight at its end is not counted).
    rows = PREDICT_INPUTS if flood == "predict" else 1
    a_rows = rows * sum(1 for c in a for t in c.answered if t <= b_end)
    b_steps = sum(len(c.latencies) for c in b)
    return {
        "b_steps_per_s": b_steps / span if span else 0.0,
        "b_p50_ms": 1e3 * b_lat.get("p50", 0.0), "b_p99_ms": 1e3 * b_lat.get("p99", 0.0),
        "a_rows_per_s": a_rows / span if span else 0.0,
        "a_outlasted_b": all(len(c.answers) < len(c.tokens) for c in a),
        "a_refused": sum(c.refused for c in a),
        "window_s": span,
        "errors": sum(len(c.errors) for c in a + b),
        "b_errors": sum(len(c.errors) for c in b),
        "error_samples": [e for c in a + b for e in c.errors][:5],
        "clients": a + b,
    }


def _check(runner: GraphRunner, clients: list[Client], check: Check) -> None:
    """Every answer against the reference: a session's after its own text up to that step,
    a prediction's after its one token from the zero state."""
    sessions = [c for c in clients if not c.predict]
    consumed = [c.tokens[: len(c.answers)] for c in sessions]
    for c, expected in zip(sessions, step_logprobs(runner, consumed), strict=True):
        for k, answer in enumerate(c.answers):
            check_top1(check, f"{c.tenant} step {k}", answer, expected[k])
    predictors = [c for c in clients if c.predict]
    if predictors:
        tokens = sorted({t for c in predictors for t in c.tokens})
        alone = dict(zip(tokens, step_logprobs(runner, [[t] for t in tokens]), strict=True))
        for c in predictors:
            for k, answers in enumerate(c.answers):
                if answers == REFUSED:
                    continue
                for i, answer in enumerate(answers or [None] * PREDICT_INPUTS):
                    check_top1(check, f"{c.tenant} predict {k} input {i}", answer,
                               alone[c.tokens[k]][0])


def run(model: ModelVersion, log_dir, steps: int, reps: int, carousel_env: dict) -> dict:
    keys = ",".join(f"{tenant}:{key}" for tenant, key in KEYS.items())
    env = {**carousel_env, "CAROUSEL_API_KEYS": keys}
    servers = {}
    try:
        for name, extra in SCHEDULERS.items():
            servers[name] = start("carousel", model, log_dir, {**env, **extra})
        runner = GraphRunner(model, 1, 1)
        return _measure({n: s.port for n, s in servers.items()}, model.name, runner, steps,
                        reps)
    finally:
        for server in servers.values():
            server.stop()


def _measure(ports: dict[str, int], model: str, runner: GraphRunner, steps: int,
             reps: int) -> dict:
    try:
        import uvloop

        run_loop = uvloop.run
    except ImportError:
        run_loop = asyncio.run
    runs: dict[str, list[dict]] = {name: [] for name in ports}
    check = Check()
    for rep in range(reps):
        # Alternate which scheduler goes first, so a drift in the machine's load is shared.
        order = list(ports) if rep % 2 == 0 else list(reversed(ports))
        for name in order:
            run = {"alone": run_loop(_load(ports[name], model, steps, None, 3 * rep))}
            for i, flood in enumerate(FLOODS):
                run[flood] = run_loop(_load(ports[name], model, steps, flood, 3 * rep + 1 + i))
            for part in run.values():
                _check(runner, part.pop("clients"), check)
            for flood in FLOODS:
                run[flood]["p99_ratio"] = run[flood]["b_p99_ms"] / run["alone"]["b_p99_ms"]
                run[flood]["throughput_ratio"] = (run[flood]["b_steps_per_s"]
                                                  / run["alone"]["b_steps_per_s"])
            runs[name].append(run)
    return {"sessions": {"A": A_SESSIONS, "B": B_SESSIONS},
            "predict": {"clients": A_PREDICT_CLIENTS, "inputs": PREDICT_INPUTS},
            "steps_per_b_session": steps, "reps": reps,
            "targets": {"p99_ratio": TARGET_P99, "throughput_ratio": TARGET_THROUGHPUT},
            **{name: _summary(rs) for name, rs in runs.items()},
            "correct": check.to_dict(), "runs": runs}


def _summary(runs: list[dict]) -> dict:
    """Medians over one scheduler's runs, and whether they meet the targets."""

    def med(part: str, key: str) -> float:
        return statistics.median(r[part][key] for r in runs)

    out: dict = {"alone": {k: med("alone", k)
                           for k in ("b_steps_per_s", "b_p50_ms", "b_p99_ms")}}
    for flood in FLOODS:
        out[flood] = {k: med(flood, k) for k in (
            "b_steps_per_s", "b_p50_ms", "b_p99_ms", "a_rows_per_s", "p99_ratio",
            "throughput_ratio")}
        out[flood]["a_outlasted_b"] = all(r[flood]["a_outlasted_b"] for r in runs)
        out[flood]["a_refused"] = sum(r[flood]["a_refused"] for r in runs)
        out[flood]["b_errors"] = sum(r[flood]["b_errors"] for r in runs)
        out[flood]["met"] = {"p99": out[flood]["p99_ratio"] <= TARGET_P99,
                             "throughput": out[flood]["throughput_ratio"] >= TARGET_THROUGHPUT}
    out["errors"] = sum(part["errors"] for r in runs for part in r.values())
    return out


def markdown(result: dict) -> str:
    met = {True: "", False: " (not met)"}
    lines = ["| A floods with | scheduler | B alone: steps/s, p50 / p99 ms | B meanwhile: "
             "steps/s, p50 / p99 ms | A's rows/s meanwhile | B's p99 ratio (target <= 1.5x) "
             "| B's throughput (target >= 80%) | B's errors / A's refused |",
             "|---|---|---|---|---|---|---|---|"]
    label = {"sessions": f"{A_SESSIONS} sessions stepping",
             "predict": f"{A_PREDICT_CLIENTS} clients predicting {PREDICT_INPUTS} inputs"}
    for flood in FLOODS:
        for name in SCHEDULERS:
            alone, r = result[name]["alone"], result[name][flood]
            lines.append(
                f"| {label[flood]} | {name} | {alone['b_steps_per_s']:,.0f}, "
                f"{alone['b_p50_ms']:.2f} / {alone['b_p99_ms']:.2f} | "
                f"{r['b_steps_per_s']:,.0f}, {r['b_p50_ms']:.2f} / {r['b_p99_ms']:.2f} | "
                f"{r['a_rows_per_s']:,.0f} | **{r['p99_ratio']:.2f}x**{met[r['met']['p99']]} | "
                f"**{100 * r['throughput_ratio']:.0f}%**{met[r['met']['throughput']]} | "
                f"{r['b_errors']} / {r['a_refused']} |")
    c = result["correct"]
    errors = sum(result[name]["errors"] for name in SCHEDULERS)
    lines.append("")
    lines.append(f"B: {B_SESSIONS} sessions x {result['steps_per_b_session']} timed steps; "
                 f"medians of {result['reps']} runs each; errors: {errors}; answers checked "
                 f"against onnxruntime: {c['compared']:,} compared, {c['wrong']} wrong, "
                 f"{c['missing']} missing.")
    return "\n".join(lines) + "\n"
