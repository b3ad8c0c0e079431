"""One backoff function, with jitter, for everything that waits before trying again.

The runtime's redelivery of a message after an outage, the scheduler's retry of a job the
binder found no room for, and the executor's re-publish of a batch all use it.

Why jitter: without it, every replica that failed at the same moment (an outage ends for
all of them at once) retries at the same moment, and again in step after each doubling.
Why keyed: the jitter comes from a hash of a key the caller gives (a message's stream
sequence, a job id) and the attempt number, not from a random source. The delay stays a
pure function of its inputs (a decision replayed from the same state decides the same
thing, and tests need no seed), while different messages, jobs and replicas spread out.
"""

from __future__ import annotations

import zlib


def backoff(attempt: int, *, base: float = 0.5, cap: float = 30.0, spread: float = 0.25, key: object = None) -> float:
    """The delay before try number ``attempt + 1``: exponential, capped, jittered.

    Args:
        attempt: how many tries failed so far (1 after the first failure).
        base: the delay after the first failure.
        cap: the longest delay; doubling stops there.
        spread: the jitter's width as a fraction of the delay: the result lies in
            ``(delay * (1 - spread), delay]``. Jitter only shortens, so ``cap`` stays the
            longest wait and a caller's "not before ``base``" still holds for ``base``
            times ``1 - spread``.
        key: what the jitter is derived from; ``None`` gives the exact nominal delay.

    Returns:
        Seconds to wait.
    """
    delay = min(cap, base * 2.0 ** min(max(0, attempt - 1), 62))
    if key is None or spread <= 0:
        return delay
    unit = zlib.crc32(f"{key}:{attempt}".encode()) / 0x1_0000_0000  # in [0, 1)
    return delay * (1.0 - spread * unit)
