"""Fair share across tenants in the batching loop, with a small fake engine of its own.

The fake is a one-number state that remembers the order of what it consumed
(s <- s / 2 + x per step), so a reordered session shows in its state, and an adapter that
records which tenant's and session's work each batch held. Work is queued before the loop
first runs, so every batch's make-up follows from the policy alone: with max_batch_size 8
and more than 16 sessions sending, every batch may take 8 rows (the half-the-senders rule
is pinned by a long RECENT_HORIZON_S, so a slow machine cannot shrink the batches).
"""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest
from carousel.service import scheduler as scheduler_module
from carousel.service.auth import Limits, Tenant
from carousel.service.errors import QueueFull, TenantQueueFull
from carousel.service.manifest import StateSpec, TensorSpec
from carousel.service.scheduler import Scheduler, Work
from carousel.service.sessions import SessionManager, Step
from carousel.service.state import StateLayout
from carousel.service.store import MemoryStore

LIMIT = 8


class Manifest:
    """What the scheduler reads of a manifest: one int64 (batch, time) input, a lengths
    input (rows of different lengths share a padded batch), one state tensor."""

    inputs = (TensorSpec("x", np.dtype(np.int64), ("batch", "time"), 0, 1),)
    constants = ()
    lengths = TensorSpec("lengths", np.dtype(np.int32), ("batch",), 0, None)
    states = (StateSpec("s", "s_out", (1,), 0),)


class Engine:
    manifest = Manifest()
    layout = StateLayout(Manifest.states)

    def run(self, feeds: dict[str, np.ndarray], wide: bool = False) -> dict[str, np.ndarray]:
        x, lengths = feeds["x"], feeds["lengths"]
        s = feeds["s"][:, 0].astype(np.float64)
        for t in range(x.shape[1]):
            s = np.where(t < lengths, s / 2 + x[:, t], s)
        return {"s_out": s[:, None].astype(np.float32)}


class Recorder:
    """The adapter: each work's answer is its new state; every batch's (tenant, key)s are
    recorded, in the order the batch holds them."""

    extra_size = 0

    def __init__(self) -> None:
        self.batches: list[list[tuple]] = []

    def finish(self, outputs, lengths, works):
        self.batches.append([(w.tenant, w.key) for w in works])
        return None, [float(v) for v in outputs["s_out"][:, 0]]

    @staticmethod
    def merge(results):  # a chunked input: its answer is its last state
        return results[-1]


def reference(tokens: list[int], s: float = 0.0) -> float:
    for x in tokens:
        s = s / 2 + x
    return s


@pytest.fixture(autouse=True)
def steady_senders(monkeypatch):
    """Every session seen in a test stays an expected sender for the whole test."""
    monkeypatch.setattr(scheduler_module, "RECENT_HORIZON_S", 600.0)


def make(**kw) -> tuple[Scheduler, Recorder]:
    recorder = Recorder()
    kw.setdefault("max_batch_size", LIMIT)
    kw.setdefault("max_batch_delay_s", 0.001)
    return Scheduler(Engine(), recorder, **kw), recorder


def queue(s: Scheduler, tenant, key, tokens: list[int], row=None) -> asyncio.Future:
    inputs = {"x": np.array(tokens, dtype=np.int64)}
    future = asyncio.get_running_loop().create_future()
    s.submit(Work(key, inputs, len(tokens), row, None, future, s.batcher.signature(inputs),
                  tenant))
    return future


def flood_and_trickle(s: Scheduler, a_tenant="A", b_tenant="B") -> list[asyncio.Future]:
    """A: 20 sessions with 2 steps each (40 items); then B: 2 sessions with 2 steps each (4
    items, a tenth of A's), queued last."""
    futures = []
    for step in range(2):
        futures += [queue(s, a_tenant, f"a{i}", [1 + step]) for i in range(20)]
    for step in range(2):
        futures += [queue(s, b_tenant, f"b{i}", [5 + step]) for i in range(2)]
    return futures


def tenants_of(batch: list[tuple]) -> Counter:
    return Counter(tenant for tenant, _ in batch)


async def drain(s: Scheduler, futures: list[asyncio.Future]) -> list:
    s.start()
    try:
        return await asyncio.wait_for(asyncio.gather(*futures), 30)
    finally:
        await s.close()


