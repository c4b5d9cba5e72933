"""The store dimension: carousel on the Redis store against the memory store, failover
between two replicas, and what an idle session costs Redis.

`carousel bench --scenarios store --store-url redis://127.0.0.1:6379/14` (the database is
the bench's own: flushed before and after). Three servers in turn, one replica each on the
same Redis, every answer checked against the in-process reference as in the main suite:

- memory: the default store;
- redis: every step reads its session from Redis first (`CAROUSEL_STORE_CACHE_SESSIONS=0`);
- redis + cache: the replica keeps the rows it used (the default); with one replica every
  session is routed to it (session-affine), so a step is one write, no read.

Each runs the 64-session HTTP /step and the 64-stream generation of the main suite; the
CPU each process spent per token (carousel, redis-server, the load generator) says where
the time goes. Then failover: two replicas, sessions stepping with positions on one, which
is SIGKILLed; the clients retry on the other (steps: at once; a session that was generating
holds a lease, so it waits for that to expire); the time to the first applied retry and the
steps lost. Then memory: Redis' `used_memory` with N idle one-token sessions, per session,
against the state's own size.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time
from pathlib import Path
from urllib.parse import urlsplit

from . import scenarios, servers
from .client import Connection
from .graph import GraphRunner, ModelVersion
from .plan import Plan, window
from .procfs import process_cpu_s

CONFIGS = [("memory", {}), ("redis", {"CAROUSEL_STORE_CACHE_SESSIONS": "0"}),
           ("redis + cache", {})]
SESSIONS = 64
FAILOVER_SESSIONS, FAILOVER_GENERATING = 32, 4
MEMORY_SESSIONS = 2000


def log(text: str) -> None:
    import sys

    print(text, file=sys.stderr, flush=True)


def _redis(url: str):
    import redis

    return redis.Redis.from_url(url)


def _redis_pid(url: str) -> int | None:
    with _redis(url) as r:
        return int(r.info("server")["process_id"])


def _cpu(pid: int | None) -> float:
    try:
        return process_cpu_s(pid) if pid else 0.0
    except OSError:  # a Redis in a container or elsewhere: not ours to read
        return 0.0


def run(model: ModelVersion, runner: GraphRunner, plan: Plan, out: Path, carousel_env: dict,
        store_url: str) -> dict:
    host = urlsplit(store_url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the store bench talks to a Redis on this machine only")
    with _redis(store_url) as r:
        r.flushdb()
    redis_pid = _redis_pid(store_url)
    results: dict = {"store_url": store_url, "configs": {}, "rounds": plan.reps}
    one = Plan(**{**plan.to_dict(), "reps": 1, "predict": []})
    runs: dict[str, list[dict]] = {name: [] for name, _ in CONFIGS}
    try:
        # Rounds of every configuration in turn, so that a machine whose load drifts (other
        # work shares the cores) weighs on all of them alike; ratios are taken per round.
        for _ in range(plan.reps):
            for name, extra in CONFIGS:
                env = {**carousel_env, **extra}
                if name != "memory":
                    env["CAROUSEL_STORE_URL"] = store_url
                runs[name].append(measure_config(model, runner, one, out, env, redis_pid,
                                                 name))
                with _redis(store_url) as r:
                    r.flushdb()
        for name, found in runs.items():
            results["configs"][name] = {sc: scenarios.median_of([f[sc] for f in found], None)
                                        for sc in found[0]}
            for sc in found[0]:
                results["configs"][name][sc]["correct"] = {
                    "ok": all(f[sc].get("correct", {}).get("ok") for f in found)}
        results["failover"] = failover(model, out, {**carousel_env,
                                                    "CAROUSEL_STORE_URL": store_url})
        with _redis(store_url) as r:
            r.flushdb()
        results["memory"] = redis_memory(model, plan, out, {**carousel_env,
                                                             "CAROUSEL_STORE_URL": store_url},
                                         store_url)
    finally:
        with _redis(store_url) as r:
            r.flushdb()
    results["ratios"] = ratios(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "store.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "store.md").write_text(markdown(results))
    log(markdown(results))
    return results


def measure_config(model, runner, plan, out, env, redis_pid, name) -> dict:
    server = servers.start("carousel", model, out / "logs", env)
    found = {}
    try:
        for scenario, load in (
                ("step_http", lambda: scenarios.steps(server, model, runner, plan, SESSIONS)),
                ("generate", lambda: scenarios.generate(server, model, runner, plan,
                                                        SESSIONS))):
            before, t0 = _cpu(redis_pid), time.monotonic()
            r = load()
            # Redis' CPU over the whole scenario (all its runs), per token of all its runs.
            wall = time.monotonic() - t0
            tokens = (r.get("tokens_per_s") or 0) * (r.get("wall_s") or 0) * r.get("runs", 1)
            redis_cpu = _cpu(redis_pid) - before
            r["redis_cpu_us_per_unit"] = (1e6 * redis_cpu / tokens if tokens and
                                          name != "memory" else None)
            r["redis_cpu_pct"] = 100 * redis_cpu / wall if name != "memory" else None
            found[scenario] = r
            lat = r.get("latency_ms") or r.get("inter_token_ms") or {}
            log(f"  store {name:14} {scenario:9} {r.get('tokens_per_s', 0):,.0f} tokens/s  "
                f"p99 {lat.get('p99', 0):.2f} ms  errors {r.get('errors')}  "
                f"correct {r.get('correct', {}).get('ok')}")
    finally:
        server.stop()
    return found


def ratios(runs: dict[str, list[dict]]) -> dict:
    """Each Redis configuration against the memory store, tokens/s and p99 latency: the
    median over rounds of each round's ratio."""
    base = runs["memory"]
    out = {}
    for name, found in runs.items():
        if name == "memory":
            continue
        out[name] = {}
        for scenario in found[0]:
            key = "latency_ms" if scenario == "step_http" else "inter_token_ms"
            rate, p99 = [], []
            for r, b in zip((f[scenario] for f in found), (f[scenario] for f in base),
                            strict=True):
                rate.append(r.get("tokens_per_s", 0) / (b.get("tokens_per_s") or 1))
                p99.append((r.get(key) or {}).get("p99", 0) / ((b.get(key) or {}).get("p99")
                                                              or 1))
            out[name][scenario] = {"tokens_per_s": statistics.median(rate),
                                   "p99": statistics.median(p99), "rounds": len(rate)}
    return out


