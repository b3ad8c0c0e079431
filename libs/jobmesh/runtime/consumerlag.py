"""Consumer lag per durable, polled from JetStream for the metrics.

A gauge callback runs synchronously at collection time and cannot ask the server, so a
background loop asks JetStream for each durable's consumer info every ``interval`` seconds
and leaves the numbers with :class:`~jobmesh.runtime.metrics.Metrics`. One request per
durable per interval, whatever the message rate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import nats.errors
from nats.js import JetStreamContext

from jobmesh.runtime.metrics import Metrics

__all__ = ["POLL_SECONDS", "poll_lag", "poll_once"]

log = logging.getLogger("jobmesh.runtime.consumerlag")

# Prometheus scrapes every 15 s by default; a fresher number than that is never read.
POLL_SECONDS = 10.0


async def poll_lag(
    js: JetStreamContext,
    durables: Callable[[], Sequence[tuple[str, str]]],
    metrics: Metrics,
    interval: float = POLL_SECONDS,
) -> None:
    """Keep ``metrics``' lag figures current until cancelled.

    Args:
        js: the service's JetStream context.
        durables: (stream, durable) of every pull consumer this process runs now.
        metrics: where the figures go.
        interval: seconds between polls.
    """
    while True:
        await poll_once(js, durables(), metrics)
        await asyncio.sleep(interval)


async def poll_once(js: JetStreamContext, durables: Sequence[tuple[str, str]], metrics: Metrics) -> None:
    """Ask JetStream once about each durable; one that does not answer keeps its last figure."""
    for stream, durable in durables:
        try:
            info = await js.consumer_info(stream, durable, timeout=2)
        except (TimeoutError, nats.errors.Error) as exc:
            log.debug("consumer info for %s/%s failed: %s", stream, durable, exc)
            continue
        metrics.set_lag(stream, durable, info.num_pending or 0, info.num_ack_pending or 0)
