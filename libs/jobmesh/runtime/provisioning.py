"""Idempotent creation of every stream and KV bucket, with explicit limits.

Every stream uses file storage, ``discard=new`` (an overload is a visible publish error,
never a silent loss) and a duplicate window (re-publishing with the same Nats-Msg-Id is a
no-op). Running this twice, or from every service at start, changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from jobmesh.contract import subjects

log = logging.getLogger("jobmesh.runtime.provisioning")

DAY = 86_400.0
GIB = 1024**3
MAX_MSG_BYTES = 1024 * 1024  # consumers refuse earlier (Settings.max_message_bytes)
DUPLICATE_WINDOW = 120.0


@dataclass(frozen=True)
class StreamLimits:
    """Explicit limits of one stream."""

    max_age: float
    max_bytes: int
    max_msgs: int = -1


STREAMS: dict[str, tuple[list[str], StreamLimits]] = {
    subjects.STREAM_JOBS: ([subjects.JOBS_ALL], StreamLimits(7 * DAY, 4 * GIB, 20_000_000)),
    subjects.STREAM_DISPATCH: ([subjects.DISPATCH_ALL], StreamLimits(2 * DAY, 2 * GIB, 5_000_000)),
    subjects.STREAM_LOGS: ([subjects.LOGS_ALL], StreamLimits(7 * DAY, 4 * GIB, 50_000_000)),
    subjects.STREAM_DEADLETTER: ([subjects.DEADLETTER_ALL], StreamLimits(30 * DAY, 1 * GIB, 1_000_000)),
    subjects.STREAM_EVENTS: ([subjects.EVENTS_ALL], StreamLimits(7 * DAY, 1 * GIB, 5_000_000)),
}

# KV buckets: (history, ttl seconds; 0 = keep forever). Node records expire unless
# refreshed, which is what makes a heartbeat a lease.
BUCKETS: dict[str, tuple[int, float]] = {
    subjects.KV_ALLOC: (1, 0.0),
    subjects.KV_CONFIG: (5, 0.0),
}


def stream_config(name: str) -> StreamConfig:
    """The full configuration of one jobmesh stream."""
    subject_list, limits = STREAMS[name]
    return StreamConfig(
        name=name,
        subjects=subject_list,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_age=limits.max_age,
        max_bytes=limits.max_bytes,
        max_msgs=limits.max_msgs,
        max_msg_size=MAX_MSG_BYTES,
        duplicate_window=DUPLICATE_WINDOW,
        num_replicas=1,
    )


async def ensure_stream(js: JetStreamContext, config: StreamConfig, update: bool = False) -> None:
    """Create ``config``'s stream if it is missing.

    Args:
        js: the JetStream context.
        config: the stream's configuration.
        update: also bring an existing stream to ``config``'s limits (``jobmesh provision``).
            Services start with ``update=False`` so that what an operator changed by hand
            stays; an update keeps the existing replica count for the same reason.
    """
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        log.info("created stream %s", config.name)
        return
    if update:
        config.num_replicas = info.config.num_replicas or config.num_replicas
        await js.update_stream(config)
        log.info("updated stream %s", config.name)


async def ensure_bucket(js: JetStreamContext, bucket: str, history: int, ttl: float) -> None:
    """Create a KV bucket if it is missing (its limits are set at creation)."""
    try:
        await js.key_value(bucket)
    except BucketNotFoundError:
        await js.create_key_value(
            KeyValueConfig(
                bucket=bucket,
                history=history,
                ttl=ttl or None,
                storage=StorageType.FILE,
                max_bytes=256 * 1024 * 1024,
            )
        )
        log.info("created bucket %s", bucket)


async def provision(
    js: JetStreamContext, node_ttl: float = 10.0, lease_ttl: float = 6.0, update: bool = False, replicas: int = 1
) -> None:
    """Create every stream and bucket jobmesh needs that is missing. Safe to run any time.

    Args:
        js: the JetStream context.
        node_ttl: seconds a node record lives without a heartbeat (set at bucket creation).
        lease_ttl: seconds a scheduler partition lease lives without renewal (likewise).
        update: also apply today's limits to existing streams (see ``ensure_stream``).
        replicas: stream replicas at creation (3 on a NATS cluster).
    """
    for name in STREAMS:
        config = stream_config(name)
        config.num_replicas = replicas
        await ensure_stream(js, config, update=update)
    for bucket, (history, ttl) in BUCKETS.items():
        await ensure_bucket(js, bucket, history, ttl)
    await ensure_bucket(js, subjects.KV_NODES, 1, node_ttl)
    await ensure_bucket(js, subjects.KV_LEASES, 1, lease_ttl)


def consumer_config(
    durable: str,
    filter_subjects: list[str],
    *,
    ack_wait: float,
    max_ack_pending: int,
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
) -> ConsumerConfig:
    """A durable pull consumer with explicit acks, shared by every replica of a service."""
    return ConsumerConfig(
        durable_name=durable,
        deliver_policy=deliver_policy,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        # The server never gives up on a message: the runtime decides when to (fate_for),
        # so a long outage delays work instead of dropping it.
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
        max_waiting=512,
        filter_subject=filter_subjects[0] if len(filter_subjects) == 1 else None,
        filter_subjects=filter_subjects if len(filter_subjects) > 1 else None,
    )


async def ensure_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    """Create a durable consumer or update its mutable settings (create is an upsert).

    Raises:
        nats.js.errors.APIError: when an immutable setting differs; the consumer is left
            alone, because recreating it would lose its position in the stream.
    """
    await js.add_consumer(stream, config)
