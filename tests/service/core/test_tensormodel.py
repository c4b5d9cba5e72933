"""The generic core on a tensor model (the real TensorModel adapter on a fake graph): per-step
float inputs with a time axis, two state tensors with different batch axes, batch axes that
are not the first. Without a lengths input rows are never padded: only rows of equal shapes
share a batch; an overridable constant splits batches by value; with a lengths input rows
are padded along each input's own sequence axis. Every row's results equal a reference
computed for that row alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from carousel.service.scheduler import Batcher, Scheduler, Work, WorkResult
from core_fakes import fake_tensor, tensor_reference, tensor_row, tensor_state

TS = fake_tensor()  # x [time, batch, 3], u [batch, time], h [batch, 2], c [2, 3, batch]
PAD = fake_tensor(padded=True)  # the same graph with a lengths input n [batch]
ATOL = 1e-5
RNG = np.random.default_rng(7)


def block(t: int) -> tuple[np.ndarray, np.ndarray]:
    """A step of t time steps: x (t, 3), u (t,)."""
    return RNG.normal(size=(t, 3)).astype(np.float32), RNG.normal(size=t).astype(np.float32)


def prepared(mv, x, u, scale=None) -> tuple[dict, int]:
    tensors = {"x": x, "u": u}
    if scale is not None:
        tensors["scale"] = np.array(scale, dtype=np.float32)
    return mv.adapter.inputs(tensors)


def submit(s: Scheduler, mv, key, x, u, row=None, scale=None) -> asyncio.Future:
    inputs, length = prepared(mv, x, u, scale)
    fut = asyncio.get_running_loop().create_future()
    s.submit(Work(key, inputs, length, row, None, fut, s.batcher.signature(inputs)))
    return fut


def run_all(mv, make, **kw) -> list[WorkResult]:
    """A fresh scheduler for `mv`; `make(s)` submits work and returns the futures."""
    async def main():
        kw.setdefault("max_batch_delay_s", 0.05)
        s = Scheduler(mv.engine, mv.adapter, **kw)
        s.start()
        results = [await f for f in make(s)]
        await s.close()
        return results

    mv.engine.log.clear()
    return asyncio.run(main())


def check(result: WorkResult, x, u, row=None, scale: float = 1.0) -> None:
    """A row's results and new state against the reference for that row alone."""
    h0, c0 = (None, None) if row is None else tensor_state(row)
    y, energy, h, c = tensor_reference(x, u, h0, c0, scale)
    assert set(result.result) == {"y", "energy"}
    assert result.result["y"].shape == y.shape, (
        f"the answer holds {result.result['y'].shape[0]} steps of y for an input of "
        f"{len(x)} steps")
    np.testing.assert_allclose(result.result["y"], y, rtol=0, atol=ATOL)
    np.testing.assert_allclose(result.result["energy"], energy, rtol=0, atol=ATOL)
    np.testing.assert_allclose(result.row, tensor_row(h, c), rtol=0, atol=ATOL)


def test_without_lengths_only_rows_of_equal_length_share_a_batch():
    blocks = [block(t) for t in (3, 2, 3, 3, 2)]
    results = run_all(TS, lambda s: [submit(s, TS, None, x, u) for x, u in blocks])
    # Stateless work is taken all at once, but rows of 3 and 2 steps never share a call.
    assert TS.engine.calls == [[3, 3, 3], [2, 2]]
    assert not any(TS.engine.wide)
    for (x, u), r in zip(blocks, results, strict=True):
        check(r, x, u)
    first = TS.engine.log[0].feeds  # stacked along x's batch axis, 1
    for i, j in enumerate((0, 2, 3)):
        np.testing.assert_array_equal(first["x"][:, i], blocks[j][0])


def test_sessions_continue_from_their_rows_batched_together():
    first = [block(4) for _ in range(3)]
    rows = [r.row for r in run_all(TS, lambda s: [submit(s, TS, f"s{i}", x, u)
                                                  for i, (x, u) in enumerate(first)])]
    second = [block(2) for _ in range(3)]
    results = run_all(TS, lambda s: [submit(s, TS, f"s{i}", x, u, row=rows[i])
                                     for i, (x, u) in enumerate(second)])
    assert sorted(n for c in TS.engine.calls for n in c) == [2, 2, 2]
    assert max(len(c) for c in TS.engine.calls) > 1, "sessions batched together"
    for (x0, u0), (x, u), row, r in zip(first, second, rows, results, strict=True):
        check(r, x, u, row=row)
        _, _, h, c = tensor_reference(np.concatenate([x0, x]), np.concatenate([u0, u]))
        np.testing.assert_allclose(r.row, tensor_row(h, c), rtol=0, atol=ATOL)  # one pass


def test_without_lengths_a_long_input_runs_in_one_call():
    x, u = block(10)
    (r,) = run_all(TS, lambda s: [submit(s, TS, "long", x, u)], prefill_chunk=4)
    assert TS.engine.calls == [[10]] and TS.engine.wide == [False]
    check(r, x, u)


