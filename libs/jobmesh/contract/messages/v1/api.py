"""Request/reply API messages: submit (trigger), queries and watch (tracker), health."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

from jobmesh.contract.messages.v1.config import PartitionStats
from jobmesh.contract.messages.v1.jobs import JobError, JobSpec, ParentRef, Resources
from jobmesh.contract.messages.v1.nodes import NodeInfo
from jobmesh.contract.messages.v1.triggers import JobOrigin
from jobmesh.errors import JobmeshError

__all__ = [
    "TERMINAL_STATES",
    "AttemptView",
    "CancelReply",
    "CancelRequest",
    "ErrorReply",
    "EventView",
    "ExplainReply",
    "ExplainRequest",
    "HealthReply",
    "JobGetRequest",
    "JobListReply",
    "JobListRequest",
    "JobState",
    "JobSummary",
    "JobUpdate",
    "JobView",
    "NodeView",
    "NodesReply",
    "NodesRequest",
    "QueuesReply",
    "QueuesRequest",
    "Submission",
    "SubmitReply",
    "SubmitRequest",
]

JobState = Literal[
    "queued",
    "waiting",
    "ready",
    "bound",
    "running",
    "succeeded",
    "failed",
    "expired",
    "lost",
    "retrying",
    "cancelled",
]
# The states a job can end in. Whether it has ended is ``final`` on the views: after a
# failed or lost attempt the job shows that state until the scheduler decides (retrying,
# or gave up, which makes it final).
TERMINAL_STATES = frozenset({"succeeded", "failed", "expired", "lost", "cancelled"})


class Submission(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """One job to submit; the same idempotency key always yields the same job id."""

    spec: JobSpec
    idempotency_key: Annotated[str, Meta(max_length=256)] = ""
    # Set by an executor for a job a workflow step's handler submits (``ctx.submit``): the
    # steps that need that step wait for this job too.
    parent: ParentRef | None = None


class SubmitRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.submit"
):
    """Submit one or more jobs; the reply comes only after every PubAck."""

    jobs: Annotated[list[Submission], Meta(min_length=1, max_length=1000)]


class SubmitReply(Struct, frozen=True, kw_only=True, tag="api.submitted"):
    """Job ids in request order; ``duplicates[i]`` is true when job i was already known."""

    job_ids: list[str]
    duplicates: list[bool]


class ErrorReply(Struct, frozen=True, kw_only=True, tag="api.error"):
    """Any API failure: a stable code, a message, and the offending field when known."""

    code: str
    message: str
    field: str = ""
    retryable: bool = False

    @classmethod
    def of(cls, error: JobmeshError) -> ErrorReply:
        """The reply that carries ``error`` (its code, message, field and retryable flag)."""
        return cls(code=error.code, message=str(error), field=error.field or "", retryable=error.retryable)

    def error(self) -> JobmeshError:
        """The error this reply describes, as the class that owns its code."""
        return JobmeshError.from_wire(self.code, self.message, self.field, self.retryable)


class JobGetRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.jobs.get"
):
    """Ask the tracker for one job with its attempts and events."""

    job_id: str


class JobListRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.jobs.list"
):
    """Ask the tracker for recent jobs, newest first."""

    limit: Annotated[int, Meta(ge=1, le=5_000)] = 50
    state: JobState | Literal[""] = ""  # "" for every state
    queue: str = ""
    states: list[JobState] = []  # any of these; wins over ``state`` when given
    workflow: str = ""  # only the jobs of this workflow run, in submission order
    # With ``workflow``: skip this many (a large run is read in pages, as one reply of
    # 20,000 rows would not fit in a message).
    offset: Annotated[int, Meta(ge=0)] = 0


class AttemptView(Struct, frozen=True, kw_only=True):
    """One attempt as recorded by the tracker."""

    attempt: int
    state: JobState
    node_id: str = ""
    exit_code: int | None = None
    error: JobError | None = None
    output_tail: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    reason: str = ""
    result: str = ""  # the result, when it travelled inline
    result_ref: str = ""  # else its object in jm_results (``jobmesh result ID``)
    result_bytes: int = 0


class EventView(Struct, frozen=True, kw_only=True):
    """One recorded lifecycle event."""

    kind: str
    attempt: int
    at: float
    detail: str = ""


class JobView(Struct, frozen=True, kw_only=True, tag="api.job"):
    """Everything the tracker knows about one job."""

    job_id: str
    name: str
    queue: str
    tenant: str
    state: JobState
    reason: str
    attempt: int
    node_id: str
    submitted_at: float
    updated_at: float
    spec: JobSpec
    attempts: list[AttemptView] = []
    events: list[EventView] = []
    final: bool = False  # the job has ended for good: nothing about it changes any more
    partition: int = -1  # its scheduler partition (where to explain or cancel it); -1 unknown
    fallback_job_id: str = ""  # the job that ran in its place
    fallback_of: str = ""  # the job this one ran in place of
    origin: JobOrigin | None = None  # the trigger rule and event that started it (None: a plain submit)


class JobSummary(Struct, frozen=True, kw_only=True):
    """One row of ``jobmesh list``."""

    job_id: str
    name: str
    queue: str
    tenant: str
    state: JobState
    attempt: int
    node_id: str
    exit_code: int | None
    submitted_at: float
    updated_at: float
    final: bool = False
    reason: str = ""
    step: str = ""  # its workflow step, if it is one
    index: int = -1  # a mapped item's position in its list
    skipped: bool = False  # cancelled because a dependency ended as it did not need


class JobListReply(Struct, frozen=True, kw_only=True, tag="api.jobs"):
    """Reply to ``JobListRequest``."""

    jobs: list[JobSummary]


class JobUpdate(Struct, frozen=True, kw_only=True, tag="api.job.update"):
    """Announced on ``jobmesh.v1.watch.<job_id>`` after the tracker commits a change."""

    job_id: str
    state: JobState
    attempt: int
    node_id: str = ""
    exit_code: int | None = None
    reason: str = ""
    at: float = 0.0
    final: bool = False


class HealthReply(Struct, frozen=True, kw_only=True, tag="health"):
    """Answer to a health check."""

    service: str
    instance: str
    ok: bool
    detail: str = ""


class ExplainRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.scheduler.explain"
):
    """Ask the owner of a job's partition why the job is not running yet."""

    job_id: str


class CancelRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.scheduler.cancel"
):
    """Ask the owner of a job's partition to cancel it (``scheduler.<p>.cancel``)."""

    job_id: str
    reason: Annotated[str, Meta(max_length=1000)] = ""


class CancelReply(Struct, frozen=True, kw_only=True, tag="api.scheduler.cancelled"):
    """``state``: ``cancelled`` (it had not started: it ended now), ``cancelling`` (its
    attempt is being stopped; it ends cancelled within a second or so), or ``unknown``
    (this scheduler holds no such job: it has ended, or was never submitted)."""

    job_id: str
    state: Literal["cancelled", "cancelling", "unknown"]
    message: str


class ExplainReply(Struct, frozen=True, kw_only=True, tag="api.scheduler.explained"):
    """``where``: ready, timer, group, key, parked, room, released; "" when not held."""

    job_id: str
    where: str
    reason: str


class QueuesRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.queues"
):
    """Ask every scheduler for the depth of the queues in the partitions it owns."""


class QueuesReply(Struct, frozen=True, kw_only=True, tag="api.queues.reply"):
    """One scheduler's answer; ``partitions`` is the cluster's total partition count."""

    instance: str
    partitions: int
    owned: list[PartitionStats]


class NodesRequest(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.nodes"):
    """Ask the binder for every node with its capacity and allocation."""


class NodeView(Struct, frozen=True, kw_only=True):
    """A node as the binder sees it."""

    node: NodeInfo
    alive: bool
    allocated: Resources
    reservations: int


class NodesReply(Struct, frozen=True, kw_only=True, tag="api.nodes.reply"):
    """Reply to ``NodesRequest``."""

    nodes: list[NodeView]
