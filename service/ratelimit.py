"""Token buckets: the arithmetic of a tenant's requests/s and tokens/s limits.

A bucket holds up to `burst` units and refills at `rate` units per second of the monotonic
clock (injectable, so tests step time by hand). Taking `n` units succeeds when the bucket
holds at least `min(n, burst)`; the level may then go below zero. That debt is what lets a
request bigger than the burst through at all (an 8,000-token prompt against a burst of
1,000), and it is paid back before anything else is admitted, so over any long stretch a
tenant gets `rate` units a second, never more. A refused take changes nothing and says how
long to wait until it would succeed (the Retry-After).

`give` returns units taken for work that then did not run (a step refused by the queue, the
unused part of a generation's `max_tokens`), capped at the burst like any refill.

Nothing here knows tenants or HTTP: auth.py holds a tenant's buckets and turns a refusal
into a 429.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    __slots__ = ("rate", "burst", "level", "_clock", "_at")

    def __init__(self, rate: float, burst: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (rate > 0 and burst > 0):
            raise ValueError("a token bucket needs a rate and a burst above 0")
        self.rate = float(rate)  # units per second
        self.burst = float(burst)  # most units held
        self.level = self.burst  # starts full
        self._clock = clock
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        if now > self._at:
            self.level = min(self.burst, self.level + (now - self._at) * self.rate)
        self._at = now

    def take(self, amount: float) -> float:
        """Take `amount` units: 0.0 if taken, else the seconds until this take would succeed
        (and nothing is taken)."""
        self._refill()
        need = min(amount, self.burst)
        if self.level >= need:
            self.level -= amount
            return 0.0
        return (need - self.level) / self.rate

    def give(self, amount: float) -> None:
        """Return units taken for work that did not run."""
        self._refill()
        self.level = min(self.burst, self.level + amount)

    def configure(self, rate: float, burst: float) -> None:
        """New limits (a reloaded keys file), keeping what the tenant has used: the level
        carries over, capped at the new burst."""
        if not (rate > 0 and burst > 0):
            raise ValueError("a token bucket needs a rate and a burst above 0")
        self._refill()
        self.rate, self.burst = float(rate), float(burst)
        self.level = min(self.level, self.burst)
