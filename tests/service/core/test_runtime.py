"""The service lifecycle without HTTP: start, refuse work while draining, wait for what is
in flight (up to the grace period), stop ending generations and failing queued work."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from carousel.service.errors import ShuttingDown
from carousel.service.locks import KeyedLocks
from carousel.service.registry import ModelVersion, Registry
from carousel.service.runtime import Service
from carousel.service.sampling import SamplingParams
from carousel.service.settings import Settings
from core_fakes import FakeEngine, fake_manifest


def service(tmp_path, **settings) -> Service:
    registry = Registry([ModelVersion(fake_manifest(), FakeEngine(delay_s=0.001))])
    return Service(Settings(model_repository=tmp_path, **settings), registry=registry)


def test_drain_refuses_new_work_and_waits_for_generations(tmp_path):
    async def main():
        svc = service(tmp_path)
        await svc.start()
        assert await svc.readiness() == (True, "ready")
        record, _ = await svc.sessions.create("fake", tokens=np.array([1, 2]))
        gen = await svc.sessions.start_generation(record.session_id, params=SamplingParams(0.0),
                                                  seed=0, max_tokens=30)
        drained = asyncio.ensure_future(svc.drain(grace_s=30))
        await asyncio.sleep(0)
        assert await svc.readiness() == (False, "shutting_down")
        with pytest.raises(ShuttingDown):
            svc.check_accepting()
        await drained
        assert gen.finish_reason == "length" and svc.busy == 0
        assert (await svc.sessions.get(record.session_id)).position == 32
        await svc.stop()

    asyncio.run(main())


def test_grace_period_bounds_the_drain_and_stop_ends_generations(tmp_path):
    async def main():
        svc = service(tmp_path)
        await svc.start()
        record, _ = await svc.sessions.create("fake", tokens=np.array([1]))
        gen = await svc.sessions.start_generation(record.session_id, params=SamplingParams(0.0),
                                                  seed=0, max_tokens=100_000)
        await svc.drain(grace_s=0.05)
        assert gen.finish_reason is None, "still running when the grace period ran out"
        await svc.stop()
        assert gen.finish_reason == "shutdown" and 0 < len(gen.tokens) < 100_000

    asyncio.run(main())


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
