"""The issue's process-level guarantee: three `carousel serve` replicas on the machine's
Redis (database 13, cleaned before and after); sessions created on one and stepped on the
others; one replica SIGKILLed in the middle of two generations and of a stream of steps;
clients retrying with positions on the replicas left. Afterwards: no acknowledged step is
lost, none is applied twice, each generation's stored session is exactly a prefix of what
its client received (the positions in its events say which), any replica continues it once
the dead one's lease has expired by itself, and every final state equals the PyTorch
reference."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from carousel.model.model import encode
from sse import sse_events
from storekit import machine_db, step_with_retries

DB = 13
STEPPERS, STEPS = 6, 30
GENERATIONS, KILL_AFTER = 2, 600  # tokens each generation has sent when the replica dies


@pytest.fixture
def three(start_server, tiny_repo, check):
    with machine_db(DB):
        env = {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]), **check.LIMITS,
               "CAROUSEL_STORE_URL": f"redis://127.0.0.1:6379/{DB}", "CAROUSEL_LEASE_S": "1"}
        servers = [start_server(f"failover-{name}", env) for name in "abc"]
        yield servers
        for s in servers:
            s.stop()


def stepper(urls: list[str], sid: str, prompt: str, seed: int, killed: threading.Event,
            ) -> tuple[str, int]:
    """Steps with positions until done, on a random replica each time; returns the text
    every acknowledged step added, and how many were acknowledged after the kill."""
    rng = random.Random(seed)
    text, after = prompt, 0
    for i in range(STEPS):
        chunk = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 4)))
        pos = len(encode(text))
        answer, _ = step_with_retries(urls, sid, chunk, pos, start=rng.randrange(len(urls)))
        assert answer["position"] == pos + len(encode(chunk)), answer
        text += chunk
        after += killed.is_set()
        if i == STEPS // 3:
            killed.wait(60)  # a third of the steps before the kill, the rest after
    return text, after


def generation(url: str, sid: str, start: int, reached: threading.Barrier) -> list[dict]:
    """A long streamed generation on the replica that will die; the events received."""
    events = []
    body = {"max_tokens": 20000, "temperature": 1.0, "seed": 3, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/sessions/{sid}/generate", json=body,
                          timeout=30, trust_env=False) as r:
            assert r.status_code == 200, r.read()
            for event, data in sse_events(r):
                if event == "message":
                    events.append(data)
                    if len(events) == KILL_AFTER:
                        reached.wait(60)
    except httpx.TransportError:
        pass  # the replica died mid-stream
    return events


def test_a_replica_killed_mid_generation_loses_nothing_acknowledged(three, tiny, check):
    a, b, c = three
    urls = [s.url for s in three]
    model = tiny["tinylstm"]
    with httpx.Client(trust_env=False, timeout=30) as http:
        def create(url: str, text: str) -> str:
            r = http.post(f"{url}/v1/sessions", json={"model": "tinylstm", "text": text})
            assert r.status_code == 201, r.text
            return r.json()["session_id"]

        step_sids = [create(urls[i % 3], f"s{i}:") for i in range(STEPPERS)]
        gen_sids = [create(b.url, f"g{i}:") for i in range(GENERATIONS)]  # made on b ...
        killed = threading.Event()
        reached = threading.Barrier(GENERATIONS + 1)
        with ThreadPoolExecutor(STEPPERS + GENERATIONS) as pool:
            steps = [pool.submit(stepper, urls, sid, f"s{i}:", i, killed)
                     for i, sid in enumerate(step_sids)]
            gens = [pool.submit(generation, a.url, sid, 3, reached)  # ... generating on a
                    for sid in gen_sids]
            reached.wait(120)
            a.proc.kill()  # SIGKILL: no drain, no write-back
            a.proc.wait()
            killed.set()
            stepped = [f.result(timeout=300) for f in steps]
            received = [f.result(timeout=300) for f in gens]

        # Steps: every acknowledged one is in the session exactly once.
        for sid, (text, after) in zip(step_sids, stepped, strict=True):
            r = http.get(f"{b.url}/v1/sessions/{sid}")
            assert r.json()["position"] == len(encode(text)), "lost or doubled steps"
            assert after > 0
            answer, _ = step_with_retries([b.url, c.url], sid, ".", len(encode(text)))
            check.logits(answer["logits"], model.last(text + "."), text)

        # Generations: the store holds a prefix of what was received, and b continues it
        # once the dead replica's lease is gone.
        for sid, events, prompt in zip(gen_sids, received, ["g0:", "g1:"], strict=True):
            start = len(encode(prompt))
            assert len(events) >= KILL_AFTER
            assert [e["position"] for e in events] == list(range(start + 1,
                                                                 start + 1 + len(events)))
            stored = http.get(f"{c.url}/v1/sessions/{sid}").json()["position"]
            assert start < stored <= events[-1]["position"], (stored, events[-1]["position"])
            kept = [e["token"] for e in events[: stored - start]]
            answer, _ = step_with_retries([b.url, c.url], sid, "!", stored)
            check.logits(answer["logits"], model.last(encode(prompt) + kept + [33]), sid)