def test_a_tenant_queueing_ten_times_more_gets_only_what_the_other_leaves():
    async def main():
        s, rec = make()
        await drain(s, flood_and_trickle(s))
        return rec.batches

    batches = asyncio.run(main())
    # B's two sessions can put one row each in a batch (never two of one session): B takes
    # them in the first batch and the next, A the rest of each. Every batch is full while
    # 8 rows can fill it; B waits behind none of A's 40 items.
    assert [tenants_of(b) for b in batches] == (
        [Counter(A=6, B=2), Counter(A=6, B=2)] + [Counter(A=8)] * 3 + [Counter(A=4)])
    # A's part (4), B's two, then A takes the two rows B could not use.
    assert [key for _, key in batches[0]] == ["a0", "a1", "a2", "a3", "b0", "b1", "a4", "a5"]


def test_without_fair_share_the_same_work_runs_oldest_first():
    async def main():
        s, rec = make(fair_share=False)
        await drain(s, flood_and_trickle(s))
        return rec.batches

    batches = asyncio.run(main())
    # One queue: B's work, the newest, runs after all of A's.
    first_b = next(i for i, b in enumerate(batches) if any(k.startswith("b") for _, k in b))
    assert first_b == 5
    assert all(tenant is None for b in batches for tenant, _ in b)


def test_no_tenants_is_oldest_first_exactly_as_a_single_queue():
    """Work without tenants batches as one queue, oldest first: the first 8 distinct
    sessions in order, then the next, a session's second step never beside its first."""

    async def run(tenant_a, tenant_b, fair_share):
        s, rec = make(fair_share=fair_share)
        await drain(s, flood_and_trickle(s, tenant_a, tenant_b))
        return [[key for _, key in b] for b in rec.batches]

    plain = asyncio.run(run(None, None, True))
    assert plain[0] == [f"a{i}" for i in range(8)]
    assert plain[1] == [f"a{i}" for i in range(8, 16)]
    assert plain[2] == [f"a{i}" for i in range(16, 20)] + [f"a{i}" for i in range(4)]
    assert sum(map(len, plain)) == 44
    # Named tenants with fair share off: the very same batches.
    assert asyncio.run(run("A", "B", False)) == plain


def test_three_tenants_share_max_min_and_take_turns_going_first():
    async def main():
        s, rec = make()
        futures = [queue(s, "A", f"a{i}", [1]) for i in range(12)]
        futures += [queue(s, "B", f"b{i}", [2]) for i in range(7)]
        futures += [queue(s, "C", "c0", [3])]
        await drain(s, futures)
        return rec.batches

    batches = asyncio.run(main())
    # First batch: 3 rows each (8 / 3 rounded up), C has 1, so A (first in turn) takes one
    # more of the row C left. Then B goes first, and C has nothing: 4 and 4.
    assert tenants_of(batches[0]) == Counter(A=4, B=3, C=1)
    assert tenants_of(batches[1]) == Counter(B=4, A=4)
    assert batches[1][0][0] == "B"
    assert tenants_of(batches[2]) == Counter(A=4)


def test_a_tenant_alone_fills_every_batch_and_a_trickle_takes_only_its_rows():
    async def main():
        s, rec = make()
        alone = [queue(s, "A", f"a{i}", [1]) for i in range(20)]
        await drain(s, alone)
        s2, rec2 = make()
        mixed = [queue(s2, "A", f"a{i}", [1]) for i in range(20)]
        mixed.append(queue(s2, "B", "b0", [2]))
        await drain(s2, mixed)
        return rec.batches, rec2.batches

    alone, mixed = asyncio.run(main())
    assert [len(b) for b in alone] == [8, 8, 4]
    # Work-conserving: B's one row leaves the other seven to A.
    assert [tenants_of(b) for b in mixed] == [Counter(A=7, B=1), Counter(A=8), Counter(A=5)]


def test_predictions_count_against_their_tenant():
    async def main():
        s, rec = make()
        futures = [queue(s, "A", None, [1, 2]) for _ in range(40)]  # stateless: no key
        futures += [queue(s, "B", f"b{i}", [3]) for i in range(4)]
        await drain(s, futures)
        return rec.batches

    batches = asyncio.run(main())
    assert tenants_of(batches[0]) == Counter(A=4, B=4)
    assert all(tenants_of(b) == Counter(A=8) for b in batches[1:5])


