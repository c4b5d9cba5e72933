"""The load generator: a separate process that drives one server and reports what it saw.

Reads a JSON spec on stdin, writes one JSON result on stdout. Raw asyncio on uvloop (see
client.py), one keep-alive connection per simulated session, bodies encoded once up front:
the client should cost the shared two cores as little as possible, and it reports its own
CPU time and the server's (from /proc) over the measured phase.

Every loop is bounded: a fixed number of requests per session, and the whole run is
cancelled at its deadline.

Kinds: step_http, step_ws, step_wsb (binary WebSocket frames) (each session steps its own
token list one token per request,
the first `warmup` steps untimed), generate (each primed session streams `max_tokens`
greedy tokens over SSE), predict (`clients` clients each send `requests` batches), create
(`count` sessions, each primed with `prime`, over `clients` connections).
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import time

from .client import Connection, ProtocolError
from .procfs import process_cpu_s, thread_cpu_s

# What one failed request can raise; it is counted as an error and the loop goes on.
FAILURES = (OSError, asyncio.IncompleteReadError, ProtocolError, RuntimeError, ValueError,
            KeyError, TypeError, IndexError)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": ordered[-1],
            "mean": sum(ordered) / len(ordered), "n": len(ordered)}


class Run:
    """The measured phase: a start barrier, CPU and metrics snapshots, errors."""

    def __init__(self, spec: dict, parties: int):
        self.spec = spec
        self.parties = parties
        self.arrived = 0
        self.started = asyncio.Event()
        self.errors = 0
        self.error_samples: list[str] = []
        self.marks: dict = {}
        # Its own connection for scrapes: a session's connection may be held by its WebSocket.
        self.control = connect(spec)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(text[:300])

    async def snapshot(self) -> dict:
        mark = {}
        if self.spec.get("server_pid"):
            mark["server_cpu_s"] = process_cpu_s(self.spec["server_pid"])
            mark["server_threads_cpu_s"] = thread_cpu_s(self.spec["server_pid"])
        if self.spec.get("metrics_path"):
            try:
                status, text = await self.control.request("GET", self.spec["metrics_path"])
                mark["metrics"] = text.decode()
            except FAILURES as e:
                self.error(f"metrics: {e!r}")
        # The scrape itself is not part of the measured phase.
        mark.update(t=time.perf_counter(), client_cpu_s=time.process_time())
        return mark

    async def barrier(self) -> None:
        """Every party waits here; the last one in takes the start snapshot."""
        self.arrived += 1
        if self.arrived == self.parties:
            self.marks["start"] = await self.snapshot()
            self.started.set()
        await self.started.wait()

    def summary(self, end: dict) -> dict:
        start = self.marks["start"]
        out = {"wall_s": end["t"] - start["t"],
               "client_cpu_s": end["client_cpu_s"] - start["client_cpu_s"],
               "errors": self.errors, "error_samples": self.error_samples}
        if "server_cpu_s" in start:
            out["server_cpu_s"] = end["server_cpu_s"] - start["server_cpu_s"]
            before = start["server_threads_cpu_s"]
            out["server_threads_cpu_s"] = {name: cpu - before.get(name, 0.0) for name, cpu
                                           in end["server_threads_cpu_s"].items()}
        if "metrics" in start and "metrics" in end:
            out["metrics_before"], out["metrics_after"] = start["metrics"], end["metrics"]
        return out


def connect(spec: dict) -> Connection:
    return Connection(spec["host"], spec["port"])


async def create_session(conn: Connection, spec: dict, tokens: list[int]) -> str:
    body = {"model": spec["model"]}
    if tokens:
        body["tokens"] = tokens
    status, raw = await conn.request("POST", "/v1/sessions", json.dumps(body).encode())
    if status != 201:
        raise RuntimeError(f"create session: {status} {raw[:200]!r}")
    return json.loads(raw)["session_id"]


def top1(payload: dict) -> list:
    best = payload["top_k"][0]
    return [best["token"], best["logprob"]]


# The binary step frame (service/wsbinary.py): magic 0, version 1, flags 0, top_k, the tokens.
BINARY_STEP = struct.Struct("<BBBH")
BINARY_ANSWER = struct.Struct("<BBBHQ")  # then k token bytes, then k float32 log-probabilities


def binary_top1(raw: bytes) -> list:
    magic, version, _, k, _ = BINARY_ANSWER.unpack_from(raw)
    if (magic, version) != (0, 1) or k < 1:
        raise ValueError(f"not a binary step answer: {raw[:40]!r}")
    (logprob,) = struct.unpack_from("<f", raw, BINARY_ANSWER.size + k)
    return [raw[BINARY_ANSWER.size], logprob]


async def run_steps(spec: dict, transport: str) -> dict:
    """transport: "http" (POST /step), "ws" (JSON frames) or "wsb" (binary frames)."""
    sequences: list[list[int]] = spec["sequences"]
    warmup, top_k = spec["warmup"], spec.get("top_k", 1)
    run = Run(spec, len(sequences))
    answers: list[list] = [[] for _ in sequences]
    latencies: list[float] = []

    async def session(s: int) -> None:
        conn = connect(spec)
        given = spec.get("session_ids")  # step existing sessions (memory scenario's check)
        sid = given[s] if given else await create_session(conn, spec, [])
        if transport == "wsb":
            bodies = [BINARY_STEP.pack(0, 1, 0, top_k) + bytes([t]) for t in sequences[s]]
        else:
            bodies = [json.dumps({"tokens": [t], "top_k": top_k}) for t in sequences[s]]
        ws = await conn.websocket(f"/v1/sessions/{sid}/ws") if transport != "http" else None
        path = f"/v1/sessions/{sid}/step"
        try:
            for k, body in enumerate(bodies):
                if k == warmup:
                    await run.barrier()
                start = time.perf_counter()
                try:
                    if transport == "wsb":
                        await ws.send_binary(body)
                        opcode, raw = await ws.receive()
                        elapsed = time.perf_counter() - start
                        if opcode != 2:  # an error is a JSON text frame
                            raise RuntimeError(f"{raw[:200]!r}")
                        answers[s].append(binary_top1(raw))
                    else:
                        if ws is not None:
                            await ws.send_text(body)
                            status, raw = 200, await ws.receive_text()
                        else:
                            status, raw = await conn.request("POST", path, body.encode())
                        elapsed = time.perf_counter() - start
                        payload = json.loads(raw)
                        if status != 200 or "error" in payload:
                            raise RuntimeError(f"{status} {raw[:200]!r}")
                        answers[s].append(top1(payload))
                    if k >= warmup:
                        latencies.append(elapsed)
                except FAILURES as e:
                    run.error(f"session {s} step {k}: {e!r}")
                    answers[s].append(None)
            if warmup >= len(bodies):
                await run.barrier()
        finally:
            if ws is not None:
                await ws.close()
            conn.close()

    await asyncio.gather(*(session(s) for s in range(len(sequences))))
    end = await run.snapshot()
    out = run.summary(end)
    out.update(requests=len(latencies), latency_s=percentiles(latencies), answers=answers)
    return out


def generate_body(max_tokens: int) -> bytes:
    # top_k=1 makes sampling greedy, so the reference can be plain argmax decoding.
    return json.dumps({"max_tokens": max_tokens, "temperature": 1.0, "top_k": 1, "seed": 0,
                       "stream": True}).encode()


async def read_stream(conn: Connection, path: str, body: bytes) -> list[tuple]:
    """POST a streamed generation; (arrival time, token) per token event, up to `end`."""
    arrivals: list[tuple] = []
    event, ended, pending = "message", False, b""
    async for status, chunk in conn.stream(path, body):
        if status != 200:
            raise RuntimeError(f"{status} {chunk[:200]!r}")
        now = time.perf_counter()
        *lines, pending = (pending + chunk).split(b"\n")  # SSE: event / data / blank line
        for line in lines:
            if line.startswith(b"event:"):
                event = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                if event == "end":
                    ended = True
                elif event == "message":
                    arrivals.append((now, json.loads(line[5:])["token"]))
                else:
                    raise RuntimeError(f"event {event}: {line[:200]!r}")
            elif not line.strip():
                event = "message"
    if not ended:
        raise RuntimeError(f"stream closed without an end event after {len(arrivals)} tokens")
    return arrivals


async def run_generate(spec: dict) -> dict:
    """Each session first streams `warmup_tokens` untimed (its connection and the server's
    stream path are warm), then all start together; answers hold both parts."""
    primes: list[list[int]] = spec["primes"]
    run = Run(spec, len(primes))
    answers: list = [None] * len(primes)
    first_token: list[float] = []
    gaps: list[float] = []
    measured = 0

    async def stream(s: int) -> None:
        nonlocal measured
        conn = connect(spec)
        try:
            sid = await create_session(conn, spec, primes[s])
            path = f"/v1/sessions/{sid}/generate"
            try:
                warm = await read_stream(conn, path, generate_body(spec["warmup_tokens"]))
            except FAILURES as e:
                run.error(f"session {s} warm-up: {e!r}")
                warm = None
            await run.barrier()
            if warm is None:
                return
            start = time.perf_counter()
            try:
                arrivals = await read_stream(conn, path, generate_body(spec["max_tokens"]))
            except FAILURES as e:
                run.error(f"session {s}: {e!r}")
                return
            times = [start] + [t for t, _ in arrivals]
            if arrivals:
                first_token.append(times[1] - start)
                gaps.extend(b - a for a, b in zip(times[1:], times[2:], strict=False))
            measured += len(arrivals)
            answers[s] = [token for _, token in warm] + [token for _, token in arrivals]
        finally:
            conn.close()

    await asyncio.gather(*(stream(s) for s in range(len(primes))))
    end = await run.snapshot()
    out = run.summary(end)
    out.update(tokens=measured, answers=answers,
               first_token_s=percentiles(first_token), inter_token_s=percentiles(gaps))
    return out


async def run_predict(spec: dict) -> dict:
    batches: list[list[list[int]]] = spec["batches"]  # per client: one request's inputs
    clients, per_client = spec["clients"], spec["requests"]
    run = Run(spec, clients)
    answers: list = [None] * clients
    latencies: list[float] = []
    path = f"/v1/models/{spec['model']}/predict"

    async def client(c: int) -> None:
        conn = connect(spec)
        body = json.dumps({"inputs": [{"tokens": t} for t in batches[c]], "top_k": 1}).encode()
        await run.barrier()
        for _ in range(per_client):
            start = time.perf_counter()
            try:
                status, raw = await conn.request("POST", path, body)
                if status != 200:
                    raise RuntimeError(f"{status} {raw[:200]!r}")
                latencies.append(time.perf_counter() - start)
                answers[c] = [top1(o) for o in json.loads(raw)["outputs"]]
            except FAILURES as e:
                run.error(f"client {c}: {e!r}")
        conn.close()

    await asyncio.gather(*(client(c) for c in range(clients)))
    end = await run.snapshot()
    out = run.summary(end)
    out.update(requests=len(latencies), sequences=len(latencies) * len(batches[0]),
               latency_s=percentiles(latencies), answers=answers)
    return out


async def run_create(spec: dict) -> dict:
    clients, count = spec["clients"], spec["count"]
    every = max(1, count // spec.get("keep", 1))  # ids kept for a later check, spread out
    run = Run(spec, clients)
    created, kept = 0, []

    async def client(c: int) -> None:
        nonlocal created
        conn = connect(spec)
        await run.barrier()
        for i in range(c, count, clients):
            try:
                sid = await create_session(conn, spec, spec["prime"])
                created += 1
                if i % every == 0:
                    kept.append(sid)
            except FAILURES as e:
                run.error(f"create: {e!r}")
        conn.close()

    await asyncio.gather(*(client(c) for c in range(clients)))
    end = await run.snapshot()
    out = run.summary(end)
    out.update(created=created, session_ids=kept)
    return out


KINDS = {
    "step_http": lambda spec: run_steps(spec, "http"),
    "step_ws": lambda spec: run_steps(spec, "ws"),
    "step_wsb": lambda spec: run_steps(spec, "wsb"),
    "generate": run_generate,
    "predict": run_predict,
    "create": run_create,
}


async def bounded(spec: dict) -> dict:
    return await asyncio.wait_for(KINDS[spec["kind"]](spec), spec["deadline_s"])


def main() -> int:
    spec = json.load(sys.stdin)
    try:
        import uvloop  # installed with uvicorn[standard]: a lighter loop for the client too

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    result = run(bounded(spec))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
