"""Scenarios 3-7 against one running server: build the load spec, run the load process,
check every answer against the in-process reference, fold repeated runs into medians."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from .graph import GraphRunner, ModelVersion
from .plan import Plan, PredictCase, session_sequences, window
from .procfs import rss_bytes
from .reference import (
    Check,
    check_generations,
    check_predictions,
    check_steps,
    check_top1,
    step_logprobs,
)
from .servers import PACKAGE, Server

MEMORY_PRIME = [32]  # each idle session consumed one token: it holds real state
MEMORY_STEP = 101  # the check's step on a sample of them
MEMORY_SAMPLE = 64
MIN_CPU_WALL_S = 0.2


def run_load(spec: dict) -> dict:
    """One load-generator process; its JSON result, or {"failed": why}."""
    try:
        done = subprocess.run([sys.executable, "-m", f"{PACKAGE}.load"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=spec["deadline_s"] + 120)
    except subprocess.TimeoutExpired:
        return {"failed": "load generator timed out"}
    if done.returncode != 0:
        return {"failed": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    return json.loads(done.stdout)


def metric_totals(text: str) -> dict[str, float]:
    """Prometheus text → each sample name summed over its labels."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return totals


def metric_deltas(result: dict) -> dict[str, float]:
    """How much each carousel metric (summed over its labels) grew over the measured phase."""
    if "metrics_after" not in result:
        return {}
    before, after = metric_totals(result["metrics_before"]), metric_totals(result["metrics_after"])
    return {name: value - before.get(name, 0.0) for name, value in after.items()}


def mean_batch_size(deltas: dict[str, float]) -> float | None:
    """Δsum / Δcount of carousel's batch-size histogram(s) over the measured phase."""
    sums = [n for n in deltas if "batch_size" in n and n.endswith("_sum")]
    count = sum(deltas.get(n[:-4] + "_count", 0.0) for n in sums)
    return sum(deltas[n] for n in sums) / count if count else None


def base_spec(server: Server, model: ModelVersion, plan: Plan, kind: str) -> dict:
    return {"kind": kind, "host": "127.0.0.1", "port": server.port, "model": model.name,
            "server_pid": server.pid, "metrics_path": server.metrics_path,
            "deadline_s": plan.deadline_s}


def summarize(result: dict, work: float, unit: str) -> dict:
    """The figures of one run: `work` units done over the measured wall time."""
    if "failed" in result:
        return {"failed": result["failed"]}
    wall = result["wall_s"]
    # /proc counts CPU in 10 ms ticks: over a shorter phase a CPU share means nothing.
    timed = wall >= MIN_CPU_WALL_S
    deltas = metric_deltas(result)
    out = {unit: work / wall if wall > 0 else 0.0, "wall_s": wall, "errors": result["errors"],
           "error_samples": result["error_samples"],
           "client_cpu_pct": 100 * result["client_cpu_s"] / wall if timed else None,
           "server_cpu_pct": 100 * result.get("server_cpu_s", 0) / wall if timed else None,
           "mean_batch_size": mean_batch_size(deltas),
           # CPU per unit of work is what contention changes least: the cost of one request.
           "server_cpu_us_per_unit": (1e6 * result.get("server_cpu_s", 0) / work
                                      if work and timed else None),
           "client_cpu_us_per_unit": 1e6 * result["client_cpu_s"] / work if work else None,
           # Per server thread: is the event loop (main) or the inference worker saturated?
           "server_threads_cpu_pct": {name: 100 * cpu / wall for name, cpu in
                                      result.get("server_threads_cpu_s", {}).items()
                                      if timed and cpu / wall > 0.01},
           # The per-step budget: each thread's CPU, and onnxruntime's share of the inference
           # threads' (carousel's own timing of its calls, wall time on one intra-op thread).
           "server_threads_us_per_unit": {name: 1e6 * cpu / work for name, cpu in
                                          result.get("server_threads_cpu_s", {}).items()
                                          if timed and work and cpu / wall > 0.01}}
    inference_s = deltas.get("carousel_inference_duration_seconds_sum")
    if inference_s is not None and work:
        out["onnxruntime_us_per_unit"] = 1e6 * inference_s / work
    for key in ("latency_s", "first_token_s", "inter_token_s"):
        if result.get(key):
            out[key[:-2] + "_ms"] = {q: result[key][q] * 1e3 for q in ("p50", "p95", "p99",
                                                                        "mean")}
    return out


def median_of(runs: list[dict], check: Check | None) -> dict:
    """Medians over repeated runs of every figure; errors added up; one correctness tally."""
    good = [r for r in runs if "failed" not in r]
    out: dict = {"runs": len(runs), "failed_runs": len(runs) - len(good)}
    if len(good) < len(runs):
        out["failures"] = [r["failed"] for r in runs if "failed" in r]
    if check is not None:
        out["correct"] = check.to_dict()
    if not good:
        return out
    out["errors"] = sum(r["errors"] for r in good)
    out["error_samples"] = [s for r in good for s in r["error_samples"]][:5]
    keys = dict.fromkeys(k for r in good for k in r if k not in ("errors", "error_samples"))
    for key in keys:
        values = [r[key] for r in good if r.get(key) is not None]
        if values and isinstance(values[0], dict):
            out[key] = {q: statistics.median(v[q] for v in values if q in v) for q in values[0]}
        elif values and isinstance(values[0], int | float):
            out[key] = statistics.median(values)
        else:
            out[key] = None
    return out


