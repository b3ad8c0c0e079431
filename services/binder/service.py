"""The binder service: atomic reservations on executor nodes.

Consumes JobReady (bind) and terminal events (release); writes the ``jm_alloc`` bucket
with compare-and-set; publishes JobBound on the chosen node's dispatch subject.
"""

from __future__ import annotations

from jobmesh.binder.allocations import Allocations
from jobmesh.binder.handlers import Binder
from jobmesh.contract import subjects
from jobmesh.contract.codec import Codec
from jobmesh.contract.messages.v1 import JobReady, NodesRequest, TerminalEvent
from jobmesh.runtime.nodes import NodeWatcher
from jobmesh.runtime.service import ConsumerSpec, ResponderSpec, Runtime
from jobmesh.runtime.settings import Settings
from jobmesh.runtime.tracing import Tracing


async def service_main(settings: Settings, tracing: Tracing) -> None:
    """Connect, watch nodes and allocations, bind and release until told to stop."""
    rt = Runtime(settings, tracing)
    await rt.connect()
    nodes = NodeWatcher(rt.js, settings.node_ttl_seconds)
    rt.spawn(nodes.run(), "nodes-watch")
    rt.spawn(nodes.expire_loop(), "nodes-expire")
    allocations = Allocations(rt.js)
    await allocations.open()
    rt.spawn(allocations.watch(), "alloc-watch")
    await nodes.wait_ready()
    await allocations.wait_ready()
    binder = Binder(allocations, nodes, rt.publisher, strategy=settings.placement)
    rt.spawn(binder.reap_lost_nodes(settings.node_ttl_seconds), "lost-nodes")
    await rt.serve(
        consumers=[
            ConsumerSpec(
                stream=subjects.STREAM_JOBS,
                durable=subjects.durable("binder", "ready"),
                filter_subjects=tuple(subjects.job_events("*", (subjects.READY,))),
                codec=Codec(JobReady, settings.max_message_bytes),
                handle=binder.bind,
                span_name="process jobmesh.v1.job.{partition}.ready",
            ),
            ConsumerSpec(
                stream=subjects.STREAM_JOBS,
                durable=subjects.durable("binder", "release"),
                filter_subjects=tuple(subjects.job_events("*", subjects.TERMINAL_KINDS)),
                codec=Codec(TerminalEvent, settings.max_message_bytes),
                handle=binder.release,
                span_name="process jobmesh.v1.job.{partition}.{terminal}",
            ),
        ],
        responders=[ResponderSpec(subjects.API_NODES, Codec(NodesRequest), binder.nodes, queue="binder")],
    )
