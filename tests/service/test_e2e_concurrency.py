"""64 sessions stepping at once each get exactly the answers they get alone: batching across
sessions never mixes state, and batches larger than one really form."""

from __future__ import annotations

import asyncio
import random

import httpx
import numpy as np
from carousel.model.model import encode

SESSIONS = 64
STEPS = 6
MODELS = ("tinylstm", "tinygru")  # two schedulers at once


def workloads() -> list[tuple[str, list[list[int]]]]:
    """Per session: a model and its chunks, of uneven lengths so batches are padded."""
    rng = random.Random(64)
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.é✓🚀"
    out = []
    for i in range(SESSIONS):
        text = f"#{i}: " + "".join(rng.choice(alphabet) for _ in range(rng.randint(10, 40)))
        tokens = encode(text)
        cuts = sorted(rng.sample(range(1, len(tokens)), STEPS - 1))
        chunks = [tokens[a:b] for a, b in zip([0, *cuts], [*cuts, len(tokens)], strict=True)]
        out.append((MODELS[i % 2], chunks))
    return out


async def run_session(client: httpx.AsyncClient, model: str, chunks, gate: asyncio.Event):
    resp = await client.post("/v1/sessions", json={"model": model})
    assert resp.status_code == 201, resp.text
    sid = resp.json()["session_id"]
    await gate.wait()  # every session starts stepping together
    answers = []
    for chunk in chunks:
        resp = await client.post(f"/v1/sessions/{sid}/step",
                                 json={"tokens": chunk, "return_logits": True})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        answers.append((body["position"], [t["token"] for t in body["top_k"]],
                        np.asarray(body["logits"])))
    return answers


async def run_all(url: str, work, concurrent: bool):
    limits = httpx.Limits(max_connections=SESSIONS, max_keepalive_connections=SESSIONS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120,
                                 trust_env=False) as client:
        if not concurrent:  # one session at a time: the answers each gets alone
            results = []
            for model, chunks in work:
                gate = asyncio.Event()
                gate.set()
                results.append(await run_session(client, model, chunks, gate))
            return results
        gate = asyncio.Event()
        tasks = [asyncio.create_task(run_session(client, m, c, gate)) for m, c in work]
        await asyncio.sleep(0.2)  # let the 64 creations land first
        gate.set()
        return await asyncio.gather(*tasks)


def batch_stats(api) -> tuple[float, float]:
    """(sum of batch sizes, number of batches) from the batch-size histogram."""
    m = api.metrics()
    return (m.total("batch", "size", kind="histogram", suffix="_sum"),
            m.total("batch", "size", kind="histogram", suffix="_count"))


def test_64_concurrent_sessions_get_their_own_answers(api, server, tiny, check):
    work = workloads()
    alone = asyncio.run(run_all(server.url, work, concurrent=False))

    sum_before, count_before = batch_stats(api)
    together = asyncio.run(run_all(server.url, work, concurrent=True))
    sum_after, count_after = batch_stats(api)

    for i, ((model, chunks), solo, mixed) in enumerate(zip(work, alone, together, strict=True)):
        tokens = [t for c in chunks for t in c]
        ref = tiny[model].logits(tokens)
        end = 0
        for k, (chunk, a, b) in enumerate(zip(chunks, solo, mixed, strict=True)):
            end += len(chunk)
            assert a[0] == b[0] == end, (i, k, a[0], b[0])
            assert a[1] == b[1], f"session {i} step {k}: top-k differ alone vs together"
            diff = float(np.abs(a[2] - b[2]).max())
            assert diff <= 1e-5, f"session {i} step {k}: alone vs together differ by {diff}"
            check.logits(b[2], ref[end - 1], f"session {i} step {k} vs PyTorch")

    batches = count_after - count_before
    assert batches > 0, "the batch-size histogram did not move"
    # Sum of sizes above the number of batches: at least one batch held several sessions.
    assert sum_after - sum_before > batches, (sum_after - sum_before, batches)


# ------------------------------------------------------------------------ bounded queue


async def step_all(url: str, sids: list[str]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(sids), max_keepalive_connections=len(sids))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120,
                                 trust_env=False) as client:
        return await asyncio.gather(*(
            client.post(f"/v1/sessions/{sid}/step", json={"text": "xyz"}) for sid in sids))


def test_full_queue_answers_503_and_changes_nothing(start_server, tiny_repo, api_factory,
                                                    tiny, check):
    """A queue of one, 48 sessions stepping at once: some steps are refused with 503 and
    Retry-After; a refused step leaves its session exactly where it was."""
    server = start_server("queue", {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]),
                                    "CAROUSEL_MAX_QUEUE": "1"})
    api = api_factory(server)
    primes = [f"q{i}:" for i in range(48)]
    sids = [api.create_session("tinylstm", text=p)["session_id"] for p in primes]
    responses = asyncio.run(step_all(server.url, sids))

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses, "48 concurrent steps never overflowed a queue of one"
    assert 200 in statuses, statuses
    for sid, prime, resp in zip(sids, primes, responses, strict=True):
        if resp.status_code == 503:
            api.expect_error(resp, 503)
            assert resp.headers.get("retry-after", "").strip(), resp.headers
            history = prime
        else:
            history = prime + "xyz"
        assert api.position(sid) == len(history)
        out = api.step(sid, text="!", return_logits=True)
        check.logits(out["logits"], tiny["tinylstm"].last(history + "!"), f"{sid} after")


# ------------------------------------------------------------------------ generations

GENERATIONS = 24  # enough for the decode run to be split across the inference threads


async def generate_all(url: str, sids: list[str], bodies: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(sids), max_keepalive_connections=len(sids))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120,
                                 trust_env=False) as client:
        return await asyncio.gather(*(
            client.post(f"/v1/sessions/{sid}/generate", json=body)
            for sid, body in zip(sids, bodies, strict=True)))


def test_concurrent_generations_each_generate_what_they_generate_alone(api, server, tiny,
                                                                      check):
    """24 seeded generations at once (mixed sampling options, different lengths, so they
    end at different iterations) give the tokens each gives alone, and every session's
    state afterwards is exactly its prompt plus its generated tokens (PyTorch's logits)."""
    primes = [f"g{i}: once upon" for i in range(GENERATIONS)]
    together = [api.create_session("tinylstm", text=p)["session_id"] for p in primes]
    alone = [api.fork(sid)["session_id"] for sid in together]
    bodies = [{"max_tokens": 30 + 3 * i, "seed": i, "temperature": 0.7 + 0.1 * (i % 4),
               "top_k": (0, 5, 1)[i % 3]} for i in range(GENERATIONS)]
    solo = [api.generate(sid, **body) for sid, body in zip(alone, bodies, strict=True)]
    mixed = asyncio.run(generate_all(server.url, together, bodies))

    for i, (sid, prime, body, a, resp) in enumerate(
            zip(together, primes, bodies, solo, mixed, strict=True)):
        assert resp.status_code == 200, resp.text
        b = resp.json()
        assert b["tokens"] == a["tokens"], f"generation {i}: together differs from alone"
        assert len(b["tokens"]) == body["max_tokens"] and b["finish_reason"] == "length"
        history = encode(prime) + b["tokens"]
        assert api.position(sid) == len(history)
        out = api.step(sid, tokens=[33], return_logits=True)
        check.logits(out["logits"], tiny["tinylstm"].last(history + [33]), f"generation {i}")
