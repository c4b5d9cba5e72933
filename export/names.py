"""The graph's tensor names: the contract between export and the service's manifest reader."""

from __future__ import annotations

TOKENS = "tokens"  # int64 (batch, time)
LENGTHS = "lengths"  # int32 (batch): real steps per row of a padded batch
LOGITS = "logits"  # float32 (batch, time, vocab)
BATCH_AXIS = 1  # state tensors are (layers, batch, hidden)


def state_input(name: str) -> str:
    """'h' -> 'state_h'."""
    return f"state_{name}"


def state_output(name: str) -> str:
    """'h' -> 'state_h_out'."""
    return f"state_{name}_out"

OPSET = 17  # LSTM/GRU-14 (layout attribute), Squeeze-13 (axes as input); ORT 1.31 runs all
BATCH, TIME = "batch", "time"  # the symbolic dimensions of every graph input and output
