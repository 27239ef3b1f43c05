"""A token bucket for request quotas (XKS per-prefix quotas, KMS instance QPS)."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """Allows ``rate`` requests per second on average and bursts of up to ``burst``.

    Not thread-safe: one bucket belongs to one event loop.
    """

    def __init__(self, *, rate: float, burst: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._rate, self._burst, self._clock = rate, burst, clock
        self._tokens = burst
        self._at = clock()

    def take(self) -> bool:
        """Spend one token if there is one."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        # The epsilon absorbs float rounding of many small refills (ten 0.1 steps != 1.0).
        if self._tokens >= 1 - 1e-9:
            self._tokens -= 1
            return True
        return False
