"""Cancelling attempts at the binder: where a ``JobCancelling`` goes, and which attempts
must never be bound. Pure decisions and bounded memory, no I/O.

A cancel reaches the binder while the attempt is out of the scheduler's hands. If a node
holds the attempt's reservation, the cancel is forwarded to that node (``AttemptCancel``),
which stops the attempt or never starts it. If none does yet, the ``JobReady`` may still be
on its way (to this replica or another): the cancel is tried again shortly, until the bind
timeout has passed since it was issued. Such an attempt is remembered as cancelled, so
that a ``JobReady`` for it that this replica sees later is refused instead of bound.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from jobmesh.runtime.backoff import backoff

# How soon a cancel with no holder yet is looked at again: short, because a cancel must
# stop a bound attempt within about a second of its binding.
RETRY_BASE = 0.2
RETRY_CAP = 1.0
# Cancelled attempts remembered per binder replica (about 100 bytes each).
REMEMBERED = 100_000


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the cancel to ``node_id``, which holds the attempt's reservation."""

    node_id: str


@dataclass(frozen=True, slots=True)
class Wait:
    """No node holds the attempt yet: look again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No node took the attempt within the bind timeout: it will not be bound any more
    (a late ``JobReady`` for it is refused)."""


CancelStep = Forward | Wait | GiveUp


def cancel_step(
    holder: str | None, issued_at: float, now: float, bind_timeout: float, deliveries: int, key: str
) -> CancelStep:
    """What to do with a ``JobCancelling`` now.

    Args:
        holder: the node holding the attempt's reservation, as read from the server when
            the cache did not show one; None when no node holds it.
        issued_at: when the cancel was issued (``JobCancelling.at``, unix seconds).
        now: the current unix time.
        bind_timeout: how long after its release an attempt can still be bound.
        deliveries: how often this cancel has been delivered, this time included.
        key: the attempt key (spreads the retries of different cancels).

    Returns:
        ``Forward`` to the holder; ``Wait`` while the bind timeout has not passed (never
        past it); ``GiveUp`` once it has.
    """
    if holder:
        return Forward(holder)
    left = issued_at + bind_timeout - now
    if left <= 0:
        return GiveUp()
    return Wait(min(left, backoff(deliveries, base=RETRY_BASE, cap=RETRY_CAP, key=key)))


class RecentAttempts:
    """A bounded memory of attempt keys (the most recent ``limit``): those this replica
    knows are cancelled, or knows have ended.

    Args:
        limit: how many keys are kept; the oldest go first.
    """

    def __init__(self, limit: int = REMEMBERED) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self._limit = limit
        self._keys: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> None:
        """Remember ``key`` (an attempt key)."""
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self._limit:
            self._keys.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)