def fold(results: list[dict]) -> dict:
    """Single runs' results (each a `repeat` of one run) as one: the medians of their figures,
    their errors and correctness tallies added up."""
    bookkeeping = ("runs", "failed_runs", "failures", "correct")
    raw = [{"failed": r["failures"][0]} if r.get("failed_runs") else
           {k: v for k, v in r.items() if k not in bookkeeping} for r in results]
    out = median_of(raw, None)
    checks = [r["correct"] for r in results if r.get("correct") is not None]
    if checks:
        total = Check(sum(c["compared"] for c in checks), sum(c["wrong"] for c in checks),
                      sum(c["missing"] for c in checks),
                      [t for c in checks for t in c["samples"]][:5])
        out["correct"] = total.to_dict()
    return out


def repeat(plan: Plan, once: Callable[[Check | None], dict], checked: bool) -> dict:
    check = Check() if checked else None
    return median_of([once(check) for _ in range(plan.reps)], check)


def merge(total: Check, part: Check) -> None:
    total.compared += part.compared
    total.wrong += part.wrong
    total.missing += part.missing
    total.samples += part.samples[: 5 - len(total.samples)]


STEP_KINDS = ("step_http", "step_ws", "step_wsb")  # POST /step, JSON frames, binary frames


def steps(server: Server, model: ModelVersion, runner: GraphRunner, plan: Plan, sessions: int,
          kind: str = "step_http") -> dict:
    """Scenarios 3 and 4: `sessions` sessions each step their own text, one token a request,
    over `kind`, one of STEP_KINDS."""
    timed = plan.steps_per_session(sessions)
    sequences = session_sequences(sessions, plan.warmup + timed)
    spec = {**base_spec(server, model, plan, kind),
            "sequences": sequences, "warmup": plan.warmup, "top_k": 1}

    def once(check: Check | None) -> dict:
        result = run_load(spec)
        if check is not None and "failed" not in result:
            merge(check, check_steps(runner, sequences, result["answers"]))
        return summarize(result, result.get("requests", 0), "tokens_per_s")

    out = repeat(plan, once, checked=not server.kind.startswith("floor"))
    out["steps_per_session"] = timed
    return out


def generate(server: Server, model: ModelVersion, runner: GraphRunner, plan: Plan,
             sessions: int) -> dict:
    """Scenario 5: `sessions` primed sessions each stream `gen_tokens` greedy tokens."""
    primes = [window(53 * s + 11, plan.prime_bytes) for s in range(sessions)]
    spec = {**base_spec(server, model, plan, "generate"), "primes": primes,
            "max_tokens": plan.gen_tokens, "warmup_tokens": plan.gen_warmup}

    def once(check: Check | None) -> dict:
        result = run_load(spec)
        if check is not None and "failed" not in result:
            merge(check, check_generations(runner, primes, plan.gen_warmup + plan.gen_tokens,
                                               result["answers"]))
        return summarize(result, result.get("tokens", 0), "tokens_per_s")

    return repeat(plan, once, checked=not server.kind.startswith("floor"))


def predict(server: Server, model: ModelVersion, runner: GraphRunner, plan: Plan,
            case: PredictCase) -> dict:
    """Scenario 6: `clients` clients each send batches of `batch` texts of `text_bytes`."""
    batches = [[window(101 * (c * case.batch + i), case.text_bytes) for i in range(case.batch)]
               for c in range(case.clients)]
    spec = {**base_spec(server, model, plan, "predict"), "batches": batches,
            "clients": case.clients, "requests": case.requests}

    def once(check: Check | None) -> dict:
        result = run_load(spec)
        if check is not None and "failed" not in result:
            for c, answers in enumerate(result["answers"]):
                merge(check, check_predictions(runner, batches[c], answers or [None] * case.batch))
        return summarize(result, result.get("sequences", 0), "sequences_per_s")

    return repeat(plan, once, checked=not server.kind.startswith("floor"))


def memory(server: Server, model: ModelVersion, runner: GraphRunner, plan: Plan) -> dict:
    """Scenario 7: resident memory of a fresh server with 0 and then more idle sessions,
    each primed with one token (so it holds real state); then a sample of them is stepped
    once and must answer as the reference does (the idle sessions really kept their state)."""
    create = {**base_spec(server, model, plan, "create"), "metrics_path": None,
              "prime": MEMORY_PRIME}
    warm = run_load({**create, "clients": 1, "count": 1})  # onnxruntime's arenas, the routes
    time.sleep(0.5)
    points = {"0": rss_bytes(server.pid)}
    created, errors, have, sample = 0, warm.get("errors", 0), 0, []
    for target in plan.memory_counts:
        result = run_load({**create, "clients": plan.memory_clients, "count": target - have,
                           "keep": MEMORY_SAMPLE // len(plan.memory_counts)})
        if "failed" in result:
            return {"failed": result["failed"], "rss_bytes": points}
        created += result["created"]
        errors += result["errors"]
        sample += result["session_ids"]
        have = target
        time.sleep(0.5)  # let the allocator settle before reading RSS
        points[str(target)] = rss_bytes(server.pid)
    top = plan.memory_counts[-1]
    check = Check()
    stepped = run_load({**base_spec(server, model, plan, "step_http"), "session_ids": sample,
                        "sequences": [[MEMORY_STEP]] * len(sample), "warmup": 0, "top_k": 1})
    if "failed" in stepped:
        check.missing += len(sample)
    else:
        expected = step_logprobs(runner, [MEMORY_PRIME + [MEMORY_STEP]])[0][-1]
        for s, answers in enumerate(stepped["answers"]):
            check_top1(check, f"idle session {s}", answers[0] if answers else None, expected)
    return {"rss_bytes": points, "created": created, "errors": errors + stepped.get("errors", 0),
            "bytes_per_session": (points[str(top)] - points["0"]) / top,
            "state_bytes": model.state_bytes, "correct": check.to_dict(),
            "target_bytes_per_session": 1.5 * model.state_bytes + 1024}
