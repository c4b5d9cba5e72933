"""`make e2e-compose`: the replicated stack run for real, every session checked.

It needs Docker, or the podman lab (../shared/lab/containers), and the image built (the
Makefile target builds it). It brings up docker-compose.yml + deploy/compose.replicas.yml
(Redis, 3 replicas, HAProxy) with the monitoring profile as a compose project of its own on
free loopback ports, and talks to it only through the load balancer (and Prometheus' API):

1. stack: every container healthy; HAProxy has every replica up; Prometheus scrapes every
   replica (found by DNS) and the load balancer.
2. routing: a session's requests stay on one replica (hashed on its id), an OpenAI
   completion continuing a session and a v2 sequence's requests (binary and JSON) too; a
   greedy generation streamed as server-sent events arrives token by token while it runs,
   and stops when the client leaves; the WebSocket carries steps and a generation.
3. stream: 32 sessions stream bytes in steps with positions through the SDK, and the
   replica holding most of them is `docker kill`ed mid-stream. The clients retry. Then each
   session's position is its byte count, every answer the SDK returned is the reference's
   at its position, and its state (a fork stepped with one more byte) is the reference's.
   Sessions on the surviving replicas never moved (consistent hashing); the killed one's
   moved to survivors.
4. restart: every replica and Redis restarted; every session is there with its position
   and state, and takes one more step.

The reference is onnxruntime alone on the bundled graph (reference.py). Timings are
printed, never asserted. Exit status 0 when every check passed; the stack is removed at the
end (--keep leaves it up) and its logs printed when a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import tritonclient.http as triton
from carousel_client import AsyncClient, Retry
from reference import Reference, log_softmax
from stack import Stack, log

REPO = Path(__file__).resolve().parents[2]
MODEL = "bytelm"
PROBE = 10  # "\n": the byte a fork (or, after the restart, the session) is stepped with
TOLERANCE = 1e-4  # largest |logit| or |logprob| difference from the reference


class Failed(Exception):
    """A check did not hold."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def say(self, what: str) -> None:
        log(f"[{time.monotonic() - self.start:6.1f}s] {what}")


