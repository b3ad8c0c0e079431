"""Idempotent creation of every stream and KV bucket, with explicit limits.

What exists and its limits is data in the contract (:mod:`jobmesh.contract.streams`); this
module turns it into nats-py configurations and applies them. Running this twice, or from
every service at start, changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import TypeVar

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from jobmesh.contract import streams, subjects
from jobmesh.errors import Unavailable

log = logging.getLogger("jobmesh.provisioning")
T = TypeVar("T")


def stream_config(name: str) -> StreamConfig:
    """The full configuration of one jobmesh stream."""
    spec = streams.STREAMS_BY_NAME[name]
    return StreamConfig(
        name=name,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_age=spec.max_age,
        max_bytes=spec.max_bytes,
        max_msgs=spec.max_msgs,
        max_msg_size=streams.MAX_MSG_BYTES,
        duplicate_window=streams.DUPLICATE_WINDOW,
        num_replicas=1,
    )


def external_stream_config(patterns: list[str]) -> StreamConfig:
    """The stream that holds the subjects outside ``jobmesh.v1.events.>`` an operator lets
    trigger rules watch (``JOBMESH_TRIGGER_SUBJECTS``), with the limits of ``JM_EVENTS``."""
    config = stream_config(streams.STREAM_EVENTS_NAME)
    config.name = streams.STREAM_EXTERNAL_NAME
    config.subjects = list(patterns)
    return config


async def ensure_stream(js: JetStreamContext, config: StreamConfig, update: bool = False) -> None:
    """Create ``config``'s stream if it is missing.

    Args:
        js: the JetStream context.
        config: the stream's configuration.
        update: also bring an existing stream to ``config``'s limits (``jobmesh provision``).
            Services start with ``update=False`` so that what an operator changed by hand
            stays; an update keeps the existing replica count for the same reason.
    """
    name = config.name or ""
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(config)
        log.info("created stream %s", config.name)
        return
    if update:
        config.num_replicas = info.config.num_replicas or config.num_replicas
        await js.update_stream(config)
        log.info("updated stream %s", config.name)
        return
    missing = [s for s in config.subjects or [] if s not in (info.config.subjects or [])]
    if missing:
        # Subjects are part of the contract, not a limit an operator tunes: a newer version
        # that adds one (node.*.cancel) must find it stored, whatever else was changed by hand.
        info.config.subjects = [*(info.config.subjects or []), *missing]
        await js.update_stream(info.config)
        log.info("stream %s now also stores %s", config.name, ", ".join(missing))


async def ensure_bucket(js: JetStreamContext, bucket: str, history: int, ttl: float, replicas: int = 1) -> None:
    """Create a KV bucket if it is missing (its limits and replicas are set at creation).

    Args:
        js: the JetStream context.
        bucket: the bucket's name.
        history: values kept per key.
        ttl: seconds a value lives; 0 for ever.
        replicas: copies of the bucket's stream (3 on a NATS cluster, like the streams: a
            node record or a lease must survive the loss of a server as a job does).
    """
    try:
        await js.key_value(bucket)
    except BucketNotFoundError:
        await js.create_key_value(
            KeyValueConfig(
                bucket=bucket,
                history=history,
                ttl=ttl or None,
                storage=StorageType.FILE,
                max_bytes=streams.BUCKET_MAX_BYTES,
                replicas=replicas,
            )
        )
        log.info("created bucket %s", bucket)


# How long provisioning keeps asking a JetStream that does not answer. On a cluster busy
# with R3 traffic one stream lookup can exceed the API timeout (CI saw STREAM.INFO time out
# at 10 s while a restarted service provisioned mid-burst); each step is idempotent, so
# asking again is safe, and a service that gave up would only be restarted to do the same.
PROVISION_PATIENCE_SECONDS = 60.0


async def retry_timeouts(call: Callable[[], Awaitable[T]], what: str, deadline: float) -> T:
    """Await ``call()``, calling it again after a JetStream API timeout until ``deadline``
    (the loop's clock). Only for idempotent steps: a timed-out create may have happened.

    Raises:
        Unavailable: JetStream did not answer for ``what`` before ``deadline``.
    """
    loop = asyncio.get_running_loop()
    while True:
        try:
            return await call()
        except nats.errors.TimeoutError as exc:
            if loop.time() >= deadline:
                raise Unavailable(f"provisioning {what}: JetStream did not answer in time") from exc
            log.warning("provisioning %s: JetStream API timed out; asking again", what)


async def provision(
    js: JetStreamContext,
    node_ttl: float = 10.0,
    lease_ttl: float = 6.0,
    update: bool = False,
    replicas: int = 1,
    result_retention: float | None = None,
) -> None:
    """Create every stream and bucket jobmesh needs that is missing. Safe to run any time.

    Args:
        js: the JetStream context.
        node_ttl: seconds a node record lives without a heartbeat (set at bucket creation).
        lease_ttl: seconds a scheduler partition lease lives without renewal (likewise).
        update: also apply today's limits to existing streams (see ``ensure_stream``).
        replicas: replicas of every stream, KV bucket and object store at creation (3 on
            a NATS cluster).
        result_retention: seconds results live in jm_results (its max age); None keeps
            the contract's default.
    """
    ttls = {"node_ttl_seconds": node_ttl, "lease_ttl_seconds": lease_ttl}
    ages = {"result_retention_seconds": result_retention} if result_retention else {}
    deadline = asyncio.get_running_loop().time() + PROVISION_PATIENCE_SECONDS
    for spec in streams.STREAMS:
        config = stream_config(spec.name)
        config.num_replicas = replicas
        await retry_timeouts(partial(ensure_stream, js, config, update=update), f"stream {spec.name}", deadline)
    for bucket in streams.BUCKETS:
        ttl = ttls.get(bucket.ttl_setting, 0.0)
        await retry_timeouts(
            partial(ensure_bucket, js, bucket.name, bucket.history, ttl, replicas), f"bucket {bucket.name}", deadline
        )
    for store in streams.OBJECT_STORES:
        age = ages.get(store.max_age_setting)
        sized = replace(store, max_age=age) if age else store
        await retry_timeouts(
            partial(ensure_object_store, js, sized, replicas, update=update), f"object store {store.name}", deadline
        )
    if replicas > 1:
        await wait_for_leaders(js, provisioned_streams())


def provisioned_streams() -> list[str]:
    """The JetStream stream behind every stream, KV bucket and object store jobmesh uses."""
    return (
        [spec.name for spec in streams.STREAMS]
        + [kv_stream(bucket.name) for bucket in streams.BUCKETS]
        + [f"OBJ_{store.name}" for store in streams.OBJECT_STORES]
    )


async def wait_for_leaders(js: JetStreamContext, names: list[str], timeout: float = 30.0) -> None:
    """Return once each stream of ``names`` answers with a leader.

    On a cluster a stream just created (here or by another service starting beside this
    one) has no leader until its Raft group elects one, and meanwhile a lookup can answer
    "stream not found": a service that opened its buckets right after provisioning then
    failed to start (seen with five services starting at once on three servers).

    Raises:
        Unavailable: when a stream has no leader within ``timeout``, naming it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for name in names:
        while True:
            reason = ""
            try:
                info = await js.stream_info(name)
                if info.cluster is None or info.cluster.leader:
                    break
                reason = "no leader yet"
            except (NotFoundError, nats.errors.Error) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if loop.time() > deadline:
                raise Unavailable(f"stream {name} has no leader {timeout:.0f}s after provisioning ({reason})")
            await asyncio.sleep(0.1)  # a Raft election takes a few hundred milliseconds


async def ensure_object_store(
    js: JetStreamContext, store: streams.ObjectStoreSpec, replicas: int = 1, update: bool = False
) -> None:
    """Create an object store bucket if it is missing (its limits are set at creation);
    with ``update``, an existing one gets today's max age (``jobmesh provision``)."""
    try:
        await js.object_store(store.name)
        if update:
            info = await js.stream_info(f"OBJ_{store.name}")
            if info.config.max_age != store.max_age:
                await js.update_stream(replace(info.config, max_age=store.max_age))
                log.info("object store %s: max age now %gs", store.name, store.max_age)
    except (BucketNotFoundError, NotFoundError):
        await js.create_object_store(
            store.name,
            ObjectStoreConfig(
                bucket=store.name,
                ttl=store.max_age,
                max_bytes=store.max_bytes,
                storage=StorageType.FILE,
                replicas=replicas,
            ),
        )
        log.info("created object store %s", store.name)


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


def kv_stream(bucket: str) -> str:
    """The stream behind KV bucket ``bucket`` (JetStream's naming, ADR-8)."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    """The subject of ``key`` in KV bucket ``bucket`` (JetStream's naming, ADR-8)."""
    return f"$KV.{bucket}.{key}"


async def forget_dispatch(js: JetStreamContext, node_id: str, up_to: int | None = None) -> bool:
    """Remove what a node gone for good left on JM_DISPATCH: its dispatch and cancel
    subjects' messages and its dispatch durable. Destructive: the provisioner's (or, without
    NATS credentials, the binder's reaper's) to call.

    A node id that comes back after this starts a new durable from the stream's start, so it
    must find no old dispatch to run again.

    Args:
        js: a JetStream context allowed to purge and delete on JM_DISPATCH.
        node_id: the node.
        up_to: purge only messages up to this stream sequence (what was there before the
            caller checked the node is gone); None for all.

    Returns:
        Whether the node had a durable to delete.
    """
    for subject in (subjects.node_dispatch(node_id), subjects.node_cancel(node_id)):
        if up_to is None:
            await js.purge_stream(subjects.STREAM_DISPATCH, subject=subject)
        else:
            await js.purge_stream(subjects.STREAM_DISPATCH, subject=subject, seq=up_to + 1)
    try:
        await js.delete_consumer(subjects.STREAM_DISPATCH, subjects.durable("executor", node_id))
    except NotFoundError:
        return False  # never made, or another binder replica was first
    return True
