"""Turn the suite's results into the side-by-side table, the targets, a PNG and files.

Every figure in the table is a median over the suite's repeated runs. Ratios are carousel
over the other column (for latencies a ratio below 1 means carousel is faster)."""

from __future__ import annotations

import json
from pathlib import Path

from . import profile
from .limit import best

SHARED_CORES = ("server and load generator share this machine's 2 cores (127.0.0.1); "
                "the load generator's own CPU use is reported per scenario")


LAYERS = {"floor-asgi": "floor: bare ASGI function under uvicorn",
          "floor-starlette": "floor: Starlette routes",
          "floor": "floor: FastAPI routes (the floor)",
          "naive": "naive baseline (FastAPI)", "carousel": "carousel"}


def _get(d: dict | None, *keys):
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _limit_step_us(limits: dict, batch: int) -> float | None:
    return best(limits, "decode", str(batch), "us_per_step") if limits else None


def _limit_tokens(limits: dict, batch: int) -> float | None:
    return best(limits, "decode", str(batch), "tokens_per_s") if limits else None


def rows(results: dict) -> list[dict]:
    """One row per scenario figure: carousel, naive, floor, limit."""
    limits = results.get("limit") or {}
    sc = results.get("scenarios", {})
    out = []

    def row(scenario, measure, values, limit=None, better="higher"):
        out.append({"scenario": scenario, "measure": measure, "carousel": values.get("carousel"),
                    "naive": values.get("naive"), "floor": values.get("floor"), "limit": limit,
                    "baseline": values.get("baseline"), "better": better})

    for kind, title in (("step_http", "HTTP /step"), ("step_ws", "WebSocket step"),
                        ("step_wsb", "WebSocket step, binary frames")):
        for level, per_server in sc.get(kind, {}).items():
            n = int(level)
            name = f"{title}, {n} session{'s' if n > 1 else ''}"
            step_us = _limit_step_us(limits, n)
            row(name, "tokens/s", {k: _get(v, "tokens_per_s") for k, v in per_server.items()},
                _limit_tokens(limits, n))
            for q in ("p50", "p99"):
                row(name, f"latency {q} ms",
                    {k: _get(v, "latency_ms", q) for k, v in per_server.items()},
                    step_us / 1e3 if step_us else None, better="lower")
    for level, per_server in sc.get("generate", {}).items():
        n = int(level)
        name = f"/generate SSE, {n} stream{'s' if n > 1 else ''}"
        step_us = _limit_step_us(limits, n)
        row(name, "tokens/s", {k: _get(v, "tokens_per_s") for k, v in per_server.items()},
            _limit_tokens(limits, n))
        row(name, "first token p50 ms",
            {k: _get(v, "first_token_ms", "p50") for k, v in per_server.items()}, better="lower")
        for q in ("p50", "p99"):
            row(name, f"inter-token {q} ms",
                {k: _get(v, "inter_token_ms", q) for k, v in per_server.items()},
                step_us / 1e3 if step_us else None, better="lower")
    for label, per_server in sc.get("predict", {}).items():
        shapes = results.get("predict_shapes", {}).get(label, [])
        limit = max((best(limits, "predict", s, "sequences_per_s") or 0 for s in shapes),
                    default=None) or None
        row(f"predict, {label} texts", "sequences/s",
            {k: _get(v, "sequences_per_s") for k, v in per_server.items()}, limit)
    memory = sc.get("memory", {})
    if memory:
        state = next((v.get("state_bytes") for v in memory.values() if "state_bytes" in v), None)
        row("idle sessions", "bytes per session",
            {k: _get(v, "bytes_per_session") for k, v in memory.items()}, state, better="lower")
    return out


