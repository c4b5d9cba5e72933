"""Rows join and leave batches: stack and unstack are inverse, for any batch axis, with the
adapter's extras kept after the state."""

from __future__ import annotations

import numpy as np
from carousel.service.state import StateLayout
from core_fakes import V, fake_manifest, tensor_manifest

LM_STATES = fake_manifest().states  # state_a (2, batch, 3), state_b (batch, 4)
TS_STATES = tensor_manifest().states  # h (batch, 2), c (2, 3, batch)


def test_stack_then_unstack_gives_each_row_back():
    layout = StateLayout(LM_STATES, V)
    assert (layout.state_size, layout.extra_size, layout.size) == (10, V, 10 + V)
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=layout.size).astype(np.float32) for _ in range(5)]
    feeds = layout.stack(rows)
    assert feeds["state_a"].shape == (2, 5, 3) and feeds["state_b"].shape == (5, 4)
    # Row 3's state_a, read straight from its slice of the row (first 6 floats, shape (2, 3)).
    np.testing.assert_array_equal(feeds["state_a"][:, 3, :], rows[3][:6].reshape(2, 3))
    np.testing.assert_array_equal(feeds["state_b"][3], rows[3][6:10])
    outputs = {"state_a_out": feeds["state_a"], "state_b_out": feeds["state_b"]}
    extras = layout.extras(rows)
    assert extras.shape == (5, V)
    np.testing.assert_array_equal(extras[2], rows[2][10:])
    np.testing.assert_array_equal(layout.extra(rows[4]), rows[4][10:])
    back = layout.unstack(outputs, extras, 5)
    for got, want in zip(back, rows, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_trailing_batch_axis_and_no_extras():
    layout = StateLayout(TS_STATES)  # a tensor model keeps nothing beside the state
    assert (layout.state_size, layout.size, layout.state_bytes) == (8, 8, 32)
    rows = [np.arange(8, dtype=np.float32) + 10 * i for i in range(3)]
    feeds = layout.stack(rows)
    assert feeds["h"].shape == (3, 2) and feeds["c"].shape == (2, 3, 3)
    assert feeds["c"].flags.c_contiguous  # what onnxruntime is given
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(feeds["h"][i], row[:2])
        np.testing.assert_array_equal(feeds["c"][:, :, i], row[2:].reshape(2, 3))
    outputs = {"h_out": feeds["h"] * 2, "c_out": feeds["c"] * 2}
    back = layout.unstack(outputs, None, 3)
    for got, want in zip(back, rows, strict=True):
        np.testing.assert_array_equal(got, want * 2)
    tensors = layout.tensors(rows[1])  # with a batch axis of 1, where the graph has it
    assert tensors["h"].shape == (1, 2) and tensors["c"].shape == (2, 3, 1)
    np.testing.assert_array_equal(tensors["c"][:, :, 0], rows[1][2:].reshape(2, 3))


def test_state_outputs_feed_the_next_call_as_they_are():
    layout = StateLayout(TS_STATES)
    outputs = {"y": np.zeros(1), "h_out": np.ones((2, 2)), "c_out": np.ones((2, 3, 2))}
    feeds = layout.feeds_from(outputs)
    assert set(feeds) == {"h", "c"}
    assert feeds["h"] is outputs["h_out"] and feeds["c"] is outputs["c_out"]


def test_unstacked_rows_are_independent_copies():
    layout = StateLayout(LM_STATES, V)
    feeds = layout.stack([None, None])
    rows = layout.unstack({"state_a_out": feeds["state_a"], "state_b_out": feeds["state_b"]},
                          np.zeros((2, V), dtype=np.float32), 2)
    for row in rows:  # no row pins a batch array: each owns exactly its own bytes
        assert isinstance(row.base, bytes) and len(row.base) == row.nbytes == 4 * (6 + 4 + V)
        assert not row.flags.writeable  # rows are never changed in place
    assert not np.shares_memory(rows[0], rows[1])


def test_a_missing_row_is_zero_state():
    layout = StateLayout(LM_STATES, V)
    assert not layout.initial_row().any() and layout.initial_row().shape == (10 + V,)
    feeds = layout.stack([None, np.ones(layout.size, dtype=np.float32)])
    assert not feeds["state_a"][:, 0].any() and feeds["state_a"][:, 1].all()
    assert not feeds["state_b"][0].any() and feeds["state_b"][1].all()


def test_unstack_takes_outputs_and_extras_in_any_memory_order():
    """Rows are joined from the outputs' bytes: a strided output or extras array (a slice of
    a bigger one) must give the same rows as contiguous ones."""
    layout = StateLayout(LM_STATES, V)
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 4, 3)).astype(np.float32)
    b_wide = rng.normal(size=(4, 8)).astype(np.float32)
    wide = rng.normal(size=(4, 2, V)).astype(np.float32)
    outputs = {"state_a_out": np.asfortranarray(a), "state_b_out": b_wide[:, ::2]}
    extras = wide[:, 1, :]  # strided, as the logits of a batch's last position are
    rows = layout.unstack(outputs, extras, 4)
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(row[:6], a[:, i, :].reshape(-1))
        np.testing.assert_array_equal(row[6:10], b_wide[i, ::2])
        np.testing.assert_array_equal(row[10:], wide[i, 1])
