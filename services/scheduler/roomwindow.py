"""How many attempts a queue may have out once the binder said the cluster is full. Pure.

Without it a backlog larger than the cluster turns into a refusal storm: every waiting
job is released, refused for want of room, retried after its backoff and refused again,
and each round trip costs a JobReady, a JobUnplaceable, two commits and two history rows,
more than a job's real run. Under faults that work slows the real jobs, the backlog grows
and the storm with it (seen in ``make chaos``: 7,000 jobs cycling, 11 refusals each).

So a queue whose release was refused for want of free capacity keeps a window, as TCP
keeps its congestion window: at most what it had out at that moment. An attempt of the
queue that ends makes room for exactly one release (self-clocked by the queue's own
finishes); capacity that other queues free is found by probing, ``max(1, base/4)`` (at
most 32) more releases per second, and each refused job of the queue that another queue's
end wakes adds one. A refusal sets the window back. After ``RECOVER_SECONDS``
without one the window is gone. A refused job waits in the backlog, which sends nothing.
"""

from __future__ import annotations

import math

GROW_SECONDS = 1.0  # the window grows by one step per this many seconds without a refusal
RECOVER_SECONDS = 30.0  # without a refusal for this long, the queue is unbounded again
MAX_STEP = 32  # at most this many more per step: probes of a big window stay few
FULL = "no free capacity"  # the binder's reason when every candidate is full (a prefix)


class RoomWindow:
    """One queue's window: unbounded until :meth:`refused`, then as the module says."""

    __slots__ = ("base", "since")

    def __init__(self) -> None:
        self.base = 0
        self.since = -math.inf  # when the last refusal for want of room came

    def refused(self, out: int, now: float) -> None:
        """A release of this queue found no free capacity; ``out`` are still out."""
        self.base = out
        self.since = now

    def limit(self, now: float) -> float:
        """How many attempts may be out at ``now`` (inf: no limit)."""
        elapsed = now - self.since
        if elapsed >= RECOVER_SECONDS or elapsed < 0:  # < 0: the clock stepped back; open
            return math.inf
        return self.base + self._step() * math.floor(max(0.0, elapsed) / GROW_SECONDS)

    def opens_at(self, out: int, now: float) -> float | None:
        """When the window next lets one more out, with ``out`` out (None: it does now)."""
        if out < self.limit(now):
            return None
        steps = (out - self.base) // self._step() + 1
        return min(self.since + steps * GROW_SECONDS, self.since + RECOVER_SECONDS)

    def woken(self) -> None:
        """A refused job of this queue was woken because an attempt of another queue ended:
        that room is this queue's to try too (queues share the nodes they free)."""
        self.base += 1

    def _step(self) -> int:
        return min(MAX_STEP, max(1, self.base // 4))
