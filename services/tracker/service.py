"""Start, serve and stop the tracker: its consumers, responders and Postgres pool."""

from __future__ import annotations

import asyncpg

from jobmesh.contract import subjects
from jobmesh.contract.codec import Codec
from jobmesh.contract.messages.v1 import JobBound, JobGetRequest, JobListRequest, LifecycleEvent
from jobmesh.runtime.db import connect_pool
from jobmesh.runtime.service import BatchHandler, ConsumerSpec, ResponderSpec, Runtime, not_consumed
from jobmesh.runtime.settings import Settings
from jobmesh.runtime.tracing import Tracing
from jobmesh.tracker.handlers import EventsHandler, QueryHandler
from jobmesh.tracker.retention import Pruner, log_purger, purges_logs
from jobmesh.tracker.store import DDL, Store

QUEUE_GROUP = "tracker"


def consumers(settings: Settings, events: BatchHandler) -> list[ConsumerSpec]:
    """The tracker's two durable consumers; one handler records both streams.

    Args:
        settings: process settings (message size limit).
        events: the batch handler.
    """
    return [
        ConsumerSpec(
            stream=subjects.STREAM_JOBS,
            durable=subjects.durable("tracker", "jobs"),
            filter_subjects=(subjects.JOBS_ALL,),
            codec=Codec(LifecycleEvent, settings.max_message_bytes),
            handle=events,
            span_name="process jobmesh.v1.job.*.*",
        ),
        ConsumerSpec(
            stream=subjects.STREAM_DISPATCH,
            durable=subjects.durable("tracker", "dispatch"),
            filter_subjects=(subjects.DISPATCH_ALL,),
            codec=Codec(JobBound, settings.max_message_bytes),
            handle=events,
            span_name="process jobmesh.v1.node.*.dispatch",
        ),
    ]


def responders(queries: QueryHandler) -> list[ResponderSpec]:
    """The tracker's request/reply subjects, answered by a queue group of all replicas."""
    return [
        ResponderSpec(subjects.API_JOB_GET, Codec(JobGetRequest), queries.get, queue=QUEUE_GROUP),
        ResponderSpec(subjects.API_JOB_LIST, Codec(JobListRequest), queries.list, queue=QUEUE_GROUP),
    ]


async def open_store(settings: Settings) -> tuple[Store, asyncpg.Pool]:
    """Apply the tracker's DDL and open its pool (search_path = ``tracker``)."""
    pool = await connect_pool(settings.database_url, "tracker", DDL, max_size=4)
    return Store(pool), pool


async def service_main(settings: Settings, tracing: Tracing) -> None:
    """Connect, record and answer until told to stop, then drain and close the pool."""
    rt = Runtime(settings, tracing)
    await rt.connect()
    store, pool = await open_store(settings)
    # The pruner's own connection: a round never holds one the write path is waiting for.
    prune_pool = await connect_pool(settings.database_url, "tracker", DDL, max_size=1)
    pruner = Pruner(
        prune_pool,
        settings.history_retention_seconds,
        settings.retention_batch,
        # Purging is the provisioner's right: a tracker with an identity of its own leaves a
        # pruned job's lines to expire with JM_LOGS.
        purge=log_purger(rt.js) if rt.provisions and purges_logs(settings.history_retention_seconds) else None,
    )
    rt.spawn(pruner.run(settings.retention_interval_seconds), "history-pruner")

    async def close_pools() -> None:
        await prune_pool.close()
        await pool.close()

    await rt.serve(
        consumers=consumers(settings, EventsHandler(store, rt.nc, rt.tracing)),
        responders=responders(QueryHandler(store)),
        on_stop=close_pools,
    )


async def provision_main(settings: Settings, tracing: Tracing) -> None:
    """The tracker's part of the one-shot provisioner: its tables and durables, then exit."""
    rt = Runtime(settings, tracing)
    await rt.connect()
    try:
        pool = await connect_pool(settings.database_url, "tracker", DDL, max_size=1)
        await pool.close()
        await rt.ensure_consumers(consumers(settings, not_consumed))
    finally:
        await rt.close()
