"""Rows join and leave batches: stack and unstack are inverse, for any batch axis."""

from __future__ import annotations

import numpy as np
from carousel.service.state import StateLayout
from core_fakes import STATES, V


def test_stack_then_unstack_gives_each_row_back():
    layout = StateLayout(STATES, V)
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=layout.size).astype(np.float32) for _ in range(5)]
    feeds = layout.stack(rows)
    assert feeds["state_a"].shape == (2, 5, 3) and feeds["state_b"].shape == (5, 4)
    # Row 3's state_a, read straight from its slice of the row (first 6 floats, shape (2, 3)).
    np.testing.assert_array_equal(feeds["state_a"][:, 3, :], rows[3][:6].reshape(2, 3))
    np.testing.assert_array_equal(feeds["state_b"][3], rows[3][6:10])
    outputs = {"state_a_out": feeds["state_a"], "state_b_out": feeds["state_b"]}
    logits = np.stack([r[layout.state_size:] for r in rows])
    back = layout.unstack(outputs, logits)
    for got, want in zip(back, rows, strict=True):
        np.testing.assert_array_equal(got, want)


def test_unstacked_rows_are_independent_copies():
    layout = StateLayout(STATES, V)
    feeds = layout.stack([None, None])
    rows = layout.unstack({"state_a_out": feeds["state_a"], "state_b_out": feeds["state_b"]},
                          np.zeros((2, V), dtype=np.float32))
    for row in rows:  # no row pins a batch array: each owns exactly its own bytes
        assert isinstance(row.base, bytes) and len(row.base) == row.nbytes == 4 * (6 + 4 + V)
        assert not row.flags.writeable  # rows are never changed in place
    assert not np.shares_memory(rows[0], rows[1])


def test_a_missing_row_is_zero_state():
    layout = StateLayout(STATES, V)
    feeds = layout.stack([None, np.ones(layout.size, dtype=np.float32)])
    assert not feeds["state_a"][:, 0].any() and feeds["state_a"][:, 1].all()
