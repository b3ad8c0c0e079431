"""A token bucket: release at most ``rate`` jobs per second, bursts up to ``burst``.

Pure: the caller passes the time, so tests and the benchmark drive it without a clock.
"""

from __future__ import annotations


class TokenBucket:
    """Tokens refill continuously at ``rate`` per second up to ``burst``.

    Args:
        rate: tokens per second (> 0).
        burst: bucket capacity; ``max(1, rate)`` when 0.
        now: the time the bucket starts (full).
    """

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst or max(1.0, rate))
        self._tokens = self.burst
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def available(self, now: float) -> bool:
        """Whether a token can be taken at ``now``."""
        self._refill(now)
        return self._tokens >= 1.0

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def next_token_at(self, now: float) -> float:
        """When the next whole token will be there."""
        self._refill(now)
        return now if self._tokens >= 1.0 else now + (1.0 - self._tokens) / self.rate
