"""Exactly-once stepping through a fault-injecting proxy (faultproxy.py) in front of a real
server: steps whose answers are dropped after the server applied them, requests held past
the client's timeout, and 503s with Retry-After. Many sessions run at once; afterwards each
session's state must equal a fresh session's stepped directly with the joined text (the
server's own logits) and PyTorch's on the same bytes, every answer the SDK returned must be
PyTorch's at its position, and the server must have consumed each byte exactly once.

Generations are never resent; one that breaks mid-stream leaves the client's position equal
to the server's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading

import pytest
from carousel_client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    GatewayError,
    GenerationInterrupted,
    Retry,
    Unavailable,
)
from faultproxy import Plan

ALPHABET = "abcxyz _\n(é€😀"
PATIENT = Retry(attempts=60, backoff_s=0.01, max_backoff_s=0.2)


def random_chunks(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 6))) for _ in range(count)]


def consumed(api, model: str) -> float:
    return api.metrics().total("token", "consum", kind="counter", model=model)


def check_answers(results, text: str, ref, check) -> None:
    """Every answer returned is PyTorch's prediction at its position in the joined text."""
    logits = ref.logits(text)
    for r in results:
        assert not r.answer_lost  # a single writer never loses a replayable answer
        check.top_k([dataclasses.asdict(t) for t in r.top_k], logits[r.position - 1])


def check_final_state(api, tiny, check, model: str, sid: str, text: str) -> None:
    """The session's state after everything equals a fresh session stepped directly with
    the joined text (the server's own computation) and PyTorch's on the same bytes."""
    probe = "\n"
    got = api.step(sid, text=probe, return_logits=True)
    assert got["position"] == len((text + probe).encode()), "a step was lost or applied twice"
    fresh = api.create_session(model, text=text + probe, return_logits=True)
    check.logits(got["logits"], fresh["logits"], "faulty session vs fresh session")
    check.logits(got["logits"], tiny[model].last(text + probe), "faulty session vs PyTorch")
    for s in (sid, fresh["session_id"]):
        assert api.http.delete(f"/v1/sessions/{s}").status_code == 204


def test_async_sessions_step_exactly_once_through_faults(server, proxy, api, tiny, check):
    # The script makes sure of each kind of fault; the rates add many more at random.
    proxy.plan = Plan(paths=r"/step$", drop=0.25, delay=0.04, busy=0.04, delay_s=1.6,
                      script=["drop", "delay", "busy", "drop", "pass", "drop", "delay"])
    rng = random.Random(1)
    plans = [(("tinylstm", "tinygru")[i % 2], random_chunks(rng, 1)[0], random_chunks(rng, 12))
             for i in range(16)]
    before = {m: consumed(api, m) for m in ("tinylstm", "tinygru")}

    async def one(client: AsyncClient, model: str, prime: str, chunks: list[str]):
        async with client.session(model, prime, keep=True) as s:
            results = [await s.step(c) for c in chunks]
            assert s.position == len((prime + "".join(chunks)).encode())
            return s.id, results

    async def main():
        async with AsyncClient(proxy.url, timeout=0.8, retry=PATIENT, trust_env=False) as c:
            return await asyncio.gather(*(one(c, *p) for p in plans))

    outcomes = asyncio.run(main())
    for model in before:  # every byte consumed exactly once: replays consume nothing
        sent = sum(len((p + "".join(cs)).encode()) for m, p, cs in plans if m == model)
        assert consumed(api, model) - before[model] == sent, model
    for (model, prime, chunks), (sid, results) in zip(plans, outcomes, strict=True):
        text = prime + "".join(chunks)
        check_answers(results, text, tiny[model], check)
        check_final_state(api, tiny, check, model, sid, text)
    assert proxy.stats["drop"] >= 20 and proxy.stats["delay"] >= 2 and proxy.stats["busy"] >= 1, \
        proxy.stats  # the faults really happened


