"""The scheduler service: owns the backlog and its order, emits JobReady, decides retries.

Queues hash onto partitions; each partition has one active owner, chosen by lease, and
the partitions are spread over the live instances. The owner of a partition runs its
durable consumer (submits, unplaceable replies, attempt endings), its planner (releases,
timers, attempt leases) and its explain and cancel responders.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.js import JetStreamContext

from jobmesh.contract import subjects
from jobmesh.contract.codec import Codec
from jobmesh.contract.messages.v1 import (
    CancelReply,
    CancelRequest,
    ExplainReply,
    ExplainRequest,
    LifecycleEvent,
    NodeInfo,
    PartitionStats,
    QueuesReply,
    QueuesRequest,
    QueueStats,
)
from jobmesh.runtime.clusterconfig import ClusterConfig
from jobmesh.runtime.db import connect_pool
from jobmesh.runtime.nodes import NodeWatcher
from jobmesh.runtime.service import BatchHandler, ConsumerSpec, Envelope, ResponderSpec, Runtime, not_consumed
from jobmesh.runtime.settings import Settings
from jobmesh.runtime.tracing import Tracing
from jobmesh.scheduler import store
from jobmesh.scheduler.handlers import PartitionScheduler, Placements
from jobmesh.scheduler.leases import Leases
from jobmesh.scheduler.metrics import SchedulerMetrics
from jobmesh.scheduler.results import ObjectResults

log = logging.getLogger("jobmesh.scheduler")

CONSUMED_KINDS = (
    subjects.SUBMITTED,
    subjects.UNPLACEABLE,
    *subjects.TERMINAL_KINDS,
    subjects.DEP_WATCH,
    subjects.DEP_ENDED,
    subjects.CHILD_ADDED,
)


async def service_main(settings: Settings, tracing: Tracing) -> None:
    """Connect, take partitions as leases allow, schedule until told to stop."""
    rt = Runtime(settings, tracing)
    await rt.connect()
    pool = await connect_pool(settings.database_url, "scheduler", store.DDL, max_size=max(2, settings.partitions + 1))
    owned: dict[int, PartitionScheduler] = {}

    def kick_all() -> None:
        for part in owned.values():
            part.kick()

    def config_changed() -> None:
        for part in owned.values():
            part.config_changed()

    def record(node: NodeInfo, at: float) -> None:
        # Every node record renews the leases of the attempts it lists, in every partition
        # this process owns.
        for part in owned.values():
            part.observe(node, at)

    nodes = NodeWatcher(rt.js, settings.node_ttl_seconds, on_change=kick_all, on_record=record)
    rt.on_reconnect(nodes.restart)
    config = ClusterConfig(rt.js, on_change=config_changed)
    rt.spawn(nodes.run(), "nodes-watch")
    rt.spawn(nodes.expire_loop(), "nodes-expire")
    rt.spawn(config.run(), "config-watch")
    await nodes.wait_ready()
    await config.wait_ready()
    placements = Placements(nodes, config, settings.placement)
    results = ObjectResults(rt.js)
    codec: Codec[Any] = Codec(LifecycleEvent, settings.max_message_bytes)
    instruments = SchedulerMetrics()
    # Each owned partition's backlog, read at collection time (list(): a copy in one step).
    instruments.observe_backlogs(lambda: [part.backlog for part in list(owned.values())])
    planners: dict[int, asyncio.Task] = {}
    pruners: dict[int, asyncio.Task] = {}

    async def gained(number: int) -> None:
        part = PartitionScheduler(
            number,
            pool,
            rt.publisher,
            placements,
            config,
            rt.tracing,
            nodes=nodes,
            partitions=settings.partitions,
            bind_timeout=settings.bind_timeout_seconds,
            # A view that just caught up may still be missing a heartbeat's worth of
            # renewals: decide on leases only once it has been current for a node TTL.
            settle=settings.node_ttl_seconds,
            results=results,
            metrics=instruments,
            processed_through=functools.partial(processed_through, rt.js, subjects.durable("scheduler", f"p{number}")),
        )
        await part.load()
        owned[number] = part
        planners[number] = rt.spawn(part.run_planner(), f"planner-{number}")
        pruners[number] = rt.spawn(part.run_pruner(settings.done_retention_seconds), f"pruner-{number}")
        await rt.add_responder(
            ResponderSpec(
                subjects.scheduler_explain(number), Codec(ExplainRequest), _explain(part), queue=f"scheduler-p{number}"
            )
        )
        await rt.add_responder(
            ResponderSpec(
                subjects.scheduler_cancel(number), Codec(CancelRequest), _cancel(part), queue=f"scheduler-p{number}"
            )
        )
        await rt.add_consumer(partition_consumer(number, codec, part.handle))

    async def lost(number: int) -> None:
        # Also called after a take-over failed half way: every step tolerates "not there".
        await rt.remove_consumer(subjects.durable("scheduler", f"p{number}"))
        await rt.remove_responder(subjects.scheduler_explain(number))
        await rt.remove_responder(subjects.scheduler_cancel(number))
        for tasks in (planners, pruners):
            task = tasks.pop(number, None)
            if task is not None:
                task.cancel()
        part = owned.pop(number, None)
        if part is not None:
            # A batch or cancel in hand commits (or fails) before the lease key goes, so the
            # next owner never loads the partition from under it.
            await part.quiesce()

    leases = Leases(rt.js, settings.instance, settings.partitions, settings.lease_ttl_seconds, gained, lost)
    rt.on_reconnect(leases.reconnected)
    rt.spawn(leases.run(), "leases")
    rt.add_health_check(leases.healthy)

    async def queues(env: Envelope) -> QueuesReply:
        now = time.time()
        stats = []
        for number, part in sorted(owned.items()):
            rows = [
                QueueStats(
                    queue=name,
                    pending=s["pending"],
                    in_flight=s["in_flight"],
                    waiting=s["waiting"],
                    tenants=s["tenants"],
                    rate=s["rate"],
                    max_in_flight=s["max_in_flight"],
                    reasons=s["reasons"],
                )
                for name, s in sorted(part.backlog.stats(now).items())
            ]
            stats.append(PartitionStats(partition=number, owner=settings.instance, queues=rows, at=now))
        return QueuesReply(instance=settings.instance, partitions=settings.partitions, owned=stats)

    async def stop() -> None:
        await leases.release_all()
        await pool.close()

    await rt.serve(
        # No queue group: every scheduler answers for the partitions it owns.
        responders=[ResponderSpec(subjects.API_QUEUES, Codec(QueuesRequest), queues, queue="")],
        on_stop=stop,
    )


def _explain(part: PartitionScheduler) -> Callable[[Envelope], Awaitable[ExplainReply]]:
    async def handle(env: Envelope) -> ExplainReply:
        return await part.explain(env.message)

    return handle


def _cancel(part: PartitionScheduler) -> Callable[[Envelope], Awaitable[CancelReply]]:
    async def handle(env: Envelope) -> CancelReply:
        return await part.cancel(env.message)

    return handle


def partition_consumer(number: int, codec: Codec[Any], handle: BatchHandler) -> ConsumerSpec:
    """The durable consumer of partition ``number``: run by the instance holding its lease."""
    return ConsumerSpec(
        stream=subjects.STREAM_JOBS,
        durable=subjects.durable("scheduler", f"p{number}"),
        filter_subjects=tuple(subjects.job_events(number, CONSUMED_KINDS)),
        codec=codec,
        handle=handle,
        span_name="process jobmesh.v1.job.{partition}.{kind}",
    )


async def provision_main(settings: Settings, tracing: Tracing) -> None:
    """The scheduler's part of the one-shot provisioner: its tables and every partition's
    durable, then exit. It takes no lease, so it never schedules."""
    rt = Runtime(settings, tracing)
    await rt.connect()
    try:
        pool = await connect_pool(settings.database_url, "scheduler", store.DDL, max_size=1)
        await pool.close()
        codec: Codec[Any] = Codec(LifecycleEvent, settings.max_message_bytes)
        await rt.ensure_consumers([partition_consumer(n, codec, not_consumed) for n in range(settings.partitions)])
    finally:
        await rt.close()


async def processed_through(js: JetStreamContext, durable: str) -> float:
    """Until when a partition's events on JM_JOBS are all handled: the time the first
    message after the durable's ack floor was stored (everything before it is acked), inf
    when nothing is outstanding, -inf when the server does not say.

    The message after the floor may be another partition's (JM_JOBS holds them all), which
    only makes the answer earlier than it could be: never later.
    """
    try:
        info = await js.consumer_info(subjects.STREAM_JOBS, durable)
        if not info.num_pending and not info.num_ack_pending:
            return math.inf
        first = await js.get_msg(subjects.STREAM_JOBS, (info.ack_floor.stream_seq or 0) + 1)
    except (TimeoutError, nats.errors.Error) as exc:
        log.warning("cannot tell how far %s has handled its events (%s): leases wait", durable, exc)
        return -math.inf
    return first.time.timestamp() if first.time is not None else -math.inf