def targets(results: dict) -> list[dict]:
    """The issue's targets, each with its figure, its threshold and whether it holds."""
    limits = results.get("limit") or {}
    sc = results.get("scenarios", {})
    out = []

    def target(name, value, threshold, holds_when, detail):
        ok = None if value is None or threshold is None else (
            value >= threshold if holds_when == ">=" else value <= threshold
            if holds_when == "<=" else value < threshold)
        out.append({"target": name, "value": value, "threshold": threshold,
                    "holds_when": holds_when, "ok": ok, "detail": detail})

    gen = _get(sc, "generate", "64", "carousel", "tokens_per_s")
    lim64 = _limit_tokens(limits, 64)
    target("generation, 64 streams: tokens/s >= 50% of limit at batch 64", gen,
           0.5 * lim64 if lim64 else None, ">=", "in-process decode at batch 64, best threads")
    same = _get(limits, "server settings", "decode", "64", "tokens_per_s")
    if same:  # for reading the above: the limit with the threads the server really uses
        target("(same, against the limit at the server's own thread settings)", gen,
               0.5 * same, ">=", "in-process decode at batch 64, server's threads")
    http = _get(sc, "step_http", "64")
    c_rps = _get(http, "carousel", "tokens_per_s")
    floor, naive = _get(http, "floor", "tokens_per_s"), _get(http, "naive", "tokens_per_s")
    target("HTTP /step, 64 sessions: >= 60% of the HTTP floor's requests/s", c_rps,
           0.6 * floor if floor else None, ">=", "floor: do-nothing endpoint, same load")
    target("HTTP /step, 64 sessions: >= 1.5x the naive baseline's tokens/s", c_rps,
           1.5 * naive if naive else None, ">=", "naive: one onnxruntime call per request")
    target("HTTP /step, 64 sessions: p99 < the naive baseline's p50",
           _get(http, "carousel", "latency_ms", "p99"), _get(http, "naive", "latency_ms", "p50"),
           "<", "milliseconds")
    ws = _get(sc, "step_ws", "64", "carousel", "tokens_per_s")
    target("WebSocket, 64 sessions: >= 2x carousel's HTTP /step", ws,
           2 * c_rps if c_rps else None, ">=", "tokens/s")
    b1 = _limit_step_us(limits, 1)
    target("single session HTTP: p50 <= in-process batch-1 step + 1.5 ms",
           _get(sc, "step_http", "1", "carousel", "latency_ms", "p50"),
           b1 / 1e3 + 1.5 if b1 else None, "<=", "milliseconds")
    mem = _get(sc, "memory", "carousel")
    target("idle sessions: bytes/session <= 1.5x state + 1 KiB", _get(mem, "bytes_per_session"),
           _get(mem, "target_bytes_per_session"), "<=", "resident memory, 0 to most sessions")
    return out


def against_limits(results: dict) -> list[dict]:
    """Issue 14's targets: carousel against the two physical limits measured in the same run
    (limit.physical), a lone stream and a single session against the naive server."""
    ph = results.get("physical") or {}
    one = _get(ph, "one_thread", "tokens_per_s")
    two = _get(ph, "two_core", "tokens_per_s")
    sc = results.get("scenarios", {})
    out = []

    def target(name, value, reference, factor, holds_when, against):
        threshold = None if reference is None else factor * reference
        ratio = None if value is None or not reference else value / reference
        ok = None if value is None or threshold is None else (
            value >= threshold if holds_when == ">=" else value <= threshold)
        out.append({"target": name, "value": value, "against": against,
                    "reference": reference, "ratio": ratio, "threshold": threshold,
                    "holds_when": holds_when, "ok": ok})

    target("HTTP /step, 64 sessions, tokens/s", _get(sc, "step_http", "64", "carousel",
           "tokens_per_s"), one, 0.5, ">=", "one-thread limit")
    target("WebSocket step, 64 sessions, tokens/s", _get(sc, "step_ws", "64", "carousel",
           "tokens_per_s"), one, 0.6, ">=", "one-thread limit")
    target("(same, binary frames)", _get(sc, "step_wsb", "64", "carousel", "tokens_per_s"),
           one, 0.6, ">=", "one-thread limit")
    target("generation, 64 streams, tokens/s", _get(sc, "generate", "64", "carousel",
           "tokens_per_s"), two, 0.85, ">=", "two-core limit")
    target("generation, 1 stream, tokens/s", _get(sc, "generate", "1", "carousel",
           "tokens_per_s"), _get(sc, "generate", "1", "naive", "tokens_per_s"), 1.5, ">=",
           "naive server")
    target("HTTP /step, 1 session, p50 ms", _get(sc, "step_http", "1", "carousel",
           "latency_ms", "p50"), _get(sc, "step_http", "1", "naive", "latency_ms", "p50"),
           1.0, "<=", "naive server")
    return out