# ---------------------------------------------------------------------------- failover


async def _step(conn: Connection, sid: str, token: int, position: int) -> int:
    body = json.dumps({"tokens": [token], "position": position, "top_k": 1}).encode()
    status, raw = await conn.request("POST", f"/v1/sessions/{sid}/step", body)
    if status == 200:
        return json.loads(raw)["position"]
    if status == 409:
        return -json.loads(raw)["error"]["position"] - 1  # the real position, marked
    raise RuntimeError(f"{status}")


async def _failover(a, b, victim_stop) -> dict:
    host = "127.0.0.1"
    setup = Connection(host, a.port)
    sids = []
    for s in range(FAILOVER_SESSIONS):
        body = json.dumps({"model": "bytelm", "tokens": window(17 * s, 8)}).encode()
        status, raw = await setup.request("POST", "/v1/sessions", body)
        assert status == 201, raw
        sids.append(json.loads(raw)["session_id"])
    setup.close()
    killed_at: list[float] = []
    stepped_recovery: list[float] = []
    acked = [8] * FAILOVER_SESSIONS
    stop = asyncio.Event()

    async def client(s: int) -> None:
        conn, on_b, recovered, token = Connection(host, a.port), False, False, 0
        while not stop.is_set():
            tok = window(29 * s + token, 1)[0]
            while True:  # the same step until some replica answers it (even after `stop`)
                try:
                    got = await _step(conn, sids[s], tok, acked[s])
                    break
                except (OSError, RuntimeError, asyncio.IncompleteReadError):
                    if not on_b:  # the replica is gone: the same step, on the other one
                        conn.close()
                        conn, on_b = Connection(host, b.port), True
                    await asyncio.sleep(0.005)
            if got < 0:  # 409: an earlier try of this step applied (its answer was lost)
                assert -got - 1 == acked[s] + 1, (got, acked[s])
                got = -got - 1
            acked[s] = got
            token += 1
            if on_b and killed_at and not recovered:
                recovered = True
                stepped_recovery.append(time.monotonic() - killed_at[0])
        conn.close()

    tasks = [asyncio.create_task(client(s)) for s in range(FAILOVER_SESSIONS)]
    await asyncio.sleep(2.0)
    victim_stop()
    killed_at.append(time.monotonic())
    deadline = time.monotonic() + 30
    while len(stepped_recovery) < FAILOVER_SESSIONS and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    check = Connection(host, b.port)
    lost = 0
    for s, sid in enumerate(sids):
        status, raw = await check.request("GET", f"/v1/sessions/{sid}", None)
        lost += abs(json.loads(raw)["position"] - acked[s])
    check.close()
    return {"sessions": FAILOVER_SESSIONS, "recovered": len(stepped_recovery),
            "first_retry_ms": 1e3 * min(stepped_recovery) if stepped_recovery else None,
            "median_retry_ms": (1e3 * statistics.median(stepped_recovery)
                                if stepped_recovery else None),
            "steps_acknowledged": sum(acked) - 8 * FAILOVER_SESSIONS,
            "steps_lost_or_doubled": lost}


