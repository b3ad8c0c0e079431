"""The scheduler service: owns the backlog and its order, emits JobReady.

Each partition has a durable consumer of its submits, unplaceable replies and terminal
events. Today one scheduler process owns every partition.
"""

from __future__ import annotations

from jobmesh import subjects
from jobmesh.codec import Codec
from jobmesh.db import connect_pool
from jobmesh.messages.v1 import LifecycleEvent
from jobmesh.nodes import NodeWatcher
from jobmesh.runtime import ConsumerSpec, Runtime
from jobmesh.scheduler import store
from jobmesh.scheduler.handlers import PartitionScheduler
from jobmesh.settings import Settings

CONSUMED_KINDS = (subjects.SUBMITTED, subjects.UNPLACEABLE, *subjects.TERMINAL_KINDS)


async def service_main(settings: Settings) -> None:
    """Connect, rebuild every partition's backlog, schedule until told to stop."""
    rt = Runtime(settings)
    await rt.connect()
    pool = await connect_pool(settings.database_url, "scheduler", store.DDL, max_size=max(2, settings.partitions + 1))
    partitions: list[PartitionScheduler] = []

    def nodes_changed() -> None:
        for p in partitions:
            p.kick()

    nodes = NodeWatcher(rt.js, settings.node_ttl_seconds, on_change=nodes_changed)
    rt.spawn(nodes.run(), "nodes-watch")
    rt.spawn(nodes.expire_loop(), "nodes-expire")
    await nodes.wait_ready()
    codec = Codec(LifecycleEvent, settings.max_message_bytes)
    consumers = []
    for number in range(settings.partitions):
        part = PartitionScheduler(number, pool, rt.publisher, nodes)
        await part.load()
        partitions.append(part)
        rt.spawn(part.run_planner(), f"planner-{number}")
        consumers.append(
            ConsumerSpec(
                stream=subjects.STREAM_JOBS,
                durable=subjects.durable("scheduler", f"p{number}"),
                filter_subjects=tuple(subjects.job_events(number, CONSUMED_KINDS)),
                codec=codec,
                handle=part.handle,
                span_name="process jobmesh.v1.job.{partition}.{kind}",
            )
        )
    await rt.serve(consumers=consumers, on_stop=pool.close)