def paired_table(results: dict) -> list[str]:
    """With --baseline: each round's carousel ÷ baseline, in the order the rounds ran."""
    paired = results.get("paired")
    if not paired:
        return []
    lines = ["", "## Round by round against the baseline", "",
             "Each round ran both servers back to back (who went first alternating); the "
             "spread of these ratios is how far apart two rounds of the same comparison are.",
             "", "| scenario | level | tokens/s ratio per round | CPU per unit ratio per round |",
             "|---|---|---|---|"]
    def col(rounds: list[dict], key: str) -> str:
        return ", ".join("–" if r[key] is None else f"{r[key]:.2f}" for r in rounds)

    for name, levels in paired.items():
        for level, rounds in levels.items():
            lines.append(f"| {name} | {level} | {col(rounds, 'tokens_per_s')} | "
                         f"{col(rounds, 'server_cpu_us_per_unit')} |")
    return lines


def limits_table(results: dict) -> list[str]:
    ph = results.get("physical")
    if not ph:
        return []
    lines = ["", "## Against the limits", "",
             f"One-thread limit: a batch-{ph['batch']} decode step on one intra-op thread, "
             f"{ph['one_thread']['us_per_step']:,.0f} µs = "
             f"**{ph['one_thread']['tokens_per_s']:,.0f} tokens/s**. Two-core limit: "
             f"{ph['two_core']['threads']} threads at once, each a batch-"
             f"{ph['batch'] // ph['two_core']['threads']} step, "
             f"{ph['two_core']['us_per_step']:,.0f} µs = "
             f"**{ph['two_core']['tokens_per_s']:,.0f} tokens/s** (onnxruntime alone, "
             "in-process, measured in this run).", "",
             "| target | carousel | against | reference | ratio | threshold | met |",
             "|---|---|---|---|---|---|---|"]
    for t in against_limits(results):
        met = {True: "yes", False: "**no**", None: "not measured"}[t["ok"]]
        ratio = "–" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {t['against']} | "
                     f"{_fmt(t['reference'])} | {ratio} | {t['holds_when']} "
                     f"{_fmt(t['threshold'])} | {met} |")
    return lines + serial_budget_table(results)


SERIAL_TARGETS = {"step_http": 0.5, "step_ws": 0.6, "step_wsb": 0.6}  # x the one-thread limit


def serial_budget(results: dict) -> list[dict]:
    """What one step costs the one interpreter lock, at 64 sessions: the event loop's CPU
    (Python nearly all of it) plus the inference threads' CPU outside onnxruntime (numpy and
    Python). Only one thread runs Python at a time, so 1 / that is about the most steps a
    second this code can serve, however the threads overlap; the target's rate says how
    small it must be."""
    one = _get(results.get("physical") or {}, "one_thread", "tokens_per_s")
    out = []
    for kind, factor in SERIAL_TARGETS.items():
        r = _get(results.get("scenarios", {}), kind, "64", "carousel") or {}
        threads, ort = r.get("server_threads_us_per_unit") or {}, r.get("onnxruntime_us_per_unit")
        if "main" not in threads or ort is None:
            continue
        loop, inference = threads["main"], sum(v for k, v in threads.items() if k != "main")
        serial = loop + max(inference - ort, 0.0)
        out.append({"scenario": kind, "tokens_per_s": r.get("tokens_per_s"), "loop_us": loop,
                    "inference_us": inference, "onnxruntime_us": ort, "serial_us": serial,
                    "ceiling_per_s": 1e6 / serial if serial else None,
                    "target_per_s": factor * one if one else None,
                    "target_serial_us": 1e6 / (factor * one) if one else None})
    return out


