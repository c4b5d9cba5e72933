"""`carousel bench` / `python -m bench`: run the suite, print the table, write the results.

Order: the in-process limit first (nothing else running), then each server in turn (floor,
naive, carousel) through the HTTP step, WebSocket, generation and predict scenarios, then
memory on fresh servers, then (with --profile) py-spy on carousel under the 64-session loads.
Only one server runs at a time; server and load generator share the machine's cores."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import fairness, limit, profile, report, scenarios, servers, store, v2
from . import plan as plans
from .graph import GraphRunner, ModelVersion, export_random_model, find_model

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("limit", "step_http", "step_ws", "step_wsb", "generate", "predict", "memory")
ONLY_CAROUSEL = {"step_wsb"}  # binary WebSocket frames: what the other servers do not speak
# Run only when asked for: v2 builds its imported model with torch (the train extra);
# fairness runs two servers with API keys of two tenants; store needs --store-url.
OPT_IN = ("v2", "fairness", "store")
SERVERS = ("floor", "naive", "carousel")
LOWER_FLOORS = ("floor-starlette", "floor-asgi")  # measured at FLOOR_LEVEL sessions only
FLOOR_LEVEL = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small counts, one run each (about 1-2 minutes)")
    parser.add_argument("--model-repository", type=Path, default=None,
                        help="model repository (default: the bundled models/)")
    parser.add_argument("--model", default="bytelm", help="model name (default: bytelm)")
    parser.add_argument("--version", type=int, default=None, help="model version (default: latest)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder ({RESULTS})")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="comma-separated subset of " + ",".join(SERVERS))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated subset of " + ",".join(SCENARIOS)
                        + " (default: all of them), or " + ",".join(OPT_IN)
                        + " (the Open Inference Protocol against v1, and an imported LSTM; "
                        "two tenants, one flooding, with and without fair share; the session "
                        "stores)")
    parser.add_argument("--store-url", default=None, metavar="redis://HOST:PORT/DB",
                        help="the Redis for the store scenario (a database of its own: it is "
                        "flushed before and after)")
    parser.add_argument("--levels", default=None,
                        help="concurrent sessions for step and generate, e.g. 1,64")
    parser.add_argument("--reps", type=int, default=None, help="runs per scenario (median)")
    parser.add_argument("--profile", action="store_true",
                        help="also sample carousel with py-spy under the 64-session loads")
    parser.add_argument("--baseline", type=Path, default=None, metavar="CHECKOUT",
                        help="another carousel checkout (say a worktree of the old main) run "
                        "as a second carousel, 'baseline', with the same settings, taking "
                        "turns with carousel run by run; the table gets its column and ratio")
    parser.add_argument("--carousel-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="extra CAROUSEL_* setting for the carousel server, repeatable")


def resolve_model(args) -> ModelVersion:
    from carousel.paths import bundled_model_repository

    repository = args.model_repository or bundled_model_repository()
    found = find_model(repository, args.model, args.version)
    if found is not None:
        return found
    if args.model_repository is not None:
        raise SystemExit(f"no model {args.model!r} (version {args.version or 'latest'}) "
                         f"in {repository}")
    log(f"{args.model} is not in {repository} yet: exporting a random-weight model of the "
        "default shape (2 x 512 LSTM) to a temporary repository; speed does not depend on "
        "the weights")
    return export_random_model(args.model)


def server_threads(carousel_env: dict) -> dict:
    """The thread settings carousel's engine will use (its Settings, with our overrides)."""
    try:
        from carousel.service.settings import Settings
    except ImportError:
        return {"intra_op_threads": 1, "inter_op_threads": 1, "inference_threads": 1,
                "spinning": False, "note": "service not importable"}
    # Our overrides as init arguments (they win over the environment, as in the server).
    settings = Settings(**{k.removeprefix("CAROUSEL_").lower(): v
                           for k, v in carousel_env.items()})
    return {"intra_op_threads": settings.intra_op_threads,
            "inter_op_threads": settings.inter_op_threads,
            "inference_threads": settings.inference_threads, "spinning": False}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def one_line(result: dict) -> str:
    if "tokens_per_s" not in result and "sequences_per_s" not in result:
        return f"FAILED {result.get('failures')}"
    rate = result.get("tokens_per_s") or result.get("sequences_per_s") or 0
    lat = result.get("latency_ms") or result.get("inter_token_ms") or {}
    correct = result.get("correct")
    verdict = "n/a" if correct is None else ("yes" if correct["ok"] else f"NO {correct}")
    batch = result.get("mean_batch_size")
    return (f"{rate:,.0f}/s  p50 {lat.get('p50', 0):.2f} ms  p99 {lat.get('p99', 0):.2f} ms  "
            f"errors {result.get('errors')}  correct {verdict}"
            + (f"  batch {batch:.1f}" if batch else "")
            + f"  load CPU {result.get('client_cpu_pct') or 0:.0f}%"
            + "".join(f"  {name} {pct:.0f}%" for name, pct in
                      (result.get("server_threads_cpu_pct") or {}).items()))


