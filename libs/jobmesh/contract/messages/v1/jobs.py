"""The job model and its lifecycle events.

A ``JobSpec`` is what a user declares. Lifecycle events are tagged, frozen structs with a
``type`` field on the wire; ``LifecycleEvent`` is their union, decoded with one typed
decoder per consumer.
"""

from __future__ import annotations

import typing
from typing import Annotated, Literal

from msgspec import Meta, Struct

__all__ = [
    "FAILURE_CODES",
    "AttemptEvent",
    "Constraints",
    "FailureCode",
    "JobBound",
    "JobError",
    "JobEvent",
    "JobExpired",
    "JobFailed",
    "JobLost",
    "JobReady",
    "JobRuntime",
    "JobSpec",
    "JobStarted",
    "JobSubmitted",
    "JobSucceeded",
    "JobUnplaceable",
    "LifecycleEvent",
    "Locality",
    "LogLine",
    "NoopRuntime",
    "Priority",
    "ProcessRuntime",
    "Resources",
    "TerminalEvent",
    "Timeouts",
]

NonNegInt = Annotated[int, Meta(ge=0)]
Name = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
Priority = Annotated[int, Meta(ge=0, le=9)]
Seconds = Annotated[float, Meta(gt=0)]
# Subject tokens may not contain dots or wildcards, so ids are restricted to this set.
Id = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
AttemptNumber = Annotated[int, Meta(ge=1)]

# Why an attempt failed (``JobError.code``). Producers are typed against this literal and
# retry policies are checked against it; the wire field itself stays a plain string, so
# that a reader of an older v1 accepts a code added later (additive evolution).
FailureCode = Literal[
    "exit_code",  # the process exited non-zero or was killed by a signal
    "timeout",  # it ran longer than its run timeout
    "spawn_failed",  # the command could not be started (not found, not executable)
    "workdir_failed",  # the attempt's working directory could not be created
    "node_drained",  # the executor stopped before the attempt finished
    "executor_error",  # the executor failed while running it (a bug)
    "disk_quota_exceeded",  # the scratch directory outgrew the disk the job reserved
]
FAILURE_CODES: frozenset[str] = frozenset(typing.get_args(FailureCode))


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
    labels: dict[str, str] = {}  # checked by contract.validation.label_problem
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
    """Why an attempt failed: a stable code (a :data:`FailureCode`) and a human message."""

    code: str
    message: str


# --- lifecycle events (stream JM_JOBS / JM_DISPATCH) ---------------------------------


class JobEvent(Struct, frozen=True, kw_only=True):
    """What every lifecycle event carries: the job and its scheduler partition."""

    job_id: Id
    partition: NonNegInt


class AttemptEvent(JobEvent, frozen=True, kw_only=True):
    """What every event about one attempt carries besides: the attempt number, which
    fences off events of a stale attempt."""

    attempt: AttemptNumber


class JobSubmitted(JobEvent, frozen=True, kw_only=True, tag="job.submitted"):
    """A job was accepted; published by the trigger with Nats-Msg-Id = idempotency key."""

    spec: JobSpec
    idempotency_key: str
    submitted_at: float


class JobReady(AttemptEvent, frozen=True, kw_only=True, tag="job.ready"):
    """The scheduler released an attempt; candidates are ranked best first."""

    spec: JobSpec
    candidates: list[str]
    submitted_at: float
    ready_at: float
    release: Annotated[int, Meta(ge=1)] = 1  # counts re-releases of the same attempt
    tiers: list[int] = []  # locality tier of each candidate (lower is nearer); [] = all equal


class JobUnplaceable(AttemptEvent, frozen=True, kw_only=True, tag="job.unplaceable"):
    """The binder could not reserve any candidate; the scheduler will hold the job."""

    reason: str
    at: float
    release: Annotated[int, Meta(ge=1)] = 1  # the JobReady.release this answers


class JobBound(AttemptEvent, frozen=True, kw_only=True, tag="job.bound"):
    """Resources are reserved on ``node_id``; sent on that node's dispatch subject."""

    node_id: Id
    spec: JobSpec
    scratch_dir: str
    submitted_at: float
    bound_at: float


class JobStarted(AttemptEvent, frozen=True, kw_only=True, tag="job.started"):
    """The executor started the attempt."""

    node_id: Id
    at: float


class JobSucceeded(AttemptEvent, frozen=True, kw_only=True, tag="job.succeeded"):
    """The attempt ended with exit code 0."""

    node_id: Id
    exit_code: int
    output_tail: str
    submitted_at: float
    started_at: float
    at: float


class JobFailed(AttemptEvent, frozen=True, kw_only=True, tag="job.failed"):
    """The attempt ended badly: non-zero exit, timeout, or a runtime error."""

    node_id: str
    exit_code: int | None
    error: JobError
    output_tail: str
    submitted_at: float
    started_at: float
    at: float


class JobExpired(JobEvent, frozen=True, kw_only=True, tag="job.expired"):
    """The job was not started before its queue timeout."""

    attempt: NonNegInt  # 0 when the job expired before any attempt was released
    reason: str
    at: float


class JobLost(AttemptEvent, frozen=True, kw_only=True, tag="job.lost"):
    """The attempt's heartbeats stopped; its node is presumed gone."""

    node_id: str
    at: float


class LogLine(Struct, frozen=True, kw_only=True, tag="job.log"):
    """One line of an attempt's output (stream JM_LOGS)."""

    job_id: Id
    attempt: AttemptNumber
    stream: Literal["stdout", "stderr"]
    line: str
    at: float


LifecycleEvent = (
    JobSubmitted | JobReady | JobUnplaceable | JobBound | JobStarted | JobSucceeded | JobFailed | JobExpired | JobLost
)
TerminalEvent = JobSucceeded | JobFailed | JobExpired | JobLost
