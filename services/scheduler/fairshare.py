"""Weighted fair share across tenants by stride scheduling.

Every tenant has a *pass*; the tenant with the smallest pass goes next and its pass grows
by ``1 / weight``, so over any stretch where both have work, a tenant of weight 3 gets three
starts for each start of a tenant of weight 1, however many jobs either has queued. A
tenant that was idle re-enters at the current virtual time, so idling banks no credit.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class Shares:
    """Pass values of the tenants of one queue.

    Args:
        weight_of: the current weight of a tenant (configuration may change it any time).
    """

    __slots__ = ("_weight_of", "passes", "vtime")

    def __init__(self, weight_of: Callable[[str], float]) -> None:
        self._weight_of = weight_of
        self.passes: dict[str, float] = {}
        self.vtime = 0.0

    def entering(self, tenant: str) -> float:
        """Pass of a tenant that becomes active: never below the virtual time."""
        value = max(self.passes.get(tenant, 0.0), self.vtime)
        self.passes[tenant] = value
        return value

    def charge(self, tenant: str) -> float:
        """Record one start for ``tenant``; returns its new pass."""
        current = self.passes.get(tenant, self.vtime)
        self.vtime = max(self.vtime, current)
        value = current + 1.0 / self._weight_of(tenant)
        self.passes[tenant] = value
        return value


class Rotation:
    """A heap of active tenants ordered by pass, with lazy correction of stale entries."""

    __slots__ = ("_count", "_heap")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._count = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, tenant: str, pass_value: float) -> None:
        self._count += 1
        heapq.heappush(self._heap, (pass_value, self._count, tenant))

    def peek(self, shares: Shares) -> str | None:
        """The tenant with the smallest current pass (entries may be stale; fix them)."""
        while self._heap:
            value, _, tenant = self._heap[0]
            current = shares.passes.get(tenant, value)
            if current != value:
                # The tenant was served elsewhere (another priority level): re-file it.
                self._count += 1
                heapq.heapreplace(self._heap, (current, self._count, tenant))
                continue
            return tenant
        return None

    def pop(self) -> None:
        heapq.heappop(self._heap)

    def replace(self, tenant: str, pass_value: float) -> None:
        self._count += 1
        heapq.heapreplace(self._heap, (pass_value, self._count, tenant))