async def _generation_failover(a, b, victim_stop) -> dict:
    """Sessions generating on the victim: after the kill, how long until the other replica
    applies a step (the dead replica's lease must expire first)."""
    host = "127.0.0.1"
    conn = Connection(host, a.port)
    sids = []
    for s in range(FAILOVER_GENERATING):
        body = json.dumps({"model": "bytelm", "tokens": window(7 * s, 8)}).encode()
        status, raw = await conn.request("POST", "/v1/sessions", body)
        sids.append(json.loads(raw)["session_id"])
    conn.close()
    streams = []
    for sid in sids:
        reader, writer = await asyncio.open_connection(host, a.port)
        body = json.dumps({"max_tokens": 4000, "stream": True, "seed": 1}).encode()
        writer.write(f"POST /v1/sessions/{sid}/generate HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode() + body)
        await writer.drain()
        streams.append((reader, writer))
    await asyncio.sleep(1.5)  # mid-generation
    victim_stop()
    killed = time.monotonic()
    waits = []
    other = Connection(host, b.port)
    for sid in sids:
        while time.monotonic() - killed < 30:
            status, raw = await other.request("GET", f"/v1/sessions/{sid}", None)
            position = json.loads(raw)["position"]
            try:
                if await _step(other, sid, 32, position) == position + 1:
                    waits.append(time.monotonic() - killed)
                    break
            except RuntimeError:  # 503 session_busy: the lease still holds
                await asyncio.sleep(0.02)
    other.close()
    for _, writer in streams:
        writer.close()
    return {"sessions": FAILOVER_GENERATING, "continued": len(waits),
            "first_retry_ms": 1e3 * min(waits) if waits else None,
            "last_retry_ms": 1e3 * max(waits) if waits else None}


def failover(model: ModelVersion, out: Path, env: dict) -> dict:
    found = {}
    for name, measure in (("steps", _failover), ("generating", _generation_failover)):
        a = servers.start("carousel", model, out / "logs", env)
        b = servers.start("carousel", model, out / "logs", env)
        try:
            def kill(victim=a) -> None:
                victim.process.send_signal(signal.SIGKILL)
                victim.process.wait()

            found[name] = asyncio.run(measure(a, b, kill))
        finally:
            a.stop()
            b.stop()
        log(f"  failover {name}: {found[name]}")
    found["lease_s"] = float(env.get("CAROUSEL_LEASE_S", 5.0))
    return found


# ---------------------------------------------------------------------------- memory


def redis_memory(model: ModelVersion, plan: Plan, out: Path, env: dict, url: str) -> dict:
    server = servers.start("carousel", model, out / "logs", env)
    try:
        with _redis(url) as r:
            before = r.info("memory")["used_memory"]
            spec = {**scenarios.base_spec(server, model, plan, "create"), "metrics_path": None,
                    "prime": [32], "clients": 16, "count": MEMORY_SESSIONS, "keep": 1}
            created = scenarios.run_load(spec)
            time.sleep(0.5)
            after = r.info("memory")["used_memory"]
            key = next(iter(r.scan_iter(match="carousel:s:*", count=100)))
            record_usage = r.memory_usage(key)
            index_usage = r.memory_usage("carousel:live")
    finally:
        server.stop()
    n = created.get("created", 0)
    row = model.state_bytes + 4 * 256  # the state, then the byte LM's last logits
    return {"sessions": n, "used_memory_delta": after - before,
            "bytes_per_session": (after - before) / n if n else None,
            "record_key_bytes": record_usage, "index_bytes_per_session": index_usage / n,
            "state_bytes": model.state_bytes, "row_bytes": row}


def markdown(results: dict) -> str:
    lines = ["| Store (bytelm, 64 concurrent, one replica) | HTTP `/step` tokens/s | p50 / p99 "
             "ms | generation tokens/s | inter-token p99 ms | CPU µs per step: carousel / "
             "redis | per generated token: carousel / redis |", "|---|---|---|---|---|---|---|"]
    for name, found in results["configs"].items():
        st, gen = found["step_http"], found["generate"]
        lat, itl = st.get("latency_ms") or {}, gen.get("inter_token_ms") or {}

        def cpu(r):
            c, red = r.get("server_cpu_us_per_unit"), r.get("redis_cpu_us_per_unit")
            return f"{c or 0:.0f} / {red:.0f}" if red is not None else f"{c or 0:.0f} / —"

        lines.append(f"| {name} | {st.get('tokens_per_s', 0):,.0f} | {lat.get('p50', 0):.1f} / "
                     f"{lat.get('p99', 0):.1f} | {gen.get('tokens_per_s', 0):,.0f} | "
                     f"{itl.get('p99', 0):.1f} | {cpu(st)} | {cpu(gen)} |")
    lines += ["", "| Against the memory store | `/step` tokens/s | `/step` p99 | generation "
              "tokens/s | inter-token p99 |", "|---|---|---|---|---|"]
    for name, r in results["ratios"].items():
        lines.append(f"| {name} | {r['step_http']['tokens_per_s']:.0%} | "
                     f"{r['step_http']['p99']:.2f}× | {r['generate']['tokens_per_s']:.0%} | "
                     f"{r['generate']['p99']:.2f}× |")
    f = results["failover"]
    s, g = f["steps"], f["generating"]
    lines += ["", f"Failover (SIGKILL of one of two replicas): {s['recovered']}/{s['sessions']} "
              f"stepping sessions continued on the other, the first retry applied "
              f"{s['first_retry_ms']:.0f} ms after the kill (median {s['median_retry_ms']:.0f} "
              f"ms); {s['steps_lost_or_doubled']} steps lost or doubled of "
              f"{s['steps_acknowledged']} acknowledged. Sessions that were generating: "
              f"{g['continued']}/{g['sessions']} continued, after "
              f"{g['first_retry_ms']:.0f}–{g['last_retry_ms']:.0f} ms (lease {f['lease_s']:g} "
              "s)."]
    m = results["memory"]
    lines += ["", f"Redis memory: {m['bytes_per_session']:,.0f} bytes per idle session "
              f"({m['sessions']} sessions; the record key {m['record_key_bytes']:,} bytes, the "
              f"index {m['index_bytes_per_session']:.0f}), against {m['state_bytes']:,} bytes "
              f"of state ({m['row_bytes']:,} with the last logits)."]
    return "\n".join(lines) + "\n"