def test_sync_sessions_in_threads_step_exactly_once(server, proxy, api, tiny, check):
    proxy.plan = Plan(paths=r"/step$", drop=0.3, delay=0.05, delay_s=1.6,
                      script=["drop", "drop", "delay", "drop", "drop", "drop"])
    rng = random.Random(2)
    plans = [("tinylstm", random_chunks(rng, 1)[0], random_chunks(rng, 10)) for _ in range(4)]
    outcomes: list = [None] * len(plans)

    def one(k: int, client: Client) -> None:
        model, prime, chunks = plans[k]
        with client.session(model, prime, keep=True) as s:
            outcomes[k] = (s.id, [s.step(c) for c in chunks])

    with Client(proxy.url, timeout=0.8, retry=PATIENT, trust_env=False) as client:
        threads = [threading.Thread(target=one, args=(k, client)) for k in range(len(plans))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for (model, prime, chunks), outcome in zip(plans, outcomes, strict=True):
        assert outcome is not None, "a thread failed (see its traceback above)"
        sid, results = outcome
        check_answers(results, prime + "".join(chunks), tiny[model], check)
        check_final_state(api, tiny, check, model, sid, prime + "".join(chunks))
    assert proxy.stats["drop"] >= 5, proxy.stats


def test_websocket_steps_exactly_once_through_dropped_sockets(server, proxy, api, tiny, check):
    """A dropped socket is reopened and the step sent again with the same position."""
    proxy.plan = Plan(paths=r"/ws$", drop=0.25, delay=0.03, delay_s=1.6,
                      script=["drop", "drop", "delay", "drop", "drop", "drop"])
    rng = random.Random(3)
    plans = [(("tinygru", "tinylstm")[i % 2], random_chunks(rng, 1)[0], random_chunks(rng, 10))
             for i in range(6)]

    async def one(client: AsyncClient, model: str, prime: str, chunks: list[str]):
        async with client.session(model, prime, keep=True) as s, s.websocket() as ws:
            return s.id, [await ws.step(c) for c in chunks]

    async def main():
        async with AsyncClient(proxy.url, timeout=0.8, retry=PATIENT, trust_env=False) as c:
            return await asyncio.gather(*(one(c, *p) for p in plans))

    for (model, prime, chunks), (sid, results) in zip(plans, asyncio.run(main()), strict=True):
        check_answers(results, prime + "".join(chunks), tiny[model], check)
        check_final_state(api, tiny, check, model, sid, prime + "".join(chunks))
    assert proxy.stats["drop"] >= 5, proxy.stats


def test_a_stream_broken_mid_way_leaves_the_position_equal_to_the_servers(server, proxy, api):
    proxy.plan = Plan(paths=r"/generate$", script=["cut"], cut_after=1500)
    with Client(proxy.url, retry=PATIENT, trust_env=False) as client:
        with client.session("utf8cycle", "x") as s:
            with pytest.raises(GenerationInterrupted) as e:
                for _ in s.stream(max_tokens=4000, temperature=0):
                    pass
            assert isinstance(e.value.cause, ConnectionFailed), e.value.cause
            assert e.value.code == "interrupted" and e.value.text.startswith("é€😀")
            assert s.position == api.position(s.id) >= 1 + len(e.value.text.encode())
            assert s.step("y").position == s.position  # the session goes on
    assert proxy.stats["cut"] == 1


def test_a_generation_whose_answer_is_lost_is_not_resent(server, proxy, api):
    proxy.plan = Plan(paths=r"/generate$", script=["drop"])
    with Client(proxy.url, retry=PATIENT, trust_env=False) as client:
        with client.session("tinylstm", "abc") as s:
            with pytest.raises(ConnectionFailed) as e:
                s.generate(max_tokens=7, seed=1)
            assert e.value.may_have_applied and e.value.status is None
            assert s.position == api.position(s.id) == 3 + 7  # applied once, read back
            assert s.step("d").position == 11
    assert proxy.stats["drop"] == 1 and proxy.stats["requests"] >= 4


def test_a_load_balancers_502_after_the_step_applied_is_resent_and_replayed(
        server, proxy, api, tiny, check):
    """A gateway answers 502 in place of the server's answer (the replica behind it died
    after applying the step): the SDK sends the very same step again, the server replays
    it, and every step is in the session once."""
    proxy.plan = Plan(paths=r"/step$", script=["gateway", "pass", "gateway", "gateway"])
    rng = random.Random(4)
    prime, chunks = "ab", random_chunks(rng, 6)
    before = consumed(api, "tinylstm")
    with Client(proxy.url, retry=PATIENT, trust_env=False) as client:
        with client.session("tinylstm", prime, keep=True) as s:
            results = [s.step(c) for c in chunks]
    text = prime + "".join(chunks)
    assert consumed(api, "tinylstm") - before == len(text.encode())
    check_answers(results, text, tiny["tinylstm"], check)
    check_final_state(api, tiny, check, "tinylstm", s.id, text)
    assert proxy.stats["gateway"] == 3


def test_a_generation_answered_502_by_a_gateway_is_not_resent(server, proxy, api):
    proxy.plan = Plan(paths=r"/generate$", script=["gateway"])
    with Client(proxy.url, retry=PATIENT, trust_env=False) as client:
        with client.session("tinylstm", "abc") as s:
            with pytest.raises(GatewayError) as e:
                s.generate(max_tokens=7, seed=1)
            assert (e.value.code, e.value.status, e.value.may_have_applied) == (
                "bad_gateway", 502, True)
            assert s.position == api.position(s.id) == 3 + 7  # applied once, read back
    assert proxy.stats["gateway"] == 1 and proxy.stats["requests"] >= 3


def test_a_503_with_retry_after_is_waited_out(start_server, tiny_repo, api_factory):
    """A real `503 at_capacity` (Retry-After: 1) on create: retried after the wait, and it
    succeeds once a session is freed; without retries it is raised with its Retry-After."""
    full = start_server("capacity", {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]),
                                     "CAROUSEL_MAX_SESSIONS": "1",
                                     "CAROUSEL_SWEEP_INTERVAL_S": "1"})
    api = api_factory(full)
    first = api.create_session("tinygru")
    seen = []

    def on_retry(error, attempt, wait):  # free a session once the SDK has been refused
        seen.append((error.code, error.status, error.retry_after, wait))
        api.http.delete(f"/v1/sessions/{first['session_id']}")

    retry = Retry(attempts=5, on_retry=on_retry)
    with Client(full.url, retry=retry, trust_env=False) as client:
        with client.session("tinygru", "ok") as s:
            assert s.position == 2
            with Client(full.url, retry=Retry(attempts=1), trust_env=False) as impatient:
                with pytest.raises(Unavailable) as e:
                    impatient.session("tinygru")
    assert seen == [("at_capacity", 503, 1.0, 1.0)]
    assert (e.value.code, e.value.status, e.value.retry_after) == ("at_capacity", 503, 1.0)
