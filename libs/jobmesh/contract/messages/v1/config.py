"""Cluster configuration kept in the ``jm_config`` KV bucket.

Keys: ``queue.<name>`` → ``QueueConfig``, ``tenant.<name>`` → ``TenantConfig``,
``zones`` → ``ZoneMap``. Set with ``jobmesh queue set``, ``jobmesh tenant set`` and
``jobmesh zones set``; schedulers watch the bucket and apply changes at once.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

__all__ = ["PartitionStats", "QueueConfig", "QueueStats", "TenantConfig", "ZoneMap"]


class QueueConfig(Struct, frozen=True, kw_only=True, tag="config.queue"):
    """Release regulation of one queue. 0 means unlimited."""

    rate: Annotated[float, Meta(ge=0), Meta(description="Jobs released per second (token bucket); 0: unlimited.")] = 0.0
    burst: Annotated[int, Meta(ge=0), Meta(description="The token bucket's size; 0: max(1, rate).")] = 0
    max_in_flight: Annotated[
        int, Meta(ge=0), Meta(description="At most this many released and not yet ended; 0: unlimited.")
    ] = 0
    preempt_min_priority: Annotated[
        Annotated[int, Meta(ge=0, le=9)] | None,
        Meta(
            description="The lowest priority (0-9) at which a job of this queue that asks for it (JobSpec.preempt) may stop lower-priority attempts to make room; null (the default): no job of this queue preempts."
        ),
    ] = None
    preemptible_fraction: Annotated[
        float,
        Meta(ge=0, le=1),
        Meta(
            description="The largest fraction (0 to 1) of this queue's running attempts that one preemption may stop; 1 (the default): no cap, 0: none of them."
        ),
    ] = 1.0

    def allows_preemption(self, priority: int) -> bool:
        """Whether a job of this queue at ``priority`` may preempt (when it asks to)."""
        return self.preempt_min_priority is not None and priority >= self.preempt_min_priority


class TenantConfig(Struct, frozen=True, kw_only=True, tag="config.tenant"):
    """A tenant's share: with weights 1 and 3, the second gets three starts for every one."""

    weight: Annotated[
        float,
        Meta(gt=0, le=1000),
        Meta(
            description="The tenant's share (above 0, at most 1000; default 1): with weights 1 and 3 the second gets three starts for every one."
        ),
    ] = 1.0


class ZoneMap(Struct, frozen=True, kw_only=True, tag="config.zones"):
    """Network distance between zones (symmetric; unknown pairs count as ``default``)."""

    distances: Annotated[
        dict[str, dict[str, Annotated[int, Meta(ge=0)]]],
        Meta(description="Network distance between zones (symmetric; zone to zone to a non-negative number)."),
    ] = {}
    default: Annotated[int, Meta(ge=0), Meta(description="The distance of a pair not listed (default 100).")] = 100


class QueueStats(Struct, frozen=True, kw_only=True):
    """Depth of one queue, per tenant, as its scheduler partition sees it."""

    queue: Annotated[str, Meta(description="The queue.")]
    pending: Annotated[int, Meta(description="Jobs waiting to be released.")]
    in_flight: Annotated[int, Meta(description="Jobs released and not yet ended.")]
    waiting: Annotated[
        dict[str, int],
        Meta(description="Held jobs by where the scheduler holds them (ready, timer, group, key, parked, room)."),
    ]
    tenants: Annotated[dict[str, int], Meta(description="Pending jobs per tenant.")]
    rate: Annotated[float, Meta(description="The queue's configured rate, per second; 0: unlimited.")] = 0.0
    max_in_flight: Annotated[int, Meta(description="The queue's configured in-flight cap; 0: unlimited.")] = 0
    reasons: Annotated[
        dict[str, int],
        Meta(description="Why the held ones wait, in words, with a count each; empty when none is held."),
    ] = {}


class PartitionStats(Struct, frozen=True, kw_only=True):
    """The queues of one partition, as its owner sees them (part of ``QueuesReply``)."""

    partition: Annotated[int, Meta(description="The partition number.")]
    owner: Annotated[str, Meta(description="The scheduler instance that owns it.")]
    queues: Annotated[list[QueueStats], Meta(description="Its queues' depths.")]
    at: Annotated[float, Meta(description="When the figures were taken. Unix time, in seconds.")]