def test_an_overridable_constant_splits_batches_by_value():
    blocks = [block(3) for _ in range(5)]
    scales = [None, 0.5, None, 0.5, 2.0]
    results = run_all(TS, lambda s: [submit(s, TS, None, x, u, scale=k)
                                     for (x, u), k in zip(blocks, scales, strict=True)])
    assert TS.engine.calls == [[3, 3], [3, 3], [3]]
    # One value per call: the manifest's where no request overrides it.
    assert [float(c.feeds["scale"]) for c in TS.engine.log] == [1.0, 0.5, 2.0]
    for (x, u), k, r in zip(blocks, scales, results, strict=True):
        check(r, x, u, scale=1.0 if k is None else k)


def test_batcher_feeds_stack_along_each_inputs_batch_axis():
    batcher = Batcher(TS.engine)
    chunks = [prepared(TS, *block(3))[0] for _ in range(3)]
    rows = [np.arange(8, dtype=np.float32), None, -np.arange(8, dtype=np.float32)]
    feeds = batcher.feeds(chunks, np.array([3, 3, 3]), rows)
    assert set(feeds) == {"x", "u", "h", "c"}, "constants are the engine's to feed"
    assert feeds["x"].shape == (3, 3, 3) and feeds["u"].shape == (3, 3)
    assert feeds["h"].shape == (3, 2) and feeds["c"].shape == (2, 3, 3)
    for i, chunk in enumerate(chunks):
        np.testing.assert_array_equal(feeds["x"][:, i, :], chunk["x"])
        np.testing.assert_array_equal(feeds["u"][i], chunk["u"])
    np.testing.assert_array_equal(feeds["c"][:, :, 2], -np.arange(2, 8).reshape(2, 3))
    assert not feeds["h"][1].any() and not feeds["c"][:, :, 1].any()
    one = batcher.feeds(chunks[:1], np.array([3]), [None])
    assert one["x"].shape == (3, 1, 3) and one["u"].shape == (1, 3)
    np.testing.assert_array_equal(one["x"][:, 0], chunks[0]["x"])
    # An overridden constant goes along, once for the batch.
    scaled = [prepared(TS, *block(3), scale=0.5)[0] for _ in range(2)]
    feeds = batcher.feeds(scaled, np.array([3, 3]), [None, None])
    assert feeds["scale"].shape == () and float(feeds["scale"]) == 0.5


def test_batcher_signature_is_every_dimension_and_each_overridden_value():
    batcher = Batcher(TS.engine)
    sig = [batcher.signature(prepared(TS, *block(t), scale=k)[0])
           for t, k in ((3, None), (3, None), (2, None), (3, 0.5), (3, 0.5), (3, 2.0))]
    assert sig[0] == sig[1] and sig[3] == sig[4]
    assert len({sig[0], sig[2], sig[3], sig[5]}) == 4
    padded = Batcher(PAD.engine)  # with lengths, the sequence axis is not part of it
    assert padded.signature(prepared(PAD, *block(3))[0]) == \
        padded.signature(prepared(PAD, *block(7))[0])


def test_batcher_pads_and_chunks_along_each_inputs_sequence_axis():
    batcher = Batcher(PAD.engine)
    blocks = [block(t) for t in (3, 1, 2)]
    chunks = [prepared(PAD, x, u)[0] for x, u in blocks]
    feeds = batcher.feeds(chunks, np.array([3, 1, 2]), [None] * 3)
    assert feeds["x"].shape == (3, 3, 3) and feeds["u"].shape == (3, 3)
    assert feeds["n"].dtype == np.int32 and feeds["n"].tolist() == [3, 1, 2]
    for i, (x, u) in enumerate(blocks):
        t = len(x)
        np.testing.assert_array_equal(feeds["x"][:t, i], x)
        np.testing.assert_array_equal(feeds["u"][i, :t], u)
        assert not feeds["x"][t:, i].any() and not feeds["u"][i, t:].any()
    x, u = block(5)
    inputs, length = prepared(PAD, x, u, scale=0.5)
    work = Work("k", inputs, length, None, None, None, batcher.signature(inputs))
    work.consumed = 2
    part = batcher.chunk(work, 2)
    np.testing.assert_array_equal(part["x"], x[2:4])
    np.testing.assert_array_equal(part["u"], u[2:4])
    assert float(part["scale"]) == 0.5


def test_with_lengths_rows_of_different_lengths_share_a_padded_batch():
    blocks = [block(t) for t in (3, 2, 5)]
    results = run_all(PAD, lambda s: [submit(s, PAD, None, x, u) for x, u in blocks])
    assert PAD.engine.calls == [[3, 2, 5]]
    for (x, u), r in zip(blocks, results, strict=True):
        check(r, x, u)  # cut to its own length: the padding's NaN never reaches it


@pytest.mark.parametrize("chunk", [4, 10])
def test_with_lengths_a_long_input_runs_in_chunks_and_answers_every_step(chunk):
    x, u = block(10)
    (r,) = run_all(PAD, lambda s: [submit(s, PAD, "long", x, u)], prefill_chunk=chunk)
    assert PAD.engine.calls == ([[4], [4], [2]] if chunk == 4 else [[10]])
    _, _, h, c = tensor_reference(x, u)
    np.testing.assert_allclose(r.row, tensor_row(h, c), rtol=0, atol=ATOL)  # state: right
    steps = r.result["y"].shape[0]
    assert steps == 10, (
        f"a 10-step input run in chunks of {chunk} was answered with y for its last {steps} "
        f"steps only: the results of the earlier chunks are dropped (Scheduler._run_batch "
        f"keeps only the last chunk's result for a tensor model's per-step outputs)")
    check(r, x, u)
