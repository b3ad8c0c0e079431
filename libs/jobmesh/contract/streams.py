"""Every JetStream stream and KV bucket, as data: names, subjects and limits.

The runtime turns these into nats-py configurations (``jobmesh.runtime.provisioning``);
the schema generator documents them in the AsyncAPI document. Keeping them here, as plain
data, lets anyone read the storage contract without the runtime.

Every stream uses file storage and ``discard=new`` (an overload is a visible publish error,
never a silent loss) and a duplicate window (a re-publish with the same Nats-Msg-Id is a
no-op).
"""

from __future__ import annotations

from dataclasses import dataclass

from jobmesh.contract import subjects

DAY = 86_400.0
GIB = 1024**3
MAX_MSG_BYTES = 1024 * 1024  # consumers refuse earlier (Settings.max_message_bytes)
DUPLICATE_WINDOW = 120.0
BUCKET_MAX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """One stream: the subjects it stores and its explicit limits."""

    name: str
    subjects: tuple[str, ...]
    max_age: float
    max_bytes: int
    max_msgs: int = -1


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """One KV bucket. ``ttl_setting`` names the setting whose value is the bucket's TTL
    when it is created (a record that is not refreshed expires: that is what makes a
    heartbeat a lease); "" means records live until deleted."""

    name: str
    history: int
    ttl_setting: str = ""


STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec(subjects.STREAM_JOBS, (subjects.JOBS_ALL,), 7 * DAY, 4 * GIB, 20_000_000),
    StreamSpec(subjects.STREAM_DISPATCH, (subjects.DISPATCH_ALL, subjects.CANCEL_ALL), 2 * DAY, 2 * GIB, 5_000_000),
    StreamSpec(subjects.STREAM_LOGS, (subjects.LOGS_ALL,), 7 * DAY, 4 * GIB, 50_000_000),
    StreamSpec(subjects.STREAM_DEADLETTER, (subjects.DEADLETTER_ALL,), 30 * DAY, 1 * GIB, 1_000_000),
    StreamSpec(subjects.STREAM_EVENTS, (subjects.EVENTS_ALL,), 7 * DAY, 1 * GIB, 5_000_000),
)

BUCKETS: tuple[BucketSpec, ...] = (
    BucketSpec(subjects.KV_NODES, 1, ttl_setting="node_ttl_seconds"),
    BucketSpec(subjects.KV_ALLOC, 1),
    BucketSpec(subjects.KV_LEASES, 1, ttl_setting="lease_ttl_seconds"),
    BucketSpec(subjects.KV_CONFIG, 5),
    BucketSpec(subjects.KV_HANDLERS, 1),
    BucketSpec(subjects.KV_TRIGGERS, 5),
    BucketSpec(subjects.KV_TRIGGER_STATE, 1),
    BucketSpec(subjects.KV_TRIGGER_STATS, 1),
    BucketSpec(subjects.KV_WORKFLOWS, 1),
)


@dataclass(frozen=True, slots=True)
class ObjectStoreSpec:
    """One object store bucket: how long objects live and how much it may hold."""

    name: str
    max_age: float
    max_bytes: int
    max_age_setting: str = ""  # the Settings field that overrides max_age, if any


OBJECT_STORES: tuple[ObjectStoreSpec, ...] = (
    # Results, kept ones (workflow steps') included, expire this long after they were
    # written (JOBMESH_RESULT_RETENTION_SECONDS).
    ObjectStoreSpec(subjects.OBJ_RESULTS, 7 * DAY, 2 * GIB, max_age_setting="result_retention_seconds"),
    # Uploads are read when an attempt starts, so they must outlive the longest wait in a
    # queue plus the retries of the job: a week, like the job's own history.
    ObjectStoreSpec(subjects.OBJ_UPLOADS, 7 * DAY, 2 * GIB),
)

# JM_EXTERNAL is made by the trigger service from a setting, with JM_EVENTS' limits; it is
# not in STREAMS because its subjects are the operator's, not the contract's.
STREAM_EVENTS_NAME = subjects.STREAM_EVENTS
STREAM_EXTERNAL_NAME = subjects.STREAM_EXTERNAL

STREAMS_BY_NAME: dict[str, StreamSpec] = {s.name: s for s in STREAMS}
BUCKETS_BY_NAME: dict[str, BucketSpec] = {b.name: b for b in BUCKETS}