async def poll(what: str, probe, timeout_s: float, every_s: float = 1.0):
    """`probe()` until it returns something true; its last value, or Failed."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = await probe()
        except (httpx.HTTPError, OSError, ValueError) as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(every_s)
    raise Failed(f"{what}: not after {timeout_s:.0f}s (last: {last!r})")


# ------------------------------------------------------------------------------ 1. stack


async def check_stack(stack: Stack, http: httpx.AsyncClient, clock: Clock) -> None:
    containers = stack.containers()
    by_service = Counter(c.service for c in containers if c.state == "running")
    require(by_service == {"carousel": stack.replicas, "redis": 1, "lb": 1, "prometheus": 1},
            f"running containers: {dict(by_service)}")
    unhealthy = [c.name for c in containers if c.health != "healthy"]
    require(not unhealthy, f"not healthy: {unhealthy}")

    async def replicas_up():
        servers = await asyncio.to_thread(stack.lb_servers)
        up = {n: a for n, (status, a) in servers.items() if status.startswith("UP")}
        return up if len(up) == stack.replicas else None

    up = await poll("HAProxy sees every replica up", replicas_up, 60)
    addresses = {c.address for c in stack.containers("carousel")}
    require({a.rsplit(":", 1)[0] for a in up.values()} == addresses,
            f"HAProxy's servers {up} are not the replicas {addresses}")
    clock.say(f"stack: {len(containers)} containers healthy; HAProxy has {len(up)} replicas "
              f"up ({', '.join(f'{n} {a}' for n, a in sorted(up.items()))})")

    async def scraped():
        r = await http.get(f"{stack.prometheus_url}/api/v1/targets", timeout=5)
        targets = r.json()["data"]["activeTargets"]
        jobs = Counter(t["labels"]["job"] for t in targets if t["health"] == "up")
        return targets if jobs == {"carousel": stack.replicas, "lb": 1} else None

    targets = await poll("Prometheus scrapes every replica and the load balancer", scraped, 120,
                         every_s=2)
    scraped_at = sorted(t["labels"]["instance"] for t in targets
                        if t["labels"]["job"] == "carousel")
    require({i.rsplit(":", 1)[0] for i in scraped_at} == addresses,
            f"Prometheus scrapes {scraped_at}, the replicas are {addresses}")
    metrics = await http.get("/metrics")
    require(metrics.status_code == 404 and metrics.json()["error"]["code"] == "not_found",
            f"/metrics through the load balancer: {metrics.status_code}")
    clock.say(f"prometheus: {len(scraped_at)} carousel targets up ({', '.join(scraped_at)}) "
              "and the load balancer; /metrics through the load balancer is refused (404)")


# ---------------------------------------------------------------------------- 2. routing


def replica(response: httpx.Response) -> str:
    name = response.headers.get("x-carousel-replica")
    require(bool(name), f"{response.request.url.path}: no X-Carousel-Replica header")
    return name


async def replica_of(http: httpx.AsyncClient, session_id: str) -> str:
    r = await http.get(f"/v1/sessions/{session_id}")
    require(r.status_code == 200, f"GET session {session_id}: {r.status_code} {r.text[:200]}")
    return replica(r)


def close(got, want, what: str) -> float:
    diff = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - want)))
    require(diff <= TOLERANCE, f"{what}: differs from the reference by {diff:.3g}")
    return diff


async def check_sessions_stay_put(stack: Stack, http: httpx.AsyncClient, client: AsyncClient,
                                  clock: Clock) -> None:
    session = await client.session(MODEL, "import o", keep=True)
    names = {await replica_of(http, session.id) for _ in range(6)}
    await session.step("s\n")
    names.add(await replica_of(http, session.id))
    require(len(names) == 1, f"one session's requests went to {names}")
    others = Counter()
    for _ in range(12):  # no session: round robin
        others[replica(await http.get("/v1/models"))] += 1
    require(len(others) == stack.replicas, f"requests without a session went to {others}")
    await session.delete()
    clock.say(f"routing: 8 requests of one session all on {names.pop()}; 12 without a "
              f"session spread over {len(others)} replicas")


async def check_openai(http: httpx.AsyncClient, client: AsyncClient, ref: Reference,
                       clock: Clock) -> None:
    prefix, prompt = b"class Stack:\n", b"    def push(self"
    session = await client.session(MODEL, prefix.decode(), keep=True)
    home = await replica_of(http, session.id)
    r = await http.post("/openai/v1/completions", json={
        "model": MODEL, "prompt": prompt.decode(), "max_tokens": 8, "temperature": 0,
        "carousel": {"session_id": session.id, "position": len(prefix)}})
    require(r.status_code == 200, f"completion: {r.status_code} {r.text[:300]}")
    require(replica(r) == home, f"the completion went to {replica(r)}, the session is on {home}")
    expected = bytes(ref.greedy(prefix + prompt, 8)).decode("utf-8", errors="replace")
    body = r.json()
    require(body["choices"][0]["text"] == expected,
            f"completion {body['choices'][0]['text']!r}, reference {expected!r}")
    require(body["carousel"]["position"] == len(prefix + prompt) + 8, f"{body['carousel']}")
    await session.delete()
    clock.say(f"openai: a completion continuing a session ran on the session's replica "
              f"({home}) and is the reference's greedy text {expected!r}")


async def check_v2_sequences(http: httpx.AsyncClient, ref: Reference, clock: Clock) -> None:
    chunks = [b"import o", b"s\nimport s", b"ys\n"]
    want = [ref.logits([b"".join(chunks[: i + 1])])[0][-1] for i in range(len(chunks))]
    seen, worst = {}, 0.0
    for kind, sequence_id in (("binary", random.randrange(1, 2**40)),
                              ("json", f"e2e-{secrets.token_hex(4)}")):
        names = set()
        for i, chunk in enumerate(chunks):
            flags = {"sequence_start": i == 0, "sequence_end": i == len(chunks) - 1}
            tokens = np.frombuffer(chunk, dtype=np.uint8).astype(np.int64)[None]
            if kind == "binary":
                tensor = triton.InferInput("tokens", list(tokens.shape), "INT64")
                tensor.set_data_from_numpy(tokens, binary_data=True)
                body, json_size = triton.InferenceServerClient.generate_request_body(
                    [tensor], sequence_id=sequence_id, **flags)
                r = await http.post(f"/v2/models/{MODEL}/infer", content=body, headers={
                    "Inference-Header-Content-Length": str(json_size),
                    "Content-Type": "application/octet-stream"})
                require(r.status_code == 200, f"v2 binary: {r.status_code} {r.text[:300]}")
                size = r.headers.get("inference-header-content-length")
                result = triton.InferenceServerClient.parse_response_body(
                    r.content, header_length=int(size) if size else None)
                logits = result.as_numpy("logits")[0]
            else:
                r = await http.post(f"/v2/models/{MODEL}/infer", json={
                    "inputs": [{"name": "tokens", "shape": list(tokens.shape),
                                "datatype": "INT64", "data": tokens.ravel().tolist()}],
                    "parameters": {"sequence_id": sequence_id, **flags}})
                require(r.status_code == 200, f"v2 json: {r.status_code} {r.text[:300]}")
                out = next(o for o in r.json()["outputs"] if o["name"] == "logits")
                logits = out["data"]
            worst = max(worst, close(logits, want[i], f"v2 {kind} sequence, request {i}"))
            names.add(replica(r))
        require(len(names) == 1, f"a v2 {kind} sequence's requests went to {names}")
        seen[kind] = names.pop()
    clock.say(f"v2: a binary sequence's requests all on {seen['binary']}, a JSON one's all on "
              f"{seen['json']}; logits equal the reference (max |diff| {worst:.2g})")


async def check_sse(http: httpx.AsyncClient, client: AsyncClient, ref: Reference,
                    clock: Clock) -> None:
    prompt, first, budget = b"def fibonacci(n):\n    ", 16, 4096
    session = await client.session(MODEL, prompt.decode(), keep=True)
    tokens = []
    async with http.stream("POST", f"/v1/sessions/{session.id}/generate", json={
            "max_tokens": budget, "temperature": 0, "stream": True}) as r:
        require(r.status_code == 200, f"generate: {r.status_code}")
        require(r.headers["content-type"].startswith("text/event-stream"),
                f"content-type {r.headers['content-type']}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and "token" in (event := json.loads(line[6:])):
                tokens.append(event["token"])
                if len(tokens) == first:
                    break  # and leave: closing the stream stops the generation
    position = await session.sync_position()  # a step waits until the generation ended
    generated = position - len(prompt)
    require(first <= generated < budget,
            f"{generated} tokens generated: the stream was buffered, or leaving it did not "
            f"stop the generation (max_tokens {budget})")
    greedy = ref.greedy(prompt, generated)
    require(tokens == greedy[:first], f"streamed {tokens}, reference {greedy[:first]}")
    async with session.fork() as fork:
        probe = await fork.step(tokens=[PROBE], return_logits=True)
    want = ref.logits([prompt + bytes(greedy) + bytes([PROBE])])[0][-1]
    diff = close(probe.logits, want, "the session after the stopped generation")
    await session.delete()
    clock.say(f"sse: the first {first} tokens of a greedy stream arrived while it ran, equal "
              f"to the reference; leaving stopped it after {generated} of {budget} tokens, "
              f"and the session holds exactly those (max |diff| {diff:.2g})")


async def check_websocket(client: AsyncClient, ref: Reference, clock: Clock) -> None:
    chunks = [b"import os\n", b"import sys\n\n", b"def main(", b"):\n    "]
    text = b"".join(chunks)
    logits = ref.logits([text])[0]
    async with client.session(MODEL, keep=True) as session, session.websocket() as ws:
        worst = 0.0
        for chunk in chunks:
            answer = await ws.step(tokens=list(chunk), top_k=1)
            want = log_softmax(logits[answer.position - 1])
            require(answer.top_k[0].token == int(np.argmax(want)), "ws step: top token")
            worst = max(worst, close(answer.top_k[0].logprob, want.max(), "ws step logprob"))
        pieces = [piece async for piece in ws.stream(max_tokens=24, temperature=0)]
        expected = bytes(ref.greedy(text, 24)).decode("utf-8", errors="replace")
        require("".join(pieces) == expected, f"ws stream {''.join(pieces)!r} vs {expected!r}")
        require(session.position == len(text) + 24, f"position {session.position}")
    clock.say(f"websocket: {len(chunks)} steps (max |diff| {worst:.2g}) and a greedy "
              f"generation {expected!r} over one socket through the load balancer")


# ----------------------------------------------------------------------------- 3. stream


def session_texts(count: int, rng: random.Random) -> list[bytes]:
    """Different texts of 3-5 KB: pieces of the service's own source."""
    corpus = b"".join(p.read_bytes() for p in sorted((REPO / "service").glob("*.py")))
    texts = []
    for _ in range(count):
        size = rng.randint(3000, 5000)
        start = rng.randrange(0, len(corpus) - size)
        texts.append(corpus[start: start + size])
    return texts