def server_loads(model, runner, chosen, plan) -> list[tuple[str, str, Callable]]:
    """(scenario, level, run(server, plan)) for every load the chosen scenarios hold."""
    loads = []
    for name in scenarios.STEP_KINDS:
        if name in chosen:
            loads += [(name, str(n), lambda server, p, n=n, name=name:
                       scenarios.steps(server, model, runner, p, n, name)) for n in plan.levels]
    if "generate" in chosen:
        loads += [("generate", str(n), lambda server, p, n=n:
                   scenarios.generate(server, model, runner, p, n)) for n in plan.gen_levels]
    if "predict" in chosen:
        loads += [("predict", case.label, lambda server, p, case=case:
                   scenarios.predict(server, model, runner, p, case)) for case in plan.predict]
    return loads


def run_server_scenarios(kind, model, runner, plan, chosen, results, out, carousel_env
                         ) -> None:
    if kind != "carousel":
        chosen = chosen - ONLY_CAROUSEL
    server = servers.start(kind, model, out / "logs", carousel_env)
    try:
        for name, level, load in server_loads(model, runner, chosen, plan):
            r = load(server, plan)
            results["scenarios"].setdefault(name, {}).setdefault(level, {})[kind] = r
            log(f"  {name:9} {level:>4} {kind:8} {one_line(r)}")
    finally:
        server.stop()


def run_paired(model, runner, plan, chosen, results, out, carousel_env, baseline) -> None:
    """carousel and the baseline checkout, both up, taking turns run by run (who goes first
    alternates), so both see the same machine: its drift over minutes falls on both alike."""
    both = {}
    try:
        for kind in ("carousel", "baseline"):
            both[kind] = servers.start(kind, model, out / "logs", carousel_env, baseline)
        one = plans.Plan(**{**plan.to_dict(), "reps": 1})
        for name, level, load in server_loads(model, runner, chosen, plan):
            runs = {"carousel": [], "baseline": []}
            turns = ("carousel",) if name in ONLY_CAROUSEL else ("carousel", "baseline")
            for rep in range(plan.reps):
                for kind in turns[:: 1 if rep % 2 == 0 else -1]:
                    runs[kind].append(load(both[kind], one))
            for kind, folded in runs.items():
                if not folded:
                    continue
                r = scenarios.fold(folded)
                results["scenarios"].setdefault(name, {}).setdefault(level, {})[kind] = r
                log(f"  {name:9} {level:>4} {kind:8} {one_line(r)}")
            if runs["baseline"]:  # each round's own ratio: how far apart the rounds are
                results.setdefault("paired", {}).setdefault(name, {})[level] = [
                    {key: _per(c, b, key) for key in PAIRED}
                    for c, b in zip(runs["carousel"], runs["baseline"], strict=True)]
    finally:
        for server in both.values():
            server.stop()


PAIRED = ("tokens_per_s", "server_cpu_us_per_unit")  # per round, carousel ÷ baseline


def _per(c: dict, b: dict, key: str) -> float | None:
    x, y = c.get(key), b.get(key)
    return x / y if isinstance(x, int | float) and isinstance(y, int | float) and y else None


