"""The binder service: atomic reservations on executor nodes.

Consumes JobReady (bind), terminal events (release) and JobCancelling (forward to the
attempt's node); writes the ``jm_alloc`` bucket with compare-and-set; publishes JobBound on
the chosen node's dispatch subject and AttemptCancel on its cancel subject.
"""

from __future__ import annotations

import logging

from jobmesh.binder.allocations import Allocations
from jobmesh.binder.handlers import Binder
from jobmesh.binder.metrics import BinderMetrics
from jobmesh.binder.reaping import Reaper
from jobmesh.contract import subjects
from jobmesh.contract.codec import Codec
from jobmesh.contract.messages.v1 import JobCancelling, JobReady, NodesRequest, TerminalEvent
from jobmesh.runtime.clusterconfig import ClusterConfig
from jobmesh.runtime.nodes import NodeWatcher
from jobmesh.runtime.service import BatchHandler, ConsumerSpec, ResponderSpec, Runtime, not_consumed
from jobmesh.runtime.settings import Settings
from jobmesh.runtime.tracing import Tracing

log = logging.getLogger("jobmesh.binder")


async def service_main(settings: Settings, tracing: Tracing) -> None:
    """Connect, watch nodes and allocations, bind, release and cancel until told to stop."""
    rt = Runtime(settings, tracing)
    await rt.connect()
    nodes = NodeWatcher(rt.js, settings.node_ttl_seconds)
    allocations = Allocations(rt.js)
    await allocations.open()
    # After a reconnect both watches may lag far behind their buckets: start them afresh.
    rt.on_reconnect(nodes.restart)
    rt.on_reconnect(allocations.restart)
    rt.spawn(nodes.run(), "nodes-watch")
    rt.spawn(nodes.expire_loop(), "nodes-expire")
    rt.spawn(allocations.watch(), "alloc-watch")
    # Preemption reads which queues may preempt, their caps and the tenants' weights.
    config = ClusterConfig(rt.js)
    rt.spawn(config.run(), "config-watch")
    await nodes.wait_ready()
    await allocations.wait_ready()
    await config.wait_ready()
    instruments = BinderMetrics()
    binder = Binder(
        allocations,
        nodes,
        rt.publisher,
        strategy=settings.placement,
        bind_timeout=settings.bind_timeout_seconds,
        node_ttl=settings.node_ttl_seconds,
        # A batch waiting on a KV request the old connection sent is handed back at once.
        reconnects=rt.reconnects,
        metrics=instruments,
        queues=config.queue,
        weight=config.weight,
    )
    instruments.observe_nodes(binder.usage)
    reaper = Reaper(rt.js, nodes, allocations, settings.node_grace_seconds, nats_side=rt.provisions)
    rt.spawn(reaper.run(settings.retention_interval_seconds), "node-reaper")
    await rt.serve(
        consumers=consumers(settings, binder.bind, binder.release, binder.cancel),
        responders=[ResponderSpec(subjects.API_NODES, Codec(NodesRequest), binder.nodes, queue="binder")],
    )


def consumers(
    settings: Settings, bind: BatchHandler, release: BatchHandler, cancel: BatchHandler
) -> list[ConsumerSpec]:
    """The binder's three durable consumers, on JM_JOBS, shared by every replica."""
    return [
        ConsumerSpec(
            stream=subjects.STREAM_JOBS,
            durable=subjects.durable("binder", "ready"),
            filter_subjects=tuple(subjects.job_events("*", (subjects.READY,))),
            codec=Codec(JobReady, settings.max_message_bytes),
            handle=bind,
            span_name="process jobmesh.v1.job.{partition}.ready",
        ),
        ConsumerSpec(
            stream=subjects.STREAM_JOBS,
            durable=subjects.durable("binder", "release"),
            filter_subjects=tuple(subjects.job_events("*", subjects.TERMINAL_KINDS)),
            codec=Codec(TerminalEvent, settings.max_message_bytes),
            handle=release,
            span_name="process jobmesh.v1.job.{partition}.{terminal}",
        ),
        ConsumerSpec(
            stream=subjects.STREAM_JOBS,
            durable=subjects.durable("binder", "cancel"),
            filter_subjects=tuple(subjects.job_events("*", (subjects.CANCELLING,))),
            codec=Codec(JobCancelling, settings.max_message_bytes),
            handle=cancel,
            span_name="process jobmesh.v1.job.{partition}.cancelling",
        ),
    ]


async def provision_main(settings: Settings, tracing: Tracing) -> None:
    """The binder's part of the one-shot provisioner: its durables, then exit."""
    rt = Runtime(settings, tracing)
    await rt.connect()
    try:
        await rt.ensure_consumers(consumers(settings, not_consumed, not_consumed, not_consumed))
    finally:
        await rt.close()