def serial_budget_table(results: dict) -> list[str]:
    rows_ = serial_budget(results)
    if not rows_:
        return []
    lines = ["", "Per step at 64 sessions (µs of CPU, from /proc and carousel's own timing of "
             "its onnxruntime calls): what holds the interpreter lock is the event loop's CPU "
             "plus the inference threads' CPU outside onnxruntime; 1 / that is about the most "
             "steps a second this code can serve.", "",
             "| scenario | tokens/s | event loop | inference threads | of which onnxruntime "
             "| serial (lock) | ceiling /s | measured / ceiling | target /s | serial the "
             "target allows |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in rows_:
        lines.append(
            f"| {b['scenario']} | {_fmt(b['tokens_per_s'])} | {_fmt(b['loop_us'])} | "
            f"{_fmt(b['inference_us'])} | {_fmt(b['onnxruntime_us'])} | "
            f"{_fmt(b['serial_us'])} | {_fmt(b['ceiling_per_s'])} | "
            f"{_ratio(b['tokens_per_s'], b['ceiling_per_s'])} | {_fmt(b['target_per_s'])} | "
            f"{_fmt(b['target_serial_us'])} |")
    return lines


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"
    return str(value)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float | int) and isinstance(b, float | int) and b \
        else "–"


def _correct(c: dict | None) -> str:
    if c is None:
        return "n/a"
    return f"{'yes' if c['ok'] else 'NO'} ({c['compared']}/{c['wrong']}/{c['missing']})"


def _threads(pct: dict | None) -> str:
    return ", ".join(f"{name} {v:.0f}" for name, v in (pct or {}).items()) or "–"


def health(results: dict) -> list[str]:
    """Errors, correctness, batch sizes and CPU use per scenario and server."""
    lines = ["| scenario | server | errors | correct (compared/wrong/missing) | mean batch | "
             "load CPU % | server CPU % | server threads CPU % | "
             "server CPU µs per token or sequence |", "|---|---|---|---|---|---|---|---|---|"]
    for kind, per_level in results.get("scenarios", {}).items():
        if kind == "memory":
            for server, m in per_level.items():
                lines.append(f"| memory | {server} | {m.get('errors', '–')} | "
                             f"{_correct(m.get('correct'))} | – | – | – | – |")
            continue
        for level, per_server in per_level.items():
            for server, r in per_server.items():
                correct = _correct(r.get("correct"))
                failed = f" ({r['failed_runs']} runs failed)" if r.get("failed_runs") else ""
                # CPU shares of phases shorter than a few /proc ticks mean nothing.
                cpu = r if (r.get("wall_s") or 0) >= 0.2 else {}
                lines.append(f"| {kind} {level} | {server} | {r.get('errors', '–')}{failed} | "
                             f"{correct} | {_fmt(r.get('mean_batch_size'))} | "
                             f"{_fmt(cpu.get('client_cpu_pct'))} | "
                             f"{_fmt(cpu.get('server_cpu_pct'))} | "
                             f"{_threads(cpu.get('server_threads_cpu_pct'))} | "
                             f"{_fmt(cpu.get('server_cpu_us_per_unit'))} |")
    return lines


def limit_table(limits: dict) -> list[str]:
    if not limits:
        return []
    lines = ["| threads | " + " | ".join(f"batch {b} µs/step (tok/s)" for b in
                                          next(iter(limits.values()))["decode"]) +
             " | prefill ms |", "|---" * (len(next(iter(limits.values()))["decode"]) + 2) + "|"]
    for label, r in limits.items():
        cells = [f"{_fmt(d['us_per_step'])} ({_fmt(d['tokens_per_s'])})"
                 for d in r["decode"].values()]
        lines.append(f"| {label} {r['threads']} | " + " | ".join(cells) +
                     f" | {_fmt(r['prefill']['ms'])} ({r['prefill']['length']} tokens) |")
    return lines