def run_profiles(model, runner, plan, out, carousel_env) -> dict:
    """py-spy on carousel during one 64-session HTTP step, WebSocket step and generation
    run (not counted in the table: sampling costs the server a little)."""
    one = plans.Plan(**{**plan.to_dict(), "reps": 1, "predict": []})
    one.step_requests = max(plan.step_requests, 20_000)  # a few seconds: ~1000 samples
    one.max_steps = max(one.max_steps, 400)
    one.gen_tokens = max(one.gen_tokens, 1024)
    loads = {"step_http": lambda server: scenarios.steps(server, model, runner, one, 64),
             "step_ws": lambda server: scenarios.steps(server, model, runner, one, 64,
                                                       "step_ws"),
             "generate": lambda server: scenarios.generate(server, model, runner, one, 64)}
    found = {}
    server = servers.start("carousel", model, out / "logs", carousel_env)
    try:
        for name, load in loads.items():
            path = out / f"profile_{name}_64.txt"
            with profile.Recording(server.pid, path):
                r = load(server)
            figures = {"tokens_per_s": round(r.get("tokens_per_s") or 0),
                       "mean_batch_size": r.get("mean_batch_size"),
                       "server_threads_cpu_pct": r.get("server_threads_cpu_pct"),
                       "load_cpu_pct": r.get("client_cpu_pct")}
            found[name] = {"figures": figures, "raw": str(path),
                           "threads": profile.summarize(path, r.get("server_threads_cpu_pct"))}
            log(f"  profiled {name} 64: {one_line(r)} -> {path}")
    finally:
        server.stop()
    return found


def run(args) -> int:
    started = time.monotonic()
    plan = plans.quick() if args.quick else plans.full()
    if args.reps:
        plan.reps = args.reps
    if args.levels:
        plan.levels = plan.gen_levels = [int(n) for n in args.levels.split(",")]
    carousel_env = {"CAROUSEL_LOG_LEVEL": "warning",
                    # room for the memory scenario's sessions on top of the others'
                    "CAROUSEL_MAX_SESSIONS": str(2 * max(plan.memory_counts) + 10_000)}
    for kv in args.carousel_setting:  # NAME=VALUE or CAROUSEL_NAME=VALUE, any case
        name, _, value = kv.partition("=")
        carousel_env["CAROUSEL_" + name.upper().removeprefix("CAROUSEL_")] = value
    model = resolve_model(args)
    try:
        return measure(args, plan, model, carousel_env, started)
    finally:
        if model.random_weights:  # the stand-in's temporary repository
            shutil.rmtree(model.repository, ignore_errors=True)


