"""Token-bucket arithmetic (service/ratelimit.py) on a clock the test moves by hand."""

from __future__ import annotations

import pytest
from carousel.service.ratelimit import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def bucket(rate: float, burst: float) -> tuple[TokenBucket, Clock]:
    clock = Clock()
    return TokenBucket(rate, burst, clock), clock


def test_starts_full_and_a_burst_goes_through_at_once():
    b, _ = bucket(rate=2, burst=5)
    assert [b.take(1) for _ in range(5)] == [0.0] * 5
    assert b.level == 0.0


def test_an_empty_bucket_says_how_long_until_the_take_fits_and_takes_nothing():
    b, clock = bucket(rate=2, burst=5)
    assert b.take(5) == 0.0
    assert b.take(1) == pytest.approx(0.5)  # one unit at 2 per second
    assert b.take(3) == pytest.approx(1.5)
    assert b.level == 0.0  # refusals took nothing
    clock.advance(0.5)
    assert b.take(1) == 0.0
    assert b.take(1) == pytest.approx(0.5)


def test_refill_is_linear_in_time_and_capped_at_the_burst():
    b, clock = bucket(rate=10, burst=20)
    b.take(20)
    clock.advance(0.75)
    assert b.take(7.5) == 0.0 and b.level == pytest.approx(0.0)
    clock.advance(3600)
    assert b.take(0) == 0.0 and b.level == 20.0  # an idle hour holds no more than the burst


def test_a_take_bigger_than_the_burst_needs_a_full_bucket_and_leaves_a_debt():
    b, clock = bucket(rate=100, burst=1000)
    b.take(1)
    assert b.take(8000) == pytest.approx(0.01)  # not full: wait for the one unit
    clock.advance(0.01)
    assert b.take(8000) == 0.0
    assert b.level == pytest.approx(-7000.0)
    # the debt is paid before anything else fits: 70 s to get back to zero, +0.01 s for one
    assert b.take(1) == pytest.approx(70.01)
    clock.advance(70.01)
    assert b.take(1) == 0.0


def test_over_a_long_stretch_the_rate_is_never_exceeded():
    b, clock = bucket(rate=3, burst=6)
    taken = 0
    for _ in range(10_000):  # a client trying every 10 ms for 100 s
        if b.take(1) == 0.0:
            taken += 1
        clock.advance(0.01)
    assert taken <= 6 + 3 * 100  # the burst, then the rate
    assert taken >= 3 * 100  # and it gets all of the rate


def test_give_returns_units_up_to_the_burst():
    b, clock = bucket(rate=1, burst=10)
    b.take(10)
    b.give(4)
    assert b.level == 4.0
    b.give(100)
    assert b.level == 10.0


def test_configure_keeps_what_was_used_capped_at_the_new_burst():
    b, clock = bucket(rate=1, burst=10)
    b.take(7)
    b.configure(rate=5, burst=20)
    assert b.level == 3.0  # a reload neither refills nor forgives
    clock.advance(1)
    assert b.take(8) == 0.0  # the new rate
    b.configure(rate=5, burst=2)
    assert b.level == 0.0  # (3 + 5 - 8), within the new burst
    b.give(10)
    assert b.level == 2.0


@pytest.mark.parametrize("rate, burst", [(0, 1), (1, 0), (-1, 1)])
def test_a_bucket_needs_a_rate_and_a_burst(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)
    with pytest.raises(ValueError):
        TokenBucket(1, 1).configure(rate, burst)