def markdown(results: dict) -> str:
    meta = results["meta"]
    table = rows(results)
    baseline = any(r["baseline"] is not None for r in table)  # --baseline: old code's column
    lines = [f"# carousel benchmark ({meta['plan']['name']} plan, {meta['finished_at']})", "",
             f"Model: {meta['model']}. Medians of {meta['plan']['reps']} run(s) each. "
             f"Note: {SHARED_CORES}.", "", "## Scenarios side by side", "",
             "| scenario | measure | carousel | naive | floor | limit | ÷naive | ÷floor | ÷limit |"
             + (" baseline | ÷baseline |" if baseline else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if baseline else "")]
    for r in table:
        c = r["carousel"]
        lines.append(f"| {r['scenario']} | {r['measure']} | {_fmt(c)} | {_fmt(r['naive'])} | "
                     f"{_fmt(r['floor'])} | {_fmt(r['limit'])} | {_ratio(c, r['naive'])} | "
                     f"{_ratio(c, r['floor'])} | {_ratio(c, r['limit'])} |"
                     + (f" {_fmt(r['baseline'])} | {_ratio(c, r['baseline'])} |" if baseline
                        else ""))
    lines += ["", "## Targets", "", "| target | carousel | threshold | met |", "|---|---|---|---|"]
    for t in targets(results):
        met = {True: "yes", False: "**no**", None: "not measured"}[t["ok"]]
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {t['holds_when']} "
                     f"{_fmt(t['threshold'])} | {met} |")
    lines += paired_table(results)
    lines += limits_table(results)
    lines += ["", "## In-process limit (onnxruntime alone)", "", *limit_table(results.get("limit")),
              "", "## Errors, correctness, batching, CPU", "", *health(results)]
    layers = _get(results, "scenarios", "step_http", "64") or {}
    if "floor-asgi" in layers or "floor-starlette" in layers:
        lines += ["", "## HTTP /step at 64 sessions, layer by layer", "",
                  "| server | tokens/s | p50 ms | server CPU µs per request |", "|---|---|---|---|"]
        for name, label in LAYERS.items():
            r = layers.get(name)
            if r:
                lines.append(f"| {label} | {_fmt(r.get('tokens_per_s'))} | "
                             f"{_fmt(_get(r, 'latency_ms', 'p50'))} | "
                             f"{_fmt(r.get('server_cpu_us_per_unit'))} |")
    memory = results.get("scenarios", {}).get("memory", {})
    if memory:
        lines += ["", "## Resident memory", "", "| server | " + " | ".join(
            f"{n} sessions" for n in next(iter(memory.values())).get("rss_bytes", {})) + " |"]
        lines.append("|---" * (1 + len(next(iter(memory.values())).get("rss_bytes", {}))) + "|")
        for server, m in memory.items():
            lines.append(f"| {server} | " + " | ".join(
                f"{v / 2**20:.1f} MiB" for v in m.get("rss_bytes", {}).values()) + " |")
    for name, found in results.get("profile", {}).items():
        lines += ["", profile.markdown(name, found["threads"], found["figures"])]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limits = results.get("limit") or {}
    sc = results.get("scenarios", {})
    panels = [("step_http", "HTTP /step: tokens/s", "tokens_per_s"),
              ("step_ws", "WebSocket step: tokens/s", "tokens_per_s"),
              ("generate", "/generate SSE: aggregate tokens/s", "tokens_per_s"),
              ("step_http", "HTTP /step: p50 latency (ms)", "latency_ms")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, (kind, title, key) in zip(axes.flat, panels, strict=True):
        data = sc.get(kind, {})
        levels = sorted(int(n) for n in data)
        for server, style in (("carousel", "o-"), ("baseline", "d-."), ("naive", "s--"),
                              ("floor", "^:")):
            ys = [_get(data, str(n), server, key, "p50") if key == "latency_ms"
                  else _get(data, str(n), server, key) for n in levels]
            if any(y is not None for y in ys):
                ax.plot(levels, [y if y is not None else float("nan") for y in ys], style,
                        label=server)
        lim = [(_limit_step_us(limits, n) or float("nan")) / 1e3 if key == "latency_ms"
               else _limit_tokens(limits, n) or float("nan") for n in levels]
        if levels and limits:
            ax.plot(levels, lim, "k-.", label="in-process limit")
            same = [_get(limits, "server settings", "decode", str(n), "us_per_step")
                    for n in levels]
            if all(v is not None for v in same):
                ys = [v / 1e3 if key == "latency_ms" else n / (v / 1e6)
                      for n, v in zip(levels, same, strict=True)]
                ax.plot(levels, ys, ":", color="gray", label="limit, server's threads")
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.set_yscale("log")
        ax.set_xlabel("concurrent sessions")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"carousel bench ({results['meta']['plan']['name']}): {SHARED_CORES}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {**results, "rows": rows(results), "targets": targets(results),
               "against_limits": against_limits(results),
               "serial_budget": serial_budget(results)}
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md",
             "png": out_dir / "results.png"}
    paths["json"].write_text(json.dumps(results, indent=1, default=str))
    paths["markdown"].write_text(markdown(results))
    plot(results, paths["png"])
    return paths