def measure(args, plan: plans.Plan, model: ModelVersion, carousel_env: dict, started: float
            ) -> int:
    chosen = set(args.scenarios.split(","))
    kinds = [k for k in SERVERS if k in args.servers.split(",")]
    if args.baseline is not None:
        if not (args.baseline / "carousel" / "__main__.py").exists():
            raise SystemExit(f"--baseline {args.baseline}: not a carousel checkout")
        kinds.append("baseline")
    runner = GraphRunner(model, 1, 1)  # the correctness reference
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        log(f"warning: load average {load_before:.2f} before the run: something else is using "
            "the cores, and the figures will show it")
    log(f"carousel bench, {plan.name} plan: model {model.describe()}")
    log(f"note: {report.SHARED_CORES}")
    meta = {"plan": plan.to_dict(), "model": model.describe(),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "shared_cores": report.SHARED_CORES, "load_average_before": load_before,
            "carousel_settings": carousel_env}
    results: dict = {"meta": meta, "scenarios": {}, "predict_shapes": {
        c.label: [f"{c.batch}x{c.text_bytes}", f"{c.batch * c.clients}x{c.text_bytes}"]
        for c in plan.predict}}
    if "limit" in chosen:
        threads = {"onnxruntime default": {}, "server settings": server_threads(carousel_env)}
        shapes = sorted({(b, c.text_bytes) for c in plan.predict
                         for b in (c.batch, c.batch * c.clients)})
        batches = sorted(set(plan.limit_batches + plan.levels + plan.gen_levels))
        results["limit"] = limit.measure(model, batches, plan.prefill_length, shapes,
                                         plan.limit_budget_s, plan.limit_repeats, threads)
        results["physical"] = limit.physical(model, 64, 2, plan.limit_budget_s,
                                             plan.limit_repeats)
        ph = results["physical"]
        log(f"  one-thread limit {ph['one_thread']['tokens_per_s']:,.0f} tokens/s, two-core "
            f"limit {ph['two_core']['tokens_per_s']:,.0f} tokens/s (batch 64)")
        for label, r in results["limit"].items():
            log(f"  limit {label}: " + ", ".join(
                f"b{b} {d['us_per_step']:.0f} µs" for b, d in r["decode"].items())
                + f", prefill {r['prefill']['ms']:.1f} ms")
    for kind in kinds if chosen & {*scenarios.STEP_KINDS, "generate", "predict"} else []:
        if kind == "carousel" and args.baseline is not None:
            run_paired(model, runner, plan, chosen, results, args.out, carousel_env,
                       args.baseline)
        elif kind != "baseline":
            run_server_scenarios(kind, model, runner, plan, chosen, results, args.out,
                                 carousel_env)
    if "step_http" in chosen and "floor" in kinds:
        # What each layer of the stack costs: the floor again without FastAPI, and bare ASGI.
        for kind in LOWER_FLOORS:
            server = servers.start(kind, model, args.out / "logs", carousel_env)
            try:
                r = scenarios.steps(server, model, runner, plan, FLOOR_LEVEL)
            finally:
                server.stop()
            results["scenarios"]["step_http"].setdefault(str(FLOOR_LEVEL), {})[kind] = r
            log(f"  step_http {FLOOR_LEVEL:4} {kind:8} {one_line(r)}")
    if "memory" in chosen:
        for kind in (k for k in kinds if k != "floor"):
            server = servers.start(kind, model, args.out / "logs", carousel_env, args.baseline)
            try:
                m = scenarios.memory(server, model, runner, plan)
            finally:
                server.stop()
            results["scenarios"].setdefault("memory", {})[kind] = m
            log(f"  memory {kind}: {m.get('bytes_per_session', 0):,.0f} B/session "
                f"(state {model.state_bytes} B), rss {m.get('rss_bytes')}")
    if args.profile and "carousel" in kinds:
        results["profile"] = run_profiles(model, runner, plan, args.out, carousel_env)
    v2_wrong = fair_wrong = False
    if "v2" in chosen:
        steps = 40 if args.quick else 200
        result = v2.run(model, args.out / "logs", steps, plan.reps, carousel_env)
        results["v2"] = write_opt_in(args.out, "v2", result, v2.markdown(result))
        v2_wrong = any(r["errors"] for runs in result["runs"].values() for r in runs)
    if "fairness" in chosen:
        steps = 100 if args.quick else 300
        result = fairness.run(model, args.out / "logs", steps, plan.reps, carousel_env)
        results["fairness"] = write_opt_in(args.out, "fairness", result,
                                           fairness.markdown(result))
        fair_wrong = not result["correct"]["ok"]
    if "store" in chosen:
        if not args.store_url:
            raise SystemExit("the store scenario needs --store-url redis://HOST:PORT/DB")
        results["store"] = store.run(model, runner, plan, args.out, carousel_env,
                                     args.store_url)
    results["meta"]["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    paths = report.write(results, args.out)
    print(paths["markdown"].read_text())
    log(f"wrote {', '.join(str(p) for p in paths.values())} in {results['meta']['duration_s']} s")
    checks = [m.get("correct") for m in results["scenarios"].get("memory", {}).values()]
    checks += [r.get("correct") for kind, per_level in results["scenarios"].items()
               if kind != "memory" for per_server in per_level.values()
               for r in per_server.values()]
    checks += [r.get("correct") for found in results.get("store", {}).get("configs", {}).values()
               for r in found.values()]
    wrong = [c for c in checks if c and not c["ok"]]
    # Benchmarks assert nothing about time, but a wrong answer is a failure.
    return 1 if wrong or v2_wrong or fair_wrong else 0


def write_opt_in(out: Path, name: str, result: dict, markdown: str) -> dict:
    """An opt-in scenario's own files (NAME.json, every run; NAME.md); its summary, without
    the runs, for results.json."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
    log(f"{name}:\n{markdown}")
    return {k: v for k, v in result.items() if k != "runs"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