def chunked(text: bytes, rng: random.Random) -> list[bytes]:
    out, at = [], 0
    while at < len(text):
        size = rng.randint(1, 48)
        out.append(text[at: at + size])
        at += size
    return out


class Progress:
    def __init__(self, total: int, kill_at: int) -> None:
        self.total = total
        self.done = 0
        self.kill_at = kill_at
        self.reached = asyncio.Event()

    def advance(self) -> None:
        self.done += 1
        if self.done >= self.kill_at:
            self.reached.set()


async def kill_mid_stream(stack: Stack, progress: Progress, homes: dict[str, str],
                          outcome: dict) -> None:
    """When the streams are `kill_at` steps in, kill the replica holding most sessions."""
    await progress.reached.wait()
    victim, count = Counter(homes.values()).most_common(1)[0]
    servers = await asyncio.to_thread(stack.lb_servers)
    address = servers[victim][1].rsplit(":", 1)[0]
    container = next(c.name for c in stack.containers("carousel") if c.address == address)
    outcome.update(victim=victim, container=container, sessions=count, at=progress.done)
    await asyncio.to_thread(stack.kill, container)
    outcome["after"] = progress.done


async def check_stream(stack: Stack, http: httpx.AsyncClient, client: AsyncClient,
                       retries: Counter, ref: Reference, count: int,
                       clock: Clock) -> list[tuple[str, bytes]]:
    rng = random.Random(20261201)
    texts = session_texts(count, rng)
    plans = [chunked(t, rng) for t in texts]
    total = sum(len(p) for p in plans)
    sessions = [await client.session(MODEL, keep=True) for _ in texts]  # round robin
    homes = {s.id: await replica_of(http, s.id) for s in sessions}
    progress = Progress(total, kill_at=total * 35 // 100)
    killed: dict = {}

    async def feed(session, chunks):
        answers = []
        for chunk in chunks:
            answers.append(await session.step(tokens=list(chunk), top_k=1))
            progress.advance()
        return answers

    started = time.monotonic()
    killer = asyncio.create_task(kill_mid_stream(stack, progress, homes, killed))
    answers = await asyncio.gather(*(feed(s, p) for s, p in zip(sessions, plans, strict=True)))
    await killer
    elapsed = time.monotonic() - started
    lost = sum(a.answer_lost for run in answers for a in run)
    require(sum(retries.values()) > 0, "the kill interrupted no request: nothing was retried")
    clock.say(f"stream: {count} sessions, {total} steps, {sum(map(len, texts))} bytes in "
              f"{elapsed:.1f}s ({total / elapsed:.0f} steps/s); killed {killed['container']} "
              f"({killed['victim']}, home of {killed['sessions']} sessions) after "
              f"{killed['at']} steps; retried: {dict(retries)}; answers lost and confirmed "
              f"by position: {lost}")

    # Consistent hashing: only the killed replica's sessions moved.
    moved = Counter()
    for s in sessions:
        now = await replica_of(http, s.id)
        if homes[s.id] == killed["victim"]:
            moved[now] += 1
        else:
            require(now == homes[s.id], f"session {s.id} moved from {homes[s.id]} to {now}, "
                    f"though {homes[s.id]} is still up")
    require(killed["victim"] not in moved, f"sessions still on the killed replica: {moved}")
    clock.say(f"hashing: {count - killed['sessions']} sessions on the surviving replicas "
              f"stayed put; the killed one's {killed['sessions']} moved to "
              f"{dict(sorted(moved.items()))}")

    # Every answer is the reference's at its position; every state the reference's.
    logits = ref.logits([t + bytes([PROBE]) for t in texts])
    worst, checked = 0.0, 0
    for session, text, run, lg in zip(sessions, texts, answers, logits, strict=True):
        for answer in run:
            if answer.answer_lost:
                continue
            want = log_softmax(lg[answer.position - 1])
            got = answer.top_k[0]
            require(want[got.token] >= want.max() - TOLERANCE,
                    f"{session.id} at {answer.position}: top token {got.token}")
            worst = max(worst, close(got.logprob, want.max(), f"{session.id} logprob"))
            checked += 1
        info = await session.info()
        require(info.position == len(text),
                f"{session.id}: position {info.position}, sent {len(text)} bytes")
        async with session.fork() as fork:
            probe = await fork.step(tokens=[PROBE], return_logits=True)
        worst = max(worst, close(probe.logits, lg[-1], f"{session.id}'s state"))
    clock.say(f"final state: {count}/{count} sessions at their byte count; {checked} answers "
              f"and {count} states (a fork stepped once more) equal the reference "
              f"(max |diff| {worst:.2g}, tolerance {TOLERANCE:g})")
    return [(s.id, t) for s, t in zip(sessions, texts, strict=True)]


# ---------------------------------------------------------------------------- 4. restart


async def check_restart(stack: Stack, http: httpx.AsyncClient, client: AsyncClient,
                        ref: Reference, runs: list[tuple[str, bytes]], clock: Clock) -> None:
    started = time.monotonic()
    await asyncio.to_thread(stack.restart, "redis", "carousel")
    await asyncio.to_thread(stack.up)  # and the killed replica, if a restart left it down

    async def replicas_up():
        servers = await asyncio.to_thread(stack.lb_servers)
        up = [n for n, (status, _) in servers.items() if status.startswith("UP")]
        return up if len(up) == stack.replicas else None

    await poll("every replica back behind HAProxy", replicas_up, 90)
    clock.say(f"restart: redis and {stack.replicas} replicas restarted, all up again in "
              f"{time.monotonic() - started:.1f}s")
    logits = ref.logits([text + bytes([PROBE]) for _, text in runs])
    worst = 0.0
    for (session_id, text), lg in zip(runs, logits, strict=True):
        session = await client.attach(session_id)
        require(session.position == len(text),
                f"{session_id} after the restart: position {session.position}, "
                f"want {len(text)}")
        answer = await session.step(tokens=[PROBE], return_logits=True)
        require(answer.position == len(text) + 1, f"{session_id}: {answer.position}")
        worst = max(worst, close(answer.logits, lg[-1], f"{session_id} after the restart"))
        await session.delete()
    clock.say(f"restart: {len(runs)}/{len(runs)} sessions there with their position and "
              f"state, each stepped once more (max |diff| {worst:.2g})")


# ------------------------------------------------------------------------------ main


async def run_checks(stack: Stack, key: str, ref: Reference, sessions: int,
                     clock: Clock) -> None:
    retries: Counter = Counter()
    policy = Retry(attempts=80, backoff_s=0.05, max_backoff_s=1.0,
                   on_retry=lambda error, attempt, wait: retries.update([error.code]))
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=30,
                                 trust_env=False) as http, \
            AsyncClient(stack.url, api_key=key, timeout=30, retry=policy,
                        trust_env=False) as client:
        await check_stack(stack, http, clock)
        await check_sessions_stay_put(stack, http, client, clock)
        await check_openai(http, client, ref, clock)
        await check_v2_sequences(http, ref, clock)
        await check_sse(http, client, ref, clock)
        await check_websocket(client, ref, clock)
        retries.clear()
        runs = await check_stream(stack, http, client, retries, ref, sessions, clock)
        await check_restart(stack, http, client, ref, runs, clock)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="carousel:dev")
    parser.add_argument("--project", default="carousel-e2e")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--keep", action="store_true", help="leave the stack up at the end")
    parser.add_argument("--file", action="append", default=[], metavar="COMPOSE_FILE",
                        help="a further compose file layered on top (your own overrides)")
    args = parser.parse_args()

    clock = Clock()
    key = secrets.token_urlsafe(24)
    # API keys (tenant:KEY) for a server that asks for them; the SDK sends the key always.
    stack = Stack(REPO, args.project, image=args.image, replicas=args.replicas,
                  extra_env={"CAROUSEL_API_KEYS": f"e2e:{key}"}, extra_files=tuple(args.file))
    ref = Reference(REPO / "models" / MODEL / "1")
    log(f"e2e-compose: project {args.project}, image {args.image}, {args.replicas} replicas, "
        f"load balancer on {stack.url}, Prometheus on {stack.prometheus_url}")
    try:
        engine = stack.docker("version", "--format", "{{.Server.Version}}", timeout=30).strip()
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        log(f"e2e-compose: no container engine answers ({e}). It needs Docker, or the podman "
            "lab: ../shared/lab/containers setup, then export "
            "DOCKER_HOST=unix:///run/podman/podman.sock DOCKER_BUILDKIT=0")
        return 2
    log(f"engine: {engine}; compose: "
        f"{stack.docker('compose', 'version', '--short', timeout=30).strip()}")
    passed = False
    try:
        stack.down()  # what an interrupted run left behind
        stack.up()
        clock.say("up: docker compose up --wait returned")
        asyncio.run(run_checks(stack, key, ref, args.sessions, clock))
        passed = True
    except Failed as e:
        log(f"FAILED: {e}")
    except Exception as e:  # the stack or the SDK failed: still show the logs, tear down
        log(f"FAILED: {type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stdout)
    finally:
        if not passed:
            log("---- the stack's logs (last lines of each container) ----")
            log(stack.logs())
        if args.keep:
            files = " ".join(f"-f {f}" for f in stack.files)
            log(f"left up; to remove it: docker compose -p {args.project} {files} "
                "--profile monitoring down --volumes")
        else:
            stack.down()
            clock.say("down: the project's containers, network and volumes removed")
    log(f"e2e-compose: {'passed' if passed else 'FAILED'} in "
        f"{time.monotonic() - clock.start:.0f}s")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
