"""The step operation's decisions in the one case today's server cannot be made to show.

If a step applied, its answer was lost, and the server can no longer replay it (a server
that keeps no replay record, or a session that moved on), the retry is refused with
`409 position_mismatch`. With the real position equal to ours plus the step's length after
an attempt that may have applied, the step did apply: the SDK must report it applied
(`answer_lost`) and never send it again. The server always replays instead, so these tests
feed the operation (a plain generator, ops.py) the outcomes directly; everything else about
steps is tested against the real server through the fault proxy (test_client_faults.py).
"""

from __future__ import annotations

import pytest
from carousel_client import ConnectionFailed, PositionMismatch, Retry, Timeout
from carousel_client.ops import Call, SessionState, Sleep, step

POLICY = Retry(attempts=5)


def mismatch(position: int) -> PositionMismatch:
    return PositionMismatch("moved", details={"position": position})


def drive(op, outcomes):
    """Feed `outcomes` to the calls the operation makes; returns (calls, result)."""
    calls, outcome, outcomes = [], None, list(outcomes)
    while True:
        try:
            action = op.send(outcome)
        except StopIteration as stop:
            return calls, stop.value
        if isinstance(action, Sleep):
            outcome = None
            continue
        assert isinstance(action, Call)
        calls.append(action)
        outcome = outcomes.pop(0)


def test_a_lost_answer_that_cannot_be_replayed_counts_as_applied():
    state = SessionState("s", "m", 10)
    lost = ConnectionFailed("dropped", may_have_applied=True)
    calls, result = drive(step(POLICY, state, "héllo", None, None, None), [lost, mismatch(16)])
    assert len(calls) == 2 and calls[0] == calls[1]  # the very same step, same position
    assert calls[0].json == {"text": "héllo", "position": 10}
    assert result.answer_lost and result.position == 16 and result.top_k == ()
    assert state.position == 16


def test_a_mismatch_after_a_request_that_never_left_is_someone_elses_step():
    state = SessionState("s", "m", 10)
    unsent = ConnectionFailed("refused", may_have_applied=False)
    with pytest.raises(PositionMismatch) as e:
        drive(step(POLICY, state, "héllo", None, None, None), [unsent, mismatch(16)])
    assert e.value.position == 16 and state.position == 10


def test_a_mismatch_elsewhere_after_a_timeout_is_raised():
    state = SessionState("s", "m", 10)
    late = Timeout("slow", may_have_applied=True)
    with pytest.raises(PositionMismatch):
        drive(step(POLICY, state, "abc", None, None, None), [late, mismatch(20)])
    assert state.position == 10
