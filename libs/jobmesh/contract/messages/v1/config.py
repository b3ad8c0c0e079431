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

    rate: Annotated[float, Meta(ge=0)] = 0.0  # jobs released per second (token bucket)
    burst: Annotated[int, Meta(ge=0)] = 0  # bucket size; 0 = max(1, rate)
    max_in_flight: Annotated[int, Meta(ge=0)] = 0  # released and not yet ended


class TenantConfig(Struct, frozen=True, kw_only=True, tag="config.tenant"):
    """A tenant's share: with weights 1 and 3, the second gets three starts for every one."""

    weight: Annotated[float, Meta(gt=0, le=1000)] = 1.0


class ZoneMap(Struct, frozen=True, kw_only=True, tag="config.zones"):
    """Network distance between zones (symmetric; unknown pairs count as ``default``)."""

    distances: dict[str, dict[str, Annotated[int, Meta(ge=0)]]] = {}
    default: Annotated[int, Meta(ge=0)] = 100


class QueueStats(Struct, frozen=True, kw_only=True):
    """Depth of one queue, per tenant, as its scheduler partition sees it."""

    queue: str
    pending: int
    in_flight: int
    waiting: dict[str, int]  # where the scheduler holds them (ready, timer, group, key, parked, room) -> count
    tenants: dict[str, int]  # tenant -> pending
    rate: float = 0.0
    max_in_flight: int = 0
    reasons: dict[str, int] = {}  # why the held ones wait, in words -> count


class PartitionStats(Struct, frozen=True, kw_only=True):
    """The queues of one partition, as its owner sees them (part of ``QueuesReply``)."""

    partition: int
    owner: str
    queues: list[QueueStats]
    at: float
