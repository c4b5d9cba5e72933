"""Padding and masking: padded positions add nothing to the loss and never move the state,
in the model and through the trainer's StreamBatches / masked_loss / estimate_bpb path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from carousel.model.data import PAD_TARGET, StreamBatches
from carousel.model.train import estimate_bpb, masked_loss
from model_helpers import PATHS, make_model, random_state, random_tokens
from numpy_reference import cross_entropy, forward, numpy_params

TOL = 1e-5


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.mark.parametrize("variant,fused", PATHS)
def test_appending_padding_changes_neither_loss_nor_state(variant, fused):
    model = make_model(variant, fused=fused)
    state = random_state(model, batch=1)
    tokens, targets = random_tokens(1, 6, seed=3), random_tokens(1, 6, seed=4)
    garbage = random_tokens(1, 5, seed=5)  # not zeros: padding must be ignored, whatever it is
    padded_tokens = torch.cat([tokens, garbage], dim=1)
    padded_targets = torch.cat([targets, torch.full((1, 5), PAD_TARGET)], dim=1)
    with torch.no_grad():
        logits, new_state = model(tokens, state)
        loss = masked_loss(logits, targets)
        padded_logits, padded_state = model(padded_tokens, state, torch.tensor([6]))
        padded_loss = masked_loss(padded_logits, padded_targets)

    assert abs(float(padded_loss) - float(loss)) <= 1e-6
    for a, b in zip(padded_state, new_state, strict=True):
        assert max_diff(a, b) <= TOL
    # and the loss is the mean next-byte cross entropy, computed independently
    total, count = cross_entropy(logits.numpy(), targets.numpy())
    assert count == 6
    assert abs(float(loss) - total / count) <= 1e-5


@pytest.mark.parametrize("variant,fused", PATHS)
def test_rows_of_a_padded_batch_equal_their_own_runs(variant, fused):
    model = make_model(variant, fused=fused, seed=21)
    state = random_state(model, batch=4, seed=22)
    tokens = random_tokens(4, 9, seed=23)
    lengths = torch.tensor([9, 3, 6, 0])
    with torch.no_grad():
        logits, new_state = model(tokens, state, lengths)
        outputs, _ = model.layers[0](model.embedding(tokens), tuple(s[0] for s in state), lengths)
        for b, n in enumerate(lengths.tolist()):
            row_state = tuple(s[:, b : b + 1] for s in state)
            if n == 0:  # a zero-length row keeps its state exactly
                for got, before in zip(new_state, row_state, strict=True):
                    assert torch.equal(got[:, b : b + 1], before)
                continue
            row_logits, row_new = model(tokens[b : b + 1, :n], row_state)
            assert max_diff(logits[b, :n], row_logits[0]) <= TOL
            for got, want in zip(new_state, row_new, strict=True):
                assert max_diff(got[:, b : b + 1], want) <= TOL
            assert torch.all(outputs[b, n:] == 0)  # past its length a row outputs zeros
    assert torch.all(outputs[3] == 0)


@pytest.mark.parametrize("variant,fused", PATHS)
def test_a_batch_of_only_empty_rows_keeps_every_state(variant, fused):
    model = make_model(variant, fused=fused)
    state = random_state(model, batch=3)
    with torch.no_grad():
        logits, new_state = model(random_tokens(3, 4), state, torch.zeros(3, dtype=torch.long))
    assert logits.shape == (3, 4, 256)
    for got, before in zip(new_state, state, strict=True):
        assert torch.equal(got, before)


def line_data(n_lines: int, seed: int = 0) -> np.ndarray:
    """Text bytes with lines of very different lengths, so StreamBatches' rows differ."""
    rng = np.random.default_rng(seed)
    lines = [rng.integers(97, 123, size=int(rng.integers(1, 40))).astype(np.uint8).tobytes()
             for _ in range(n_lines)]
    return np.frombuffer(b"\n".join(lines) + b"\n", dtype=np.uint8)


def test_stream_batches_cover_every_row_exactly_once():
    data = line_data(20)
    batches = StreamBatches(data, batch_size=3, seq_len=16)
    chunks = [batches.get_batch(k) for k in range(batches.chunks_per_epoch)]
    starts = [start for start, _ in batches.bounds]
    assert starts[0] == 0 and batches.bounds[-1][1] == len(data)
    assert all(data[s - 1] == ord("\n") for s in starts[1:])  # rows start at line starts
    for (_, end), (start, _) in zip(batches.bounds, batches.bounds[1:], strict=False):
        assert end == start  # shards are contiguous: no byte left out
    padded = 0
    for b, (start, end) in enumerate(batches.bounds):
        xs, ys = [], []
        for x, y, lengths in chunks:
            n = int(lengths[b])
            xs += x[b, :n].tolist()
            ys += y[b, :n].tolist()
            assert torch.all(y[b, n:] == PAD_TARGET)
            padded += 16 - n
        assert xs == data[start : end - 1].tolist()  # inputs: the row's bytes but the last
        assert ys == data[start + 1 : end].tolist()  # targets: the next byte of each
    assert padded > 0  # rows differ in length, so padding was exercised


@pytest.mark.parametrize("variant,fused", PATHS)
def test_trainer_chunks_equal_one_pass_per_row(variant, fused):
    """Walk StreamBatches' padded chunks carrying state as the trainer does: the summed
    masked loss and every row's final state equal one unpadded pass over each row."""
    model = make_model(variant, fused=fused, seed=31)
    data = line_data(24, seed=1)
    batches = StreamBatches(data, batch_size=3, seq_len=16)
    state, total, count = model.init_state(3), 0.0, 0
    with torch.no_grad():
        for k in range(batches.chunks_per_epoch):
            x, y, lengths = batches.get_batch(k)
            logits, state = model(x, state, lengths)
            n = int((y != PAD_TARGET).sum())
            assert n == int(lengths.sum())
            total += float(masked_loss(logits, y)) * n
            count += n

        want_total, want_count = 0.0, 0
        for b, (start, end) in enumerate(batches.bounds):
            row = torch.from_numpy(data[start : end - 1].astype(np.int64))[None]
            row_logits, row_state = model(row, model.init_state(1))
            row_total, row_count = cross_entropy(row_logits.numpy(), data[start + 1 : end])
            want_total += row_total
            want_count += row_count
            for got, want in zip(state, row_state, strict=True):
                assert max_diff(got[:, b : b + 1], want) <= TOL
    assert count == want_count == len(data) - 3
    assert abs(total - want_total) <= 1e-4 * want_count


def test_estimate_bpb_equals_numpy_bits_per_byte():
    """Validation bits per byte: the numpy model's cross entropy over each row of the
    stream, in one pass from zero state, in bits."""
    model = make_model("lstm", layers=2, embed=4, hidden=8, seed=41)
    data = line_data(90, seed=2)
    assert 1536 <= len(data) < 2048  # estimate_bpb then uses len // 512 = 3 rows
    bpb = estimate_bpb(model, data, max_bytes=len(data), batch_size=16, seq_len=32)
    params = numpy_params(model)
    total, count = 0.0, 0
    for start, end in StreamBatches(data, 3, 32).bounds:
        zeros = [np.zeros((2, 1, 8))] * 2
        logits, _ = forward(params, "lstm", data[None, start : end - 1].astype(np.int64), zeros)
        row_total, row_count = cross_entropy(logits, data[start + 1 : end])
        total += row_total
        count += row_count
    assert abs(bpb - total / count / math.log(2)) <= 1e-4
