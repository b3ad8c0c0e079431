"""The job model and its lifecycle events.

A ``JobSpec`` is what a user declares. Lifecycle events are tagged, frozen structs with a
``type`` field on the wire; ``LifecycleEvent`` is their union, decoded with one typed
decoder per consumer.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "Resources", "ProcessRuntime", "NoopRuntime", "JobRuntime", "Constraints", "Locality",
    "Timeouts", "JobSpec", "JobSubmitted", "JobReady", "JobUnplaceable", "JobBound",
    "JobStarted", "JobSucceeded", "JobFailed", "JobExpired", "JobLost", "LogLine",
    "LifecycleEvent", "TerminalEvent", "JobError", "Priority",
]

NonNegInt = Annotated[int, Meta(ge=0)]
Name = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
Priority = Annotated[int, Meta(ge=0, le=9)]
Seconds = Annotated[float, Meta(gt=0)]
# Subject tokens may not contain dots or wildcards, so ids are restricted to this set.
Id = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]


class Resources(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What one attempt reserves on its node for as long as it runs."""

    cpu_milli: NonNegInt = 100
    memory_mb: NonNegInt = 64
    gpu: NonNegInt = 0
    gpu_kind: str = ""
    disk_mb: NonNegInt = 0


class ProcessRuntime(Struct, frozen=True, kw_only=True, tag="process", tag_field="kind"):
    """Run ``argv`` as a subprocess in a fresh working directory."""

    argv: Annotated[list[str], Meta(min_length=1)]
    env: dict[str, str] = {}


class NoopRuntime(Struct, frozen=True, kw_only=True, tag="noop", tag_field="kind"):
    """Succeed at once without starting a process (benchmarks, smoke tests)."""

    exit_code: NonNegInt = 0


JobRuntime = ProcessRuntime | NoopRuntime


class Constraints(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Hard placement constraints: a node that fails any of these is never a candidate."""

    arch: str = ""
    isolation: Literal["", "process", "sandbox", "container", "vm"] = ""
    labels: dict[str, str] = {}
    handler: str = ""


class Locality(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Soft placement hints: nodes near these score higher."""

    zone: str = ""
    dataset: str = ""


class Timeouts(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Deadlines, in seconds. ``queue`` 0 means the job may wait forever."""

    queue: Annotated[float, Meta(ge=0)] = 0.0
    run: Seconds = 3600.0
    heartbeat: Seconds = 30.0


class JobSpec(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Everything a user declares about one job."""

    runtime: JobRuntime
    name: Annotated[str, Meta(max_length=256)] = ""
    queue: Name = "default"
    tenant: Name = "default"
    priority: Priority = 5
    resources: Resources = Resources()
    constraints: Constraints = Constraints()
    locality: Locality = Locality()
    timeouts: Timeouts = Timeouts()
    concurrency_key: Annotated[str, Meta(max_length=256)] = ""
    concurrency_limit: NonNegInt = 0
    group: Annotated[str, Meta(max_length=256)] = ""
    not_before: Annotated[float, Meta(ge=0)] = 0.0
    metadata: dict[str, str] = {}


class JobError(Struct, frozen=True, kw_only=True):
    """Why an attempt failed: a stable code and a human message."""

    code: str
    message: str


# --- lifecycle events (stream JM_JOBS / JM_DISPATCH) ---------------------------------


class JobSubmitted(Struct, frozen=True, kw_only=True, tag="job.submitted"):
    """A job was accepted; published by the trigger with Nats-Msg-Id = idempotency key."""

    job_id: Id
    partition: NonNegInt
    spec: JobSpec
    idempotency_key: str
    submitted_at: float


class JobReady(Struct, frozen=True, kw_only=True, tag="job.ready"):
    """The scheduler released an attempt; candidates are ranked best first."""

    job_id: Id
    attempt: Annotated[int, Meta(ge=1)]
    partition: NonNegInt
    spec: JobSpec
    candidates: list[str]
    submitted_at: float
    ready_at: float
    release: Annotated[int, Meta(ge=1)] = 1  # counts re-releases of the same attempt
    tiers: list[int] = []  # locality tier of each candidate (lower is nearer); [] = all equal


class JobUnplaceable(Struct, frozen=True, kw_only=True, tag="job.unplaceable"):
    """The binder could not reserve any candidate; the scheduler will hold the job."""

    job_id: Id
    attempt: Annotated[int, Meta(ge=1)]
    partition: NonNegInt
    reason: str
    at: float
    release: Annotated[int, Meta(ge=1)] = 1  # the JobReady.release this answers


class JobBound(Struct, frozen=True, kw_only=True, tag="job.bound"):
    """Resources are reserved on ``node_id``; sent on that node's dispatch subject."""

    job_id: Id
    attempt: Annotated[int, Meta(ge=1)]
    partition: NonNegInt
    node_id: Id
    spec: JobSpec
    scratch_dir: str
    submitted_at: float
    bound_at: float


class JobStarted(Struct, frozen=True, kw_only=True, tag="job.started"):
    """The executor started the attempt."""

    job_id: Id
    attempt: Annotated[int, Meta(ge=1)]
    partition: NonNegInt
    node_id: Id
    at: float


class JobSucceeded(Struct, frozen=True, kw_only=True, tag="job.succeeded"):
    """The attempt ended with exit code 0."""

    job_id: Id
    attempt: Annotated[int, Meta(ge=1)]
    partition: NonNegInt
    node_id: Id
    exit_code: int
    output_tail: str
    submitted_at: float
    started_at: float
    at: float


class JobFailed(Struct, frozen=True, kw_only=True, tag="job.failed"):
    """The attempt ended badly: non-zero exit, timeout, or a runtime error."""

    job_id: Id
    attempt: Annotated[int, Meta(ge=1)]
    partition: NonNegInt
    node_id: str
    exit_code: int | None
    error: JobError
    output_tail: str
    submitted_at: float
    started_at: float
    at: float


class JobExpired(Struct, frozen=True, kw_only=True, tag="job.expired"):
    """The job was not started before its queue timeout."""

    job_id: Id
    attempt: NonNegInt
    partition: NonNegInt
    reason: str
    at: float


class JobLost(Struct, frozen=True, kw_only=True, tag="job.lost"):
    """The attempt's heartbeats stopped; its node is presumed gone."""

    job_id: Id
    attempt: Annotated[int, Meta(ge=1)]
    partition: NonNegInt
    node_id: str
    at: float


class LogLine(Struct, frozen=True, kw_only=True, tag="job.log"):
    """One line of an attempt's output (stream JM_LOGS)."""

    job_id: Id
    attempt: Annotated[int, Meta(ge=1)]
    stream: Literal["stdout", "stderr"]
    line: str
    at: float


LifecycleEvent = (
    JobSubmitted | JobReady | JobUnplaceable | JobBound | JobStarted | JobSucceeded
    | JobFailed | JobExpired | JobLost
)
TerminalEvent = JobSucceeded | JobFailed | JobExpired | JobLost

# Validation happens at decode time; this encoder is shared because it is stateless.
encoder = msgspec.json.Encoder()
