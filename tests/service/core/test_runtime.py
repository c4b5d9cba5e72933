"""The service lifecycle without HTTP, driven through its data plane (what the transports
call): start, refuse work while draining, wait for what is in flight (up to the grace
period), stop ending generations and failing queued work."""

from __future__ import annotations

import asyncio
import json

import pytest
from carousel.service.errors import EmptyInput, PositionMismatch, ShuttingDown
from carousel.service.locks import KeyedLocks
from carousel.service.registry import Registry
from carousel.service.runtime import Service
from carousel.service.schemas import GenerateRequest, parse
from carousel.service.settings import Settings
from core_fakes import LM_STATE, fake_lm, greedy, reference_row, row_after, top


def service(tmp_path, **settings) -> Service:
    registry = Registry([fake_lm(delay_s=0.001)])
    return Service(Settings(model_repository=tmp_path, **settings), registry=registry)


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


async def generate(svc: Service, session_id: str, **fields):
    args = svc.plane.generation_args(parse(GenerateRequest, body(**fields)))
    return await svc.plane.start_generation(session_id, args)


def test_the_data_plane_steps_retries_and_refuses_to_continue_an_empty_session(tmp_path):
    async def main():
        svc = service(tmp_path)
        await svc.start()
        created = await svc.plane.create_session(body(model="fake", tokens=[1, 2], top_k=2), {})
        sid = created["session_id"]
        want, _ = top(reference_row([1, 2])[LM_STATE:], 2)
        assert created["position"] == 2 and [t["token"] for t in created["top_k"]] == want
        step = await svc.plane.step(sid, body(tokens=[3], position=2, top_k=3), {})
        again = await svc.plane.step(sid, body(tokens=[3], position=2, top_k=3), {})
        want, _ = top(row_after([1, 2], [3])[LM_STATE:], 3)
        assert step == again and [t["token"] for t in step["top_k"]] == want
        assert step["position"] == 3
        with pytest.raises(PositionMismatch):
            await svc.plane.step(sid, body(tokens=[4], position=2), {})
        empty = await svc.plane.create_session(body(model="fake"), {})
        with pytest.raises(EmptyInput):
            await generate(svc, empty["session_id"], max_tokens=3)
        await svc.stop()

    asyncio.run(main())


def test_drain_refuses_new_work_and_waits_for_generations(tmp_path):
    async def main():
        svc = service(tmp_path)
        await svc.start()
        assert await svc.readiness() == (True, "ready")
        sid = (await svc.plane.create_session(body(model="fake", tokens=[1, 2]), {}))[
            "session_id"]
        gen = await generate(svc, sid, temperature=0.0, seed=0, max_tokens=30)
        drained = asyncio.ensure_future(svc.drain(grace_s=30))
        await asyncio.sleep(0)
        assert await svc.readiness() == (False, "shutting_down")
        with pytest.raises(ShuttingDown):
            svc.check_accepting()
        with pytest.raises(ShuttingDown):
            await svc.plane.create_session(body(model="fake"), {})
        await drained
        assert gen.finish_reason == "length" and svc.busy == 0
        assert gen.tokens == greedy([1, 2], 30)
        assert (await svc.sessions.get(sid)).position == 32
        await svc.stop()

    asyncio.run(main())


def test_grace_period_bounds_the_drain_and_stop_ends_generations(tmp_path):
    async def main():
        svc = service(tmp_path, max_generate_tokens=100_000)
        await svc.start()
        sid = (await svc.plane.create_session(body(model="fake", tokens=[1]), {}))["session_id"]
        record = await svc.sessions.get(sid)
        gen = await generate(svc, sid, temperature=0.0, seed=0, max_tokens=100_000)
        await svc.drain(grace_s=0.05)  # still running when the grace period ran out: ended
        assert gen.finish_reason == "shutdown" and gen.done.done() and svc.busy == 0
        await svc.stop()
        return gen, record

    gen, record = asyncio.run(main())
    assert gen.finish_reason == "shutdown" and 0 < len(gen.tokens) < 100_000
    assert gen.tokens == greedy([1], len(gen.tokens))
    assert record.position == 1 + len(gen.tokens), "written back before the store closed"


def test_keyed_locks_are_fifo_and_leave_nothing_behind():
    async def main():
        locks = KeyedLocks()
        order = []

        async def user(i):
            async with locks.hold("k"):
                order.append(i)
                await asyncio.sleep(0)

        await asyncio.gather(*(user(i) for i in range(5)))
        assert order == [0, 1, 2, 3, 4] and len(locks) == 0
        await locks.acquire("k")
        waiter = asyncio.ensure_future(locks.acquire("k"))
        await asyncio.sleep(0)
        waiter.cancel()  # a cancelled waiter leaves no trace
        await asyncio.sleep(0)
        locks.release("k")
        assert len(locks) == 0

    asyncio.run(main())