def test_each_session_keeps_its_order_and_state_under_fair_share():
    """Closed-loop clients (each step waits for the last, as a session's lock makes them)
    of two tenants, one with a long input that runs in chunks: every session's state is
    what its own steps in order give, and its steps ran in order."""
    rng = np.random.default_rng(3)
    plans = {("A", f"a{i}"): rng.integers(0, 9, size=(6, 1)).tolist() for i in range(20)}
    plans |= {("B", f"b{i}"): rng.integers(0, 9, size=(6, 1)).tolist() for i in range(3)}
    plans[("A", "long")] = [rng.integers(0, 9, size=11).tolist(), [4], [5]]

    async def client(s: Scheduler, tenant, key, steps) -> float:
        row = None
        for tokens in steps:
            result = await queue(s, tenant, key, tokens, row)
            row = result.row
        return float(row[0])

    async def main():
        s, rec = make(prefill_chunk=4)
        s.start()
        try:
            finals = await asyncio.wait_for(asyncio.gather(
                *(client(s, t, k, steps) for (t, k), steps in plans.items())), 30)
        finally:
            await s.close()
        return dict(zip(plans, finals, strict=True)), rec.batches

    finals, batches = asyncio.run(main())
    for (tenant, key), steps in plans.items():
        want = reference([x for tokens in steps for x in tokens])
        assert finals[(tenant, key)] == pytest.approx(want, rel=1e-6), key
    # The long input ran in 3 chunks (4 + 4 + 3 steps), then its two steps: 5 batches.
    assert sum(key == "long" for b in batches for _, key in b) == 5
    for b in batches:
        keys = [k for _, k in b]
        assert len(keys) == len(set(keys))  # never two rows of one session in a batch
        assert len(b) <= LIMIT


def test_a_tenant_may_hold_only_its_share_of_the_queue_while_others_queue():
    async def main():
        s, _ = make(max_queue=16, max_batch_size=4)  # not started: the queue only fills
        for i in range(16):
            queue(s, "A", f"a{i}", [1])
        with pytest.raises(QueueFull):  # alone, A may fill the whole queue, no more
            queue(s, "A", "a16", [1])
        # B gets in although the queue is full: two tenants queueing, 16 / 2 each.
        for i in range(8):
            queue(s, "B", f"b{i}", [1])
        with pytest.raises(TenantQueueFull) as err:
            queue(s, "B", "b8", [1])
        assert err.value.status == 429 and err.value.retry_after == 1
        with pytest.raises(TenantQueueFull):  # A holds more than its share now
            queue(s, "A", "a17", [1])
        # A third tenant: 16 / 3 = 5 each (at least a batch, 4); all or nothing for 6.
        with pytest.raises(TenantQueueFull):
            s.check_room(6, "C")
        s.check_room(5, "C")
        assert s.queued == 24  # the refused work was never queued
        await s.close()

    asyncio.run(main())


def test_without_fair_share_the_queue_bound_is_global():
    async def main():
        s, _ = make(max_queue=16, max_batch_size=4, fair_share=False)
        for i in range(16):
            queue(s, "A", f"a{i}", [1])
        with pytest.raises(QueueFull) as err:
            queue(s, "B", "b0", [1])
        assert err.value.status == 503
        await s.close()

    asyncio.run(main())


class Model:
    """The registry and the model version at once, for the session manager."""

    name, version = "m", 1

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.layout = scheduler.layout

    def get(self, name, version=None):
        return self


def test_the_session_manager_hands_each_tenants_name_to_the_scheduler():
    """Session creation, steps and predictions run as their tenant's work; without a
    tenant (no API keys) as nobody's."""
    alice, bob = (Tenant(name, False, Limits()) for name in ("alice", "bob"))

    def x(*tokens) -> Step:
        return Step({"x": np.array(tokens, dtype=np.int64)}, len(tokens), None, b"")

    async def main():
        s, rec = make()
        s.start()
        model = Model(s)
        m = SessionManager(model, MemoryStore(), session_ttl_s=60.0, max_session_ttl_s=60.0,
                           max_sessions=10)
        try:
            record, _ = await m.create(model, step=x(1, 2), tenant=alice)
            await m.step(record.session_id, lambda mv: x(3), tenant=alice)
            await m.predict(model, [x(4), x(5)], tenant=bob)
            plain, _ = await m.create(model, step=x(6))
            _, outcome = await m.step(plain.session_id, lambda mv: x(7))
        finally:
            await s.close()
        return rec.batches, record, outcome

    batches, record, outcome = asyncio.run(main())
    assert [t for b in batches for t, _ in b] == ["alice", "alice", "bob", "bob", None, None]
    assert [k for b in batches for _, k in b][:2] == [record.session_id] * 2
    assert float(outcome.row[0]) == pytest.approx(reference([6, 7]))
